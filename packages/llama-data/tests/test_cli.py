"""The llama-data command: a TOML pipeline file runs, resumes, and bad files are explained."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from llama_data.cli import STEP_TYPES, build_step, load_pipeline, main

PIPELINE = """
inputs = ["in/*.jsonl.gz"]
out_dir = "out"
workers = 1

[[steps]]
type = "url_blocklist"
file = "blocklist.txt"

[[steps]]
type = "pii"

[[steps]]
type = "gopher_quality"
min_words = 5

[[global_steps]]
type = "exact_dedup"

[[global_steps]]
type = "near_dedup"
threshold = 0.7
"""

TEXT = "the cat and the dog sat on the mat with a hat that was red and blue"


def write_inputs(root: Path) -> None:
    (root / "in").mkdir()
    (root / "blocklist.txt").write_text("# spam\nspam.example\n")
    rows = [
        {"id": "a", "text": TEXT + " mail me at a@b.org", "url": "https://ok.example/1"},
        {"id": "b", "text": TEXT + " mail me at a@b.org", "url": "https://ok.example/2"},
        {"id": "c", "text": TEXT, "url": "https://www.spam.example/x"},
        {"id": "d", "text": "too short", "url": "https://ok.example/3"},
    ]
    with gzip.open(root / "in" / "part1.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def test_run_executes_the_file_and_resumes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`llama-data run` builds every step from the TOML, counts each drop, and a second run
    resumes (nothing recomputed, same statistics)."""
    write_inputs(tmp_path)
    (tmp_path / "pipeline.toml").write_text(PIPELINE)
    assert main(["run", str(tmp_path / "pipeline.toml"), "--no-progress"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["url_blocklist"]["dropped"] == {"url_blocklist": 1}
    assert stats["gopher_quality"]["dropped"] == {"too_few_words": 1}
    assert stats["exact_dedup"]["dropped"] == {"exact_duplicate": 1}
    assert (tmp_path / "out" / "documents.jsonl.gz").is_file()
    assert main(["run", str(tmp_path / "pipeline.toml"), "--no-progress"]) == 0
    summary = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert summary["parts_skipped"] == ["part-00000"] and summary["parts_run"] == []


def test_every_step_type_builds_from_defaults(tmp_path: Path) -> None:
    """Each registered step type builds from a minimal table."""
    from llama_data import FastTextClassifier

    (tmp_path / "words.txt").write_text("badword\n")
    examples = [("good clear text", "__label__hq"), ("buy now cheap", "__label__lq")] * 3
    FastTextClassifier.train(examples, dim=4, bucket=64).save(tmp_path / "quality.npz")
    minimal = {
        "url_blocklist": {"domains": ["x.example"]},
        "dirty_words": {"file": "words.txt"},
        "quality": {"model": "quality.npz"},
    }
    for kind in STEP_TYPES:
        step = build_step({"type": kind, **minimal.get(kind, {})}, tmp_path, "steps[0]")
        assert step.name


def test_bad_pipeline_files_are_explained(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Unknown step types list the valid ones; bad options name the table and field; a pattern
    that matches nothing says so; the command exits 2 with the message."""
    write_inputs(tmp_path)
    path = tmp_path / "p.toml"
    path.write_text('inputs = ["in/*.jsonl.gz"]\nout_dir = "o"\n[[steps]]\ntype = "gopher"\n')
    with pytest.raises(
        ValueError, match=r"steps\[0\]: unknown step type 'gopher'; valid types: html, "
    ):
        load_pipeline(path)
    path.write_text(
        'inputs = ["in/*.jsonl.gz"]\nout_dir = "o"\n[[steps]]\ntype = "pii"\nemail = 3\n'
    )
    with pytest.raises(ValueError, match=r"(?s)steps\[0\] \(type 'pii'\).*email"):
        load_pipeline(path)
    path.write_text('inputs = ["nothing/*.gz"]\nout_dir = "o"\n')
    with pytest.raises(FileNotFoundError, match="matches no file"):
        load_pipeline(path)
    path.write_text('inputs = ["in/*.jsonl.gz"]\nout_dir = "o"\nworkerz = 2\n')
    assert main(["run", str(path)]) == 2
    assert "workerz" in capsys.readouterr().err
