"""llama-data at web scale: memory per worker as the corpus grows, throughput with workers, and a
side-by-side run against datatrove 0.10.1 (issue 16).

1. **Memory.** A synthetic web-like corpus (Zipf vocabulary; exact copies, near copies, recrawled
   URLs and boilerplate lines planted) in parts of 500 documents: 8, 32 and 128 parts (1x, 4x,
   16x). `Pipeline` runs URL, exact, near (exact Jaccard confirmation) and line dedup on it with 2
   worker processes and `partitions` growing with the corpus (2, 8, 32: one partition per 2,000
   documents, as a user sizes them). Each run is a fresh process; the table gives the peak RSS of
   its largest worker (`RUSAGE_CHILDREN` once the pool is shut down) and of the coordinating
   process (`RUSAGE_SELF`). Target: per-worker peak grows less than 10% from 1x to 16x.
2. **Workers.** The 4x run again with 1 worker (tasks in the coordinating process): docs/s.
3. **datatrove.** Real text: the Python 3.11 documentation Debian ships (`python3.11-doc`, the
   HTML of examples/web_curation), extracted by our `HtmlExtractor`, cut into documents of 150+
   words at paragraph ends, with near copies planted (a quarter of the documents get a copy with
   0-6% of its words replaced: exact 5-gram Jaccard about 0.5-1.0) and a few exact copies. The
   same JSONL goes to both sides, split in 2 files, 2 workers each:
   - ours: `Pipeline([GopherQualityFilter()], global_steps=[NearDedup(...)])` (the `llama-data`
     path: parts, sharded near-dedup stages, documents.jsonl.gz), 5-gram shingles, 128
     permutations as 16 bands x 8 rows, seed 1, xxh3 shingle hash, exact-Jaccard confirmation;
   - datatrove: `benchmarks/_datatrove_side.py` in its own venv (made here with uv from PyPI):
     `GopherQualityFilter` -> `MinhashDedupSignature` -> `Buckets` -> `Cluster` -> `Filter`,
     5-grams, 16 buckets x 8 hashes, seed 1, its default 64-bit xxhash MinHash (its fastest);
   - docs/s per core = input documents / wall seconds / 2 processes (each side's whole run);
   - precision and recall of each side's near-dedup removals against exact Jaccard >= 0.8 on
     word 5-gram shingles (our tokenisation) among the documents that side's Gopher filter kept:
     the true pairs are found with a sensitive LSH (32 bands x 4 rows: a pair at 0.8 is missed
     with probability 5e-8) and checked with exact Jaccard; in each connected component of true
     pairs all but one document should go. A removal counts as correct while it removes at most
     size - 1 documents of a true component; precision = correct / removed, recall = correct /
     should go. Targets: >= 1.5x datatrove's docs/s per core, higher precision and recall.
   The two Gopher filters share thresholds but not rules (datatrove counts spaCy tokens, with
   punctuation, ours whitespace words), so they keep different documents; both counts are shown.

Prints tables and writes benchmarks/results/data_scale.json. Usage:
    uv run python benchmarks/data_scale.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llama_data import (
    Document,
    ExactDedup,
    GopherQualityFilter,
    HtmlExtractor,
    LineDedup,
    MinHasher,
    NearDedup,
    NearDedupConfig,
    Pipeline,
    StepStats,
    UrlDedup,
    read_jsonl,
    write_jsonl,
)

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results" / "data_scale.json"
WORK = Path(os.environ.get("DATA_SCALE_WORK", "/tmp/llama3-data-scale"))
DATATROVE_VENV = Path(os.environ.get("DATATROVE_VENV", "/tmp/datatrove-venv"))
DATATROVE = "datatrove[processing]==0.10.1"
NEAR = NearDedupConfig(shingle_hash="xxh3", bands=16, rows=8)
PER_PART = 500


# ------------------------------------------------------------------------------------------
# 1-2: synthetic corpus, memory and workers


def synthetic_part(index: int, rng: random.Random, vocabulary: list[str]) -> list[Document]:
    weights = (1.0 / np.arange(1, len(vocabulary) + 1)).tolist()
    menu = ["Home | News | Sport | Contact", "Accept all cookies", "Share on social media"]
    docs: list[Document] = []
    for j in range(PER_PART):
        words = rng.choices(vocabulary, weights=weights, k=rng.randint(150, 400))
        if docs and rng.random() < 0.1:  # an exact copy of an earlier document of the part
            words = rng.choice(docs).text.split("\n")[0].split()
        elif docs and rng.random() < 0.1:  # a near copy
            words = rng.choice(docs).text.split("\n")[0].split()
            for _ in range(max(1, len(words) // 50)):
                words[rng.randrange(len(words))] = rng.choice(vocabulary)
        lines = [" ".join(words), *rng.sample(menu, rng.randint(0, 2))]
        docs.append(
            Document(
                id=f"{index}-{j}",
                text="\n".join(lines),
                url=f"https://site{rng.randint(0, 9)}.example/{index}/{rng.randint(0, PER_PART)}",
                metadata={"crawl_date": f"2024-0{rng.randint(1, 9)}-1{rng.randint(0, 9)}"},
            )
        )
    return docs


def synthetic_corpus(parts: int, directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    vocabulary_rng = random.Random(0)
    vocabulary = [
        "".join(
            vocabulary_rng.choices("abcdefghijklmnopqrstuvwxyz", k=vocabulary_rng.randint(2, 9))
        )
        for _ in range(20_000)
    ]
    paths = []
    for i in range(parts):
        path = directory / f"part-{i:05d}.jsonl.gz"
        if not path.is_file():  # parts are the same whatever the corpus size: seeded by index
            write_jsonl(synthetic_part(i, random.Random(i), vocabulary), path)
        paths.append(path)
    return paths


def child_run(spec_path: str) -> None:
    """In a fresh process: run the global-step pipeline the spec describes, print measurements."""
    spec = json.loads(Path(spec_path).read_text())
    pipeline = Pipeline(
        [],
        global_steps=[UrlDedup(), ExactDedup(), NearDedup(NEAR), LineDedup()],
        partitions=spec["partitions"],
    )
    started = time.perf_counter()
    report = pipeline.run(spec["inputs"], spec["out"], workers=spec["workers"], progress=False)
    wall = time.perf_counter() - started
    print(
        json.dumps(
            {
                "wall_s": wall,
                "documents": report.stats["global_read"].kept,
                "kept": report.stats["line_dedup"].kept,
                "dropped": {
                    name: sum(s.dropped.values())
                    for name, s in report.stats.items()
                    if name.endswith("dedup")
                },
                "self_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "worker_peak_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
            }
        )
    )


def measure(inputs: Sequence[Path], out: Path, workers: int, partitions: int) -> dict[str, Any]:
    spec = WORK / "spec.json"
    spec.write_text(
        json.dumps(
            {"inputs": [str(p) for p in inputs], "out": str(out), "workers": workers,
             "partitions": partitions}
        )
    )  # fmt: skip
    if out.exists():
        subprocess.run(["rm", "-rf", str(out)], check=True)
    done = subprocess.run(
        [sys.executable, __file__, "--child", str(spec)], capture_output=True, text=True, check=True
    )
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


# ------------------------------------------------------------------------------------------
# 3: ours vs datatrove on real text


def python_docs_corpus(path: Path, seed: int = 0) -> int:
    """The JSONL described in the module docstring; returns its document count."""
    if path.is_file():
        return sum(1 for _ in path.open())
    sys.path.insert(0, str(ROOT.parent / "examples" / "web_curation"))
    from make_warcs import debian_html, html_files

    pages = [
        Document(id=relative, text=body.decode("utf-8", errors="replace"))
        for relative, body in html_files(debian_html(WORK / "python-doc"))
    ]
    texts = [d.text for d in HtmlExtractor().run(pages, StepStats())]
    rng = random.Random(seed)
    docs: list[str] = []
    for text in texts:
        chunk: list[str] = []
        for paragraph in text.split("\n"):
            chunk.append(paragraph)
            if sum(len(p.split()) for p in chunk) >= 150:
                docs.append("\n".join(chunk))
                chunk = []
    planted: list[str] = []
    for text in docs:
        roll = rng.random()
        if roll < 0.25:
            words = text.split(" ")
            for _ in range(int(len(words) * rng.uniform(0.0, 0.06))):
                words[rng.randrange(len(words))] = rng.choice(words)
            planted.append(" ".join(words))
        elif roll < 0.28:
            planted.append(text)
    everything = docs + planted
    rng.shuffle(everything)
    with path.open("w", encoding="utf-8") as f:
        for i, text in enumerate(everything):
            f.write(json.dumps({"id": f"d{i:06d}", "text": text}) + "\n")
    return len(everything)


def ensure_datatrove() -> Path:
    python = DATATROVE_VENV / "bin" / "python"
    if not python.is_file():
        subprocess.run(["uv", "venv", str(DATATROVE_VENV), "--python", "3.11", "-q"], check=True)
    check = subprocess.run([str(python), "-c", "import datatrove, spacy, orjson"], check=False)
    if check.returncode != 0:
        subprocess.run(
            ["uv", "pip", "install", "-q", "--python", str(python), DATATROVE, "spacy", "orjson"],
            check=True,
        )
    return python


def run_ours(corpus: Path, work: Path, *, gopher: bool, config: NearDedupConfig) -> dict[str, Any]:
    docs = list(read_jsonl(corpus, stats=StepStats()))
    inputs = [work / "in-0.jsonl.gz", work / "in-1.jsonl.gz"]
    half = (len(docs) + 1) // 2
    if work.exists():
        subprocess.run(["rm", "-rf", str(work)], check=True)
    work.mkdir(parents=True)
    write_jsonl(docs[:half], inputs[0])
    write_jsonl(docs[half:], inputs[1])
    steps = [GopherQualityFilter()] if gopher else []
    pipeline = Pipeline(steps, global_steps=[NearDedup(config)], partitions=4)
    started = time.perf_counter()
    report = pipeline.run(inputs, work / "out", workers=2, progress=False)
    wall = time.perf_counter() - started
    kept_gopher = [
        d.id
        for i in range(2)
        for d in read_jsonl(work / "out" / "parts" / f"part-{i:05d}.jsonl.gz", stats=StepStats())
    ]
    final = {d.id for d in read_jsonl(work / "out" / "documents.jsonl.gz", stats=StepStats())}
    assert report.stats["near_dedup"].kept == len(final)
    return {
        "total_s": wall,
        "gopher_kept_ids": kept_gopher,
        "removed": sorted(set(kept_gopher) - final),
    }


def run_datatrove(
    python: Path, corpus: Path, work: Path, *, gopher: bool, config: NearDedupConfig
) -> dict[str, Any]:
    out = work / "result.json"
    subprocess.run(
        [str(python), str(ROOT / "_datatrove_side.py"), "--input", str(corpus), "--work",
         str(work / "dt"), "--out", str(out), "--tasks", "2", "--workers", "2", "--ngram", "5",
         "--bands", str(config.bands), "--rows", str(config.rows), "--seed", "1",
         "--precision", "64", "--hash-fc", "xxhash", *([] if gopher else ["--no-gopher"])],
        check=True, env={**os.environ, "TQDM_DISABLE": "1"},
    )  # fmt: skip
    result: dict[str, Any] = json.loads(out.read_text())
    result["removed"] = sorted(result["minhash_removed_ids"])
    if not gopher:
        result["gopher_kept_ids"] = [d.id for d in read_jsonl(corpus, stats=StepStats())]
    return result


def true_components(texts: dict[str, str]) -> list[set[str]]:
    """Connected components (size >= 2) of the pairs at exact 5-gram Jaccard >= 0.8."""
    hasher = MinHasher(128, 5, 1, "affine32", "xxh3")
    ids = sorted(texts)
    shingles = {i: set(hasher.shingles(texts[i])) for i in ids}
    signatures = hasher.signatures([texts[i] for i in ids])
    parent = list(range(len(ids)))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    checked: set[tuple[int, int]] = set()
    for band in range(32):
        buckets: dict[bytes, list[int]] = {}
        for n, signature in enumerate(signatures):
            buckets.setdefault(signature[band * 4 : band * 4 + 4].tobytes(), []).append(n)
        for members in buckets.values():
            for a_pos, a in enumerate(members):
                for b in members[a_pos + 1 :]:
                    if (a, b) in checked:
                        continue
                    checked.add((a, b))
                    x, y = shingles[ids[a]], shingles[ids[b]]
                    if x and y and len(x & y) >= 0.8 * len(x | y):
                        parent[find(a)] = find(b)
    groups: dict[int, set[str]] = {}
    for n, i in enumerate(ids):
        groups.setdefault(find(n), set()).add(i)
    return [g for g in groups.values() if len(g) > 1]


def grade(removed: Sequence[str], components: list[set[str]]) -> dict[str, float]:
    removed_set = set(removed)
    correct = sum(min(len(c & removed_set), len(c) - 1) for c in components)
    should = sum(len(c) - 1 for c in components)
    return {
        "removed": len(removed_set),
        "should_go": should,
        "correct": correct,
        "precision": correct / len(removed_set) if removed_set else 1.0,
        "recall": correct / should if should else 1.0,
    }


# ------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="1x/2x/4x and a quarter corpus")
    args = parser.parse_args(argv)
    if args.child:
        child_run(args.child)
        return 0
    WORK.mkdir(parents=True, exist_ok=True)
    scales = (1, 2, 4) if args.quick else (1, 4, 16)
    rows: list[dict[str, Any]] = []
    print(f"{'corpus':>7} {'parts':>6} {'docs':>7} {'partitions':>10} {'workers':>7} "
          f"{'wall s':>7} {'docs/s':>7} {'worker MiB':>10} {'driver MiB':>10}  dropped")  # fmt: skip
    runs = [(scale, 2) for scale in scales] + [(4 if not args.quick else 2, 1)]
    for scale, workers in runs:
        parts = synthetic_corpus(8 * scale, WORK / "synthetic")
        result = measure(parts, WORK / "synthetic-out", workers, partitions=2 * scale)
        row = {"corpus": f"{scale}x", "parts": len(parts), "partitions": 2 * scale,
               "workers": workers, **result}  # fmt: skip
        row["docs_per_s"] = result["documents"] / result["wall_s"]
        rows.append(row)
        print(f"{row['corpus']:>7} {len(parts):>6} {result['documents']:>7} {2 * scale:>10} "
              f"{workers:>7} {result['wall_s']:>7.1f} {row['docs_per_s']:>7.0f} "
              f"{result['worker_peak_mib']:>10.1f} {result['self_peak_mib']:>10.1f}  "
              f"{result['dropped']}")  # fmt: skip
    two = [r for r in rows if r["workers"] == 2]
    growth = two[-1]["worker_peak_mib"] / two[0]["worker_peak_mib"] - 1
    driver_growth = two[-1]["self_peak_mib"] / two[0]["self_peak_mib"] - 1
    same = [r for r in rows if r["corpus"] == rows[-1]["corpus"]]
    speedup = same[0]["docs_per_s"] / same[-1]["docs_per_s"]
    print(f"per-worker peak RSS {two[0]['corpus']} -> {two[-1]['corpus']}: {growth:+.1%} "
          f"(target < +10%); driver {driver_growth:+.1%}; "
          f"2 workers vs 1 on {same[0]['corpus']}: {speedup:.2f}x docs/s")  # fmt: skip

    corpus = WORK / "python-docs.jsonl"
    n_docs = python_docs_corpus(corpus)
    if args.quick:
        lines = corpus.read_text().splitlines()[: n_docs // 4]
        corpus = WORK / "python-docs-quick.jsonl"
        corpus.write_text("\n".join(lines) + "\n")
        n_docs = len(lines)
    texts = {d.id: d.text for d in read_jsonl(corpus, stats=StepStats())}
    python = ensure_datatrove()
    print(f"\nreal text: {n_docs} documents (Python 3.11 docs, planted near copies), 2 processes "
          "each; precision/recall against exact Jaccard >= 0.8")  # fmt: skip
    print(f"{'workload':>28} {'side':>10} {'wall s':>7} {'docs/s/core':>11} {'input':>6} "
          f"{'removed':>8} {'should go':>9} {'precision':>9} {'recall':>7}")  # fmt: skip
    table: dict[str, dict[str, Any]] = {}
    ratios: dict[str, float] = {}
    stages: dict[str, Any] = {}
    workloads = [
        ("gopher + minhash 16x8", True, NEAR),
        ("minhash 16x8, same docs", False, NEAR),
        ("minhash 32x4, same docs", False, NEAR.model_copy(update={"bands": 32, "rows": 4})),
    ]
    for workload, gopher, config in workloads:
        sides = {
            "ours": run_ours(corpus, WORK / "ours", gopher=gopher, config=config),
            "datatrove": run_datatrove(
                python, corpus, WORK / "datatrove", gopher=gopher, config=config
            ),
        }
        stages[workload] = sides["datatrove"].get("stages")
        for name, side in sides.items():
            kept = side["gopher_kept_ids"]
            grades = grade(side["removed"], true_components({i: texts[i] for i in kept}))
            row = table[f"{workload} / {name}"] = {
                "total_s": side["total_s"],
                "docs_per_s_per_core": n_docs / side["total_s"] / 2,
                "dedup_input": len(kept),
                **grades,
            }
            print(f"{workload:>28} {name:>10} {row['total_s']:>7.1f} "
                  f"{row['docs_per_s_per_core']:>11.0f} {row['dedup_input']:>6} "
                  f"{row['removed']:>8} {row['should_go']:>9} {row['precision']:>9.3f} "
                  f"{row['recall']:>7.3f}")  # fmt: skip
        ratios[workload] = (
            table[f"{workload} / ours"]["docs_per_s_per_core"]
            / table[f"{workload} / datatrove"]["docs_per_s_per_core"]
        )
    print("ours / datatrove docs/s per core: "
          + ", ".join(f"{w}: {r:.2f}x" for w, r in ratios.items()) + " (target >= 1.5x)")  # fmt: skip
    print(f"datatrove stages (s): {stages}")

    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "machine": os.uname().machine,
                "cpus": os.cpu_count(),
                "quick": args.quick,
                "scale": rows,
                "per_worker_peak_growth": growth,
                "driver_peak_growth": driver_growth,
                "two_vs_one_worker": speedup,
                "real_text_documents": n_docs,
                "versus_datatrove": table,
                "ours_over_datatrove": ratios,
                "datatrove_stages_s": stages,
            },
            indent=2,
        )
    )
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
