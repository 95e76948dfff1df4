"""De-duplication steps at the three levels of §3.1.1 of the Llama 3 paper, plus exact dedup.

- `UrlDedup` (URL level): "we keep the most recent version for pages corresponding to each URL".
- `ExactDedup`: documents with the same (whitespace-normalised) text; the first one is kept.
- `NearDedup` (document level): "global MinHash (Broder, 1997) de-duplication across the entire
  dataset to remove near duplicate documents"; signatures and banding live in `llama_data.minhash`,
  and candidate pairs are confirmed by the exact Jaccard of their shingle sets. Its settings are
  one pydantic model, `NearDedupConfig`, shared by the Python API and pipeline files.
- `LineDedup` (line level): "we remove lines that appeared more than 6 times in each bucket of 30M
  documents", which the paper says removes leftover boilerplate (navigation menus, cookie warnings).

`UrlDedup` and `NearDedup` can only decide a document's fate after seeing the whole stream, so
they read it more than once (twice; three times for `NearDedup`'s exact confirmation). A
re-iterable input (a list, or an object whose `__iter__` starts afresh) is iterated again and must
yield the same documents each time; a one-shot iterator (a generator) is spooled to an anonymous
temporary file (pickled documents) on the first pass and replayed, so memory holds only
per-document keys, never texts (``spool_to_disk=False`` keeps them in a list). Survivors come out
in input order.
"""

from __future__ import annotations

import pickle
import tempfile
from collections import Counter
from collections.abc import Callable, Container, Iterable, Iterator, Mapping
from dataclasses import replace
from datetime import UTC, date, datetime
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import numpy.typing as npt
import xxhash
from pydantic import BaseModel, ConfigDict, Field, model_validator

from llama_data.document import Document, Step, StepStats
from llama_data.minhash import LshIndex, MinHasher, Scheme, ShingleHash, Signature

__all__ = [
    "ExactDedup",
    "LineDedup",
    "NearDedup",
    "NearDedupConfig",
    "UrlDedup",
    "jaccard",
    "near_duplicate_clusters",
    "normalize_url",
    "shingle_set",
]

LINE_MAX_OCCURRENCES = 6  # §3.1.1: lines appearing more than 6 times in a bucket are removed
LINE_BUCKET_DOCUMENTS = 30_000_000  # §3.1.1: buckets of 30M documents
NEAR_DUP_THRESHOLD = 0.8  # not given in §3.1.1; a common Jaccard threshold for web documents
_DEFAULT_PORTS = {"http": 80, "https": 443}


class _Replayable:
    """Read a stream of documents more than once: iterate a re-iterable input again, or replay
    a spool of a one-shot input."""

    def __init__(self, docs: Iterable[Document], spool_to_disk: bool) -> None:
        self._docs = docs
        self._one_shot = iter(docs) is docs
        self._spool_to_disk = spool_to_disk
        self._memory: list[Document] = []
        self._file: Any = None
        self._count = 0

    def first(self) -> Iterator[Document]:
        """The documents, recording them if the input cannot be iterated again."""
        if self._one_shot and self._spool_to_disk:
            self._file = tempfile.TemporaryFile()  # noqa: SIM115 -- closed by close()
        for doc in self._docs:
            self._count += 1
            if self._file is not None:
                pickle.dump(doc, self._file, protocol=pickle.HIGHEST_PROTOCOL)
            elif self._one_shot:
                self._memory.append(doc)
            yield doc

    def replay(self) -> Iterator[Document]:
        """The same documents again, in the same order (as often as needed, after `first`)."""
        if self._file is not None:
            self._file.seek(0)
            for _ in range(self._count):
                yield pickle.load(self._file)  # our own spool file, written just above
        elif self._one_shot:
            yield from self._memory
        else:
            seen = 0
            for doc in self._docs:
                seen += 1
                yield doc
            if seen != self._count:
                raise RuntimeError(
                    f"input yielded {self._count} documents on the first pass and {seen} on the "
                    "second; pass a list or a one-shot iterator (which is spooled) instead"
                )

    def close(self) -> None:
        """Delete the spool."""
        if self._file is not None:
            self._file.close()
        self._memory = []


def normalize_url(url: str) -> str:
    """Scheme and host lower-cased, default port and fragment dropped, empty path -> "/", query kept."""
    url = url.strip()
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:  # e.g. an unclosed IPv6 bracket or a non-numeric port: compare as written
        return url
    scheme = parts.scheme.lower()
    if ":" in host:
        host = f"[{host}]"  # IPv6 literal
    netloc = host
    if port is not None and port != _DEFAULT_PORTS.get(scheme):
        netloc = f"{host}:{port}"
    if "@" in parts.netloc:
        netloc = parts.netloc.rsplit("@", 1)[0] + "@" + netloc
    path = parts.path or ("/" if netloc else "")
    return urlunsplit((scheme, netloc, path, parts.query, ""))


