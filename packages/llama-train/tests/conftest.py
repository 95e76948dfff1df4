"""Shared fixtures: launching small multi-process (gloo, CPU) runs of a worker script with torchrun.

Worker scripts live in `tests/distributed/` (not collected by pytest). Each builds the same tiny model
on every rank, computes the single-process reference itself, runs the parallel version and raises
(non-zero exit) on any mismatch; the test asserts the launch succeeded and shows the workers' output.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

WORKERS = Path(__file__).parent / "distributed"
# The workers' shared helpers (`_common`: tiny configs, shards, overrides) serve the in-process
# tests too: `import _common` works in every test module of this package.
sys.path.insert(0, str(WORKERS))

RunDistributed = Callable[..., subprocess.CompletedProcess[str]]


def _run_distributed(
    script: str, nprocs: int, *args: str, timeout: float = 300.0
) -> subprocess.CompletedProcess[str]:
    """Run `tests/distributed/<script>` on `nprocs` CPU processes under torchrun; fail on error."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={nprocs}", "--tee=3", str(WORKERS / script), *args,
    ]  # fmt: skip
    result = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    if result.returncode != 0:
        pytest.fail(
            f"{script} on {nprocs} processes exited with {result.returncode}\n"
            f"--- stdout ---\n{result.stdout[-6000:]}\n--- stderr ---\n{result.stderr[-6000:]}"
        )
    return result


@pytest.fixture
def run_distributed() -> RunDistributed:
    """`run_distributed(script, nprocs, *args)` → the finished torchrun process (output captured)."""
    return _run_distributed
