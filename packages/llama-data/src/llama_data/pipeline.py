"""Run a chain of steps over many input files in parallel, resumably, with per-step statistics.

Each input file is one unit of work: it is read (`read_documents`), passed through the steps in
order, and written to `out_dir/parts/part-NNNNN.jsonl.gz` together with a statistics file
`part-NNNNN.stats.json`. The statistics file is written last, atomically, and names a fingerprint of
the input and the steps: it is the part's commit marker. A run that is killed and restarted with the
same inputs and steps therefore skips every part whose marker matches and redoes the others from
scratch, so no document is lost or duplicated, and the output is the same as an uninterrupted run.

Steps that need the whole corpus at once (URL, exact, near and line deduplication, §3.1.1) are
passed as `global_steps` and run afterwards over the parts, each as sharded stages of independent
tasks (`llama_data.sharded`): memory per task is bounded by a part or one of `partitions` hash
partitions, not by the corpus; every task has its own marker, so a killed run resumes inside a
global step too; and the result does not depend on the number of workers or the backend. Each
step's output parts go to `out_dir/global/NN-<step>/parts/`; the last step's parts, concatenated in
order, are `out_dir/documents.jsonl.gz`.

Work runs in worker processes (`workers`), or as Ray tasks with `backend="ray"` (the
`llama-data[ray]` extra): the same parts, markers and statistics, scheduled by Ray on a local
instance it starts (or the cluster `ray.init` already connected to; `out_dir` must then be on
storage every node sees). Steps must be picklable (load models lazily). A progress bar per stage
shows tasks done. `run` returns, and writes to `out_dir/stats.json`, every step's kept and dropped
counts per reason, and the readers' error counts with example locations.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from llama_data._atomic import atomic_write
from llama_data._describe import describe
from llama_data.document import Document, Step, StepStats
from llama_data.readers import read_documents, write_jsonl
from llama_data.sharded import LocalExecutor, RayExecutor, as_sharded

__all__ = ["Pipeline", "PipelineReport"]

READ = "read"
GLOBAL_READ = "global_read"
_VERSION = importlib.metadata.version("llama-data")  # new code may compute different parts


@dataclass
class PipelineReport:
    """What a run did: statistics per step (the reader's under "read"), and which parts it
    computed now versus found done from an earlier run."""

    stats: dict[str, StepStats] = field(default_factory=dict)
    parts_run: list[str] = field(default_factory=list)
    parts_skipped: list[str] = field(default_factory=list)

    def merge(self, part_stats: dict[str, StepStats]) -> None:
        for name, stats in part_stats.items():
            self.stats.setdefault(name, StepStats()).merge(stats)

    def to_dict(self) -> dict[str, Any]:
        return {
            "steps": {name: s.to_dict() for name, s in self.stats.items()},
            "parts_run": self.parts_run,
            "parts_skipped": self.parts_skipped,
        }


class Pipeline:
    """`steps` run per input file, in parallel; `global_steps` run after, over everything, as
    sharded stages with `partitions` hash partitions (size them so that corpus / partitions fits a
    worker's memory; the result does not depend on them)."""

    def __init__(
        self,
        steps: Sequence[Step],
        *,
        global_steps: Sequence[Step] = (),
        reader_options: dict[str, Any] | None = None,
        partitions: int = 16,
    ) -> None:
        names = [s.name for s in (*steps, *global_steps)]
        reserved = {READ, GLOBAL_READ} & set(names)
        duplicates = sorted({n for n in names if names.count(n) > 1} | reserved)
        if duplicates:
            raise ValueError(
                f"step names must be unique and not {READ!r} or {GLOBAL_READ!r} (they key the "
                "statistics); "
                f"repeated or reserved: {duplicates}"
            )
        self.steps = list(steps)
        self.global_steps = list(global_steps)
        self.reader_options = dict(reader_options or {})
        if partitions < 1:
            raise ValueError(f"partitions must be at least 1, got {partitions}")
        self.partitions = partitions

    def fingerprint(self, path: Path) -> str:
        """Identifies a part's work: the input file (path, size, mtime) and the steps' config,
        described stably across processes and runs (no object addresses)."""
        stat = path.stat()
        recipe = repr(
            (_VERSION, str(path.resolve()), stat.st_size, stat.st_mtime_ns,
             describe(self.reader_options), [describe(step) for step in self.steps])
        )  # fmt: skip
        return hashlib.sha256(recipe.encode()).hexdigest()

    def run(
        self,
        inputs: Sequence[str | os.PathLike[str]],
        out_dir: str | os.PathLike[str],
        *,
        workers: int = 1,
        progress: bool = True,
        backend: Literal["processes", "ray"] = "processes",
    ) -> PipelineReport:
        """Process `inputs` into `out_dir` (resuming a previous run there); see the module doc."""
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        if backend not in ("processes", "ray"):
            raise ValueError(f"backend must be 'processes' or 'ray', got {backend!r}")
        paths = [Path(p) for p in inputs]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"input files not found: {missing[:5]}")
        out = Path(out_dir)
        parts = out / "parts"
        parts.mkdir(parents=True, exist_ok=True)
        report = PipelineReport()
        todo: list[tuple[Path, Path, str]] = []
        for i, path in enumerate(paths):
            part = parts / f"part-{i:05d}"
            fingerprint = self.fingerprint(path)
            done = _load_marker(part, fingerprint)
            if done is None:
                todo.append((path, part, fingerprint))
            else:
                report.parts_skipped.append(part.name)
                report.merge(done)
        executor: LocalExecutor | RayExecutor = (
            RayExecutor(workers, progress=progress)
            if backend == "ray"
            else LocalExecutor(workers, progress=progress)
        )
        with executor:
            if todo:
                results = executor.map([(_run_part, (self, *job)) for job in todo], "files")
                for name, stats in results:
                    report.parts_run.append(name)
                    report.merge(stats)
            if self.global_steps:
                self._run_global(parts, len(paths), out, report, executor)
        _atomic_json(out / "stats.json", report.to_dict())
        return report

    def _run_global(
        self,
        parts: Path,
        n_parts: int,
        out: Path,
        report: PipelineReport,
        executor: LocalExecutor | RayExecutor,
    ) -> None:
        """Each global step as sharded stages over the previous step's parts (`llama_data.sharded`),
        then the last step's parts concatenated, in order, into `documents.jsonl.gz`."""
        current = [parts / f"part-{i:05d}.jsonl.gz" for i in range(n_parts)]
        for j, step in enumerate(self.global_steps):
            sharded = as_sharded(step, self.partitions)
            home = out / "global" / f"{j:02d}-{sharded.name}"
            marker = home / "step.done.json"
            fingerprint = _files_fingerprint(current, describe(sharded))
            done = _read_json(marker)
            if (
                done is not None
                and done.get("fingerprint") == fingerprint
                and all(Path(p).is_file() for p in done["parts"])
            ):
                outputs = [Path(p) for p in done["parts"]]
                stats, read = (StepStats.from_dict(done[k]) for k in ("stats", "read"))
            else:
                marker.unlink(missing_ok=True)
                result = sharded.run(current, home / "work", home / "parts", executor=executor)
                outputs, stats, read = result.parts, result.stats, result.read
                _atomic_json(
                    marker,
                    {"fingerprint": fingerprint, "parts": [str(p) for p in outputs],
                     "stats": stats.to_dict(), "read": read.to_dict()},
                )  # fmt: skip
            # The step's scratch files are needed only until its marker is written.
            shutil.rmtree(home / "work", ignore_errors=True)
            if j == 0:  # reading the per-file parts again is accounted for (e.g. emptied texts)
                report.stats.setdefault(GLOBAL_READ, StepStats()).merge(read)
            report.stats.setdefault(step.name, StepStats()).merge(stats)
            current = outputs
        documents, marker = out / "documents.jsonl.gz", out / "documents.done.json"
        fingerprint = _files_fingerprint(current)
        done = _read_json(marker)
        if documents.is_file() and done is not None and done.get("fingerprint") == fingerprint:
            return  # kept as it is, so that what was made from it stays valid
        marker.unlink(missing_ok=True)
        with atomic_write(documents) as temporary, open(temporary, "wb") as f:
            for path in current:  # gzip members, one after another: one valid gzip file
                with open(path, "rb") as member:
                    shutil.copyfileobj(member, f)
        _atomic_json(marker, {"fingerprint": fingerprint})


def _run_part(
    pipeline: Pipeline, path: Path, part: Path, fingerprint: str
) -> tuple[str, dict[str, StepStats]]:
    """Process one input file into its part (output, then the statistics marker)."""
    # A marker from an earlier configuration must not vouch for the data about to be rewritten.
    part.with_suffix(".stats.json").unlink(missing_ok=True)
    stats = {READ: StepStats()}
    docs: Iterable[Document] = read_documents(path, stats=stats[READ], **pipeline.reader_options)
    for step in pipeline.steps:
        stats[step.name] = StepStats()
        docs = step.run(docs, stats[step.name])
    write_jsonl(docs, part.with_suffix(".jsonl.gz"))
    _atomic_json(
        part.with_suffix(".stats.json"),
        {
            "fingerprint": fingerprint,
            "input": str(path),
            "steps": {n: s.to_dict() for n, s in stats.items()},
        },
    )
    return part.name, stats


def _load_marker(part: Path, fingerprint: str) -> dict[str, StepStats] | None:
    """The statistics of a part finished with this fingerprint, or None if it must be (re)done."""
    marker = part.with_suffix(".stats.json")
    if not marker.is_file() or not part.with_suffix(".jsonl.gz").is_file():
        return None
    try:
        data = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    if data.get("fingerprint") != fingerprint:
        return None
    return {name: StepStats.from_dict(d) for name, d in data["steps"].items()}


def _files_fingerprint(paths: Sequence[Path], *config: Any) -> str:
    """Fingerprint of files (path, size, mtime) and a configuration."""
    files = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in paths]
    return hashlib.sha256(repr((config, files)).encode()).hexdigest()


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data


def _atomic_json(path: Path, obj: Any) -> None:
    with atomic_write(path) as temporary:
        temporary.write_text(json.dumps(obj, indent=2, sort_keys=True), encoding="utf-8")
