"""Stages as a user runs them (`llama-align <stage> --config ...`): published output directories,
skipped when complete, exact resume after SIGKILL, clear errors for bad configs and rows."""

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

FAST = ["train.progress=false", "train.tensorboard=false", 'train.dtype="float32"']


def _sft_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "sft", f'model="{model}"', f'data=["{data}"]', f'out="{out}"', "max_tokens=64",
        "train.steps=4", "train.batch_size=2", "train.micro_batch_size=2", "train.lr=1e-3",
        *FAST, *extra,
    ]  # fmt: skip


def test_sft_stage_publishes_a_loadable_model_and_is_skipped_when_done(
    tmp_path: Path,
    tiny_checkpoint: Path,
    jsonl: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`llama-align sft` writes out/model (a checkpoint load_checkpoint reads) and stage.json with
    the data report and losses; a second run finds it complete and does nothing."""
    out = tmp_path / "sft"
    assert main(_sft_args(tiny_checkpoint, jsonl["sft"], out)) == 0
    record = json.loads((out / STAGE_FILE).read_text())
    assert record["stage"] == "sft" and record["results"]["data"]["used"] == 8
    assert record["results"]["last_loss"] < record["results"]["first_loss"]
    load_checkpoint(out / MODEL_DIR)
    assert not (tmp_path / ".sft.work").exists()  # published by rename
    stamp = (out / STAGE_FILE).stat().st_mtime_ns
    assert main(_sft_args(tiny_checkpoint, jsonl["sft"], out)) == 0
    assert (out / STAGE_FILE).stat().st_mtime_ns == stamp


def test_a_bad_config_names_the_key(capsys: pytest.CaptureFixture[str]) -> None:
    """An unknown key and a missing one each get a line; exit code 2."""
    assert main(["dpo", 'model="m"', 'out="o"', 'data=["d"]', "betta=0.2"]) == 2
    err = capsys.readouterr().err
    assert "betta: unknown key; did you mean 'beta'?" in err


def test_bad_rows_are_counted_with_their_place(
    tmp_path: Path, tiny_checkpoint: Path, jsonl: dict[str, Path]
) -> None:
    """A broken line and a row without an assistant answer are dropped and reported as file:line."""
    data = tmp_path / "mixed.jsonl"
    good = jsonl["sft"].read_text().splitlines()
    bad = ['{"messages": [{"role": "user", "content": "no answer"}]}', "{not json"]
    data.write_text("\n".join([*good, *bad]) + "\n")
    out = tmp_path / "sft"
    assert main(_sft_args(tiny_checkpoint, data, out)) == 0
    report = json.loads((out / STAGE_FILE).read_text())["results"]["data"]
    assert report["used"] == 8
    assert report["dropped"] == {
        "invalid: row: the last message must be the assistant's (what SFT learns), got 'user'": 1,
        "not JSON": 1,
    }
    assert any(f"{data}:10" in e for e in report["examples"]["not JSON"])


@pytest.mark.slow
def test_sigkill_mid_training_resumes_exactly(
    tmp_path: Path, tiny_checkpoint: Path, jsonl: dict[str, Path]
) -> None:
    """SFT killed with SIGKILL after its second checkpoint and rerun gives the uninterrupted run's
    losses, bit for bit, and each step logged once."""
    steps = ["train.steps=6", "train.checkpoint_every=1"]
    straight = tmp_path / "straight"  # a fresh process too: global torch settings that earlier
    # tests of this pytest process may have changed (matmul precision, threads) cannot differ
    cli = [sys.executable, "-m", "llama_align.cli"]
    uninterrupted = [*cli, *_sft_args(tiny_checkpoint, jsonl["sft"], straight), *steps]
    subprocess.run(uninterrupted, check=True, capture_output=True, timeout=600)
    expected = [
        json.loads(x)["loss"] for x in (straight / "metrics.jsonl").read_text().splitlines()
    ]

    out = tmp_path / "killed"
    command = [
        sys.executable,
        "-m",
        "llama_align.cli",
        *_sft_args(tiny_checkpoint, jsonl["sft"], out),
        *steps,
    ]
    process = subprocess.Popen(
        command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    state = tmp_path / ".killed.work" / "checkpoint" / "state.json"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if state.is_file() and json.loads(state.read_text())["step"] >= 2:
            break
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be killed"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (out / STAGE_FILE).exists()
    subprocess.run(command, check=True, capture_output=True, timeout=600)  # resumes
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(6))
    assert [r["loss"] for r in records] == expected


def test_lora_sft_and_adapters_off_dpo_export_merged_models(
    tmp_path: Path, tiny_checkpoint: Path, jsonl: dict[str, Path]
) -> None:
    """SFT with a [lora] section, then DPO with LoRA and reference="adapters-off": each exports a
    plain merged Llama that differs from its start only in the adapted matrices."""
    lora = ['lora={r=4, alpha=8, target_modules=["wq", "wv"]}']
    sft = tmp_path / "sft"
    assert main([*_sft_args(tiny_checkpoint, jsonl["sft"], sft), *lora]) == 0
    base = load_checkpoint(tiny_checkpoint).state_dict()
    tuned = load_checkpoint(sft / MODEL_DIR).state_dict()
    changed = {k for k in base if not base[k].equal(tuned[k])}
    assert changed and all(k.endswith(("wq.weight", "wv.weight")) for k in changed)

    dpo = tmp_path / "dpo"
    args = [
        "dpo", f'model="{sft / MODEL_DIR}"', f'data=["{jsonl["preferences"]}"]',
        f'heldout=["{jsonl["preferences"]}"]', f'out="{dpo}"', "max_tokens=64",
        'reference="adapters-off"', "train.steps=3", "train.batch_size=4",
        "train.micro_batch_size=2", "train.lr=1e-3", *FAST, *lora,
    ]  # fmt: skip
    assert main(args) == 0
    results = json.loads((dpo / STAGE_FILE).read_text())["results"]
    assert results["heldout_accuracy_before"] == 0.0  # adapters start at zero: ties
    assert results["heldout_margin"] > results["heldout_margin_before"]
    after = load_checkpoint(dpo / MODEL_DIR).state_dict()
    changed = {k for k in tuned if not tuned[k].equal(after[k])}
    assert changed and all(k.endswith(("wq.weight", "wv.weight")) for k in changed)
