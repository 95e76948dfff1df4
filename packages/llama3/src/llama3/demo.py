"""`llama-demo`: the whole Llama 3 system on one CPU, offline, from raw text to a served model.

The stages of "The Llama 3 Herd of Models" (arXiv 2407.21783), in order, each printing what it did
and the figure that shows it worked:

1. curate (§3.1): the docstrings of the installed Python standard library, read with `ast`
   (nothing is imported or executed), through llama-data: PII scrubbing, Gopher quality rules,
   exact and MinHash deduplication; documents kept and dropped by reason.
2. shards: Llama 3 token shards, one document in 20 held out; the unigram cross-entropy of the
   held-out tokens under the training tokens' frequencies is the bar pretraining must beat.
3. pretrain (§3.4): the `debug` model at width 128 (4 layers, the full vocabulary) with llama-train's
   `Trainer`, bf16 autocast where the CPU multiplies bf16 natively; loss first -> last and
   held-out loss against the unigram bar.
4. sft (§4.1.3): a verifiable task from the same standard library (llama-align's
   `DocstringTask`: "What does `json.dumps` do?", the function's own docstring the true answer,
   split by function so held-out functions appear in no training row); SFT on its answers.
5. rm (§4.1.2): a reward model from the SFT model; held-out pair accuracy before -> after.
6. sample (§4.1.3): rejection sampling of K answers per held-out question through llama-serve's
   engine; mean reward of the kept answers vs a random one of the K.
7. dpo (§4.1.4): DPO from the SFT model; held-out preference accuracy and margin before -> after.
8. fp8 (§6.2): the DPO model quantized with the paper's recipe; per-token KL and top-1 agreement
   against bf16 on held-out text; an FP8 checkpoint.
9. serve: the FP8 checkpoint behind the OpenAI-compatible server on a loopback port; one chat
   question through the `openai` client, the answer streamed; the server shut down.

Then `report.md` and PNG plots in the output directory. A finished stage is reused by the next run
when its settings (and every earlier stage's) are unchanged; a stage killed half way resumes what
its library can resume (curation parts, alignment checkpoints) and redoes the rest. The demo uses
only the libraries' exported names: it is what a user writes, and it lives in the umbrella package
because it is an application of all of them.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import ctypes
import gc
import gzip
import hashlib
import json
import resource
import shutil
import sys
import sysconfig
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from llama3.report import write_report
from llama_align import (
    DocstringTask,
    DpoConfig,
    RewardConfig,
    SampleConfig,
    SamplingSettings,
    SftConfig,
    TrainSettings,
    run_dpo,
    run_rm,
    run_sample,
    run_sft,
    write_rows,
)
from llama_data import (
    ExactDedup,
    GopherQualityFilter,
    NearDedup,
    PiiScrubber,
    Pipeline,
    StepStats,
    TokenShards,
    read_jsonl,
    write_token_shards,
)
from llama_kernels import bf16_is_fast
from llama_model import Tokenizer, atomic_write, load_checkpoint
from llama_serve import (
    NativeBackend,
    ServerConfig,
    build_app,
    compare_logits,
    quantize_fp8,
    save_fp8_checkpoint,
    serve_in_background,
)
from llama_train import TrainConfig, Trainer

__all__ = ["STAGES", "docstring_corpus", "main"]

MODEL = {"dim": 128, "n_heads": 4, "n_kv_heads": 2, "multiple_of": 32}
"""The demo's model: the `debug` preset (4 layers, the full vocabulary) at width 128, which a
2-core CPU pretrains and aligns in minutes; FP8 (§6.2) quantizes its 2 middle layers."""
HELDOUT_EVERY = 20
"""One curated document in this many (by a hash of its id) is held out of pretraining."""
EVAL_WINDOWS = 16
"""Held-out windows of `seq_len` tokens that the held-out loss and the FP8 comparison use."""
NEGATIVES = 8
"""Other functions' answers ranked below each true answer in the reward model's rows."""
MODEL_NAME = "llama3-demo"
"""The name the demo's server gives its model."""


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