class _BadDateError(Exception):
    """A crawl date that is not an ISO 8601 string, datetime or date."""


def _crawl_timestamp(doc: Document, key: str) -> float:
    """Seconds since the epoch of doc.metadata[key]; -inf when absent (older than any crawl).
    Raises _BadDateError for a value that is not an ISO 8601 string, datetime or date."""
    value = doc.metadata.get(key)
    if value is None:
        return float("-inf")
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            raise _BadDateError(doc.id) from None
    if isinstance(value, date) and not isinstance(value, datetime):
        value = datetime(value.year, value.month, value.day)
    if not isinstance(value, datetime):
        raise _BadDateError(doc.id)
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)  # naive dates are taken to be UTC
    return value.timestamp()


class UrlDedup(Step):
    """Keeps the most recent crawl of each (normalised) URL, §3.1.1.

    The winner has the latest `metadata[date_key]`; among equal dates, the smallest document id;
    among equal ids, the first seen. Documents without a URL are kept. Memory: one
    (timestamp, id, position) entry per distinct URL, plus the spool (module docstring).
    """

    name = "url_dedup"

    def __init__(self, date_key: str = "crawl_date", spool_to_disk: bool = True) -> None:
        self.date_key = date_key
        self.spool_to_disk = spool_to_disk

    def run(self, docs: Iterable[Document], stats: StepStats) -> Iterator[Document]:
        passes = _Replayable(docs, self.spool_to_disk)
        try:
            best: dict[str, tuple[float, str, int]] = {}
            for position, doc in enumerate(passes.first()):
                if doc.url is None:
                    continue
                url = normalize_url(doc.url)
                try:
                    stamp = _crawl_timestamp(doc, self.date_key)
                except _BadDateError:  # counted, and treated as the oldest crawl: never fatal
                    stats.error("invalid_crawl_date", doc.id)
                    stamp = float("-inf")
                held = best.get(url)
                if held is None or stamp > held[0] or (stamp == held[0] and doc.id < held[1]):
                    best[url] = (stamp, doc.id, position)
            for position, doc in enumerate(passes.replay()):
                if doc.url is None or best[normalize_url(doc.url)][2] == position:
                    stats.kept += 1
                    yield doc
                else:
                    stats.drop("url_duplicate")
        finally:
            passes.close()


def _normalize_text(text: str) -> str:
    """Runs of whitespace collapsed to one space, ends stripped."""
    return " ".join(text.split())


class ExactDedup(Step):
    """Drops documents whose whitespace-normalised text was seen before (xxh3-128 of the text).

    Streaming, first occurrence kept; memory is one 128-bit hash per distinct text.
    """

    name = "exact_dedup"

    def run(self, docs: Iterable[Document], stats: StepStats) -> Iterator[Document]:
        seen: set[int] = set()
        for doc in docs:
            digest = xxhash.xxh3_128_intdigest(_normalize_text(doc.text).encode())
            if digest in seen:
                stats.drop("exact_duplicate")
                continue
            seen.add(digest)
            stats.kept += 1
            yield doc


class _UnionFind:
    """Disjoint sets over 0..n-1 with path halving and union by size."""

    def __init__(self, n: int) -> None:
        self.parent = list(range(n))
        self.size = [1] * n

    def find(self, x: int) -> int:
        parent = self.parent
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(self, x: int, y: int) -> None:
        x, y = self.find(x), self.find(y)
        if x == y:
            return
        if self.size[x] < self.size[y]:
            x, y = y, x
        self.parent[y] = x
        self.size[x] += self.size[y]


ShingleSet = npt.NDArray[np.uint64]  # sorted distinct 64-bit fingerprints of a document's shingles
Confirm = Literal["exact", "estimate"]


def shingle_set(hasher: MinHasher, text: str) -> ShingleSet:
    """The set of `text`'s shingles (the ones `hasher` signs), as sorted distinct 64-bit xxh3
    fingerprints: 8 bytes a shingle, and Jaccard by one sorted merge.

    Two distinct shingles share a fingerprint with probability 2**-64, so the Jaccard of these
    sets equals that of the shingle sets themselves except with probability below
    ``|A| * |B| / 2**64`` (5e-15 for two 10,000-shingle documents).
    """
    shingles = hasher.shingles(text)
    fingerprints = np.sort(np.fromiter(map(xxhash.xxh3_64_intdigest, shingles), np.uint64))
    if fingerprints.size < 2:
        return fingerprints
    return fingerprints[np.concatenate(([True], fingerprints[1:] != fingerprints[:-1]))]


