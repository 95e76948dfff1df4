"""Global steps as sharded stages: URL, exact, MinHash near and line deduplication at any scale.

A global step sees the whole corpus; here it runs over the parts of a pipeline run
(`part-NNNNN.jsonl.gz`, in order) as stages of independent *tasks*. Every document is keyed on its
*position* (part index, ordinal within the part), every decision is a function of positions and
content, and intermediate data goes to files partitioned by a hash of the key, so:

- the result (the kept documents, their order in the output parts, the statistics) does not depend
  on how many workers run the tasks, in which order, or on which executor (`LocalExecutor`'s
  processes or `RayExecutor`);
- memory per task is bounded by its part or by its hash partition (`partitions`, a setting sized
  to the corpus, never derived from the number of workers), not by the corpus;
- every task writes its outputs atomically and then a marker naming a fingerprint of its inputs, so
  a run killed at any moment and started again skips finished tasks and redoes the rest.

The steps and their stages (`as_sharded` maps the single-process steps of `llama_data.dedup` onto
them, with the same settings and the same results):

- `ShardedKeyDedup`: URL dedup (`kind="url"`) and exact dedup (`kind="exact"`): map (per part:
  keys to partition files) -> reduce (per partition: the winner of each key) -> filter (per part).
- `ShardedNearDedup`: MinHash near dedup: signatures (per part) -> band buckets (per partition) ->
  candidate shingles (per part, exact confirmation only) -> confirm (per partition) -> components
  (union-find over the confirmed edges) -> filter (per part).
- `ShardedLineDedup`: line dedup in buckets of N consecutive documents (§3.1.1): count (per part)
  -> map (per part: line hashes to partition files) -> reduce (per partition: the frequent lines of
  each bucket) -> filter (per part).
- `StreamedStep`: any other `Step`, run once over all parts in order (memory: the step's own).
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Protocol

import numpy as np
import numpy.typing as npt
import xxhash
from tqdm import tqdm

from llama_data._atomic import atomic_write
from llama_data._describe import describe
from llama_data.dedup import (
    ExactDedup,
    LineDedup,
    NearDedup,
    NearDedupConfig,
    UrlDedup,
    _BadDateError,
    _crawl_timestamp,
    _line_hashes,
    _normalize_text,
    _without_frequent_lines,
    jaccard,
    normalize_url,
    shingle_set,
)
from llama_data.document import Document, Step, StepStats
from llama_data.minhash import LshIndex, MinHasher
from llama_data.readers import read_jsonl, write_jsonl

__all__ = [
    "Executor",
    "LocalExecutor",
    "RayExecutor",
    "ShardedKeyDedup",
    "ShardedLineDedup",
    "ShardedNearDedup",
    "ShardedResult",
    "ShardedStep",
    "StreamedStep",
    "as_sharded",
]

Kind = Literal["exact", "url"]
Task = tuple[Callable[..., Any], tuple[Any, ...]]


# ---------------------------------------------------------------------------------------------
# Executors: run one stage's tasks (module-level functions of picklable arguments), return their
# results in task order, and show a progress bar per stage.


class Executor(Protocol):
    """Runs a stage's tasks; results come back in task order whatever the completion order."""

    def map(self, tasks: Sequence[Task], desc: str) -> list[Any]: ...


class LocalExecutor:
    """Tasks in `workers` local processes (in this process when `workers` is 1); use it as a
    context manager so the worker processes are shared by every stage and shut down after."""

    def __init__(self, workers: int = 1, *, progress: bool = False) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self.workers = workers
        self.progress = progress
        self._pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> LocalExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def map(self, tasks: Sequence[Task], desc: str) -> list[Any]:
        if self.workers == 1 or len(tasks) <= 1:
            with tqdm(total=len(tasks), desc=desc, unit="task", disable=not self.progress) as bar:
                results = []
                for function, args in tasks:
                    results.append(function(*args))
                    bar.update()
                return results
        if self._pool is None:
            self._pool = ProcessPoolExecutor(max_workers=self.workers)
        # Submit (and so fork) before the bar starts its monitor thread.
        futures = [self._pool.submit(function, *args) for function, args in tasks]
        return _collect(futures, desc, self.progress)


def _collect(futures: Sequence[Future[Any]], desc: str, progress: bool) -> list[Any]:
    with tqdm(total=len(futures), desc=desc, unit="task", disable=not progress) as bar:
        for future in futures:
            future.add_done_callback(lambda _: bar.update())
        return [future.result() for future in futures]


