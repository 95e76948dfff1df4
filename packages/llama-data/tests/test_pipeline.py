"""Pipeline: per-file steps in worker processes, statistics, resume after a crash, global steps."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

from llama_data.document import Document, Filter, Step, StepStats
from llama_data.pipeline import Pipeline
from llama_data.readers import read_jsonl


class DropShort(Filter):
    """Drops documents under `min_chars` characters."""

    name = "drop_short"

    def __init__(self, min_chars: int) -> None:
        self.min_chars = min_chars

    def reason(self, doc: Document) -> str | None:
        return "too_short" if len(doc.text) < self.min_chars else None


class CrashOnce(Filter):
    """Raises at document `crash_id` while the file `armed` exists, disarming it: a run that dies
    once mid-way, then succeeds with the very same configuration."""

    name = "crash_once"

    def __init__(self, crash_id: str, armed: Path) -> None:
        self.crash_id = crash_id
        self.armed = armed

    def reason(self, doc: Document) -> str | None:
        if doc.id == self.crash_id and self.armed.exists():
            self.armed.unlink()
            raise RuntimeError(f"simulated crash at {doc.id}")
        return None


class DropRepeatedText(Step):
    """A global step: keeps the first document with each text."""

    name = "exact"

    def run(self, docs: Iterable[Document], stats: StepStats) -> Iterator[Document]:
        seen = set()
        for doc in docs:
            if doc.text in seen:
                stats.drop("duplicate")
                continue
            seen.add(doc.text)
            stats.kept += 1
            yield doc


def make_inputs(tmp_path: Path, n_files: int = 4, per_file: int = 5) -> list[Path]:
    paths = []
    for f in range(n_files):
        path = tmp_path / f"in-{f}.jsonl.gz"
        with gzip.open(path, "wt", encoding="utf-8") as out:
            for d in range(per_file):
                text = "short" if d == 0 else f"document {f}-{d} with enough text"
                out.write(json.dumps({"id": f"{f}-{d}", "text": text}) + "\n")
            out.write("{not json\n")
        paths.append(path)
    return paths


def output_ids(out: Path) -> list[str]:
    ids = []
    for part in sorted((out / "parts").glob("part-*.jsonl.gz")):
        ids += [d.id for d in read_jsonl(part, stats=StepStats())]
    return ids


@pytest.mark.parametrize("workers", [1, 2])
def test_pipeline_counts_every_document(tmp_path: Path, workers: int) -> None:
    """Every input document is kept or dropped under a reason, bad lines are errors, and the
    summary lands in stats.json; parallel workers give the same output as one."""
    inputs = make_inputs(tmp_path)
    report = Pipeline([DropShort(10)]).run(
        inputs, tmp_path / "out", workers=workers, progress=False
    )
    assert report.stats["read"].kept == 20 and report.stats["read"].errors == {"invalid_json": 4}
    assert report.stats["drop_short"].kept == 16 and report.stats["drop_short"].dropped == {
        "too_short": 4
    }
    assert output_ids(tmp_path / "out") == [f"{f}-{d}" for f in range(4) for d in range(1, 5)]
    summary = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert summary["steps"]["drop_short"]["dropped"] == {"too_short": 4}


def test_killed_run_resumes_without_loss_or_duplicates(tmp_path: Path) -> None:
    """A run that dies in file 2 leaves files 0-1 done; the restart with the same configuration
    skips them, redoes the rest, and the output equals an uninterrupted run's."""
    inputs = make_inputs(tmp_path)
    out, armed = tmp_path / "out", tmp_path / "armed"
    armed.touch()
    with pytest.raises(RuntimeError, match="simulated crash at 2-3"):
        Pipeline([CrashOnce("2-3", armed)]).run(inputs, out, progress=False)
    assert sorted(p.name for p in (out / "parts").glob("*.stats.json")) == [
        "part-00000.stats.json", "part-00001.stats.json"]  # fmt: skip
    result = Pipeline([CrashOnce("2-3", armed)]).run(inputs, out, progress=False)
    assert result.parts_skipped == ["part-00000", "part-00001"]
    assert result.parts_run == ["part-00002", "part-00003"]
    assert result.stats["read"].kept == 20 and result.stats["crash_once"].kept == 20
    clean = tmp_path / "clean"
    Pipeline([CrashOnce("2-3", armed)]).run(inputs, clean, progress=False)
    assert output_ids(out) == output_ids(clean) == [f"{f}-{d}" for f in range(4) for d in range(5)]


def test_changed_steps_redo_the_work(tmp_path: Path) -> None:
    """Changing a step's configuration invalidates the finished parts."""
    inputs = make_inputs(tmp_path, n_files=2)
    out = tmp_path / "out"
    Pipeline([DropShort(10)]).run(inputs, out, progress=False)
    report = Pipeline([DropShort(100)]).run(inputs, out, progress=False)
    assert report.parts_skipped == [] and report.parts_run == ["part-00000", "part-00001"]
    assert output_ids(out) == []


def test_global_steps_see_every_part(tmp_path: Path) -> None:
    """Global steps run once over all parts' outputs and write documents.jsonl.gz."""
    inputs = make_inputs(tmp_path, n_files=3)
    report = Pipeline([], global_steps=[DropRepeatedText()]).run(
        inputs, tmp_path / "out", progress=False
    )
    assert report.stats["exact"].dropped == {"duplicate": 2}  # "short" appears in all three files
    final = list(read_jsonl(tmp_path / "out" / "documents.jsonl.gz", stats=StepStats()))
    assert len(final) == 13


