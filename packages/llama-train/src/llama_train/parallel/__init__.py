"""Parallelism for Llama training on one `DeviceMesh`: FSDP2, tensor, pipeline and context parallel.

The building blocks live in their modules (`tensor_parallel`, `context_parallel`, `pipeline`);
`llama_train.parallel.compose.parallelize` composes them in torchtitan's order.
"""

from llama_train.parallel.context_parallel import (
    ContextParallelAttention,
    load_balanced_index,
    shard_batch,
)
from llama_train.parallel.mesh import MESH_DIMS, ParallelDims, ParallelMesh, build_mesh
from llama_train.parallel.pipeline import Pipeline, build_pipeline, split_llama
from llama_train.parallel.tensor_parallel import apply_tensor_parallel, check_tensor_parallel_config

__all__ = [
    "MESH_DIMS",
    "ContextParallelAttention",
    "ParallelDims",
    "ParallelMesh",
    "Pipeline",
    "apply_tensor_parallel",
    "build_mesh",
    "build_pipeline",
    "check_tensor_parallel_config",
    "load_balanced_index",
    "shard_batch",
    "split_llama",
]
