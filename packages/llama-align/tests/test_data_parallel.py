"""Two data-parallel processes (accelerate over gloo, CPU) take the same steps as one process on
the same global batch: losses to rtol 1e-6 and weights to 1e-5 (float32; the ranks' gradients are
summed in another order, a few ulps per step, which Adam's normalisation can scale up for tiny
gradients; a rank training alone on its half of the batch differs at 1e-2 from the second step)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "distributed" / "dp_train.py"
HANG_S = 120
"""A worker stuck this long prints every thread's stack and exits (faulthandler, in the script);
the launcher gets 60 s more before its process group is killed. A run takes about 15 s."""


def _launch(command: list[str], env: dict[str, str]) -> tuple[int | None, str]:
    """(exit code, or None when killed as hung; stdout and stderr together)."""
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        output, _ = process.communicate(timeout=HANG_S + 60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the launcher and every worker
        output, _ = process.communicate()
        return None, output
    return process.returncode, output


def _hung(code: int | None, output: str) -> bool:
    return code is None or "Timeout (0:" in output  # faulthandler's header


def _run(out: Path, nprocs: int, kind: str) -> dict[str, object]:
    """Run the script; a launch that hangs (once seen in CI, not reproduced in 6 reruns) is
    retried once with its stacks printed, any other failure fails the test."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", HANG_S=str(HANG_S))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    if nprocs == 1:
        command = [sys.executable, str(SCRIPT), kind, str(out)]
    else:
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={nprocs}", str(SCRIPT), kind, str(out),
        ]  # fmt: skip
    code, output = _launch(command, env)
    if _hung(code, output):
        print(f"{nprocs} processes hung; retrying once. Its output:\n{output[-6000:]}")
        # From scratch: the hung run may have checkpointed every step, and a resumed retry would
        # report no losses at all.
        shutil.rmtree(out, ignore_errors=True)
        code, output = _launch(command, env)
    if code != 0:
        state = "hung again" if _hung(code, output) else f"exit {code}"
        pytest.fail(f"{nprocs} processes: {state}\n{output[-6000:]}")
    payload: dict[str, object] = json.loads((out / f"result-{nprocs}.json").read_text())
    return payload


@pytest.mark.distributed
@pytest.mark.parametrize("kind", ["sft", "rm", "dpo"])
def test_two_processes_equal_one(tmp_path: Path, kind: str) -> None:
    """3 steps, global batch 4: 2 ranks x 2 micro-batches of 1 == 1 rank x 4, for SFT (packed
    rows, token denominator), the reward model (ranked rows, pair denominator) and DPO (pairs
    with precomputed reference log-probs, pair and token denominators)."""
    one = _run(tmp_path / "one", 1, kind)
    two = _run(tmp_path / "two", 2, kind)
    assert two["world"] == 2 and one["world"] == 1
    losses_one, losses_two = one["losses"], two["losses"]
    assert isinstance(losses_one, dict) and isinstance(losses_two, dict)
    assert list(losses_one) == list(losses_two) == ["0", "1", "2"]
    for step in losses_one:
        assert losses_two[step] == pytest.approx(losses_one[step], rel=1e-6)
    weights_one, weights_two = one["weights"], two["weights"]
    assert isinstance(weights_one, dict) and isinstance(weights_two, dict)
    for name, total in weights_one.items():
        assert weights_two[name] == pytest.approx(total, rel=1e-5, abs=1e-4), name