def test_bad_configuration_is_explained(tmp_path: Path) -> None:
    """Duplicate step names, missing inputs and zero workers are errors naming the problem."""
    with pytest.raises(ValueError, match="repeated or reserved: \\['drop_short'\\]"):
        Pipeline([DropShort(1), DropShort(2)])
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl"):
        Pipeline([]).run([tmp_path / "nope.jsonl"], tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match="workers"):
        Pipeline([]).run([], tmp_path / "out", workers=0, progress=False)


def test_fingerprint_is_stable_for_real_steps_and_workers_get_models(tmp_path: Path) -> None:
    """Steps holding a fastText model or a function get the same fingerprint when rebuilt (so a
    restart resumes), and travel to worker processes (the model reloads there by path)."""
    from llama_data import LanguageFilter, TokenKLFilter

    inputs = make_inputs(tmp_path, n_files=2)

    def build() -> Pipeline:
        return Pipeline(
            [LanguageFilter(), TokenKLFilter().fit(["a b c d e f", "a b c", "d e f a"])]
        )

    assert build().fingerprint(inputs[0]) == build().fingerprint(inputs[0])
    first = Pipeline([LanguageFilter()]).run(inputs, tmp_path / "out", workers=2, progress=False)
    assert first.stats["read"].kept == 10 and first.stats["language"].kept > 0
    again = Pipeline([LanguageFilter()]).run(inputs, tmp_path / "out", workers=2, progress=False)
    assert again.parts_skipped == ["part-00000", "part-00001"] and again.parts_run == []


def test_ray_backend_matches_processes_and_resumes(tmp_path: Path) -> None:
    """On a local Ray instance the pipeline writes the same parts and statistics as with worker
    processes, and a rerun resumes from the markers."""
    inputs = make_inputs(tmp_path, n_files=3)
    local = Pipeline([DropShort(10)]).run(inputs, tmp_path / "local", workers=2, progress=False)
    on_ray = Pipeline([DropShort(10)]).run(
        inputs, tmp_path / "ray", workers=2, progress=False, backend="ray"
    )
    assert output_ids(tmp_path / "ray") == output_ids(tmp_path / "local")
    assert on_ray.to_dict()["steps"] == local.to_dict()["steps"]
    again = Pipeline([DropShort(10)]).run(inputs, tmp_path / "ray", progress=False, backend="ray")
    assert again.parts_run == [] and len(again.parts_skipped) == 3


class Blank(Filter):
    """Keeps every document but empties the text of those listed (a Mapper gone wrong)."""

    name = "blank"

    def __init__(self, ids: tuple[str, ...]) -> None:
        self.ids = ids

    def reason(self, doc: Document) -> str | None:
        if doc.id in self.ids:
            doc.text = ""
        return None


def test_global_stage_accounts_for_every_document(tmp_path: Path) -> None:
    """Documents emptied by a per-file step are counted when the parts are re-read for the global
    steps, not lost silently: every document is kept or dropped under a reason somewhere."""
    inputs = make_inputs(tmp_path, n_files=2)
    report = Pipeline([Blank(("0-1", "1-2"))], global_steps=[DropRepeatedText()]).run(
        inputs, tmp_path / "out", progress=False
    )
    read_again = report.stats["global_read"]
    assert read_again.dropped == {"empty_text": 2}
    assert read_again.kept + sum(read_again.dropped.values()) == report.stats["blank"].kept == 10


def test_fingerprint_sees_partials_lambdas_and_slots(tmp_path: Path) -> None:
    """Different partial arguments, lambda bodies or __slots__ values give different fingerprints
    (finished parts are not reused under a changed configuration)."""
    import functools

    class Slotted(DropShort):
        __slots__ = ("extra",)

        def __init__(self, extra: int) -> None:
            super().__init__(5)
            self.extra = extra

    path = make_inputs(tmp_path, n_files=1)[0]

    def fingerprint(value: object) -> str:
        step = DropShort(5)
        step.option = value  # type: ignore[attr-defined]
        return Pipeline([step]).fingerprint(path)

    assert fingerprint(functools.partial(max, 1)) != fingerprint(functools.partial(max, 2))
    assert fingerprint(lambda t: t.upper()) != fingerprint(lambda t: t.lower())
    assert fingerprint(lambda t: t.upper()) == fingerprint(lambda t: t.upper())
    assert Pipeline([Slotted(1)]).fingerprint(path) != Pipeline([Slotted(2)]).fingerprint(path)


def test_stale_marker_never_vouches_for_rewritten_data(tmp_path: Path) -> None:
    """A run under another configuration that dies while rewriting a part removes that part's old
    marker first, so going back to the first configuration redoes the part."""
    inputs = make_inputs(tmp_path, n_files=1)
    out, armed = tmp_path / "out", tmp_path / "armed"
    Pipeline([DropShort(10)]).run(inputs, out, progress=False)
    armed.touch()
    with pytest.raises(RuntimeError, match="simulated crash"):
        Pipeline([CrashOnce("0-2", armed)]).run(inputs, out, progress=False)
    again = Pipeline([DropShort(10)]).run(inputs, out, progress=False)
    assert again.parts_run == ["part-00000"] and again.parts_skipped == []
