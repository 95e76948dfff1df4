"""Worker: build_mesh gives the documented 5-D mesh and flattened groups (run with 4 processes)."""

from __future__ import annotations

import _common

from llama_train.parallel import ParallelDims, build_mesh

rank, world = _common.init()
mesh = build_mesh(ParallelDims(cp=2), world, "cpu")  # pp=1, dp_replicate=1, dp_shard=2, cp=2, tp=1
world_mesh = mesh.world
assert world_mesh.mesh_dim_names == ("pp", "dp_replicate", "dp_shard", "cp", "tp")
assert tuple(world_mesh.shape) == (1, 1, 2, 2, 1), world_mesh.shape
assert mesh["dp"].size() == 2 and mesh["dp_shard_cp"].size() == 4 and mesh["dp_cp"].size() == 4
# cp is inside dp_shard: ranks 0,1 form one cp group and see the same data-parallel index.
assert mesh["cp"].get_local_rank() == rank % 2
assert mesh["dp"].get_local_rank() == rank // 2
assert mesh["fsdp"] is mesh["dp_shard_cp"]
hsdp = build_mesh(ParallelDims(dp_replicate=2), world, "cpu")  # dp_shard = 2
assert hsdp["fsdp"].mesh_dim_names == ("dp_replicate", "dp_shard_cp")
assert tuple(hsdp["fsdp"].shape) == (2, 2)
assert hsdp["fsdp"]["dp_shard_cp"].get_local_rank() == rank % 2
_common.done(rank, "mesh")