def jaccard(a: ShingleSet, b: ShingleSet) -> float:
    """|A & B| / |A | B| of two `shingle_set`s (0.0 when both are empty)."""
    if a.size > b.size:
        a, b = b, a
    if a.size == 0:
        return 0.0
    at = np.minimum(np.searchsorted(b, a), b.size - 1)  # where each of a would sit in b
    shared = int(np.count_nonzero(b[at] == a))
    return shared / (a.size + b.size - shared)


def near_duplicate_clusters(
    signatures: Signature,
    index: LshIndex,
    shingle_sets: Mapping[int, ShingleSet] | None = None,
) -> list[int]:
    """A cluster label (the index of one member) per document, independent of document order.

    Clusters are the connected components of the graph whose edges are the LSH candidate pairs
    (documents sharing a band) confirmed at Jaccard >= index.threshold: by the exact Jaccard of
    their `shingle_sets` (one for every document in a bucket, keyed by row) when given, else by
    the MinHash estimate (the fraction of equal signature values; its standard error is
    sqrt(J (1 - J) / num_perm), 0.035 at J = 0.8 and 128 permutations).

    Each bucket is searched breadth-first, comparing a reached member against the members not
    yet reached: a bucket of k copies costs O(k) comparisons, not O(k^2). With exact
    confirmation, a member already in the reached member's cluster (joined through another
    band) is taken without a comparison, and a failed comparison is not repeated in another band.
    """
    sets = _UnionFind(len(signatures))
    threshold = index.threshold
    close: Callable[[int, npt.NDArray[np.intp]], npt.NDArray[np.bool_]]
    if shingle_sets is None:
        num_perm = signatures.shape[1] if signatures.ndim == 2 else 0
        min_agree = int(np.ceil(threshold * num_perm - 1e-9))  # equal values for >= threshold

        def close(x: int, others: npt.NDArray[np.intp]) -> npt.NDArray[np.bool_]:
            return np.count_nonzero(signatures[others] == signatures[x], axis=1) >= min_agree

    else:
        apart: set[tuple[int, int]] = set()  # pairs compared exactly and found below threshold
        shingles = shingle_sets

        def close(x: int, others: npt.NDArray[np.intp]) -> npt.NDArray[np.bool_]:
            result = np.zeros(others.size, dtype=np.bool_)
            root = sets.find(x)
            for i, y in enumerate(others.tolist()):
                if sets.find(y) == root:  # joined through another band already
                    result[i] = True
                    continue
                pair = (x, y) if x < y else (y, x)
                if pair in apart:
                    continue
                if jaccard(shingles[x], shingles[y]) >= threshold:
                    result[i] = True
                else:
                    apart.add(pair)
            return result

    for members in index.buckets(signatures):
        unreached = members
        while unreached.size:
            frontier = [int(unreached[0])]
            unreached = unreached[1:]
            while frontier and unreached.size:
                x = frontier.pop()
                is_close = close(x, unreached)
                for y in unreached[is_close].tolist():
                    sets.union(x, y)
                    frontier.append(y)
                unreached = unreached[~is_close]
    return [sets.find(i) for i in range(len(signatures))]


