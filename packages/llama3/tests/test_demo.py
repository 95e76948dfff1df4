"""The `llama-demo` job: every stage runs, on a small source tree and a few training steps."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llama3.demo import main as demo_main
from llama_kernels import bf16_is_fast


def test_llama_demo_help_names_the_command(capsys: pytest.CaptureFixture[str]) -> None:
    """`llama-demo --help` exits 0 and describes the command under its installed name."""
    with pytest.raises(SystemExit) as exit_info:
        demo_main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: llama-demo") and "--steps" in out, out


def test_llama_demo_runs_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """llama-demo on a small source tree runs every stage: corpus, curation, shards, training,
    export and generation (a few steps here; the default run trains for minutes)."""
    corpus = tmp_path / "src"
    corpus.mkdir()
    words = "the function returns a list of values that the caller may sort and filter"
    for i in range(12):
        body = f'"""Module {i}. {words} {words} {words} {words} {i}."""\n\ndef f():\n    """{words}."""\n'
        (corpus / f"m{i}.py").write_text(body)
    code = demo_main([
        "--out", str(tmp_path / "out"), "--corpus", str(corpus), "--steps", "2",
        "--batch-size", "1", "--seq-len", "16", "--no-progress",
    ])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    for stage in (
        "[1/5] corpus: 12 documents",
        "[2/5] curation",
        "[3/5] shards",
        "[4/5] pretraining (",
        "2 steps of 1x16 tokens",
        "[5/5] exported",
        "served by llama-serve",
        "sample 0 of 4",
        "sample 3 of 4",
    ):
        assert stage in out, out
    assert (tmp_path / "out" / "train" / "model" / "model.safetensors").is_file()
    assert (tmp_path / "out" / "train" / "metrics.jsonl").read_text().count("\n") == 2
    assert (tmp_path / "out" / "train" / "loss.png").is_file()
    # bf16 autocast where this CPU multiplies bf16 natively (the default --dtype auto)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = "bfloat16" if bf16_is_fast(device) else "float32"
    assert f"pretraining ({dtype} compute)" in out, out
