"""De-duplication steps at the three levels of §3.1.1 of the Llama 3 paper, plus exact dedup.

- `UrlDedup` (URL level): "we keep the most recent version for pages corresponding to each URL".
- `ExactDedup`: documents with the same (whitespace-normalised) text; the first one is kept.
- `NearDedup` (document level): "global MinHash (Broder, 1997) de-duplication across the entire
  dataset to remove near duplicate documents"; signatures and banding live in `llama_data.minhash`.
- `LineDedup` (line level): "we remove lines that appeared more than 6 times in each bucket of 30M
  documents", which the paper says removes leftover boilerplate (navigation menus, cookie warnings).

`UrlDedup` and `NearDedup` can only decide a document's fate after seeing the whole stream, so
they read it twice. A re-iterable input (a list, or an object whose `__iter__` starts afresh) is
iterated twice and must yield the same documents both times; a one-shot iterator (a generator) is
spooled to an anonymous temporary file (pickled documents) on the first pass and replayed, so
memory holds only per-document keys, never texts (``spool_to_disk=False`` keeps them in a list).
Survivors come out in input order.
"""

from __future__ import annotations

import pickle
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import replace
from datetime import UTC, date, datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import xxhash

from llama_data.document import Document, Step, StepStats
from llama_data.minhash import LshIndex, MinHasher, Signature

__all__ = [
    "ExactDedup",
    "LineDedup",
    "NearDedup",
    "UrlDedup",
    "near_duplicate_clusters",
    "normalize_url",
]

LINE_MAX_OCCURRENCES = 6  # §3.1.1: lines appearing more than 6 times in a bucket are removed
LINE_BUCKET_DOCUMENTS = 30_000_000  # §3.1.1: buckets of 30M documents
NEAR_DUP_THRESHOLD = 0.8  # not given in §3.1.1; a common Jaccard threshold for web documents
_DEFAULT_PORTS = {"http": 80, "https": 443}


class _TwoPass:
    """Read a stream of documents twice: iterate a re-iterable input again, or replay a spool."""

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

    def second(self) -> Iterator[Document]:
        """The same documents again, in the same order."""
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
        passes = _TwoPass(docs, self.spool_to_disk)
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
            for position, doc in enumerate(passes.second()):
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


def near_duplicate_clusters(
    signatures: Signature, index: LshIndex, verify: bool = True
) -> list[int]:
    """A cluster label (the index of one member) per document, independent of document order.

    Clusters are the connected components of the graph whose edges are the LSH candidate pairs,
    each kept only if its estimated Jaccard is >= index.threshold when `verify`. Verification
    searches each bucket's graph, comparing a reached member against all members not yet reached
    in one numpy call: a bucket of k copies costs O(k) comparisons, not O(k^2).
    """
    sets = _UnionFind(len(signatures))
    num_perm = signatures.shape[1] if signatures.ndim == 2 else 0
    min_agree = int(np.ceil(index.threshold * num_perm - 1e-9))  # equal values for >= threshold
    for members in index.buckets(signatures):
        if not verify:
            for other in members[1:].tolist():
                sets.union(int(members[0]), other)
            continue
        unreached = members
        while unreached.size:
            frontier = [int(unreached[0])]
            unreached = unreached[1:]
            while frontier and unreached.size:
                x = frontier.pop()
                agree = np.count_nonzero(signatures[unreached] == signatures[x], axis=1)
                close = agree >= min_agree
                for y in unreached[close].tolist():
                    sets.union(x, y)
                    frontier.append(y)
                unreached = unreached[~close]
    return [sets.find(i) for i in range(len(signatures))]