class RayExecutor:
    """Tasks as Ray tasks: on the cluster `ray.init` already connected to, or on a local instance
    of `workers` CPUs that this executor starts and stops (as a context manager). Every path must
    be on storage all nodes see. Needs `llama-data[ray]`."""

    def __init__(self, workers: int = 1, *, progress: bool = False) -> None:
        try:
            import ray
        except ImportError as err:
            raise ImportError("the Ray executor needs Ray: install llama-data[ray]") from err
        self._ray = ray
        self.workers = workers
        self.progress = progress
        self._started = False

    def __enter__(self) -> RayExecutor:
        if not self._ray.is_initialized():
            self._ray.init(num_cpus=self.workers, include_dashboard=False, log_to_driver=False)
            self._started = True
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._started:
            self._ray.shutdown()
            self._started = False

    def map(self, tasks: Sequence[Task], desc: str) -> list[Any]:
        ray = self._ray
        refs = [ray.remote(function).remote(*args) for function, args in tasks]
        with tqdm(total=len(refs), desc=desc, unit="task", disable=not self.progress) as bar:
            pending = list(refs)
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                bar.update(len(ready))
        results: list[Any] = ray.get(refs)
        return results


# ---------------------------------------------------------------------------------------------
# What every sharded step shares: the result, markers, fingerprints and scratch files.


@dataclass
class ShardedResult:
    """A sharded step's outputs: its parts in order, its statistics, and the reader's statistics
    of its input parts (documents the reader counted and did not pass on, e.g. empty texts)."""

    parts: list[Path]
    stats: StepStats
    read: StepStats


class ShardedStep(Protocol):
    """A global step as sharded stages over parts (what `Pipeline` runs for its global steps)."""

    @property
    def name(self) -> str: ...

    def run(
        self, parts: Sequence[Path], work: Path, out: Path, *, executor: Executor | None = None
    ) -> ShardedResult: ...


def _read(path: Path, stats: StepStats | None = None) -> Iterator[Document]:
    return read_jsonl(path, stats=stats or StepStats(), max_chars=sys.maxsize)


def _key(kind: Kind, doc: Document) -> int | None:
    if kind == "exact":
        return xxhash.xxh3_128_intdigest(_normalize_text(doc.text).encode())
    if doc.url is None:
        return None  # kept, never compared
    return xxhash.xxh3_128_intdigest(normalize_url(doc.url).encode())


def _save_npz(path: Path, **arrays: npt.NDArray[Any]) -> None:
    with atomic_write(path) as temporary, open(temporary, "wb") as f:
        np.savez(f, **arrays)  # type: ignore[arg-type]


_LINE_BITS = 32  # a position is part << 32 | ordinal


def _save_positions(path: Path, positions: npt.NDArray[np.int64]) -> None:
    """Positions (part << 32 | ordinal), sorted, as a .npy file `_part_ordinals` can slice."""
    with atomic_write(path) as temporary, open(temporary, "wb") as f:
        np.save(f, np.sort(positions.astype(np.int64)))


def _part_ordinals(path: Path, index: int) -> set[int]:
    """The ordinals of part `index` in a `_save_positions` file, reading only that part's slice
    (memory-mapped), so a task's memory does not grow with the positions of other parts."""
    positions = np.load(path, mmap_mode="r")
    low, high = np.searchsorted(positions, [index << _LINE_BITS, (index + 1) << _LINE_BITS])
    return set((np.asarray(positions[low:high]) & ((1 << _LINE_BITS) - 1)).tolist())


def _done(marker: Path, fingerprint: str) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    return data if data.get("fingerprint") == fingerprint else None


def _mark(marker: Path, fingerprint: str, **extra: Any) -> dict[str, Any]:
    data = {"fingerprint": fingerprint, **extra}
    with atomic_write(marker) as temporary:
        temporary.write_text(json.dumps(data), encoding="utf-8")
    return data


