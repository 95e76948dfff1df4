"""How fast and how accurate is llama_data's de-duplication (§3.1.1), next to datasketch?

MinHash signatures, single process (documents/s per core), num_perm=128, word 5-gram shingles of
~500-word documents drawn from a fixed Zipf-distributed vocabulary with a seeded RNG. Every timing
includes shingling (the same `MinHasher.shingles` for every implementation) and hashing:
- datasketch `MinHash.update` once per shingle (the per-document loop most pipelines write);
- datasketch `MinHash.update_batch` over the document's shingles;
- ours, `MinHasher.signature` one document at a time, and `MinHasher.signatures` over batches;
- ours with the xxh3 shingle hash instead of sha1 (not datasketch's default hash; compatible with
  datasketch given the same hashfunc).
All signatures are checked equal to datasketch's before anything is timed.

Near-duplicate quality on a planted set: random base documents plus variants with a few word edits
(exact 5-gram Jaccard ~0.5-0.95), graded against exact Jaccard computed with Python sets: recall
and precision of the LSH candidate pairs and of the final clusters (pairs in the same cluster).

Results are rows (a list of dicts, one per measurement) so later parts of the pipeline (an end-to-end
row: read -> filter -> dedup -> shards) can be appended. Prints a table and writes
benchmarks/results/data_pipeline.json. Usage:
    uv run python benchmarks/data_pipeline.py [--docs N] [--repeats R] [--scheme affine32|legacy]
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasketch
import numpy as np
import xxhash

from bench_common import cpu_name, timed
from llama_data.dedup import NearDedup, near_duplicate_clusters
from llama_data.document import Document, StepStats
from llama_data.minhash import LshIndex, MinHasher

NUM_PERM = 128
NGRAM = 5
THRESHOLD = 0.8


def zipf_documents(n_docs: int, words_per_doc: int = 500, seed: int = 0) -> list[str]:
    """Real-ish text: words from a 30k-word vocabulary with Zipf(1.1) frequencies, in sentences."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    letter_p = 1.0 / np.arange(1, 27)
    letter_p /= letter_p.sum()
    vocab = ["".join(rng.choice(letters, rng.integers(1, 11), p=letter_p)) for _ in range(30_000)]
    word_p = 1.0 / np.arange(1, len(vocab) + 1) ** 1.1
    word_p /= word_p.sum()
    docs = []
    for _ in range(n_docs):
        n_words = int(rng.integers(words_per_doc * 4 // 5, words_per_doc * 6 // 5))
        words = [vocab[i] for i in rng.choice(len(vocab), n_words, p=word_p)]
        for end in range(12, n_words, 15):
            words[end] += "."
        docs.append(" ".join(words).capitalize())
    return docs


def signature_rows(texts: list[str], repeats: int, scheme: str) -> list[dict[str, Any]]:
    """Documents/s of each signature implementation, checked equal to datasketch first."""
    hasher = MinHasher(NUM_PERM, NGRAM, seed=1, scheme=scheme)  # type: ignore[arg-type]
    fast = MinHasher(NUM_PERM, NGRAM, seed=1, scheme=scheme, shingle_hash="xxh3")  # type: ignore[arg-type]
    mask = (1 << 32) - 1

    def xxh3_32(s: bytes) -> int:
        return xxhash.xxh3_64_intdigest(s) & mask

    def ds_loop(batch: list[str], hashfunc: Callable[[bytes], int] | None = None) -> list[Any]:
        out = []
        for text in batch:
            m = datasketch.MinHash(NUM_PERM, seed=1, scheme=scheme, hashfunc=hashfunc)
            for shingle in hasher.shingles(text):
                m.update(shingle)
            out.append(m.hashvalues)
        return out

    def ds_batch(batch: list[str], hashfunc: Callable[[bytes], int] | None = None) -> list[Any]:
        out = []
        for text in batch:
            m = datasketch.MinHash(NUM_PERM, seed=1, scheme=scheme, hashfunc=hashfunc)
            m.update_batch(hasher.shingles(text))
            out.append(m.hashvalues)
        return out

    few = texts[: max(20, len(texts) // 10)]  # the per-shingle loop is slow: time it on fewer docs
    reference = np.array(ds_batch(few))
    assert np.array_equal(np.array(ds_loop(few)), reference)
    assert np.array_equal(np.array([hasher.signature(t) for t in few]), reference)
    assert np.array_equal(hasher.signatures(few), reference)
    assert np.array_equal(fast.signatures(few), np.array(ds_batch(few, xxh3_32)))

    n_shingles = sum(len(hasher.shingles(t)) for t in texts)
    candidates: list[tuple[str, str, list[str], Callable[[list[str]], object]]] = [
        ("datasketch", "update per shingle (sha1)", few, ds_loop),
        ("datasketch", "update_batch (sha1)", texts, ds_batch),
        ("datasketch", "update_batch (xxh3)", texts, lambda b: ds_batch(b, xxh3_32)),
        (
            "llama_data",
            "signature per doc (sha1)",
            texts,
            lambda b: [hasher.signature(t) for t in b],
        ),
        ("llama_data", "signatures batched (sha1)", texts, hasher.signatures),
        ("llama_data", "signatures batched (xxh3)", texts, fast.signatures),
        (
            "(shingling only)",
            "MinHasher.shingles",
            texts,
            lambda b: [hasher.shingles(t) for t in b],
        ),
    ]
    rows: list[dict[str, Any]] = []
    for impl, method, batch, fn in candidates:
        seconds = timed(lambda fn=fn, batch=batch: fn(batch), repeats)  # type: ignore[misc]
        rows.append(
            {
                "section": "minhash_signatures",
                "impl": impl,
                "method": method,
                "scheme": scheme,
                "num_perm": NUM_PERM,
                "ngram": NGRAM,
                "docs": len(batch),
                "mean_shingles_per_doc": n_shingles / len(texts),
                "docs_per_s": len(batch) / seconds,
            }
        )
    loop = rows[0]["docs_per_s"]
    batch_sha1 = rows[1]["docs_per_s"]
    for row in rows:
        row["vs_update_loop"] = row["docs_per_s"] / loop
        row["vs_update_batch_sha1"] = row["docs_per_s"] / batch_sha1
    return rows


def planted_corpus(n_base: int = 300, words: int = 200, seed: int = 0) -> list[Document]:
    """Random base documents; every other one gets two variants with 1 to 14 word edits."""
    rng = random.Random(seed)
    vocab = [
        "".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9))) for _ in range(5000)
    ]
    docs = []
    for base in range(n_base):
        text = rng.choices(vocab, k=words)
        docs.append(Document(id=f"b{base:04d}", text=" ".join(text)))
        for variant in range(2 if base % 2 == 0 else 0):
            edited = list(text)
            for _ in range(rng.randint(1, 14)):
                position = rng.randrange(len(edited))
                if rng.random() < 0.7:
                    edited[position] = rng.choice(vocab)
                else:
                    del edited[position]
            docs.append(Document(id=f"b{base:04d}v{variant}", text=" ".join(edited)))
    return docs


def exact_pairs(shingles: list[set[bytes]], threshold: float) -> set[tuple[int, int]]:
    """Pairs (i < j) with exact Jaccard >= threshold; pairs sharing no shingle have Jaccard 0."""
    holders: dict[bytes, list[int]] = defaultdict(list)
    for i, doc_shingles in enumerate(shingles):
        for shingle in doc_shingles:
            holders[shingle].append(i)
    sharing = {(i, j) for held in holders.values() for i in held for j in held if i < j}
    return {
        (i, j)
        for i, j in sharing
        if len(shingles[i] & shingles[j]) >= threshold * len(shingles[i] | shingles[j])
    }


def co_clustered(labels: list[int]) -> set[tuple[int, int]]:
    """All pairs (i < j) sharing a label."""
    members: dict[int, list[int]] = defaultdict(list)
    for i, label in enumerate(labels):
        members[label].append(i)
    return {(i, j) for group in members.values() for i in group for j in group if i < j}


def components(n: int, pairs: set[tuple[int, int]]) -> list[int]:
    """Connected-component labels (depth-first search)."""
    neighbours: dict[int, list[int]] = defaultdict(list)
    for i, j in pairs:
        neighbours[i].append(j)
        neighbours[j].append(i)
    label = [-1] * n
    for start in range(n):
        if label[start] < 0:
            label[start], stack = start, [start]
            while stack:
                for other in neighbours[stack.pop()]:
                    if label[other] < 0:
                        label[other] = start
                        stack.append(other)
    return label


def quality_rows(n_base: int) -> list[dict[str, Any]]:
    """Recall and precision of LSH candidates and of NearDedup's clusters on a planted set."""
    docs = planted_corpus(n_base)
    hasher = MinHasher(NUM_PERM, NGRAM)
    shingles = [set(hasher.shingles(doc.text)) for doc in docs]
    truth = {t: exact_pairs(shingles, t) for t in (THRESHOLD - 0.05, THRESHOLD, THRESHOLD + 0.05)}
    signatures = hasher.signatures([doc.text for doc in docs])
    start = time.perf_counter()
    stats = StepStats()
    kept = sum(1 for _ in NearDedup().run(docs, stats))
    step_docs_per_s = len(docs) / (time.perf_counter() - start)
    rows = []
    indexes = {
        "NearDedup default (fn weight 0.95)": NearDedup().index,
        "datasketch equal weights": LshIndex(THRESHOLD, NUM_PERM),
    }
    for name, index in indexes.items():
        candidates = index.candidate_pairs(signatures)
        found = co_clustered(near_duplicate_clusters(signatures, index))
        strict = co_clustered(components(len(docs), truth[THRESHOLD]))
        high = co_clustered(components(len(docs), truth[THRESHOLD + 0.05]))
        low = co_clustered(components(len(docs), truth[THRESHOLD - 0.05]))
        similar = truth[THRESHOLD]
        rows.append(
            {
                "section": "near_dedup_quality",
                "impl": "llama_data",
                "method": f"{name}: {index.bands} bands x {index.rows} rows",
                "docs": len(docs),
                "true_pairs": len(similar),
                "candidate_recall": len(candidates & similar) / len(similar),
                "candidate_precision": len(candidates & similar) / max(1, len(candidates)),
                "cluster_recall": len(found & strict) / len(strict),
                "cluster_precision": len(found & strict) / max(1, len(found)),
                "cluster_recall_vs_0.85": len(found & high) / len(high),
                "cluster_precision_vs_0.75": len(found & low) / max(1, len(found)),
            }
        )
    rows[0]["near_dedup_kept"] = kept
    rows[0]["near_dedup_docs_per_s"] = step_docs_per_s
    return rows


def pipeline_rows(texts: list[str], workers: int) -> list[dict[str, Any]]:
    """End to end, documents/s per core: JSONL.gz files -> PII scrub -> Gopher quality and
    repetition rules -> language ID (per file, `workers` processes) -> exact and MinHash dedup
    (global) -> written JSONL.gz."""
    import gzip
    import tempfile

    from llama_data import (
        ExactDedup,
        GopherQualityFilter,
        GopherRepetitionFilter,
        LanguageFilter,
        PiiScrubber,
        Pipeline,
    )

    with tempfile.TemporaryDirectory() as tmp:
        inputs = []
        per_file = max(1, len(texts) // 8)
        for f in range(0, len(texts), per_file):
            path = Path(tmp) / f"in-{f:06d}.jsonl.gz"
            with gzip.open(path, "wt", encoding="utf-8") as out:
                for i, text in enumerate(texts[f : f + per_file]):
                    out.write(json.dumps({"id": f"{f}-{i}", "text": text}) + "\n")
            inputs.append(path)
        pipeline = Pipeline(
            [PiiScrubber(), GopherQualityFilter(), GopherRepetitionFilter(), LanguageFilter()],
            global_steps=[ExactDedup(), NearDedup()],
        )
        start = time.perf_counter()
        report = pipeline.run(inputs, Path(tmp) / "out", workers=workers, progress=False)
        seconds = time.perf_counter() - start
    return [
        {
            "section": "pipeline_end_to_end",
            "impl": "llama_data",
            "method": "read, PII, Gopher quality+repetition, language ID | exact + near dedup, write",
            "docs": len(texts),
            "workers": workers,
            "docs_per_s": len(texts) / seconds,
            "docs_per_s_per_core": len(texts) / seconds / workers,
            "stats": {name: st.to_dict() for name, st in report.stats.items()},
        }
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--docs", type=int, default=1000, help="documents for signature timing")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scheme", default="affine32", choices=["affine32", "affine64", "legacy"])
    parser.add_argument("--planted-base", type=int, default=300, help="base documents, planted set")
    parser.add_argument("--workers", type=int, default=1, help="processes for the end-to-end row")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "data_pipeline.json"
    )
    args = parser.parse_args()

    texts = zipf_documents(args.docs)
    rows = signature_rows(texts, args.repeats, args.scheme)
    rows += quality_rows(args.planted_base)
    rows += pipeline_rows(texts, args.workers)

    print(
        f"MinHash signatures, {NUM_PERM} perms, word {NGRAM}-grams, scheme {args.scheme}, "
        f"~{rows[0]['mean_shingles_per_doc']:.0f} shingles/doc, one process"
    )
    print(f"{'impl':<18}{'method':<30}{'docs/s':>10}{'vs loop':>10}{'vs batch':>10}")
    for r in rows:
        if r["section"] == "minhash_signatures":
            print(
                f"{r['impl']:<18}{r['method']:<30}{r['docs_per_s']:>10.0f}"
                f"{r['vs_update_loop']:>9.1f}x{r['vs_update_batch_sha1']:>9.2f}x"
            )
    print(f"\nNear-duplicates at Jaccard {THRESHOLD}, planted set (pair recall / precision)")
    print(
        f"{'banding':<58}{'cand R':>8}{'cand P':>8}{'clu R':>8}{'clu P':>8}{'R>=.85':>8}{'P>=.75':>8}"
    )
    for r in rows:
        if r["section"] == "near_dedup_quality":
            print(
                f"{r['method']:<58}{r['candidate_recall']:>8.3f}{r['candidate_precision']:>8.3f}"
                f"{r['cluster_recall']:>8.3f}{r['cluster_precision']:>8.3f}"
                f"{r['cluster_recall_vs_0.85']:>8.3f}{r['cluster_precision_vs_0.75']:>8.3f}"
            )
    quality = next(r for r in rows if "near_dedup_docs_per_s" in r)
    print(
        f"NearDedup step: {quality['docs']} docs -> {quality['near_dedup_kept']} kept, "
        f"{quality['near_dedup_docs_per_s']:.0f} docs/s ({quality['true_pairs']} true pairs)"
    )

    for r in rows:
        if r["section"] == "pipeline_end_to_end":
            print(
                f"End to end ({r['method']}): {r['docs']} docs, {r['workers']} worker(s), "
                f"{r['docs_per_s_per_core']:.0f} docs/s per core"
            )

    record = {
        "benchmark": "data_pipeline",
        "date": datetime.date.today().isoformat(),
        "device": cpu_name(),
        "numpy": np.__version__,
        "datasketch": datasketch.__version__,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
