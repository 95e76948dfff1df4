"""The llama-data command: a TOML pipeline file runs, resumes, and bad files are explained."""

from __future__ import annotations

import gzip
import json
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from llama_data import NearDedup, NearDedupConfig
from llama_data.cli import STEP_TYPES, PipelineFileError, build_step, load_pipeline, main
from llama_data.document import Document, StepStats
from llama_data.readers import read_jsonl, write_jsonl

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
    minimal: dict[str, dict[str, Any]] = {
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
    """Every problem of a file is one line naming the key and its value (unknown keys and step
    types with the closest valid one and the list), a pattern that matches nothing says so, and
    the command exits 2 without pydantic's URLs."""
    write_inputs(tmp_path)
    path = tmp_path / "p.toml"
    path.write_text(
        'inputs = ["in/*.jsonl.gz"]\nout_dir = "o"\n'
        '[[steps]]\ntype = "gopher"\n'
        '[[steps]]\ntype = "pii"\nemail = 3\nphones = "maybe"\n'
        '[[global_steps]]\ntype = "near_dedup"\nconfirm = "exactly"\n'
        '[[global_steps]]\ntype = "near_dedup"\nbands = 30\nrows = 8\n'
    )
    with pytest.raises(PipelineFileError) as info:
        load_pipeline(path)
    assert str(info.value).splitlines() == [
        "  steps[0].type = 'gopher': unknown step type; did you mean 'gopher_quality'? valid "
        "step types: " + ", ".join(sorted(STEP_TYPES)),
        "  steps[1].phones = 'maybe': must be a valid boolean, unable to interpret input",
        "  steps[1].email: unknown key; did you mean 'emails'? valid keys: emails, phones, "
        "ip_addresses, keep_non_public_ips, email_placeholder, phone_placeholder, ip_placeholder",
        "  global_steps[0].confirm = 'exactly': must be 'exact' or 'estimate'",
        "  global_steps[1]: bands * rows = 30 * 8 exceeds num_perm=128; lower bands or rows, or "
        "raise num_perm",
    ]
    path.write_text('inputs = ["nothing/*.gz"]\nout_dir = "o"\n')
    with pytest.raises(FileNotFoundError, match="matches no file"):
        load_pipeline(path)
    path.write_text('inputs = ["in/*.jsonl.gz"]\nout_dir = "o"\nworkerz = 2\nworkers = 0\n')
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "  workerz: unknown key; did you mean 'workers'? valid keys: inputs, out_dir, " in err
    assert "  workers = 0: must be greater than 0" in err
    assert "pydantic.dev" not in err and "For further information" not in err


def test_steps_lists_every_option_with_its_default(capsys: pytest.CaptureFixture[str]) -> None:
    """`llama-data steps` shows each type's keys with the defaults the API uses."""
    assert main(["steps"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert set(lines) == set(STEP_TYPES)
    for field in NearDedupConfig.model_fields:
        assert f"{field}=" in lines["near_dedup"]
    assert "confirm='exact'" in lines["near_dedup"] and "model (required)" in lines["quality"]


# ---------------------------------------------------------------- near_dedup: file == API


def _run_file(tmp_path: Path, docs: list[Document], table: str) -> list[str]:
    """Ids `llama-data run` keeps with one global near_dedup step given as `table`."""
    write_jsonl(docs, tmp_path / "in.jsonl.gz")
    (tmp_path / "p.toml").write_text(
        f'inputs = ["in.jsonl.gz"]\nout_dir = "out"\n[[global_steps]]\ntype = "near_dedup"\n{table}'
    )
    assert main(["run", str(tmp_path / "p.toml"), "--no-progress"]) == 0
    return [
        doc.id for doc in read_jsonl(tmp_path / "out" / "documents.jsonl.gz", stats=StepStats())
    ]


def test_near_dedup_from_a_file_equals_the_api(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    planted_corpus: Callable[..., list[Document]],
) -> None:
    """A bare `near_dedup` table keeps exactly the documents `NearDedup()` keeps; the step the
    file builds has the API's config; datasketch's equal band weights (the old CLI) differ."""
    docs = planted_corpus(n_base=120, vocab_size=3000)
    from_api = [doc.id for doc in NearDedup().run(docs, StepStats())]
    from_file = _run_file(tmp_path, docs, "")
    stats = json.loads(capsys.readouterr().out)["near_dedup"]
    assert from_file == from_api
    assert stats["dropped"] == {"near_duplicate": len(docs) - len(from_api)} and from_api != [
        d.id for d in docs
    ]
    step = build_step({"type": "near_dedup"}, tmp_path, "global_steps[0]")
    assert isinstance(step, NearDedup) and step.config == NearDedup().config
    assert STEP_TYPES["near_dedup"].options is NearDedupConfig  # one place for the defaults
    # Negative control: the old CLI's index (equal weights: 9 x 13) keeps other documents here.
    equal = NearDedupConfig(false_positive_weight=0.5, false_negative_weight=0.5)
    assert (NearDedup(equal).index.bands, NearDedup(equal).index.rows) == (9, 13)
    assert [doc.id for doc in NearDedup(equal).run(docs, StepStats())] != from_api


def test_every_near_dedup_setting_is_read_from_the_file(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    planted_corpus: Callable[..., list[Document]],
) -> None:
    """A table setting every NearDedupConfig field builds that config and the API's result."""
    settings: dict[str, Any] = {
        "threshold": 0.75, "confirm": "estimate", "num_perm": 64, "ngram": 4, "seed": 3,
        "scheme": "affine64", "shingle_hash": "xxh3", "bands": 16, "rows": 4,
        "false_positive_weight": 0.2, "false_negative_weight": 0.8, "batch_size": 7,
        "spool_to_disk": False,
    }  # fmt: skip
    assert set(settings) == set(NearDedupConfig.model_fields)
    config = NearDedupConfig(**settings)
    table = "".join(f"{key} = {json.dumps(value)}\n" for key, value in settings.items())
    step = build_step(tomllib.loads(f'type = "near_dedup"\n{table}'), tmp_path, "x")
    assert isinstance(step, NearDedup) and step.config == config
    docs = planted_corpus(n_base=120, vocab_size=3000, seed=1)
    from_api = [doc.id for doc in NearDedup(config).run(docs, StepStats())]
    assert _run_file(tmp_path, docs, table) == from_api
    capsys.readouterr()


def test_token_shards_table_is_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """[token_shards] needs global steps (they write the documents it tokenizes), and a
    tokenizer that cannot be imported is named in a one-line error, exit 2."""
    write_inputs(tmp_path)
    path = tmp_path / "p.toml"
    path.write_text(
        'inputs = ["in/*.jsonl.gz"]\nout_dir = "o"\n[token_shards]\ntokenizer = "x:y"\n'
    )
    assert main(["run", str(path), "--no-progress"]) == 2
    assert "token_shards tokenizes documents.jsonl.gz, which only global_steps write" in (
        capsys.readouterr().err
    )
    path.write_text(
        'inputs = ["in/*.jsonl.gz"]\nout_dir = "o"\n[[global_steps]]\ntype = "exact_dedup"\n'
        '[token_shards]\ntokenizer = "no_such_module_here"\n'
    )
    assert main(["run", str(path), "--no-progress"]) == 2
    assert "token_shards.tokenizer: 'no_such_module_here' is not 'module:attribute'" in (
        capsys.readouterr().err
    )
