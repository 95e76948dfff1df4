"""The `llama-demo` job: every stage runs end to end with tiny settings, writes its report and
plots, is reused by a second run, and a run killed in the middle of a stage finishes on rerun
without redoing the stages it had finished."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from llama3.demo import STAGES
from llama3.demo import main as demo_main
from llama_kernels import bf16_is_fast

# Tiny settings: the real standard-library corpus (first 150 files), a few steps per stage.
TINY = [
    "--max-documents", "150", "--steps", "3", "--batch-size", "2", "--seq-len", "64",
    "--functions", "30", "--sft-steps", "2", "--rm-steps", "2", "--dpo-steps", "2", "--k", "2",
    "--max-answer-tokens", "4", "--no-progress",
]  # fmt: skip


def test_llama_demo_help_names_the_command_and_its_stages(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`llama-demo --help` exits 0 and lists the options and every stage `--until` takes."""
    with pytest.raises(SystemExit) as exit_info:
        demo_main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: llama-demo") and "--steps" in out and "--fresh" in out, out
    for stage in STAGES:
        assert stage.name in out, out


def test_llama_demo_refuses_bad_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A bad value is named and nothing runs."""
    assert demo_main(["--out", str(tmp_path / "o"), "--steps", "0"]) == 2
    assert "--steps must be at least 1, got 0" in capsys.readouterr().err
    assert demo_main(["--out", str(tmp_path / "o"), "--corpus", str(tmp_path / "nope")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_llama_demo_runs_every_stage_writes_its_report_and_reuses_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every stage prints its figure; report.md and the three plots exist; a second run reuses
    every stage; --until stops early; changing one stage's option reruns it and what follows;
    --no-progress shows no progress bar."""
    out = tmp_path / "out"
    assert demo_main(["--out", str(out), *TINY]) == 0
    printed, errors = capsys.readouterr()
    assert "rejection sampling" not in errors and "%|" not in errors, errors  # --no-progress
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = "bfloat16" if bf16_is_fast(device) else "float32"
    for n, expected in enumerate(
        [
            "curate: 150 docstring documents",
            "shards: ",
            f"pretrain: 3 steps of 2x64 tokens ({dtype} compute): loss ",
            "sft: task from the standard library's docstrings: 24 functions to train on, 6 held",
            "rm: reward model on 24 ranked rows",
            "sample: K=2 answers to each of 6 held-out questions (12 samples",
            "dpo: DPO on 48 pairs",
            "fp8: 6 FFN projections in FP8",
            "serve: FP8 model behind the OpenAI-compatible server (http://127.0.0.1:",
        ],
        start=1,
    ):
        assert f"[{n}/9] {expected}" in printed, printed
    assert "reused" not in printed
    figure = (
        r"loss \d+\.\d\d -> \d+\.\d\d \(mean of the first/last 1\); held-out \d+\.\d\d vs unigram"
    )
    assert re.search(figure, printed), printed
    results = {s.name: json.loads((out / "stages" / f"{s.name}.json").read_text()) for s in STAGES}
    pretrain = results["pretrain"]["results"]
    assert 0 < pretrain["unigram_entropy"] < pretrain["first_loss"]  # a random model is worse
    fp8 = results["fp8"]["results"]
    assert 0 <= fp8["kl"] < 1e-2 and fp8["top1"] > 0.9, fp8
    assert (out / "fp8" / "model" / "config.json").is_file()
    serve = results["serve"]["results"]
    assert serve["question"].startswith("What does `") and serve["true_answer"]
    report = (out / "report.md").read_text()
    for stage in STAGES:
        assert f"| {stage.name} |" in report, report
    for png in ("pretraining_loss.png", "reward_model_accuracy.png", "dpo_margins.png"):
        data = (out / "plots" / png).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000, png
        assert f"plots/{png}" in report

    # A second run reuses every stage; one with more DPO steps reruns DPO and what follows only.
    assert demo_main(["--out", str(out), *TINY]) == 0
    assert capsys.readouterr().out.count("(reused from an earlier run)") == 9
    more_dpo = [*TINY, "--dpo-steps", "3", "--until", "fp8"]
    assert demo_main(["--out", str(out), *more_dpo]) == 0
    printed = capsys.readouterr().out
    assert printed.count("(reused from an earlier run)") == 6, printed
    assert "[7/9] dpo (§4.1.4) ..." in printed and "[8/9] fp8 (§6.2) ..." in printed
    assert "[9/9]" not in printed


@pytest.mark.slow
def test_llama_demo_killed_mid_stage_finishes_on_rerun_without_redoing_stages(
    tmp_path: Path,
) -> None:
    """SIGKILL to the demo's process group while SFT trains; the rerun reuses curation, shards
    and pretraining, and finishes every stage."""
    out = tmp_path / "out"
    command = [sys.executable, "-m", "llama3.demo", "--out", str(out), *TINY]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log = (tmp_path / "first.log").open("w")
    process = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 300
        while "[4/9] sft (§4.1.3) ..." not in (tmp_path / "first.log").read_text():
            assert process.poll() is None, (tmp_path / "first.log").read_text()
            assert time.monotonic() < deadline, "the demo did not reach SFT in 300 s"
            time.sleep(0.2)
        time.sleep(2.0)  # inside the stage: loading the pretrained model or training
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        log.close()
    assert process.returncode == -signal.SIGKILL
    assert not (out / "stages" / "sft.json").exists()  # the stage had not finished

    rerun = subprocess.run(
        command, capture_output=True, text=True, env=env, timeout=600, check=False
    )
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    for n, stage in enumerate(["curate", "shards", "pretrain"], start=1):
        assert f"[{n}/9] {stage}: " in rerun.stdout
    assert rerun.stdout.count("(reused from an earlier run)") == 3, rerun.stdout
    assert "[9/9] serve: FP8 model behind" in rerun.stdout
    assert (out / "report.md").is_file()
