"""How close do the FP8 model's outputs stay to bf16? (§6.2's recipe, issue 12)

The paper's Figure 26 shows that FP8 inference barely moves Llama 3 405B's outputs: the
reward-model scores of its responses have the same distribution under bf16 and FP8 inference. We
have no reward model, so we compare the models' next-token distributions directly, which is
stricter: for every position of a held-out text, KL(P_bf16 || P_fp8) in nats and whether both put
their highest probability on the same token (top-1 agreement), plus each model's cross-entropy on
the actual next token.

The model: a random-weight model says little (its next-token distributions are nearly uniform),
so this script trains the `debug` preset (4 layers, width 256, the full 128,256-token vocabulary)
with `llama_train.Trainer` on the corpus first, as `llama-demo` does (warmup + cosine, packed
documents, bf16 autocast where the CPU multiplies bf16 natively; at most one pass over the
training tokens: 340 steps of 4 x 256 with this corpus), exports it in the Hugging Face layout,
loads it in float32 (`llama_model.load_checkpoint`) and rounds copies of it to bf16. The same
comparison on the untrained initialisation is printed beside it for scale.

The corpus: the docstrings of this Python's standard library (`llama3.demo.docstring_corpus`, one
document per module), tokenized with `llama_model.Tokenizer.llama3()`. Every 10th document (in
path order) is held out: training sees the others; the held-out ones (each cut to `--seq-len`
tokens after BOS, at most `--eval-documents` of them) are scored.

Variants, each against the bf16 model (same weights, FP8 applied with `llama_serve.quantize_fp8`):
- fp8 §6.2: feed-forward of every layer but the first and the last, activation scales capped at
  1200 (the paper's recipe; what `llama-serve quantize` writes as `fbgemm_fp8`);
- fp8 all layers: the first and the last layer quantized too (`--no-skip-first-last`);
- fp8 §6.2, no cap (compressed-tensors): activation scale bound infinity, the model written as a
  compressed-tensors checkpoint and read back (`save_fp8_checkpoint(format="compressed-tensors")`,
  `load_fp8_checkpoint`): what vLLM serves from that format, which cannot carry the bound;
and, for the floor that bf16 itself sets, the bf16 model against the float32 one it was rounded
from (KL(P_fp32 || P_bf16)). The largest activation entering an FP8 layer is printed too, and the
fraction of FP8 rows (token x FP8 layer) whose maximum exceeds 1200, the rows the cap changes:
where none does, "no cap" equals §6.2 bit for bit.

What dropping the cap changes where activations do exceed 1200 (trained model only, `--stress`):
the inputs of the FP8 layers are scaled by 2**k (each quantized layer's `ffn_norm` weight times 2**k,
its w1 and w3 times 2**-k). Powers of two make this exact: the bf16 model computes bit for bit the
same function (checked), and the uncapped FP8 model too (each row's e4m3 values are unchanged, its
scale times 2**k), so only the cap differs, clipping every row whose maximum exceeds 1200 (the
largest entries saturate at +-1200). Each k gives a capped and an uncapped row. This measures the
cap's cost on rows of ordinary shape; its benefit, which §6.2 gives as the reason for it (a few
very large activations on high-perplexity tokens such as dates set a large scale that flushes the
rest of the row towards zero), needs the heavy-tailed activations of a large trained model.

Everything the run writes (shards, training output, the exported checkpoint) goes to `--run-dir`
(a temporary directory by default, removed at the end). Prints each stage's counts and a table;
writes benchmarks/results/fp8_quality.json. About 6 minutes on 2 idle CPU cores with the defaults.
Usage:
    uv run python benchmarks/fp8_quality.py [--steps 500] [--stress 7 9 11] [--run-dir DIR]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sysconfig
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bench_common import cpu_name
from llama3.demo import docstring_corpus
from llama_data import Document, write_token_shards
from llama_kernels import SCALE_UB, Fp8RowwiseLinear, bf16_is_fast
from llama_model import Llama, Tokenizer, load_checkpoint
from llama_serve import compare_logits, load_fp8_checkpoint, quantize_fp8, save_fp8_checkpoint
from llama_train import TrainConfig, Trainer

HOLD_OUT_EVERY = 10  # every 10th document is scored, never trained on


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=Path(sysconfig.get_paths()["stdlib"]))
    parser.add_argument("--steps", type=int, default=500, help="training steps")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-documents", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--stress",
        type=int,
        nargs="*",
        default=[7, 9, 11],
        help="exponents k: FP8-layer inputs scaled by 2**k (exactly), capped vs uncapped",
    )
    parser.add_argument("--run-dir", type=Path, default=None, help="default: a temporary dir")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "fp8_quality.json"
    )
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    if args.run_dir is None:
        with tempfile.TemporaryDirectory(prefix="fp8_quality-") as run_dir:
            record = run(args, Path(run_dir))
    else:
        record = run(args, args.run_dir)
    record["wall_s"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"done in {record['wall_s']:.0f} s; wrote {args.out}")


def run(args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    tokenizer = Tokenizer.llama3()
    records = list(docstring_corpus(args.corpus))
    train_docs = [r for i, r in enumerate(records) if i % HOLD_OUT_EVERY != 0]
    held_out = [r for i, r in enumerate(records) if i % HOLD_OUT_EVERY == 0]
    print(
        f"[1/4] corpus: {len(records)} documents of docstrings from {args.corpus}; "
        f"{len(train_docs)} for training, {len(held_out)} held out"
    )
    if not train_docs or not held_out:
        raise SystemExit(f"the corpus at {args.corpus} has too few documents ({len(records)})")

    manifest = write_token_shards(
        (Document(id=r["id"], text=r["text"], source="docstrings") for r in train_docs),
        tokenizer,
        run_dir / "shards",
        overwrite=True,
    )
    print(f"[2/4] shards: {manifest.num_documents} documents, {manifest.num_tokens:,} tokens")

    device = torch.device("cpu")
    compute = "bfloat16" if bf16_is_fast(device) else "float32"
    steps_available = manifest.num_tokens // ((args.seq_len + 1) * args.batch_size)
    steps = max(2, min(args.steps, steps_available))
    config = TrainConfig.model_validate(
        {
            "model": {"preset": "debug"},
            "data": {
                "sources": [{"path": run_dir / "shards", "name": "docstrings"}],
                "batch_size": args.batch_size,
                "seq_len": args.seq_len,
                "seed": args.seed,
            },
            "optimizer": {"peak_lr": 2e-3, "final_lr": 2e-4, "warmup_steps": max(1, steps // 10)},
            "checkpoint": {"interval": 0, "keep_last": 1, "resume": False},
            "logging": {"progress": False},
            "steps": steps,
            "seed": args.seed,
            "device": "cpu",
            "dtype": compute,
            "out_dir": run_dir / "train",
        }
    )
    train_start = time.perf_counter()
    trainer = Trainer(config)
    try:
        result = trainer.fit()
    finally:
        trainer.close()
    train_s = time.perf_counter() - train_start
    losses = [result.losses[k] for k in sorted(result.losses)]
    window = max(1, len(losses) // 10)
    first, last = sum(losses[:window]) / window, sum(losses[-window:]) / window
    print(
        f"[3/4] training ({compute} compute): {len(losses)} steps of {args.batch_size}x"
        f"{args.seq_len} tokens ({len(losses) * args.batch_size * args.seq_len:,} tokens), loss "
        f"{first:.3f} -> {last:.3f} (mean of first/last {window}), {train_s:.0f} s"
    )
    assert result.exported is not None
    trained32 = load_checkpoint(result.exported, dtype=torch.float32)

    eval_tokens = [
        tokenizer.encode(r["text"], bos=True, eos=False)[: args.seq_len]
        for r in held_out[: args.eval_documents]
    ]
    eval_tokens = [t for t in eval_tokens if len(t) >= 2]
    scored = sum(len(t) - 1 for t in eval_tokens)
    print(
        f"[4/4] scoring: {len(eval_tokens)} held-out documents, {scored:,} next-token "
        f"distributions (each document cut to {args.seq_len} tokens)"
    )

    initial = Llama(trained32.config)
    initial.init_weights(seed=args.seed)  # the Trainer's initialisation (same seed)
    rows = []
    for model_name, model32, stress, checkpoint in (
        ("trained", trained32, args.stress, run_dir / "fp8-trained"),
        ("untrained (init)", initial, [], run_dir / "fp8-init"),
    ):
        rows += compare_variants(model_name, model32, eval_tokens, checkpoint, stress)
    print_table(rows)

    return {
        "benchmark": "fp8_quality",
        "date": datetime.date.today().isoformat(),
        "device": cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "model": {
            "preset": "debug",
            "config": trained32.config.model_dump(mode="json"),
            "trained_steps": len(losses),
            "train_tokens": len(losses) * args.batch_size * args.seq_len,
            "train_compute_dtype": compute,
            "loss_first": first,
            "loss_last": last,
            "train_s": round(train_s, 1),
        },
        "corpus": {
            "source": str(args.corpus),
            "documents": len(records),
            "train_documents": manifest.num_documents,
            "train_shard_tokens": manifest.num_tokens,
            "held_out_documents": len(held_out),
            "scored_documents": len(eval_tokens),
            "scored_tokens": scored,
            "seq_len": args.seq_len,
        },
        "metric": "per-token KL(reference || variant) in nats over next-token distributions; "
        "top-1 agreement of their argmax; cross-entropy (nats) on the actual next token; "
        "fp8_rows_over_ub: fraction of (token, FP8 layer) input rows whose max exceeds 1200",
        "stress": "FP8-layer inputs scaled by 2**k (ffn_norm weight x 2**k, w1 and w3 x 2**-k: "
        "the same bf16 function); only the activation cap acts differently",
        "rows": rows,
    }


def compare_variants(
    model_name: str,
    model32: Llama,
    documents: list[list[int]],
    checkpoint_dir: Path,
    stress: list[int],
) -> list[dict[str, Any]]:
    """The rows of one model: each FP8 variant against its bf16 weights, and bf16 against the
    float32 weights it was rounded from. Each document's distributions are computed once per
    model and compared in every pair."""
    bf16 = _copy(model32, torch.bfloat16)
    uncapped = save_fp8_checkpoint(
        quantize_fp8(_copy(model32, torch.bfloat16), scale_ub=math.inf),
        checkpoint_dir,
        format="compressed-tensors",
    )
    models = {
        "float32": model32,
        "bfloat16": bf16,
        "fp8 §6.2 (skip first/last, ub 1200)": quantize_fp8(_copy(model32, torch.bfloat16)),
        "fp8 all layers (ub 1200)": quantize_fp8(
            _copy(model32, torch.bfloat16), skip_first_last=False
        ),
        "fp8 §6.2, no cap (compressed-tensors)": load_fp8_checkpoint(uncapped),
    }
    for k in stress:
        stressed = _scale_fp8_inputs(_copy(model32, torch.bfloat16), k)
        with torch.inference_mode():  # the scaling is exact: the bf16 function is unchanged
            probe = torch.tensor([documents[0]])
            assert torch.equal(stressed(probe), bf16(probe)), f"2**{k} scaling is not exact"
        for cap, ub in (("ub 1200", SCALE_UB), ("no cap", math.inf)):
            models[f"fp8 §6.2, inputs x2^{k}, {cap}"] = quantize_fp8(
                _scale_fp8_inputs(_copy(model32, torch.bfloat16), k), scale_ub=ub
            )
    pairs = [("bf16 vs float32", "float32", "bfloat16")] + [
        (name, "bfloat16", name) for name in list(models)[2:]
    ]
    absmax = dict.fromkeys(models, 0.0)  # largest |activation| entering an FP8 layer
    over = dict.fromkeys(models, 0)  # FP8 input rows whose maximum exceeds the cap
    rows_seen = dict.fromkeys(models, 0)

    def track(name: str) -> Callable[[torch.nn.Module, tuple[torch.Tensor, ...]], None]:
        def hook(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            row_max = inputs[0].abs().amax(dim=-1)  # [B, T]
            absmax[name] = max(absmax[name], float(row_max.max()))
            over[name] += int((row_max > SCALE_UB).sum())
            rows_seen[name] += row_max.numel()

        return hook

    for name, model in models.items():
        for module in model.modules():
            if isinstance(module, Fp8RowwiseLinear):
                module.register_forward_pre_hook(track(name))
    kls: dict[str, list[torch.Tensor]] = {name: [] for name, _, _ in pairs}
    agree = dict.fromkeys(kls, 0)
    nll = dict.fromkeys(models, 0.0)
    start = time.perf_counter()
    with torch.inference_mode():
        for tokens in documents:
            ids = torch.tensor([tokens])  # [1, T]
            targets = ids[0, 1:, None]  # [T - 1, 1]
            logits = {name: model(ids)[0, :-1] for name, model in models.items()}  # [T - 1, V]
            for name, values in logits.items():
                logp = F.log_softmax(values.float(), dim=-1)
                nll[name] -= float(logp.gather(-1, targets).sum())
            for name, reference, variant in pairs:
                kl, same = compare_logits(logits[reference], logits[variant])  # [T - 1] each
                kls[name].append(kl)
                agree[name] += int(same.sum())
    eval_s = time.perf_counter() - start
    rows = []
    for name, reference, variant in pairs:
        kl = torch.cat(kls[name]).double()
        n = kl.numel()
        fp8 = {n: m for n, m in models[variant].named_modules() if isinstance(m, Fp8RowwiseLinear)}
        rows.append(
            {
                "model": model_name,
                "variant": name,
                "reference": reference,
                "fp8_layers": sorted({int(module.split(".")[1]) for module in fp8}),
                "activation_scale_ub": (str(next(iter(fp8.values())).scale_ub) if fp8 else None),
                "fp8_input_absmax": absmax[variant] if fp8 else None,
                "fp8_rows_over_ub": over[variant] / rows_seen[variant] if fp8 else None,
                "tokens": n,
                "kl_mean": float(kl.mean()),
                "kl_p50": float(kl.quantile(0.5)),
                "kl_p99": float(kl.quantile(0.99)),
                "kl_max": float(kl.max()),
                "top1_agreement": agree[name] / n,
                "nll_reference": nll[reference] / n,
                "nll_variant": nll[variant] / n,
            }
        )
    print(f"      scored the {model_name} model's {len(models)} versions in {eval_s:.0f} s")
    return rows


def _scale_fp8_inputs(model: Llama, exponent: int) -> Llama:
    """`model` (bf16) with the inputs of the feed-forward layers §6.2 quantizes (every layer but
    the first and the last) scaled by 2**exponent: `ffn_norm.weight` times 2**exponent, w1 and w3
    times 2**-exponent. Powers of two scale bf16 values exactly, so the function is unchanged."""
    n_layers = model.config.n_layers
    with torch.no_grad():
        for i in range(1, n_layers - 1):
            model.get_parameter(f"layers.{i}.ffn_norm.weight").mul_(2.0**exponent)
            for w in ("w1", "w3"):
                model.get_parameter(f"layers.{i}.feed_forward.{w}.weight").mul_(2.0**-exponent)
    return model


def _copy(model32: Llama, dtype: torch.dtype) -> Llama:
    """A copy of `model32` in `dtype` (quantize_fp8 changes its model in place)."""
    copy = Llama(model32.config)
    copy.load_state_dict(model32.state_dict())
    return copy.to(dtype).eval()


def print_table(rows: list[dict[str, Any]]) -> None:
    header = (
        f"{'model':<17} {'variant':<38} {'vs':<8} {'KL mean':>9} {'p50':>9} {'p99':>9} "
        f"{'max':>9} {'top-1':>7} {'NLL ref':>8} {'NLL var':>8} {'>ub':>7}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        over = r["fp8_rows_over_ub"]
        print(
            f"{r['model']:<17} {r['variant']:<38} {r['reference']:<8} {r['kl_mean']:9.2e} "
            f"{r['kl_p50']:9.2e} {r['kl_p99']:9.2e} {r['kl_max']:9.2e} "
            f"{100 * r['top1_agreement']:6.2f}% {r['nll_reference']:8.4f} {r['nll_variant']:8.4f} "
            + (f"{100 * over:6.2f}%" if over is not None else f"{'-':>7}")
        )
    print(
        f"(KL in nats per token; ub = activation scale bound, §6.2's {SCALE_UB:g}; >ub = share of "
        "FP8 input rows whose maximum exceeds it)"
    )
    for r in rows:
        if r["fp8_input_absmax"] is not None:
            print(
                f"{r['model']:<17} {r['variant']:<38} largest |activation| into an FP8 layer: "
                f"{r['fp8_input_absmax']:.1f}"
            )


if __name__ == "__main__":
    main()
