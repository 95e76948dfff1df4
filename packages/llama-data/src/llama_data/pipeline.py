"""Run a chain of steps over many input files in parallel, resumably, with per-step statistics.

Each input file is one unit of work: it is read (`read_documents`), passed through the steps in
order, and written to `out_dir/parts/part-NNNNN.jsonl.gz` together with a statistics file
`part-NNNNN.stats.json`. The statistics file is written last, atomically, and names a fingerprint of
the input and the steps: it is the part's commit marker. A run that is killed and restarted with the
same inputs and steps therefore skips every part whose marker matches and redoes the others from
scratch, so no document is lost or duplicated, and the output is the same as an uninterrupted run.

Steps that need the whole corpus at once (URL, exact, near and line deduplication, §3.1.1) are run
afterwards over the parts' outputs, in one process, by passing them as `global_steps`.

Parts run in worker processes (`workers`), or as Ray tasks with `backend="ray"` (the
`llama-data[ray]` extra): the same parts, markers and statistics, scheduled by Ray on a local
instance it starts (or the cluster `ray.init` already connected to; `out_dir` must then be on storage
every node sees). Steps must be picklable (load models lazily). A progress bar shows files done. `run` returns, and writes to `out_dir/stats.json`, every step's kept and
dropped counts per reason, and the readers' error counts with example locations.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
import sys
import types
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel
from tqdm import tqdm

from llama_data._atomic import atomic_write
from llama_data.document import Document, Step, StepStats
from llama_data.readers import read_documents, read_jsonl, write_jsonl

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
    """`steps` run per input file, in parallel; `global_steps` run once over everything after."""

    def __init__(
        self,
        steps: Sequence[Step],
        *,
        global_steps: Sequence[Step] = (),
        reader_options: dict[str, Any] | None = None,
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

    def fingerprint(self, path: Path) -> str:
        """Identifies a part's work: the input file (path, size, mtime) and the steps' config,
        described stably across processes and runs (no object addresses)."""
        stat = path.stat()
        recipe = repr(
            (_VERSION, str(path.resolve()), stat.st_size, stat.st_mtime_ns,
             _describe(self.reader_options), [_describe(step) for step in self.steps])
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

        def collect(results: Iterable[tuple[str, dict[str, StepStats]]]) -> None:
            bar = tqdm(
                total=len(paths), initial=len(paths) - len(todo), unit="file", disable=not progress
            )
            with bar:
                for name, stats in results:
                    report.parts_run.append(name)
                    report.merge(stats)
                    bar.update()

        if backend == "ray" and todo:
            collect(_run_parts_on_ray(self, todo, workers))
        elif backend == "ray" or workers == 1 or len(todo) <= 1:
            collect(_run_part(self, *job) for job in todo)
        else:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                # Submitting forks the workers; the progress bar (and its monitor thread) starts
                # only afterwards, since forking a process that runs threads can deadlock.
                futures = [pool.submit(_run_part, self, *job) for job in todo]
                collect(future.result() for future in futures)

        if self.global_steps:
            self._run_global(parts, len(paths), out, report)
        _atomic_json(out / "stats.json", report.to_dict())
        return report

    def _run_global(self, parts: Path, n_parts: int, out: Path, report: PipelineReport) -> None:
        # Re-reading the parts is accounted for too (e.g. documents a Mapper emptied are counted
        # as empty_text here), and without a size limit: the per-file stage already applied it.
        read_stats = report.stats.setdefault(GLOBAL_READ, StepStats())

        def everything() -> Iterator[Document]:
            for i in range(n_parts):
                part = parts / f"part-{i:05d}.jsonl.gz"
                yield from read_jsonl(part, stats=read_stats, max_chars=sys.maxsize)

        docs: Iterable[Document] = everything()
        for step in self.global_steps:
            docs = step.run(docs, report.stats.setdefault(step.name, StepStats()))
        write_jsonl(docs, out / "documents.jsonl.gz")


def _describe(obj: Any, depth: int = 0) -> Any:
    """A stable, comparable description of a step's configuration: pydantic models by their
    fields, functions and classes by name, objects by their attributes (recursively)."""
    if depth > 6:
        return type(obj).__qualname__
    if obj is None or isinstance(obj, str | int | float | bool | bytes):
        return obj
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, BaseModel):
        return (type(obj).__qualname__, obj.model_dump_json())
    if isinstance(obj, dict):
        return sorted(((repr(k), _describe(v, depth + 1)) for k, v in obj.items()), key=repr)
    if isinstance(obj, list | tuple | set | frozenset):
        items = [_describe(v, depth + 1) for v in obj]
        return sorted(items, key=repr) if isinstance(obj, set | frozenset) else items
    if isinstance(obj, functools.partial):
        return ("partial", _describe((obj.func, obj.args, obj.keywords), depth + 1))
    if isinstance(obj, types.FunctionType):  # by name and code, so an edited lambda differs
        code = obj.__code__
        constants = [c for c in code.co_consts if not isinstance(c, types.CodeType)]
        closure = [cell.cell_contents for cell in obj.__closure__ or ()]
        return (f"{obj.__module__}.{obj.__qualname__}", code.co_code.hex(), code.co_names,
                _describe((constants, closure), depth + 1))  # fmt: skip
    if callable(obj) and hasattr(obj, "__qualname__"):
        return f"{getattr(obj, '__module__', '')}.{obj.__qualname__}"
    state = obj.__getstate__()
    if isinstance(state, tuple) and len(state) == 2:  # (__dict__ or None, __slots__ values)
        state = {**(state[0] or {}), **(state[1] or {})}
    if not isinstance(state, dict):
        return (type(obj).__qualname__, repr(state))
    return (type(obj).__qualname__, _describe(state, depth + 1))


def _run_parts_on_ray(
    pipeline: Pipeline, todo: list[tuple[Path, Path, str]], workers: int
) -> Iterator[tuple[str, dict[str, StepStats]]]:
    """Run the parts as Ray tasks, yielding results in input order as they are collected."""
    try:
        import ray
    except ImportError as err:
        raise ImportError("backend='ray' needs Ray: install llama-data[ray]") from err
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    try:
        task = ray.remote(_run_part)
        pipeline_ref = ray.put(pipeline)
        futures = [task.remote(pipeline_ref, *job) for job in todo]
        for future in futures:
            yield ray.get(future)
    finally:
        if started:
            ray.shutdown()


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
    result = {}
    for name, d in data["steps"].items():
        s = StepStats(kept=d["kept"])
        s.dropped.update(d["dropped"])
        s.errors.update(d["errors"])
        s.error_examples = {k: list(v) for k, v in d["error_examples"].items()}
        result[name] = s
    return result


def _atomic_json(path: Path, obj: Any) -> None:
    with atomic_write(path) as temporary:
        temporary.write_text(json.dumps(obj, indent=2, sort_keys=True), encoding="utf-8")
