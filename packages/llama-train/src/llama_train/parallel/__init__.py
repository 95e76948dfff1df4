"""Parallelism for Llama training on one `DeviceMesh`: FSDP2, tensor, pipeline and context parallel."""

from llama_train.parallel.mesh import MESH_DIMS, ParallelDims, ParallelMesh, build_mesh

__all__ = ["MESH_DIMS", "ParallelDims", "ParallelMesh", "build_mesh"]