@dataclass
class Demo:
    """What the stages share: the options, the output directory, earlier stages' results."""

    args: argparse.Namespace
    out: Path
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    _tokenizer: Tokenizer | None = None

    @property
    def tokenizer(self) -> Tokenizer:
        """Llama 3's tokenizer (the `tokenizer.model` the `llama-models` package ships)."""
        if self._tokenizer is None:
            self._tokenizer = Tokenizer.llama3()
        return self._tokenizer

    @property
    def progress(self) -> bool:
        return not self.args.no_progress

    def heldout_windows(self) -> torch.Tensor:
        """Up to `EVAL_WINDOWS` windows of ``seq_len + 1`` held-out tokens, [N, seq_len + 1]."""
        tokens = _all_tokens(self.out / "shards" / "heldout")
        width = self.args.seq_len + 1
        n = min(EVAL_WINDOWS, len(tokens) // width)
        if n == 0:
            raise ValueError(
                f"the held-out shards hold {len(tokens)} tokens, fewer than one window of "
                f"{width}; use a larger --corpus or a smaller --seq-len"
            )
        return torch.from_numpy(tokens[: n * width].astype(np.int64).reshape(n, width))


def _all_tokens(path: Path) -> np.ndarray[Any, np.dtype[np.uint32]]:
    shards = TokenShards(path)
    parts = [np.asarray(shards.shard(j)) for j in range(shards.num_shards)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint32)


def _train_settings(demo: Demo, steps: int, batch: int, lr: float) -> TrainSettings:
    """llama-align's `TrainSettings` for a demo stage (bf16 autocast where fast, seeded)."""
    return TrainSettings(
        steps=steps,
        batch_size=batch,
        micro_batch_size=batch,
        lr=lr,
        warmup_steps=max(1, steps // 10),
        seed=demo.args.seed,
        progress=demo.progress,
        tensorboard=False,
    )


def _f(value: float | None, spec: str = ".2f") -> str:
    """`value` formatted, or "n/a" where a stage had nothing to measure (no answer kept)."""
    return "n/a" if value is None else format(value, spec)


def _results(stage_dir: Path) -> dict[str, Any]:
    """The results llama-align's stage wrote into its `stage.json`."""
    results: dict[str, Any] = json.loads((stage_dir / "stage.json").read_text())["results"]
    return results


# ------------------------------------------------------------------------------------- stages
def curate(demo: Demo) -> dict[str, Any]:
    args = demo.args
    raw = demo.out / "curate" / "corpus.jsonl.gz"
    if not raw.is_file():
        with atomic_write(raw) as tmp, gzip.open(tmp, "wt", encoding="utf-8") as f:
            for record in docstring_corpus(args.corpus, args.max_documents):
                f.write(json.dumps(record) + "\n")
    pipeline = Pipeline(
        [PiiScrubber(), GopherQualityFilter()], global_steps=[ExactDedup(), NearDedup()]
    )
    report = pipeline.run([raw], demo.out / "curate" / "curated", progress=demo.progress)
    steps = {name: stats.to_dict() for name, stats in report.stats.items()}
    first = next(iter(report.stats.values()))
    read = first.kept + sum(first.dropped.values())
    kept = list(report.stats.values())[-1].kept
    drops = ", ".join(
        f"{reason} {n}" for stats in report.stats.values() for reason, n in stats.dropped.items()
    )
    return {
        "documents": read,
        "kept": kept,
        "steps": steps,
        "line": f"{read} docstring documents from {args.corpus}: kept {kept}, dropped "
        f"{read - kept} ({drops or 'none'})",
    }


def shards(demo: Demo) -> dict[str, Any]:
    curated = demo.out / "curate" / "curated" / "documents.jsonl.gz"
    docs = list(read_jsonl(curated, stats=StepStats()))
    heldout = [d for d in docs if zlib.crc32(d.id.encode()) % HELDOUT_EVERY == 0]
    train = [d for d in docs if zlib.crc32(d.id.encode()) % HELDOUT_EVERY != 0]
    if not heldout or not train:
        raise ValueError(
            f"{len(docs)} curated documents split into {len(train)} for training and "
            f"{len(heldout)} held out; the demo needs both: use a larger --corpus"
        )
    folder = demo.out / "shards"
    manifests = {
        name: write_token_shards(split, demo.tokenizer, folder / name, overwrite=True)
        for name, split in (("train", train), ("heldout", heldout))
    }
    # The bar for pretraining: the cross-entropy of the held-out next tokens under the training
    # tokens' unigram frequencies (add-1/2 smoothing over the vocabulary).
    vocab = demo.tokenizer.vocab_size
    counts = np.bincount(_all_tokens(folder / "train"), minlength=vocab).astype(np.float64)
    log_p = np.log((counts + 0.5) / (counts.sum() + 0.5 * vocab))
    targets = demo.heldout_windows()[:, 1:].numpy()
    unigram = float(-log_p[targets].mean())
    return {
        "train_documents": manifests["train"].num_documents,
        "train_tokens": manifests["train"].num_tokens,
        "heldout_documents": manifests["heldout"].num_documents,
        "heldout_tokens": manifests["heldout"].num_tokens,
        "unigram_entropy": unigram,
        "line": f"{manifests['train'].num_documents} documents, "
        f"{manifests['train'].num_tokens:,} Llama 3 tokens to train on; "
        f"{manifests['heldout'].num_documents} held out ({manifests['heldout'].num_tokens:,} "
        f"tokens), unigram cross-entropy {unigram:.2f} nats",
    }


def _dtype(requested: str) -> str:
    if requested != "auto":
        return requested
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return "bfloat16" if bf16_is_fast(device) else "float32"


def pretrain(demo: Demo) -> dict[str, Any]:
    args = demo.args
    train_tokens = demo.results["shards"]["train_tokens"]
    steps_available = train_tokens // ((args.seq_len + 1) * args.batch_size)
    steps = max(2, min(args.steps, steps_available))  # one pass over the curated tokens at most
    dtype = _dtype(args.dtype)
    shutil.rmtree(demo.out / "pretrain", ignore_errors=True)  # a killed run's steps are redone
    # The sections as a run.toml would give them (TrainConfig validates each one).
    config = TrainConfig.model_validate(
        {
            "model": {"preset": "debug", "overrides": dict(MODEL)},
            "data": {
                "sources": [{"path": demo.out / "shards" / "train", "name": "docstrings"}],
                "batch_size": args.batch_size,
                "seq_len": args.seq_len,
                "seed": args.seed,
            },
            "optimizer": {"peak_lr": 2e-3, "final_lr": 2e-4, "warmup_steps": max(1, steps // 10)},
            "checkpoint": {"interval": 0, "keep_last": 1, "resume": False},
            "logging": {"progress": demo.progress, "tensorboard": False},
            "steps": steps,
            "seed": args.seed,
            "dtype": dtype,  # bf16 autocast keeps float32 weights, optimizer and loss
            "out_dir": demo.out / "pretrain",
        }
    )
    trainer = Trainer(config)
    try:
        result = trainer.fit()
    finally:
        trainer.close()
    assert result.exported is not None
    losses = [result.losses[k] for k in sorted(result.losses)]
    window = max(1, len(losses) // 10)
    first, last = sum(losses[:window]) / window, sum(losses[-window:]) / window
    # Held-out loss of the exported model, in float32: the mean next-token cross-entropy, a
    # window at a time (one window's logits over the full vocabulary are 128 MiB).
    model = load_checkpoint(result.exported, dtype=torch.float32).eval()
    windows = demo.heldout_windows()
    total = 0.0
    with torch.no_grad():
        for row in windows:
            logits = model(row[None, :-1])[0]
            total += float(F.cross_entropy(logits.float(), row[1:], reduction="sum"))
    heldout = total / windows[:, 1:].numel()
    unigram = demo.results["shards"]["unigram_entropy"]
    return {
        "steps": len(losses),
        "dtype": dtype,
        "first_loss": first,
        "last_loss": last,
        "heldout_loss": heldout,
        "unigram_entropy": unigram,
        "model": str(result.exported),
        "line": f"{len(losses)} steps of {args.batch_size}x{args.seq_len} tokens ({dtype} "
        f"compute): loss {first:.2f} -> {last:.2f} (mean of the first/last {window}); held-out "
        f"{heldout:.2f} vs unigram {unigram:.2f} nats",
    }


def sft(demo: Demo) -> dict[str, Any]:
    args = demo.args
    negatives = NEGATIVES
    if args.functions is not None:  # a small task: as many as the held-out split allows
        negatives = max(1, min(NEGATIVES, round(0.2 * args.functions) - 1))
    splits = DocstringTask().build(seed=args.seed, negatives=negatives, limit=args.functions)
    task_dir = demo.out / "task"
    files = splits.write(task_dir)
    # DPO pairs each training question's true answer with 2 other functions' answers.
    dpo_rows = DocstringTask().build(
        seed=args.seed, negatives=min(2, negatives), limit=args.functions
    )
    write_rows(task_dir / "dpo.jsonl", dpo_rows.preference_train)
    stage = run_sft(
        SftConfig(
            model=Path(demo.results["pretrain"]["model"]),
            data=[files["sft"]],
            out=demo.out / "sft",
            max_tokens=256,
            train=_train_settings(demo, args.sft_steps, 8, 2e-3),
        )
    )
    r = _results(stage)
    first = splits.heldout_functions[0]
    return {
        "train_functions": len(splits.train_functions),
        "heldout_functions": len(splits.heldout_functions),
        "dialogs": r["dialogs"],
        "first_loss": r["first_loss"],
        "last_loss": r["last_loss"],
        "question": f"What does `{first.name}` do?",
        "true_answer": first.answer,
        "line": f"task from the standard library's docstrings: {len(splits.train_functions)} "
        f"functions to train on, {len(splits.heldout_functions)} held out (in no training row); "
        f"SFT on {r['dialogs']} dialogs, loss {r['first_loss']:.2f} -> {r['last_loss']:.2f}",
    }


def rm(demo: Demo) -> dict[str, Any]:
    task = demo.out / "task"
    stage = run_rm(
        RewardConfig(
            model=demo.out / "sft" / "model",
            data=[task / "preferences.jsonl"],
            heldout=[task / "preferences_heldout.jsonl"],
            out=demo.out / "rm",
            train=_train_settings(demo, demo.args.rm_steps, 16, 5e-4),
        )
    )
    r = _results(stage)
    before, after = r["heldout_pair_accuracy_before"], r["heldout_pair_accuracy"]
    return {
        "heldout_examples": r["heldout_examples"],
        "heldout_before": before,
        "heldout_after": after,
        "line": f"reward model on {r['examples']} ranked rows (the true answer above others'): "
        f"held-out pair accuracy {_f(before)} -> {_f(after)} ({r['heldout_examples']} held-out "
        "questions, chance 0.50)",
    }


def sample(demo: Demo) -> dict[str, Any]:
    k = demo.args.k
    stage = run_sample(
        SampleConfig(
            model=demo.out / "sft" / "model",
            reward_model=demo.out / "rm" / "model",
            prompts=[demo.out / "task" / "prompts_heldout.jsonl"],
            out=demo.out / "sample",
            sampling=SamplingSettings(k=k, temperature=1.0, top_p=1.0, max_tokens=64),
            progress=demo.progress,
        )
    )
    s = _results(stage)["sampling"]
    kept, random = s["mean_kept_reward"], s["mean_random_reward"]
    return {
        "prompts": s["prompts"],
        "samples": s["samples"],
        "kept": s["kept"],
        "mean_kept_reward": kept,
        "mean_random_reward": random,
        "line": f"K={k} answers to each of {s['prompts']} held-out questions ({s['samples']} "
        f"samples, one shared prefill per question): mean reward of the {s['kept']} kept "
        f"{_f(kept)} vs {_f(random)} for a random one of the K",
    }


def dpo(demo: Demo) -> dict[str, Any]:
    task = demo.out / "task"
    stage = run_dpo(
        DpoConfig(
            model=demo.out / "sft" / "model",
            data=[task / "dpo.jsonl"],
            heldout=[task / "preferences_heldout.jsonl"],
            out=demo.out / "dpo",
            train=_train_settings(demo, demo.args.dpo_steps, 16, 2e-4),
        )
    )
    r = _results(stage)
    return {
        "pairs": r["pairs"],
        "heldout_pairs": r["heldout_pairs"],
        "accuracy_before": r["heldout_accuracy_before"],
        "accuracy_after": r["heldout_accuracy"],
        "margin_before": r["heldout_margin_before"],
        "margin_after": r["heldout_margin"],
        "line": f"DPO on {r['pairs']} pairs (β 0.1, NLL 0.2, formatting tokens masked): held-out "
        f"preference accuracy {_f(r['heldout_accuracy_before'])} -> {_f(r['heldout_accuracy'])},"
        f" margin {_f(r['heldout_margin_before'])} -> {_f(r['heldout_margin'])} over "
        f"{r['heldout_pairs']} pairs (a tie counts as wrong)",
    }


def fp8(demo: Demo) -> dict[str, Any]:
    bf16 = load_checkpoint(demo.out / "dpo" / "model", dtype=torch.bfloat16).eval()
    quantized = quantize_fp8(copy.deepcopy(bf16))  # §6.2: FFNs of all but the first/last layer
    windows = demo.heldout_windows()[:, :-1]
    kls, agreements = [], []
    with torch.no_grad():
        for row in windows:  # a window at a time: the logits span the full vocabulary
            kl_row, agree_row = compare_logits(bf16(row[None]), quantized(row[None]))
            kls.append(kl_row)
            agreements.append(agree_row)
    kl = float(torch.cat(kls, dim=1).mean())
    top1 = float(torch.cat(agreements, dim=1).float().mean())
    n_fp8 = sum(type(m).__name__ == "Fp8RowwiseLinear" for m in quantized.modules())
    save_fp8_checkpoint(quantized, demo.out / "fp8" / "model", tokenizer=demo.tokenizer)
    return {
        "fp8_linears": n_fp8,
        "tokens": windows.numel(),
        "kl": kl,
        "top1": top1,
        "model": str(demo.out / "fp8" / "model"),
        "line": f"{n_fp8} FFN projections in FP8 (row-wise scales, first and last layer kept in "
        f"bf16): per-token KL {kl:.2e} and top-1 agreement {top1:.2%} vs bf16 on "
        f"{windows.numel():,} held-out tokens",
    }


def serve(demo: Demo) -> dict[str, Any]:
    import openai

    question = demo.results["sft"]["question"]
    backend = NativeBackend.from_pretrained(demo.out / "fp8" / "model", tokenizer=demo.tokenizer)
    app = build_app(backend, ServerConfig(model_name=MODEL_NAME))
    pieces: list[str] = []
    with serve_in_background(app, host="127.0.0.1", port=0) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
        print(f"      served at {url}; {question!r} -> ", end="", flush=True)
        stream = client.chat.completions.create(
            model=MODEL_NAME,
            messages=[{"role": "user", "content": question}],
            max_tokens=demo.args.max_answer_tokens,
            temperature=0.0,
            stream=True,
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
                print(chunk.choices[0].delta.content, end="", flush=True)
        print(flush=True)
    answer = "".join(pieces)
    return {
        "url": url,
        "question": question,
        "answer": answer,
        "true_answer": demo.results["sft"]["true_answer"],
        "line": f"FP8 model behind the OpenAI-compatible server ({url}, shut down): {question!r} "
        f"-> {answer!r}",
    }


@dataclass(frozen=True)
class Stage:
    """One stage of the demo: what it runs and which options its result depends on."""

    name: str
    section: str
    run: Callable[[Demo], dict[str, Any]]
    options: tuple[str, ...]


STAGES: tuple[Stage, ...] = (
    Stage("curate", "§3.1", curate, ("corpus", "max_documents")),
    Stage("shards", "§3.1", shards, ("seq_len",)),
    Stage("pretrain", "§3.4", pretrain, ("steps", "batch_size", "seq_len", "seed", "dtype")),
    Stage("sft", "§4.1.3", sft, ("functions", "sft_steps")),
    Stage("rm", "§4.1.2", rm, ("rm_steps",)),
    Stage("sample", "§4.1.3", sample, ("k",)),
    Stage("dpo", "§4.1.4", dpo, ("dpo_steps",)),
    Stage("fp8", "§6.2", fp8, ()),
    Stage("serve", "§6", serve, ("max_answer_tokens",)),
)
"""The stages in order; `--until NAME` stops after NAME."""

STAGE_OUTPUTS = {"curate": ("curate",), "shards": ("shards",), "sft": ("sft", "task")}
"""Directories a stage writes besides ``<out>/<name>`` (default: just that one)."""


# ------------------------------------------------------------------------------------- runner
def _fingerprint(previous: str, stage: Stage, args: argparse.Namespace) -> str:
    """A stage's identity: its options' values chained with every earlier stage's."""
    options = {name: str(getattr(args, name)) for name in stage.options}
    payload = json.dumps([previous, stage.name, options], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _outputs(out: Path, stage: Stage) -> list[Path]:
    return [out / name for name in STAGE_OUTPUTS.get(stage.name, (stage.name,))]


def _write_json(path: Path, data: Any) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")


def run_stages(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Run (or reuse) the stages up to `args.until`; returns each stage's results."""
    out: Path = args.out
    records = out / "stages"
    if args.fresh:
        shutil.rmtree(records, ignore_errors=True)
    records.mkdir(parents=True, exist_ok=True)
    demo = Demo(args=args, out=out)
    names = [stage.name for stage in STAGES]
    selected = STAGES[: names.index(args.until) + 1]
    seconds: dict[str, float] = {}
    fingerprint = ""
    for number, stage in enumerate(selected, start=1):
        fingerprint = _fingerprint(fingerprint, stage, args)
        done, started = records / f"{stage.name}.json", records / f"{stage.name}.started"
        record = json.loads(done.read_text()) if done.is_file() else None
        reused = record is not None and record["fingerprint"] == fingerprint
        if record is not None and not reused:
            done.unlink()
        if not reused:
            # Partial work of this very stage (a killed run) is resumed where its library can;
            # anything else in its directories is from other settings and is removed.
            if not (started.is_file() and started.read_text() == fingerprint):
                for path in _outputs(out, stage):
                    shutil.rmtree(path, ignore_errors=True)
                with atomic_write(started) as tmp:
                    tmp.write_text(fingerprint)
            print(f"[{number}/{len(STAGES)}] {stage.name} ({stage.section}) ...", flush=True)
            t0 = time.perf_counter()
            results = stage.run(demo)
            record = {
                "fingerprint": fingerprint,
                "seconds": time.perf_counter() - t0,
                "results": results,
            }
            _write_json(done, record)
            started.unlink(missing_ok=True)
            _release_memory()
        assert record is not None
        demo.results[stage.name] = record["results"]
        seconds[stage.name] = record["seconds"]
        note = " (reused from an earlier run)" if reused else f" ({record['seconds']:.0f} s)"
        print(f"[{number}/{len(STAGES)}] {stage.name}: {record['results']['line']}{note}")
    report = write_report(out, [(s.name, s.section) for s in STAGES], demo.results, seconds)
    print(f"report: {report} (plots in {out / 'plots'})")
    return demo.results


def _release_memory() -> None:
    """Hand the memory a finished stage freed back to the system. The C allocator keeps freed
    blocks for reuse, and a stage's large tensors leave a lot of them behind (measured here: 1.9
    GB after SFT, 0.8-1.3 GB after the reward model and rejection sampling), which the later
    stages would otherwise add to; `malloc_trim` is glibc's, elsewhere only `gc` runs."""
    gc.collect()
    if sys.platform.startswith("linux"):
        # Another C library (musl) has no libc.so.6 or no malloc_trim: nothing to trim with.
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def _peak_memory_gib() -> float:
    """The process's peak resident memory so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**30 if sys.platform == "darwin" else 2**20)


def _parser() -> argparse.ArgumentParser:
    doc = __doc__ or ""
    parser = argparse.ArgumentParser(
        prog="llama-demo",
        description=doc.splitlines()[0],
        epilog="A second run reuses the finished stages whose options did not change (--fresh "
        "reruns everything).",
    )
    names = [stage.name for stage in STAGES]
    add = parser.add_argument
    add("--out", type=Path, default=Path("llama-demo-output"), help="output directory")
    add("--until", choices=names, default=names[-1], help="the last stage to run")
    add("--fresh", action="store_true", help="rerun every stage, reusing nothing")
    add("--corpus", type=Path, default=Path(sysconfig.get_paths()["stdlib"]),
        help="directory of Python sources (default: the standard library)")  # fmt: skip
    add("--max-documents", type=int, default=None, help="read at most this many files")
    add("--steps", type=int, default=180, help="pretraining steps (at most one pass)")
    add("--batch-size", type=int, default=8, help="pretraining sequences per step")
    add("--seq-len", type=int, default=256, help="pretraining sequence length")
    add("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
        help="pretraining compute dtype (auto: bf16 autocast where the device multiplies bf16 "
        "natively, else float32)")  # fmt: skip
    add("--functions", type=int, default=None, help="use this many stdlib functions for the task")
    add("--sft-steps", type=int, default=80, help="SFT steps (batches of 8 dialogs)")
    add("--rm-steps", type=int, default=150, help="reward-model steps (batches of 16 questions)")
    add("--k", type=int, default=8, help="rejection sampling: answers per question")
    add("--dpo-steps", type=int, default=100, help="DPO steps (batches of 16 pairs)")
    add("--max-answer-tokens", type=int, default=48, help="length of the served answer")
    add("--seed", type=int, default=0)
    add("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `llama-demo`."""
    args = _parser().parse_args(argv)
    for name in ("steps", "batch_size", "seq_len", "sft_steps", "rm_steps", "k", "dpo_steps"):
        if getattr(args, name) < 1:
            print(f"llama-demo: --{name.replace('_', '-')} must be at least 1, got "
                  f"{getattr(args, name)}", file=sys.stderr)  # fmt: skip
            return 2
    if not args.corpus.is_dir():
        print(f"llama-demo: --corpus {args.corpus} is not a directory", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    run_stages(args)
    print(
        f"done in {time.perf_counter() - started:.0f} s (peak memory {_peak_memory_gib():.1f} GiB)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