class NearDedupConfig(BaseModel):
    """Every setting of `NearDedup`, defined once: the Python API (`NearDedup()`) and a pipeline
    file's ``near_dedup`` step (every key of this model) build the step from these defaults."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    threshold: float = Field(default=NEAR_DUP_THRESHOLD, gt=0.0, lt=1.0)
    """Jaccard similarity of two documents' word-shingle sets at or above which they are near
    duplicates. §3.1.1 gives none; 0.8 is a common choice for web text."""
    confirm: Confirm = "exact"
    """How a candidate pair (documents sharing an LSH band) is confirmed: "exact" computes the
    Jaccard of the two shingle sets (re-reading the candidate documents; see `NearDedup`),
    "estimate" uses the MinHash estimate, whose standard error at Jaccard 0.8 and 128
    permutations is 0.035: pairs at 0.72-0.80 get merged and pairs at 0.80-0.84 missed."""
    num_perm: int = Field(default=128, ge=1)
    """MinHash permutations per signature (datasketch's default, 128)."""
    ngram: int = Field(default=5, ge=1)
    """Words per shingle (5-grams, a common choice for web-scale near-dedup)."""
    seed: int = 1
    """Seed of the permutations (datasketch's default, 1)."""
    scheme: Scheme = "affine32"
    """Permutation scheme, as in datasketch (`llama_data.minhash`)."""
    shingle_hash: ShingleHash = "sha1"
    """Shingle hash for the signatures: "sha1" (datasketch's default) or "xxh3" (~8x faster)."""
    bands: int | None = Field(default=None, ge=1)
    """LSH bands; with `rows`, overrides the choice from the two weights below."""
    rows: int | None = Field(default=None, ge=1)
    """Signature values per band; give `bands` and `rows` together (bands * rows <= num_perm)."""
    false_positive_weight: float = Field(default=0.05, ge=0.0)
    """Weight of the false-positive area when bands x rows are chosen (datasketch uses 0.5).
    Low, because confirmation removes false candidates at the cost of one comparison each."""
    false_negative_weight: float = Field(default=0.95, ge=0.0)
    """Weight of the false-negative area (datasketch uses 0.5). At 128 permutations and 0.8,
    0.05/0.95 gives 16 bands x 8 rows: a pair at Jaccard 0.8 is a candidate with probability
    0.95, against 0.40 for datasketch's equal weights (9 x 13)."""
    batch_size: int = Field(default=256, ge=1)
    """Documents signed per vectorised `MinHasher.signatures` call."""
    spool_to_disk: bool = True
    """Spool a one-shot input to a temporary file to read it again (False: keep it in memory)."""

    @model_validator(mode="after")
    def _check_banding(self) -> NearDedupConfig:
        if (self.bands is None) != (self.rows is None):
            raise ValueError(
                f"give both bands and rows or neither, got bands={self.bands}, rows={self.rows}"
            )
        if self.bands is not None and self.rows is not None:
            if self.bands * self.rows > self.num_perm:
                raise ValueError(
                    f"bands * rows = {self.bands} * {self.rows} exceeds num_perm={self.num_perm}; "
                    "lower bands or rows, or raise num_perm"
                )
        elif self.false_positive_weight + self.false_negative_weight <= 0:
            raise ValueError("false_positive_weight + false_negative_weight must be > 0")
        return self


class NearDedup(Step):
    """Drops near-duplicate documents with MinHash + LSH, §3.1.1; keeps one per cluster.

    Documents sharing an LSH band are candidates; a candidate pair is confirmed by the exact
    Jaccard of the two documents' shingle sets (or, with ``confirm="estimate"``, by the MinHash
    estimate), and clusters are the connected components of confirmed pairs. The survivor of
    each cluster is the document with the smallest id (string order; the first seen among equal
    ids), so the output set does not depend on input order. Documents without a word are never
    clustered (they are kept; quality filters judge them).

    The input is read three times with exact confirmation (two with the estimate): signatures;
    then the shingle sets of the candidate documents only; then the output. Memory: one
    signature per document (num_perm x 4 bytes for the default scheme: 512 B at 128 perms) plus
    its id and the spool (module docstring), and with exact confirmation 8 bytes per distinct
    shingle of each candidate document (about 4 KB for a 500-word candidate). Beyond one
    machine, shard with Ray by band.
    """

    name = "near_dedup"

    def __init__(self, config: NearDedupConfig | None = None) -> None:
        """The step `config` describes (default: `NearDedupConfig()`)."""
        self.config = config if config is not None else NearDedupConfig()
        c = self.config
        self.hasher = MinHasher(c.num_perm, c.ngram, c.seed, c.scheme, c.shingle_hash)
        """Signs documents (built from the config)."""
        self.index = LshIndex(
            c.threshold,
            c.num_perm,
            bands=c.bands,
            rows=c.rows,
            false_positive_weight=c.false_positive_weight,
            false_negative_weight=c.false_negative_weight,
        )
        """Bands signatures into candidate buckets (built from the config)."""

    def run(self, docs: Iterable[Document], stats: StepStats) -> Iterator[Document]:
        passes = _Replayable(docs, self.config.spool_to_disk)
        try:
            ids: list[str] = []
            blocks: list[Signature] = []
            texts: list[str] = []
            for doc in passes.first():
                ids.append(doc.id)
                texts.append(doc.text)
                if len(texts) == self.config.batch_size:
                    blocks.append(self.hasher.signatures(texts))
                    texts = []
            blocks.append(self.hasher.signatures(texts))
            signatures: Signature = np.concatenate(blocks)  # [n_docs, num_perm]
            # Documents without a single word have the all-max signature; each is its own cluster.
            shingled = np.flatnonzero((signatures != self.hasher.empty_signature).any(axis=1))
            shingled_signatures = signatures[shingled]  # [n_shingled, num_perm]
            shingle_sets = None
            if self.config.confirm == "exact":
                shingle_sets = self._candidate_shingle_sets(passes, shingled, shingled_signatures)
            sublabels = near_duplicate_clusters(shingled_signatures, self.index, shingle_sets)
            del shingle_sets
            labels = list(range(len(ids)))
            for position, sublabel in zip(shingled.tolist(), sublabels, strict=True):
                labels[position] = int(shingled[sublabel])
            survivor: dict[int, int] = {}
            for position, label in enumerate(labels):
                held = survivor.get(label)
                if held is None or ids[position] < ids[held]:
                    survivor[label] = position
            for position, doc in enumerate(passes.replay()):
                if survivor[labels[position]] == position:
                    stats.kept += 1
                    yield doc
                else:
                    stats.drop("near_duplicate")
        finally:
            passes.close()

    def _candidate_shingle_sets(
        self, passes: _Replayable, shingled: npt.NDArray[np.intp], signatures: Signature
    ) -> dict[int, ShingleSet]:
        """Shingle sets of the documents in some LSH bucket, keyed by row of `signatures`."""
        in_bucket = list(self.index.buckets(signatures))
        if not in_bucket:
            return {}
        candidates = np.unique(np.concatenate(in_bucket))  # rows of `signatures`
        row_of_position = dict(zip(shingled[candidates].tolist(), candidates.tolist(), strict=True))
        sets: dict[int, ShingleSet] = {}
        for position, doc in enumerate(passes.replay()):
            row = row_of_position.get(position)
            if row is not None:
                sets[row] = shingle_set(self.hasher, doc.text)
        return sets


def _line_hash(line: str) -> int:
    """64-bit xxh3 of a (stripped) line's UTF-8 bytes."""
    return xxhash.xxh3_64_intdigest(line.encode())


def _line_hashes(text: str) -> list[int]:
    """`_line_hash` of each non-blank line of `text`, stripped (what line dedup counts)."""
    return [_line_hash(s) for s in map(str.strip, text.splitlines()) if s]


def _without_frequent_lines(
    doc: Document, frequent: Container[int], stats: StepStats
) -> Document | None:
    """`doc` without the lines whose `_line_hash` is in `frequent` (blank lines stay), counted in
    `stats`: kept (as it was, or rewritten), or dropped when nothing but blank lines is left."""
    lines = doc.text.splitlines(keepends=True)
    kept = [line for line in lines if not (s := line.strip()) or _line_hash(s) not in frequent]
    if len(kept) == len(lines):
        stats.kept += 1
        return doc
    if any(line.strip() for line in kept):
        stats.kept += 1
        return replace(doc, text="".join(kept))
    stats.drop("empty_after_line_dedup")
    return None


class LineDedup(Step):
    """Removes lines occurring more than `max_occurrences` times within each bucket, §3.1.1.

    The stream is cut into consecutive buckets of `bucket_size` documents. Within a bucket every
    occurrence of every non-blank line (compared after strip) is counted by its 64-bit xxh3 hash;
    lines counted more than `max_occurrences` times are then removed from each document of the
    bucket. Blank lines are never counted or removed. A document left with only blank lines is
    dropped as "empty_after_line_dedup". Memory: the bucket's documents are buffered (the paper's
    30M is for a cluster; lower `bucket_size` to fit one machine) plus one counter per distinct line.
    """

    name = "line_dedup"

    def __init__(
        self,
        max_occurrences: int = LINE_MAX_OCCURRENCES,
        bucket_size: int = LINE_BUCKET_DOCUMENTS,
    ) -> None:
        if max_occurrences < 1:
            raise ValueError(f"max_occurrences must be >= 1, got {max_occurrences}")
        if bucket_size < 1:
            raise ValueError(f"bucket_size must be >= 1 document, got {bucket_size}")
        self.max_occurrences = max_occurrences
        self.bucket_size = bucket_size

    def run(self, docs: Iterable[Document], stats: StepStats) -> Iterator[Document]:
        bucket: list[Document] = []
        for doc in docs:
            bucket.append(doc)
            if len(bucket) == self.bucket_size:
                yield from self._dedup_bucket(bucket, stats)
                bucket = []
        yield from self._dedup_bucket(bucket, stats)

    def _dedup_bucket(self, bucket: list[Document], stats: StepStats) -> Iterator[Document]:
        """Count the bucket's lines, then yield its documents without the frequent ones."""
        counts: Counter[int] = Counter()
        for doc in bucket:
            counts.update(_line_hashes(doc.text))
        frequent = {h for h, n in counts.items() if n > self.max_occurrences}
        del counts
        for doc in bucket:
            if (out := _without_frequent_lines(doc, frequent, stats)) is not None:
                yield out
