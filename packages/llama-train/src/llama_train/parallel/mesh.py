"""The parallel layout: how many ways each dimension splits the job, and the `DeviceMesh` for it.

Mesh order, outermost to innermost: ``pp, dp_replicate, dp_shard, cp, tp``. Adjacent ranks share the
fastest links (NVLink inside a node), so the innermost dimension should be the one that talks most:
tensor parallelism communicates inside every layer, twice per block forward, and must stay in a
node; context parallelism all-gathers keys and values once per layer; FSDP gathers weights and
reduce-scatters gradients once per block, overlapped with compute; pipeline parallelism only sends
activations between neighbouring stages, which tolerates the slowest links, so it goes outermost.
This is the order of §3.3.2 of the paper ("[TP, CP, PP, DP]" listed innermost first, with DP
outermost there because their PP stages span nodes too) and of torchtitan; we keep pp outermost
so that a data-parallel replica's stages can sit on different nodes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Self

from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

__all__ = ["MESH_DIMS", "ParallelDims", "ParallelMesh", "build_mesh"]

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")


class ParallelDims(BaseModel):
    """Degrees of each parallelism; their product is the world size.

    dp_shard = -1 means "whatever is left": world_size / (pp · dp_replicate · cp · tp).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    dp_replicate: int = Field(
        default=1, ge=1, description="HSDP replicas (full copies of the sharded model)"
    )
    dp_shard: int = Field(
        default=-1, description="FSDP shards per replica; -1 fills the world size"
    )
    cp: int = Field(
        default=1, ge=1, description="context-parallel ranks (sequence split, K/V gathered)"
    )
    tp: int = Field(
        default=1, ge=1, description="tensor-parallel ranks (heads and FFN columns split)"
    )
    pp: int = Field(default=1, ge=1, description="pipeline stages' ranks")

    @model_validator(mode="after")
    def _check_dp_shard(self) -> Self:
        if self.dp_shard == 0 or self.dp_shard < -1:
            raise ValueError(f"dp_shard must be -1 (fill) or >= 1, got {self.dp_shard}")
        return self

    def resolve(self, world_size: int) -> ParallelDims:
        """These dims with dp_shard filled in; raises if they do not multiply to `world_size`."""
        others = self.dp_replicate * self.cp * self.tp * self.pp
        dp_shard = self.dp_shard
        if dp_shard == -1:
            if world_size % others:
                raise ValueError(
                    f"world size {world_size} is not divisible by pp·dp_replicate·cp·tp = {others}; "
                    "change the parallel degrees or the number of processes"
                )
            dp_shard = world_size // others
        if others * dp_shard != world_size:
            raise ValueError(
                f"pp={self.pp} · dp_replicate={self.dp_replicate} · dp_shard={dp_shard} · "
                f"cp={self.cp} · tp={self.tp} = {others * dp_shard}, but the world size is "
                f"{world_size}; set dp_shard = -1 or change the degrees"
            )
        return self.model_copy(update={"dp_shard": dp_shard})

    @property
    def dp(self) -> int:
        """Data-parallel degree (ranks that see different batches): dp_replicate · dp_shard."""
        if self.dp_shard == -1:
            raise ValueError("call resolve(world_size) first: dp_shard is -1")
        return self.dp_replicate * self.dp_shard

    def sizes(self) -> tuple[int, ...]:
        """Sizes in `MESH_DIMS` order."""
        return (self.pp, self.dp_replicate, self.dp_shard, self.cp, self.tp)


@dataclass(frozen=True)
class ParallelMesh:
    """The 5-D `world` mesh named `MESH_DIMS` and its flattened views; ``mesh[name]`` gives any of
    them by name:

    - ``pp``, ``dp_replicate``, ``dp_shard``, ``cp``, ``tp``: the 1-D slices of `world`;
    - ``dp`` (dp_replicate × dp_shard): ranks that read different data;
    - ``dp_shard_cp`` (dp_shard × cp): the FSDP sharding group (CP ranks shard weights too);
    - ``dp_cp`` (dp_replicate × dp_shard × cp): ranks whose losses and gradients are summed;
    - ``fsdp``: the mesh FSDP2 shards over: ``dp_shard_cp``, or 2-D (dp_replicate, dp_shard_cp)
      for HSDP when dp_replicate > 1.
    """

    world: DeviceMesh
    flattened: Mapping[str, DeviceMesh]

    def __getitem__(self, name: str) -> DeviceMesh:
        if name in self.flattened:
            return self.flattened[name]
        if name not in MESH_DIMS:
            raise KeyError(
                f"no mesh dimension {name!r}; have {', '.join((*MESH_DIMS, *self.flattened))}"
            )
        return self.world[name]


def build_mesh(dims: ParallelDims, world_size: int, device_type: str) -> ParallelMesh:
    """The mesh for `dims` (see `ParallelMesh`); needs an initialised default process group of
    `world_size` ranks. Every rank must call it (it creates process groups)."""
    resolved = dims.resolve(world_size)
    world = init_device_mesh(device_type, resolved.sizes(), mesh_dim_names=MESH_DIMS)
    flattened = {
        "dp": world["dp_replicate", "dp_shard"]._flatten("dp"),
        "dp_shard_cp": world["dp_shard", "cp"]._flatten("dp_shard_cp"),
        "dp_cp": world["dp_replicate", "dp_shard", "cp"]._flatten("dp_cp"),
    }
    if resolved.dp_replicate > 1:
        flattened["fsdp"] = flattened["dp_cp"]._unflatten(
            0,
            (resolved.dp_replicate, resolved.dp_shard * resolved.cp),
            ("dp_replicate", "dp_shard_cp"),
        )
    else:
        flattened["fsdp"] = flattened["dp_shard_cp"]
    return ParallelMesh(world=world, flattened=MappingProxyType(flattened))
