"""`llama-demo`: the whole Llama 3 path on one CPU, offline, in a few minutes.

1. Corpus: the docstrings of the Python standard library installed on this machine, read from the
   source files with `ast` (nothing is imported or executed), one document per module.
2. Curation with llama-data: PII scrubbing, Gopher quality rules, exact and MinHash deduplication.
3. Token shards with the real Llama 3 tokenizer.
4. Pretraining of the `debug` model (4 layers, width 256, the full vocabulary) with the `Trainer`
   (the recipe's warmup + cosine schedule, packed documents with cross-document masking, a
   progress bar, metrics JSONL/TensorBoard/loss.png, a sharded checkpoint).
5. Export in the Hugging Face layout (loads in transformers and vLLM) and serve it with
   llama-serve's engine: greedy, and four samples sharing one prefill.
Every stage prints what it did. `llama-demo --help` lists the options.

The stages follow "The Llama 3 Herd of Models" (arXiv 2407.21783): curation §3.1, the model §3.2,
the pretraining recipe §3.4. The demo uses only the libraries' exported names: it is what a user
writes, and it lives in the umbrella package because it is an application of all of them.
"""

from __future__ import annotations

import argparse
import ast
import gzip
import json
import shutil
import sysconfig
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from llama_data import (
    ExactDedup,
    GopherQualityFilter,
    NearDedup,
    PiiScrubber,
    Pipeline,
    StepStats,
    read_jsonl,
    write_token_shards,
)
from llama_kernels import bf16_is_fast
from llama_model import Tokenizer
from llama_serve import Engine, SamplingParams
from llama_train import TrainConfig, Trainer

__all__ = ["docstring_corpus", "main"]


def docstring_corpus(root: Path, max_documents: int | None = None) -> Iterator[dict[str, str]]:
    """One record per Python file under `root`: its module, class and function docstrings.
    Files that do not parse are skipped (the corpus is read as data, never imported)."""
    count = 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or "test" in path.parts or "tests" in path.parts:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        nodes = [
            tree,
            *(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef | ast.FunctionDef)),
        ]
        docs = [d for n in nodes if (d := ast.get_docstring(n))]
        if docs:
            yield {"id": str(path.relative_to(root)), "text": "\n\n".join(docs)}
            count += 1
            if max_documents is not None and count >= max_documents:
                return


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `llama-demo`."""
    parser = argparse.ArgumentParser(prog="llama-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("llama-demo-output"))
    parser.add_argument("--corpus", type=Path, default=Path(sysconfig.get_paths()["stdlib"]),
                        help="directory of Python sources (default: the standard library)")  # fmt: skip
    parser.add_argument("--max-documents", type=int, default=None)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompt", default="Return the number of")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                        help="compute dtype (auto: bf16 autocast where the device multiplies bf16 "
                        "natively, else float32)")  # fmt: skip
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    raw = out / "corpus" / "docstrings.jsonl.gz"
    raw.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(raw, "wt", encoding="utf-8") as f:
        n_raw = 0
        for record in docstring_corpus(args.corpus, args.max_documents):
            f.write(json.dumps(record) + "\n")
            n_raw += 1
    print(f"[1/5] corpus: {n_raw} documents of docstrings from {args.corpus}")

    pipeline = Pipeline(
        [PiiScrubber(), GopherQualityFilter()], global_steps=[ExactDedup(), NearDedup()]
    )
    report = pipeline.run([raw], out / "curated", progress=not args.no_progress)
    for name, stats in report.stats.items():
        print(f"[2/5] curation: {name:<16} kept {stats.kept:>6}  dropped {dict(stats.dropped)}")

    tokenizer = Tokenizer.llama3()
    docs = read_jsonl(out / "curated" / "documents.jsonl.gz", stats=StepStats())
    manifest = write_token_shards(docs, tokenizer, out / "shards", overwrite=True)
    print(f"[3/5] shards: {manifest.num_documents} documents, {manifest.num_tokens:,} tokens")

    dtype = args.dtype
    if dtype == "auto":  # on the device the trainer will pick (its config's device = "auto")
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = "bfloat16" if bf16_is_fast(device) else "float32"
    steps_available = manifest.num_tokens // ((args.seq_len + 1) * args.batch_size)
    steps = max(2, min(args.steps, steps_available))  # one pass over the curated tokens
    # The sections as a run.toml would give them (TrainConfig validates each one).
    config = TrainConfig.model_validate(
        {
            "model": {"preset": "debug"},
            "data": {
                "sources": [{"path": out / "shards", "name": "docstrings"}],
                "batch_size": args.batch_size,
                "seq_len": args.seq_len,
                "seed": args.seed,
            },
            "optimizer": {"peak_lr": 2e-3, "final_lr": 2e-4, "warmup_steps": max(1, steps // 10)},
            "checkpoint": {"interval": 0, "keep_last": 1, "resume": False},
            "logging": {"progress": not args.no_progress},
            "steps": steps,
            "seed": args.seed,
            "dtype": dtype,  # bf16 autocast keeps float32 weights, optimizer and loss
            "out_dir": out / "train",
        }
    )
    shutil.rmtree(out / "train", ignore_errors=True)  # the demo's own output of an earlier run
    trainer = Trainer(config)
    try:
        result = trainer.fit()
    finally:
        trainer.close()
    losses = [result.losses[k] for k in sorted(result.losses)]
    window = max(1, len(losses) // 10)
    first = sum(losses[:window]) / window
    last = sum(losses[-window:]) / window
    print(f"[4/5] pretraining ({dtype} compute): {len(losses)} steps of "
          f"{args.batch_size}x{args.seq_len} tokens, "
          f"loss {first:.3f} -> {last:.3f} (mean of first/last {window}); metrics, loss.png and "
          f"checkpoints in {out / 'train'}")  # fmt: skip

    assert result.exported is not None
    engine = Engine.from_pretrained(result.exported, tokenizer=tokenizer)
    greedy, sampled = engine.generate(
        [args.prompt, args.prompt],
        [SamplingParams(max_tokens=24, temperature=0.0),
         SamplingParams(max_tokens=24, temperature=0.8, n=4, seed=0)],
    )  # fmt: skip
    print(f"[5/5] exported to {result.exported} (Hugging Face layout); served by llama-serve "
          f"({engine.dtype}), greedy: {args.prompt!r} -> {greedy.outputs[0].text!r}")  # fmt: skip
    for sample in sampled.outputs:
        print(f"      sample {sample.index} of 4 (temperature 0.8, one shared prefill): "
              f"{sample.text!r}")  # fmt: skip
    print(f"done in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