def _fingerprint_file(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return (str(path.resolve()), stat.st_size, stat.st_mtime_ns)


def _base(config: Any, parts: Sequence[Path]) -> str:
    """Fingerprint of a step's run: its settings and its input files (path, size, mtime)."""
    recipe = repr((config, [_fingerprint_file(p) for p in parts]))
    return hashlib.sha256(recipe.encode()).hexdigest()


def _stats(results: Sequence[dict[str, Any]], key: str) -> StepStats:
    total = StepStats()
    for result in results:
        total.merge(StepStats.from_dict(result[key]))
    return total


def _start(
    parts: Sequence[Path], work: Path, out: Path, executor: Executor | None
) -> tuple[Executor, list[Path]]:
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    outputs = [out / f"part-{i:05d}.jsonl.gz" for i in range(len(parts))]
    return executor or LocalExecutor(), outputs


@dataclass(frozen=True)
class ShardedKeyDedup:
    """URL dedup (`kind="url"`) or exact dedup (`kind="exact"`) as map / reduce / filter tasks;
    the result equals `UrlDedup` / `ExactDedup` over the parts in order (the winner of a URL is the
    latest crawl, then the smallest id, then the first position; of a text, the first position)."""

    kind: Kind = "exact"
    """Which key: "exact" (whitespace-normalised text) or "url" (normalised URL)."""
    partitions: int = 16
    """Hash partitions of the keys: reduce tasks, and the memory bound of each."""
    date_key: str = "crawl_date"
    """URL dedup: the metadata key of the crawl date (the latest crawl wins)."""

    def __post_init__(self) -> None:
        if self.kind not in ("exact", "url"):
            raise ValueError(f"kind must be 'exact' or 'url', got {self.kind!r}")
        if self.partitions < 1:
            raise ValueError(f"partitions must be >= 1, got {self.partitions}")

    @property
    def name(self) -> str:
        return "url_dedup" if self.kind == "url" else "exact_dedup"

    def run(
        self, parts: Sequence[Path], work: Path, out: Path, *, executor: Executor | None = None
    ) -> ShardedResult:
        """Deduplicate `parts` into `out/part-NNNNN.jsonl.gz` (same numbering), with scratch
        files and markers in `work`."""
        run, outputs = _start(parts, work, out, executor)
        base = _base((self.kind, self.partitions, self.date_key), parts)
        mapped = run.map(
            [(_map_task, (self, i, p, work, base)) for i, p in enumerate(parts)],
            f"{self.name}: map",
        )
        run.map(
            [(_reduce_task, (self, k, len(parts), work, base)) for k in range(self.partitions)],
            f"{self.name}: reduce",
        )
        filtered = run.map(
            [
                (_filter_task, (self, i, p, work, o, base))
                for i, (p, o) in enumerate(zip(parts, outputs, strict=True))
            ],
            f"{self.name}: filter",
        )
        return ShardedResult(outputs, _stats(filtered, "stats"), _stats(mapped, "read"))


def _map_task(
    step: ShardedKeyDedup, index: int, part: Path, work: Path, base: str
) -> dict[str, Any]:
    marker = work / f"map-{index:05d}.done.json"
    fingerprint = f"{base}:map:{index}"
    if (done := _done(marker, fingerprint)) is not None:
        return done
    by_partition: list[list[tuple[int, float, str, int]]] = [[] for _ in range(step.partitions)]
    read, errors = StepStats(), StepStats()
    for line, doc in enumerate(_read(part, read)):
        key = _key(step.kind, doc)
        if key is None:
            continue
        stamp = 0.0
        if step.kind == "url":
            try:
                stamp = _crawl_timestamp(doc, step.date_key)
            except _BadDateError:  # counted, and the oldest crawl, as in UrlDedup
                errors.error("invalid_crawl_date", doc.id)
                stamp = float("-inf")
        by_partition[key % step.partitions].append((key, stamp, doc.id, line))
    for k, rows in enumerate(by_partition):
        keys = np.array([r[0] for r in rows], dtype=object)
        _save_npz(
            work / f"map-{index:05d}-{k:05d}.npz",
            key_hi=np.array([int(x) >> 64 for x in keys], dtype=np.uint64),
            key_lo=np.array([int(x) & (2**64 - 1) for x in keys], dtype=np.uint64),
            stamp=np.array([r[1] for r in rows], dtype=np.float64),
            id=np.array([r[2] for r in rows], dtype=np.str_),
            line=np.array([r[3] for r in rows], dtype=np.int64),
        )
    return _mark(marker, fingerprint, read=read.to_dict(), errors=errors.to_dict())


def _reduce_task(
    step: ShardedKeyDedup, partition: int, n_parts: int, work: Path, base: str
) -> dict[str, Any]:
    marker = work / f"reduce-{partition:05d}.done.json"
    fingerprint = f"{base}:reduce:{partition}"
    if (done := _done(marker, fingerprint)) is not None:
        return done
    columns: dict[str, list[npt.NDArray[Any]]] = {
        c: [] for c in ("key_hi", "key_lo", "stamp", "id", "line", "part")
    }
    for index in range(n_parts):
        with np.load(work / f"map-{index:05d}-{partition:05d}.npz") as data:
            for c in ("key_hi", "key_lo", "stamp", "id", "line"):
                columns[c].append(data[c])
            columns["part"].append(np.full(data["line"].shape, index, dtype=np.int64))
    cat = {c: np.concatenate(v) if v else np.array([]) for c, v in columns.items()}
    n = cat["line"].size
    if n:
        if step.kind == "exact":  # first position wins
            order = np.lexsort((cat["line"], cat["part"], cat["key_lo"], cat["key_hi"]))
        else:  # latest stamp, then smallest id, then first position
            id_rank = np.unique(cat["id"], return_inverse=True)[1]
            order = np.lexsort(
                (cat["line"], cat["part"], id_rank, -cat["stamp"], cat["key_lo"], cat["key_hi"])
            )
        hi, lo = cat["key_hi"][order], cat["key_lo"][order]
        first = np.ones(n, dtype=bool)
        first[1:] = (hi[1:] != hi[:-1]) | (lo[1:] != lo[:-1])
        losers = order[~first]
    else:
        losers = np.array([], dtype=np.int64)
    positions = (
        (cat["part"][losers].astype(np.int64) << _LINE_BITS) | cat["line"][losers].astype(np.int64)
        if n
        else losers
    )
    _save_positions(work / f"reduce-{partition:05d}.npy", positions)
    return _mark(marker, fingerprint)


def _filter_task(
    step: ShardedKeyDedup, index: int, part: Path, work: Path, output: Path, base: str
) -> dict[str, Any]:
    marker = output.with_suffix(".done.json")
    fingerprint = f"{base}:filter:{index}"
    if (done := _done(marker, fingerprint)) is not None:
        return done
    losers: set[int] = set()
    for partition in range(step.partitions):
        losers |= _part_ordinals(work / f"reduce-{partition:05d}.npy", index)
    mapped = json.loads((work / f"map-{index:05d}.done.json").read_text())
    stats = StepStats.from_dict(mapped["errors"])
    reason = "url_duplicate" if step.kind == "url" else "exact_duplicate"
    _write_without(part, output, losers, reason, stats)
    return _mark(marker, fingerprint, stats=stats.to_dict())


def _write_without(
    part: Path, output: Path, losers: set[int], reason: str, stats: StepStats
) -> None:
    """Write `part` to `output` without the documents at ordinals `losers` (dropped as `reason`)."""

    def kept() -> Iterator[Document]:
        for line, doc in enumerate(_read(part)):
            if line in losers:
                stats.drop(reason)
            else:
                stats.kept += 1
                yield doc

    write_jsonl(kept(), output)


@dataclass(frozen=True)
class ShardedLineDedup:
    """`LineDedup` as count / map / reduce / filter tasks: buckets are `bucket_size` consecutive
    documents of the parts in order (the paper's 30M), line-hash counts are partitioned by hash,
    and a line counted more than `max_occurrences` times in its bucket is removed. Equals
    `LineDedup` over the parts in order, whatever the workers and partitions."""

    max_occurrences: int = 6
    """A line seen more than this many times in a bucket is removed (§3.1.1: 6)."""
    bucket_size: int = 30_000_000
    """Documents per bucket (§3.1.1: 30M)."""
    partitions: int = 16
    """Hash partitions of the line counts: reduce tasks, and the memory bound of each."""

    name = "line_dedup"

    def __post_init__(self) -> None:
        if self.max_occurrences < 1 or self.bucket_size < 1 or self.partitions < 1:
            raise ValueError(
                f"max_occurrences, bucket_size and partitions must be >= 1, got "
                f"{self.max_occurrences}, {self.bucket_size}, {self.partitions}"
            )

    def run(
        self, parts: Sequence[Path], work: Path, out: Path, *, executor: Executor | None = None
    ) -> ShardedResult:
        """Deduplicate lines of `parts` into `out/part-NNNNN.jsonl.gz`; scratch in `work`."""
        run, outputs = _start(parts, work, out, executor)
        base = _base((self.max_occurrences, self.bucket_size, self.partitions), parts)
        counts = run.map(
            [(_count_task, (i, p, work, base)) for i, p in enumerate(parts)],
            f"{self.name}: count",
        )
        offsets = np.concatenate(([0], np.cumsum([c["documents"] for c in counts]))).tolist()
        run.map(
            [(_line_map_task, (self, i, p, offsets[i], work, base)) for i, p in enumerate(parts)],
            f"{self.name}: map",
        )
        run.map(
            [
                (_line_reduce_task, (self, k, len(parts), work, base))
                for k in range(self.partitions)
            ],
            f"{self.name}: reduce",
        )
        filtered = run.map(
            [
                (_line_filter_task, (self, i, p, offsets[i], work, o, base))
                for i, (p, o) in enumerate(zip(parts, outputs, strict=True))
            ],
            f"{self.name}: filter",
        )
        return ShardedResult(outputs, _stats(filtered, "stats"), _stats(counts, "read"))


def _count_task(index: int, part: Path, work: Path, base: str) -> dict[str, Any]:
    marker = work / f"count-{index:05d}.done.json"
    fingerprint = f"{base}:count:{index}"
    if (done := _done(marker, fingerprint)) is not None:
        return done
    read = StepStats()
    documents = sum(1 for _ in _read(part, read))
    return _mark(marker, fingerprint, documents=documents, read=read.to_dict())


def _line_map_task(
    step: ShardedLineDedup, index: int, part: Path, offset: int, work: Path, base: str
) -> dict[str, Any]:
    marker = work / f"lmap-{index:05d}.done.json"
    fingerprint = f"{base}:lmap:{index}"
    if (done := _done(marker, fingerprint)) is not None:
        return done
    counts: list[dict[tuple[int, int], int]] = [{} for _ in range(step.partitions)]
    for line, doc in enumerate(_read(part)):
        bucket = (offset + line) // step.bucket_size
        for h in _line_hashes(doc.text):
            table = counts[h % step.partitions]
            table[(bucket, h)] = table.get((bucket, h), 0) + 1
    for k, table in enumerate(counts):
        _save_npz(
            work / f"lmap-{index:05d}-{k:05d}.npz",
            bucket=np.array([b for b, _ in table], dtype=np.int64),
            hash=np.array([h for _, h in table], dtype=np.uint64),
            count=np.array(list(table.values()), dtype=np.int64),
        )
    return _mark(marker, fingerprint)


def _line_reduce_task(
    step: ShardedLineDedup, partition: int, n_parts: int, work: Path, base: str
) -> dict[str, Any]:
    marker = work / f"lreduce-{partition:05d}.done.json"
    fingerprint = f"{base}:lreduce:{partition}"
    if (done := _done(marker, fingerprint)) is not None:
        return done
    buckets, hashes, counts = [], [], []
    for index in range(n_parts):
        with np.load(work / f"lmap-{index:05d}-{partition:05d}.npz") as data:
            buckets.append(data["bucket"])
            hashes.append(data["hash"])
            counts.append(data["count"])
    bucket, hash_, count = (np.concatenate(a) for a in (buckets, hashes, counts))
    frequent_bucket = np.array([], dtype=np.int64)
    frequent_hash = np.array([], dtype=np.uint64)
    if bucket.size:
        order = np.lexsort((hash_, bucket))
        bucket, hash_, count = bucket[order], hash_[order], count[order]
        starts = np.flatnonzero(
            np.concatenate(([True], (bucket[1:] != bucket[:-1]) | (hash_[1:] != hash_[:-1])))
        )
        totals = np.add.reduceat(count, starts)
        frequent = starts[totals > step.max_occurrences]
        frequent_bucket, frequent_hash = bucket[frequent], hash_[frequent]
    _save_npz(work / f"lreduce-{partition:05d}.npz", bucket=frequent_bucket, hash=frequent_hash)
    return _mark(marker, fingerprint)


def _line_filter_task(
    step: ShardedLineDedup,
    index: int,
    part: Path,
    offset: int,
    work: Path,
    output: Path,
    base: str,
) -> dict[str, Any]:
    marker = output.with_suffix(".done.json")
    fingerprint = f"{base}:lfilter:{index}"
    if (done := _done(marker, fingerprint)) is not None:
        return done
    documents = json.loads((work / f"count-{index:05d}.done.json").read_text())["documents"]
    first, last = offset // step.bucket_size, (offset + max(documents, 1) - 1) // step.bucket_size
    frequent: dict[int, set[int]] = {}  # bucket -> hashes of its frequent lines
    for partition in range(step.partitions):
        with np.load(work / f"lreduce-{partition:05d}.npz") as data:
            bucket, hash_ = data["bucket"], data["hash"]  # each read once
            mine = (bucket >= first) & (bucket <= last)
            for b, h in zip(bucket[mine].tolist(), hash_[mine].tolist(), strict=True):
                frequent.setdefault(b, set()).add(h)
    stats = StepStats()

    def kept() -> Any:
        for line, doc in enumerate(_read(part)):
            bucket = (offset + line) // step.bucket_size
            out = _without_frequent_lines(doc, frequent.get(bucket, set()), stats)
            if out is not None:
                yield out

    write_jsonl(kept(), output)
    return _mark(marker, fingerprint, stats=stats.to_dict())


@dataclass(frozen=True)
class ShardedNearDedup:
    """`NearDedup` as tasks: signatures (per part) -> band buckets (per hash partition) ->
    candidate shingle sets (per part) -> confirmation (per partition: the same breadth-first
    search per bucket as `near_duplicate_clusters`, exact Jaccard or the estimate) -> components
    (one task: union-find over the confirmed edges only, so memory grows with the duplicated
    documents, not the corpus) -> filter (per part). A band bucket is keyed by the xxh3-128 of the
    band's values (a false merge of two different bands has probability about 2**-128 per pair).
    Equals `NearDedup(config)` over the parts in order."""

    config: NearDedupConfig = field(default_factory=NearDedupConfig)
    """The settings of the single-process step (threshold, confirm, permutations, banding)."""
    partitions: int = 16
    """Hash partitions of the band buckets."""

    name = "near_dedup"

    def __post_init__(self) -> None:
        if self.partitions < 1:
            raise ValueError(f"partitions must be >= 1, got {self.partitions}")

    def run(
        self, parts: Sequence[Path], work: Path, out: Path, *, executor: Executor | None = None
    ) -> ShardedResult:
        """Deduplicate `parts` into `out/part-NNNNN.jsonl.gz`; scratch in `work`."""
        run, outputs = _start(parts, work, out, executor)
        base = _base((self.config.model_dump_json(), self.partitions), parts)
        n, name = len(parts), self.name
        signed = run.map(
            [(_sig_task, (self, i, p, work, base)) for i, p in enumerate(parts)],
            f"{name}: signatures",
        )
        partitions = range(self.partitions)
        run.map([(_bucket_task, (self, k, n, work, base)) for k in partitions], f"{name}: buckets")
        if self.config.confirm == "exact":
            run.map(
                [(_shingle_task, (self, i, p, work, base)) for i, p in enumerate(parts)],
                f"{name}: candidate shingles",
            )
        run.map([(_confirm_task, (self, k, n, work, base)) for k in partitions], f"{name}: confirm")
        run.map([(_component_task, (self, n, work, base))], f"{name}: components")
        filtered = run.map(
            [
                (_near_filter_task, (self, i, p, work, o, base))
                for i, (p, o) in enumerate(zip(parts, outputs, strict=True))
            ],
            f"{name}: filter",
        )
        return ShardedResult(outputs, _stats(filtered, "stats"), _stats(signed, "read"))

    def _hasher(self) -> MinHasher:
        c = self.config
        return MinHasher(c.num_perm, c.ngram, c.seed, c.scheme, c.shingle_hash)

    def _index(self) -> LshIndex:
        c = self.config
        return LshIndex(
            c.threshold, c.num_perm, bands=c.bands, rows=c.rows,
            false_positive_weight=c.false_positive_weight,
            false_negative_weight=c.false_negative_weight,
        )  # fmt: skip


def _sig_task(
    step: ShardedNearDedup, index: int, part: Path, work: Path, base: str
) -> dict[str, Any]:
    marker = work / f"sig-{index:05d}.done.json"
    fingerprint = f"{base}:sig:{index}"
    if (done := _done(marker, fingerprint)) is not None:
        return done
    hasher, lsh = step._hasher(), step._index()
    ids: list[str] = []
    blocks: list[npt.NDArray[Any]] = []
    texts: list[str] = []
    read = StepStats()
    for doc in _read(part, read):
        ids.append(doc.id)
        texts.append(doc.text)
        if len(texts) == step.config.batch_size:
            blocks.append(hasher.signatures(texts))
            texts = []
    blocks.append(hasher.signatures(texts))
    signatures = np.concatenate(blocks)
    shingled = np.flatnonzero((signatures != hasher.empty_signature).any(axis=1))
    _save_npz(
        work / f"sig-{index:05d}-ids.npz", id=np.array(ids, dtype=np.str_), signature=signatures
    )
    rows: list[list[tuple[int, int, int]]] = [[] for _ in range(step.partitions)]
    for band in range(lsh.bands):
        values = np.ascontiguousarray(signatures[shingled, band * lsh.rows : (band + 1) * lsh.rows])
        for line, value in zip(shingled.tolist(), values, strict=True):
            key = xxhash.xxh3_128_intdigest(value.tobytes(), seed=band)
            rows[key % step.partitions].append((band, key, (index << _LINE_BITS) | line))
    for k, table in enumerate(rows):
        _save_npz(
            work / f"sig-{index:05d}-{k:05d}.npz",
            band=np.array([r[0] for r in table], dtype=np.int64),
            key_hi=np.array([r[1] >> 64 for r in table], dtype=np.uint64),
            key_lo=np.array([r[1] & (2**64 - 1) for r in table], dtype=np.uint64),
            position=np.array([r[2] for r in table], dtype=np.int64),
        )
    return _mark(marker, fingerprint, read=read.to_dict())


def _bucket_task(
    step: ShardedNearDedup, partition: int, n_parts: int, work: Path, base: str
) -> dict[str, Any]:
    """The partition's buckets of >= 2 members, as (band, members in ascending position)."""
    marker = work / f"bucket-{partition:05d}.done.json"
    fingerprint = f"{base}:bucket:{partition}"
    if (done := _done(marker, fingerprint)) is not None:
        return done
    cols: dict[str, list[npt.NDArray[Any]]] = {
        c: [] for c in ("band", "key_hi", "key_lo", "position")
    }
    for index in range(n_parts):
        with np.load(work / f"sig-{index:05d}-{partition:05d}.npz") as data:
            for c in cols:
                cols[c].append(data[c])
    band, hi, lo, position = (
        np.concatenate(cols[c]) for c in ("band", "key_hi", "key_lo", "position")
    )
    order = np.lexsort((position, lo, hi, band))
    band, hi, lo, position = band[order], hi[order], lo[order], position[order]
    new = np.ones(band.size, dtype=bool)
    new[1:] = (band[1:] != band[:-1]) | (hi[1:] != hi[:-1]) | (lo[1:] != lo[:-1])
    starts = np.flatnonzero(new)
    sizes = np.diff(np.append(starts, band.size))
    keep = sizes >= 2
    member_mask = np.repeat(keep, sizes)
    _save_npz(
        work / f"bucket-{partition:05d}.npz",
        band=band[starts[keep]],
        sizes=sizes[keep],
        members=position[member_mask],
    )
    _save_positions(work / f"members-{partition:05d}.npy", np.unique(position[member_mask]))
    return _mark(marker, fingerprint)


def _shingle_task(
    step: ShardedNearDedup, index: int, part: Path, work: Path, base: str
) -> dict[str, Any]:
    """Shingle sets of this part's documents that are in some bucket (exact confirmation)."""
    marker = work / f"shingle-{index:05d}.done.json"
    fingerprint = f"{base}:shingle:{index}"
    if (done := _done(marker, fingerprint)) is not None:
        return done
    wanted: set[int] = set()
    for partition in range(step.partitions):
        wanted |= _part_ordinals(work / f"members-{partition:05d}.npy", index)
    hasher = step._hasher()
    lines, sets = [], []
    for line, doc in enumerate(_read(part)):
        if line in wanted:
            lines.append(line)
            sets.append(shingle_set(hasher, doc.text))
    _save_npz(
        work / f"shingle-{index:05d}.npz",
        line=np.array(lines, dtype=np.int64),
        sizes=np.array([s.size for s in sets], dtype=np.int64),
        values=np.concatenate(sets) if sets else np.array([], dtype=np.uint64),
    )
    return _mark(marker, fingerprint)


def _confirm_task(
    step: ShardedNearDedup, partition: int, n_parts: int, work: Path, base: str
) -> dict[str, Any]:
    """Confirmed edges of this partition's buckets, searched breadth-first per bucket."""
    marker = work / f"confirm-{partition:05d}.done.json"
    fingerprint = f"{base}:confirm:{partition}"
    if (done := _done(marker, fingerprint)) is not None:
        return done
    with np.load(work / f"bucket-{partition:05d}.npz") as data:
        sizes, members = data["sizes"], data["members"]
    needed = np.unique(members)
    parts_needed = np.unique(needed >> _LINE_BITS).tolist()
    threshold = step.config.threshold
    shingles: dict[int, npt.NDArray[np.uint64]] = {}
    signatures: dict[int, npt.NDArray[Any]] = {}
    for index in parts_needed:
        # Each array is read from the file once (an NpzFile reads it again on every access) and
        # only the needed rows are copied out, so the part's arrays are freed after the loop.
        mine = needed[(needed >> _LINE_BITS) == index] & ((1 << _LINE_BITS) - 1)
        if step.config.confirm == "exact":
            with np.load(work / f"shingle-{index:05d}.npz") as data:
                lines, sizes_, values = data["line"], data["sizes"], data["values"]
            ends = np.cumsum(sizes_)
            for row in np.flatnonzero(np.isin(lines, mine)).tolist():
                position = (index << _LINE_BITS) | int(lines[row])
                shingles[position] = values[ends[row] - sizes_[row] : ends[row]].copy()
        else:
            with np.load(work / f"sig-{index:05d}-ids.npz") as data:
                part_signatures = data["signature"]
            for line in mine.tolist():
                signatures[(index << _LINE_BITS) | line] = part_signatures[line].copy()
    num_perm = step.config.num_perm
    min_agree = int(np.ceil(threshold * num_perm - 1e-9))

    def close(x: int, y: int) -> bool:
        if step.config.confirm == "exact":
            return jaccard(shingles[x], shingles[y]) >= threshold
        return int(np.count_nonzero(signatures[x] == signatures[y])) >= min_agree

    edges: list[tuple[int, int]] = []
    start = 0
    for size in sizes.tolist():
        bucket = members[start : start + size].tolist()
        start += size
        unreached = bucket
        while unreached:
            frontier = [unreached[0]]
            unreached = unreached[1:]
            while frontier and unreached:
                x = frontier.pop()
                still = []
                for y in unreached:
                    if close(x, y):
                        edges.append((x, y))
                        frontier.append(y)
                    else:
                        still.append(y)
                unreached = still
    _save_npz(
        work / f"confirm-{partition:05d}.npz",
        a=np.array([e[0] for e in edges], dtype=np.int64),
        b=np.array([e[1] for e in edges], dtype=np.int64),
    )
    return _mark(marker, fingerprint)


def _component_task(step: ShardedNearDedup, n_parts: int, work: Path, base: str) -> dict[str, Any]:
    """Connected components of the confirmed edges, and their losers: every member but the one
    with the smallest id (then the first position). All in numpy arrays, over the documents with
    a confirmed near duplicate only: memory is about 40 bytes per such document (datatrove's
    cluster stage is one process too)."""
    marker = work / "components.done.json"
    fingerprint = f"{base}:components"
    if (done := _done(marker, fingerprint)) is not None:
        return done
    a_list, b_list = [], []
    for partition in range(step.partitions):
        with np.load(work / f"confirm-{partition:05d}.npz") as data:
            a_list.append(data["a"])
            b_list.append(data["b"])
    a, b = np.concatenate(a_list), np.concatenate(b_list)
    nodes = np.unique(np.concatenate((a, b)))
    label = _component_labels(nodes.size, np.searchsorted(nodes, a), np.searchsorted(nodes, b))
    ids = np.empty(nodes.size, dtype=object)
    parts_of = nodes >> _LINE_BITS
    for index in np.unique(parts_of).tolist():
        with np.load(work / f"sig-{index:05d}-ids.npz") as data:
            part_ids = data["id"]
        rows = np.flatnonzero(parts_of == index)
        ids[rows] = part_ids[nodes[rows] & ((1 << _LINE_BITS) - 1)]
    ids = ids.astype(np.str_)
    order = np.lexsort((nodes, ids, label))  # by component, then id, then position
    first = np.ones(order.size, dtype=bool)
    first[1:] = label[order][1:] != label[order][:-1]
    _save_positions(work / "components.npy", nodes[order[~first]])
    return _mark(marker, fingerprint)


def _component_labels(
    n: int, a: npt.NDArray[np.int64], b: npt.NDArray[np.int64]
) -> npt.NDArray[np.int64]:
    """For each of `n` nodes, the smallest node of its connected component under edges (a, b):
    min-label propagation along the edges with pointer jumping, until nothing changes."""
    label = np.arange(n, dtype=np.int64)
    while True:
        smaller = np.minimum(label[a], label[b])
        new = label.copy()
        np.minimum.at(new, a, smaller)
        np.minimum.at(new, b, smaller)
        new = new[new]  # jump: a node takes its label's label
        if np.array_equal(new, label):
            return label
        label = new


def _near_filter_task(
    step: ShardedNearDedup, index: int, part: Path, work: Path, output: Path, base: str
) -> dict[str, Any]:
    marker = output.with_suffix(".done.json")
    fingerprint = f"{base}:nfilter:{index}"
    if (done := _done(marker, fingerprint)) is not None:
        return done
    mine = _part_ordinals(work / "components.npy", index)
    stats = StepStats()
    _write_without(part, output, mine, "near_duplicate", stats)
    return _mark(marker, fingerprint, stats=stats.to_dict())


@dataclass(frozen=True)
class StreamedStep:
    """Any `Step` as one task over every part in order, written as one output part: for global
    steps that have no sharded form. Its memory is whatever the step holds."""

    step: Step
    """The step, run once over the stream of all parts' documents."""

    @property
    def name(self) -> str:
        return self.step.name

    def run(
        self, parts: Sequence[Path], work: Path, out: Path, *, executor: Executor | None = None
    ) -> ShardedResult:
        """Run the step over `parts` into `out/part-00000.jsonl.gz`."""
        run, _ = _start(parts, work, out, executor)
        output = out / "part-00000.jsonl.gz"
        base = _base((type(self.step).__qualname__, describe(self.step)), parts)
        (result,) = run.map([(_streamed_task, (self, list(parts), output, base))], self.name)
        return ShardedResult(
            [output], StepStats.from_dict(result["stats"]), StepStats.from_dict(result["read"])
        )


def _streamed_task(
    step: StreamedStep, parts: list[Path], output: Path, base: str
) -> dict[str, Any]:
    marker = output.with_suffix(".done.json")
    fingerprint = f"{base}:streamed"
    if (done := _done(marker, fingerprint)) is not None:
        return done
    read, stats = StepStats(), StepStats()

    def everything() -> Iterator[Document]:
        for part in parts:
            yield from _read(part, read)

    write_jsonl(step.step.run(everything(), stats), output)
    return _mark(marker, fingerprint, stats=stats.to_dict(), read=read.to_dict())


def as_sharded(step: Step | ShardedStep, partitions: int = 16) -> ShardedStep:
    """The sharded form of a global step, with the same settings and results: `UrlDedup` and
    `ExactDedup` -> `ShardedKeyDedup`, `NearDedup` -> `ShardedNearDedup`, `LineDedup` ->
    `ShardedLineDedup` (each with `partitions` hash partitions); a sharded step as it is; any other
    step (subclasses of those four included, as they may change what they do) -> `StreamedStep`."""
    if type(step) is UrlDedup and isinstance(step, UrlDedup):
        return ShardedKeyDedup("url", partitions, date_key=step.date_key)
    if type(step) is ExactDedup:
        return ShardedKeyDedup("exact", partitions)
    if type(step) is NearDedup and isinstance(step, NearDedup):
        return ShardedNearDedup(step.config, partitions)
    if type(step) is LineDedup and isinstance(step, LineDedup):
        return ShardedLineDedup(step.max_occurrences, step.bucket_size, partitions)
    if isinstance(step, Step):
        return StreamedStep(step)
    return step