class NearDedup(Step):
    """Drops near-duplicate documents with MinHash + LSH, §3.1.1; keeps one per cluster.

    The survivor of each cluster is the document with the smallest id (string order; the first
    seen among equal ids), so the output set does not depend on input order. Documents without a
    word are never clustered (they are kept; quality filters judge them). Memory: one signature
    per document (num_perm x 4 bytes for the default scheme: 512 B at 128 perms) plus its id and
    the spool (module docstring); beyond one machine, shard with Ray by band.
    """

    name = "near_dedup"

    def __init__(
        self,
        hasher: MinHasher | None = None,
        index: LshIndex | None = None,
        *,
        verify: bool = True,
        batch_size: int = 256,
        spool_to_disk: bool = True,
    ) -> None:
        """`hasher` defaults to MinHasher(), `index` to a recall-first LshIndex at Jaccard 0.8.

        The default index weighs false negatives 0.95 and false positives 0.05 (16 bands x 8 rows
        at 128 perms: a pair at Jaccard 0.8 is a candidate with probability 0.95, against 0.40
        for datasketch's equal weights, 9 x 13); verification then removes the false positives.
        The paper does not give its threshold; 0.8 is a common choice for web text.

        `verify` keeps a candidate pair only if its estimated Jaccard reaches index.threshold;
        `batch_size` documents are signed per vectorised call.
        """
        self.hasher = hasher if hasher is not None else MinHasher()
        if index is None:
            index = LshIndex(
                NEAR_DUP_THRESHOLD,
                self.hasher.num_perm,
                false_positive_weight=0.05,
                false_negative_weight=0.95,
            )
        self.index = index
        if self.index.num_perm != self.hasher.num_perm:
            raise ValueError(
                f"index.num_perm={self.index.num_perm} differs from hasher.num_perm="
                f"{self.hasher.num_perm}; build both with the same num_perm"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.verify = verify
        self.batch_size = batch_size
        self.spool_to_disk = spool_to_disk

    def run(self, docs: Iterable[Document], stats: StepStats) -> Iterator[Document]:
        passes = _TwoPass(docs, self.spool_to_disk)
        try:
            ids: list[str] = []
            blocks: list[Signature] = []
            texts: list[str] = []
            for doc in passes.first():
                ids.append(doc.id)
                texts.append(doc.text)
                if len(texts) == self.batch_size:
                    blocks.append(self.hasher.signatures(texts))
                    texts = []
            blocks.append(self.hasher.signatures(texts))
            signatures: Signature = np.concatenate(blocks)  # [n_docs, num_perm]
            # Documents without a single word have the all-max signature; each is its own cluster.
            shingled = np.flatnonzero((signatures != self.hasher.empty_signature).any(axis=1))
            labels = list(range(len(ids)))
            sublabels = near_duplicate_clusters(signatures[shingled], self.index, self.verify)
            for position, sublabel in zip(shingled.tolist(), sublabels, strict=True):
                labels[position] = int(shingled[sublabel])
            survivor: dict[int, int] = {}
            for position, label in enumerate(labels):
                held = survivor.get(label)
                if held is None or ids[position] < ids[held]:
                    survivor[label] = position
            for position, doc in enumerate(passes.second()):
                if survivor[labels[position]] == position:
                    stats.kept += 1
                    yield doc
                else:
                    stats.drop("near_duplicate")
        finally:
            passes.close()


def _line_hash(line: str) -> int:
    """64-bit xxh3 of a (stripped) line's UTF-8 bytes."""
    return xxhash.xxh3_64_intdigest(line.encode())


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
            counts.update(map(_line_hash, filter(None, map(str.strip, doc.text.splitlines()))))
        frequent = {h for h, n in counts.items() if n > self.max_occurrences}
        del counts
        for doc in bucket:
            lines = doc.text.splitlines(keepends=True)
            kept = [
                line for line in lines if not (s := line.strip()) or _line_hash(s) not in frequent
            ]
            if len(kept) == len(lines):
                stats.kept += 1
                yield doc
            elif any(line.strip() for line in kept):
                stats.kept += 1
                yield replace(doc, text="".join(kept))
            else:
                stats.drop("empty_after_line_dedup")
