"""`llama-align round`: RM -> rejection sampling -> SFT -> DPO per seed -> average, each stage
published in its own directory and skipped once complete, so a killed round restarts at the
unfinished stage."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llama_align.cli import main
from llama_align.stages import MODEL_DIR, STAGE_FILE
from llama_model import load_checkpoint

TRAIN = (
    'progress=false, tensorboard=false, dtype="float32", batch_size=2, micro_batch_size=2, lr=1e-3'
)
STAGES = ("rm", "sample", "sft", "dpo-0", "dpo-1", "average")


def _round_toml(tmp_path: Path, model: Path, jsonl: dict[str, Path], *, dpo_steps: int = 2) -> Path:
    path = tmp_path / "round.toml"
    path.write_text(
        f"""
policy = "{model}"
preferences = ["{jsonl["preferences"]}"]
heldout = ["{jsonl["preferences"]}"]
prompts = ["{jsonl["prompts"]}"]
sft_data = ["{jsonl["sft"]}"]
out = "{tmp_path / "round"}"
dpo_seeds = [0, 1]

[rm]
max_tokens = 128
train = {{ steps = 2, {TRAIN} }}

[sample]
k = 2
max_tokens = 4
top_p = 1.0
prompts_per_batch = 4

[sft]
max_tokens = 64
train = {{ steps = 2, {TRAIN} }}

[dpo]
max_tokens = 64
train = {{ steps = {dpo_steps}, checkpoint_every = 1, {TRAIN} }}
"""
    )
    return path


def test_round_runs_every_stage_and_redoes_only_what_is_missing(
    tmp_path: Path, tiny_checkpoint: Path, jsonl: dict[str, Path]
) -> None:
    """A round publishes rm/, sample/, sft/, dpo-0/, dpo-1/ and average/ (whose model is the
    mean of the two DPO models); with average/ removed, a rerun redoes only the average."""
    config = _round_toml(tmp_path, tiny_checkpoint, jsonl)
    assert main(["round", "--config", str(config)]) == 0
    out = tmp_path / "round"
    for stage in STAGES:
        assert (out / stage / STAGE_FILE).is_file(), stage
    record = json.loads((out / STAGE_FILE).read_text())
    assert set(record["results"]) == {"rm", "sample", "sft", "dpo-0", "dpo-1"}
    assert record["results"]["sample"]["sampling"]["prompts"] == 4
    sft = json.loads((out / "sft" / STAGE_FILE).read_text())["results"]
    assert sft["data"]["used"] == 8 + record["results"]["sample"]["sampling"]["kept"]
    a, b = (load_checkpoint(out / f"dpo-{s}" / MODEL_DIR).state_dict() for s in (0, 1))
    mean = load_checkpoint(out / "average" / MODEL_DIR).state_dict()
    name = "layers.0.attention.wq.weight"
    assert not a[name].equal(b[name])  # the seeds made different runs
    assert mean[name].equal(((a[name].double() + b[name].double()) / 2).float())

    stamps = {s: (out / s / STAGE_FILE).stat().st_mtime_ns for s in STAGES[:-1]}
    for path in (out / "average").rglob("*"):
        if path.is_file():
            path.unlink()
    for path in sorted((out / "average").rglob("*"), reverse=True):
        path.rmdir()
    (out / "average").rmdir()
    (out / STAGE_FILE).unlink()
    assert main(["round", "--config", str(config)]) == 0
    assert (out / "average" / STAGE_FILE).is_file()
    assert {s: (out / s / STAGE_FILE).stat().st_mtime_ns for s in STAGES[:-1]} == stamps


@pytest.mark.slow
def test_a_round_killed_during_dpo_restarts_there(
    tmp_path: Path, tiny_checkpoint: Path, jsonl: dict[str, Path]
) -> None:
    """SIGKILL while the first DPO run trains; the rerun keeps rm/, sample/ and sft/ as they were
    and resumes DPO from its checkpoint."""
    config = _round_toml(tmp_path, tiny_checkpoint, jsonl, dpo_steps=40)
    out = tmp_path / "round"
    command = [sys.executable, "-m", "llama_align.cli", "round", "--config", str(config)]
    process = subprocess.Popen(
        command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    state = out / ".dpo-0.work" / "checkpoint" / "state.json"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if state.is_file() and json.loads(state.read_text())["step"] >= 2:
            break
        time.sleep(0.05)
    assert process.poll() is None, "the round ended before it could be killed"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    done = {s: (out / s / STAGE_FILE).stat().st_mtime_ns for s in ("rm", "sample", "sft")}
    assert not (out / "dpo-0" / STAGE_FILE).exists()
    assert main(["round", "--config", str(config)]) == 0
    assert {s: (out / s / STAGE_FILE).stat().st_mtime_ns for s in done} == done
    lines = (out / "dpo-0" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(40))
