"""The datatrove side of benchmarks/data_scale.py: Gopher quality filter + MinHash near-dedup.

Runs datatrove (0.10.1, in its own venv; nothing from this repo is imported) over a JSONL file of
{"id", "text", ...} documents, structured like datatrove's examples/minhash_deduplication.py:

  prep      (not timed) split the input into --tasks contiguous shards, one file per task
  stage 1   JsonlReader -> GopherQualityFilter() -> JsonlWriter(gopher_kept) -> MinhashDedupSignature
  stage 2   MinhashDedupBuckets   (one task per bucket)
  stage 3   MinhashDedupCluster   (one task)
  stage 4   JsonlReader(gopher_kept) -> MinhashDedupFilter -> JsonlWriter(final)

Stage 4 re-reads the Gopher-kept documents stage 1 wrote (rather than re-reading the input and
running Gopher twice), so every document is filtered once; both writers are uncompressed JSONL.
--no-gopher drops the Gopher step (dedup only, e.g. on the documents our Gopher filter kept).
Each stage is one LocalPipelineExecutor run (--workers processes, datatrove's default forkserver
start), timed with time.perf_counter; total_s is the sum of the four stages (prep_s apart).
"step_s" adds datatrove's own per-step times (summed over tasks) from each stage's stats.json:
filters and writers time each document, but "MinHash stage 1" times its whole loop, so it
includes the reader, Gopher and writer steps before it (subtract them) plus its bucket sort.

MinHash: MinhashConfig(n_grams, num_buckets=bands, hashes_per_bucket=rows, seed) with
HashConfig(precision=32, hash_fc="sha1") by default: the shingle hash is the first 4 bytes of sha1
and the permutation (a*h + b mod 2**64) mod (2**61 - 1) & 0xFFFFFFFF, i.e. datasketch's pre-2.0
("legacy") 32-bit MinHash. datatrove's own default is --precision 64 --hash-fc xxhash.
Text normalisation (--norm closest, default): lowercase, datatrove's punctuation list to spaces,
whitespace collapsed, but digits and diacritics left as they are, like ours; --norm datatrove adds
datatrove's defaults (every number -> "0", NFD with combining marks removed). Words are then
datatrove's English tokenizer's (spaCy blank "en", no model download needed).

Setup (PyPI only) and usage:
    uv venv /tmp/datatrove-venv --python 3.11
    uv pip install --python /tmp/datatrove-venv/bin/python "datatrove[processing]==0.10.1" \
        spacy orjson
    /tmp/datatrove-venv/bin/python benchmarks/_datatrove_side.py --input docs.jsonl \
        --work /tmp/dt-work --out result.json --tasks 2 --workers 2 \
        --ngram 5 --bands 16 --rows 8 --seed 1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")  # the cluster stage's progress bar; set before forking

from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.dedup.minhash import (
    MinhashConfig,
    MinhashDedupBuckets,
    MinhashDedupCluster,
    MinhashDedupFilter,
    MinhashDedupSignature,
)
from datatrove.pipeline.filters import GopherQualityFilter
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter
from datatrove.utils.hashing import HashConfig
from datatrove.utils.text import TextNormConfig
from loguru import logger


def quiet_logging() -> None:
    """Only errors from loguru reach stderr (each task's full log still goes to its logs folder)."""
    logger.remove()
    logger.add(sys.stderr, level="ERROR")


class QuietExecutor(LocalPipelineExecutor):  # type: ignore[misc]  # datatrove is untyped
    """LocalPipelineExecutor whose tasks log errors only to stderr.

    datatrove sends INFO to stderr for the task with local_rank 0 and ERROR for the others;
    local_rank is used for nothing but logging. After each task it re-adds a DEBUG stderr sink.
    """

    def _run_for_rank(self, rank: int, local_rank: int = 0, node_rank: int = -1) -> Any:
        try:
            return super()._run_for_rank(rank, local_rank=1, node_rank=node_rank)
        finally:
            quiet_logging()


def shard_input(input_path: Path, shard_dir: Path, tasks: int) -> int:
    """Split the JSONL into `tasks` contiguous files (datatrove gives each task whole files)."""
    lines = [line for line in input_path.read_bytes().splitlines(keepends=True) if line.strip()]
    shard_dir.mkdir(parents=True)
    per_shard = -(-len(lines) // tasks)
    for rank in range(tasks):
        (shard_dir / f"{rank:05d}.jsonl").write_bytes(
            b"".join(lines[rank * per_shard : (rank + 1) * per_shard])
        )
    return len(lines)


def read_ids(folder: Path) -> list[str]:
    """Document ids in the JSONL files of `folder`, in file then line order."""
    ids: list[str] = []
    for path in sorted(folder.glob("*.jsonl")):
        with path.open() as f:
            ids.extend(str(json.loads(line)["id"]) for line in f if line.strip())
    return ids


def step_times(logging_dir: Path) -> dict[str, float]:
    """datatrove's own time per pipeline step (summed over the stage's tasks), from stats.json."""
    times = {}
    for step in json.loads((logging_dir / "stats.json").read_text()):
        name = step["name"].encode("ascii", "ignore").decode().replace("  ", " ").strip(" -")
        time_stats = step.get("time_stats", 0)  # 0 (an int) for a step that never timed anything
        times[name] = time_stats["total"] if isinstance(time_stats, dict) else float(time_stats)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", type=Path, required=True, help="JSONL with 'id' and 'text'")
    parser.add_argument(
        "--work", type=Path, required=True, help="scratch (our subfolders there are replaced)"
    )
    parser.add_argument("--out", type=Path, required=True, help="result JSON")
    parser.add_argument("--tasks", type=int, default=2, help="tasks for stages 1 and 4")
    parser.add_argument("--workers", type=int, default=2, help="processes per stage")
    parser.add_argument("--ngram", type=int, default=5)
    parser.add_argument("--bands", type=int, default=16)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--precision", type=int, choices=(32, 64), default=32)
    parser.add_argument("--hash-fc", choices=("sha1", "xxhash"), default="sha1")
    parser.add_argument(
        "--norm",
        choices=("closest", "datatrove"),
        default="closest",
        help="closest: no number/diacritic normalisation (as ours); datatrove: its defaults",
    )
    parser.add_argument(
        "--gopher",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="--no-gopher: dedup the input as is (stage 1 is then named 'signature')",
    )
    args = parser.parse_args()
    quiet_logging()

    work = args.work.resolve()
    folders = {
        name: work / name
        for name in ("input", "gopher_kept", "signatures", "buckets", "remove_ids", "final", "logs")
    }
    for folder in folders.values():  # only our own subfolders: --work may hold other things
        shutil.rmtree(folder, ignore_errors=True)
    prep_start = time.perf_counter()
    documents_in = shard_input(args.input, folders["input"], args.tasks)
    prep_s = time.perf_counter() - prep_start

    config = MinhashConfig(
        n_grams=args.ngram,
        num_buckets=args.bands,
        hashes_per_bucket=args.rows,
        seed=args.seed,
        hash_config=HashConfig(precision=args.precision, hash_fc=args.hash_fc),
        norm_config=TextNormConfig()
        if args.norm == "datatrove"
        else TextNormConfig(norm_numbers=False, norm_unicode_diacritics=False),
    )

    def writer(folder: Path) -> JsonlWriter:
        return JsonlWriter(str(folder), output_filename="${rank}.jsonl", compression=None)

    stages: dict[str, tuple[list[Any], int, int]] = {  # name -> (pipeline, tasks, workers)
        "gopher_signature" if args.gopher else "signature": (
            [
                JsonlReader(str(folders["input"]), id_key="id", text_key="text"),
                *([GopherQualityFilter()] if args.gopher else []),
                writer(folders["gopher_kept"]),
                MinhashDedupSignature(output_folder=str(folders["signatures"]), config=config),
            ],
            args.tasks,
            args.workers,
        ),
        "buckets": (
            [
                MinhashDedupBuckets(
                    input_folder=str(folders["signatures"]),
                    output_folder=str(folders["buckets"]),
                    config=config,
                )
            ],
            config.num_buckets,
            args.workers,
        ),
        "cluster": (
            [
                MinhashDedupCluster(
                    input_folder=str(folders["buckets"]),
                    output_folder=str(folders["remove_ids"]),
                    config=config,
                )
            ],
            1,
            1,
        ),
        "filter": (
            [
                JsonlReader(str(folders["gopher_kept"]), id_key="id", text_key="text"),
                MinhashDedupFilter(input_folder=str(folders["remove_ids"])),
                writer(folders["final"]),
            ],
            args.tasks,
            args.workers,
        ),
    }
    timings: dict[str, float] = {}
    steps: dict[str, dict[str, float]] = {}
    for name, (pipeline, tasks, workers) in stages.items():
        if name == "filter":
            # Stage 4 must see the same files per rank as stage 1 wrote: a task that kept no
            # document wrote no file, so give it an empty one (keeps files[rank::tasks] aligned).
            folders["gopher_kept"].mkdir(parents=True, exist_ok=True)
            for rank in range(args.tasks):
                (folders["gopher_kept"] / f"{rank:05d}.jsonl").touch()
        logging_dir = folders["logs"] / name
        executor = QuietExecutor(
            pipeline,
            tasks=tasks,
            workers=min(workers, tasks),
            logging_dir=str(logging_dir),
            skip_completed=False,
        )
        start = time.perf_counter()
        executor.run()
        timings[name] = time.perf_counter() - start
        steps[name] = step_times(logging_dir)

    kept = read_ids(folders["gopher_kept"])
    final = read_ids(folders["final"])
    final_set = set(final)
    result = {
        "datatrove_version": version("datatrove"),
        "stages": timings,
        "total_s": sum(timings.values()),
        "prep_s": prep_s,
        "step_s": steps,
        "documents_in": documents_in,
        "gopher_kept_ids": kept,
        "gopher_dropped": documents_in - len(kept),
        "minhash_removed_ids": [doc_id for doc_id in kept if doc_id not in final_set],
        "final_kept_ids": final,
        "config": {
            "tasks": args.tasks,
            "workers": args.workers,
            "minhash": {
                "n_grams": config.n_grams,
                "num_buckets": config.num_buckets,
                "hashes_per_bucket": config.hashes_per_bucket,
                "seed": config.seed,
                "precision": config.hash_config.precision,
                "hash_fc": config.hash_config.hash_fc,
                "norm_config": dataclasses.asdict(config.norm_config),
            },
            "gopher": "GopherQualityFilter() defaults, language=eng (spaCy blank 'en' words)"
            if args.gopher
            else None,
            "filter_input": "gopher-kept documents written by stage 1 (uncompressed JSONL)",
        },
    }
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
