"""ParallelDims validation and the DeviceMesh layout (4 gloo processes)."""

from __future__ import annotations

from collections.abc import Callable
from subprocess import CompletedProcess

import pytest

from llama_train.parallel import ParallelDims

RunDistributed = Callable[..., CompletedProcess[str]]  # the conftest fixture's type


def test_resolve_fills_dp_shard_and_names_bad_products() -> None:
    assert ParallelDims(tp=2, pp=2).resolve(8).dp_shard == 2
    assert ParallelDims(tp=2, dp_replicate=2).resolve(8).dp == 4
    with pytest.raises(
        ValueError, match=r"world size 6 is not divisible by pp·dp_replicate·cp·tp = 4"
    ):
        ParallelDims(tp=2, cp=2).resolve(6)
    with pytest.raises(ValueError, match=r"= 4, but the world size is 8"):
        ParallelDims(dp_shard=2, tp=2).resolve(8)
    with pytest.raises(ValueError, match="dp_shard must be -1"):
        ParallelDims(dp_shard=0)


@pytest.mark.distributed
def test_mesh_layout(run_distributed: RunDistributed) -> None:
    assert "OK mesh" in run_distributed("check_mesh.py", 4).stdout
