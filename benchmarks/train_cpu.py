"""How fast does `llama_train.Trainer` train, next to a plain transformers + AdamW loop?

Both sides hold the same weights (ours copied into `transformers.LlamaForCausalLM`), take the same
packed batch of random token shards (documents of random length, written with
`llama_data.write_token_shards`), use the same AdamW settings (betas 0.9/0.95, eps 1e-5, weight
decay 0.1 on matrices only), clip gradients at global norm 1.0, and run with the same number of
threads. One timed step is: zero the gradients, forward + backward with the mean next-token
cross-entropy over the non-ignored targets, clip, optimizer step (and on CUDA a synchronize).
Data loading, the spike detector and metrics are left out of both (`Trainer.fit` runs them
between these calls).

On CPU every variant runs in float32 and in bf16 autocast (`--dtypes`; fp32 master weights,
gradients and AdamW state, matmuls in bf16: `TrainConfig.dtype = "bfloat16"` for ours,
`torch.autocast("cpu", torch.bfloat16)` around the forward for transformers). torch.optim.AdamW's
default on CPU is its per-tensor for-loop implementation (foreach and fused kernels are opt-in
there); the trainer opts in to the fused one, and so does the hf+fused_adamw row.

What each side computes:
- ours (`llama-train`): `Trainer.forward_backward` + `Trainer.clip_gradients` + the trainer's AdamW;
  attention is masked at document boundaries (`document_ids`, §3.2) and positions restart at each
  document, so SDPA gets an explicit [B, 1, T, T] mask (no plain-causal flash path); on one CPU
  process the trainer's loss is `llama_train.loss.LinearCrossEntropy` of the final hidden states
  against `model.output_weight()` (chunked, no [B·T, vocab] logits, buffers kept between steps)
  and its AdamW is the fused one;
- ours, causal: the same model, loss and optimizer, but plain causal attention (SDPA's flash
  path) — the cost of document masking;
- transformers: `LlamaForCausalLM` (SDPA attention), plain causal attention over the packed rows
  (it has no document masking outside flash-attention-2), `torch.optim.AdamW` (default
  implementation), `clip_grad_norm_`; hf+fused_adamw (CPU) the same with `AdamW(fused=True)`.

Reported: the median step time over --repeats steps after --warmup steps, tokens/s, ours/HF and,
on CUDA, model-FLOPs utilisation (`llama_model.flops_per_token`, PaLM's formula, against the H100's
dense bf16 peak of 989.4 TFLOP/s, NVIDIA H100 SXM datasheet). On CPU the variants of one model and
dtype are timed in turn (the order rotating each round, so a shared machine's drift hits them
alike) and each row has its speed-up over the transformers row of the same dtype, paired round by
round; rows of different dtypes were timed in different groups, so across dtypes compare the
medians (unpaired). The JSON also records this CPU's float32 and bf16 2048^3 matmul rates. On CUDA
the runs are bf16 (`torch.autocast`, fp32 master weights, as the Trainer does without FSDP) with
and without `torch.compile` (ours: `compile=true`, each block compiled; transformers: the whole
model).

CUDA also times experiments that change the trainer's step inside this script only, to measure
what a change to llama-train would buy (rows named ours+...): `+fused_adamw` swaps in
`AdamW(fused=True)`; `+flex` runs the document-masked attention with FlexAttention and a block mask
built once per batch instead of SDPA with a dense mask (now `model.attention_kernel = "flex"`,
which "auto" also picks on CUDA); `+compiled_ce` computes the loss with a
compiled cross-entropy, so no float32 copy of the [B·T, vocab] logits is made. `first_loss` (the
loss of the first step, same weights and batch) checks that every variant computes the same thing.

Since those measurements llama-train does all three by default on CUDA (fused AdamW, FlexAttention
for packed documents, the compiled cross-entropy under compile=true), so the plain `ours` rows of a
new run include them and the `ours+...` rows apply them twice (harmless, but no longer a contrast):
`train_gpu-nvidia-h100-80gb-hbm3.json` holds the before/after experiment,
`train_gpu-nvidia-h100-80gb-hbm3-integrated.json` the trainer as it is now.

Prints a table and writes benchmarks/results/train_cpu.json (CPU) or
benchmarks/results/train_gpu-<device>.json (CUDA). Usage:
    uv run python benchmarks/train_cpu.py [--threads 2] [--repeats 7] [--dtypes float32 bfloat16]
    python benchmarks/train_cpu.py --device cuda --batch-sizes 4 8 --profile kernels.txt
(the GPU machine's own torch: PYTHONPATH=packages/*/src joined with ':'; seq 2048, llama3.2-1b)
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import hashlib
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import transformers

from bench_common import cpu_name, matmul_gflops
from llama_data import Document, write_token_shards
from llama_kernels import bf16_is_fast, cpu_bf16_instructions
from llama_model import (
    AttentionBackend,
    Causal,
    Documents,
    Llama,
    LlamaConfig,
    config_to_hf,
    count_parameters,
    flops_per_token,
    to_hf_name,
)
from llama_train import TrainConfig, Trainer
from llama_train.data import IGNORE_INDEX, Batch
from llama_train.loss import LinearCrossEntropy, summed_cross_entropy

H100_BF16_PEAK = 989.4e12  # dense bf16 tensor-core FLOP/s, NVIDIA H100 SXM5 datasheet

# (preset, overrides): the same two shapes as benchmarks/model_cpu.py.
CPU_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "debug": ("debug", {}),
    # ~100M parameters with the full vocabulary: 8 layers of width 512, tied embeddings.
    "100m": (
        "debug",
        {"dim": 512, "n_layers": 8, "n_heads": 8, "n_kv_heads": 2, "tie_word_embeddings": True},
    ),
}
GPU_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama3.2-1b": ("llama3.2-1b", {}),
}


class RandomTokenizer:
    """Texts that are space-separated token ids, encoded as those ids (random shards for timing)."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.bos_id, self.eos_id = 128_000, 128_001  # Llama 3's <|begin_of_text|>, <|end_of_text|>
        # The identity the shards' manifest records (a tokenizer defined in code: the sha256 of
        # the string that defines it).
        self.name = "space-separated-ids"
        self.sha256 = hashlib.sha256(f"space-separated ids < {vocab_size}".encode()).hexdigest()

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in text.split()]


def random_shards(out_dir: Path, vocab_size: int, tokens: int, max_doc: int, seed: int) -> Path:
    """Token shards of random documents (lengths uniform in [16, max_doc)) totalling ~`tokens`."""
    rng = np.random.default_rng(seed)

    def docs() -> Iterator[Document]:
        written, i = 0, 0
        while written < tokens:
            n = int(rng.integers(16, max_doc))
            ids = rng.integers(0, min(vocab_size, 128_000), n)
            yield Document(id=f"random-{i}", text=" ".join(map(str, ids)))
            written, i = written + n + 2, i + 1

    write_token_shards(docs(), RandomTokenizer(vocab_size), out_dir)
    return out_dir


def hf_twin(trainer: Trainer) -> transformers.LlamaForCausalLM:
    """transformers' LlamaForCausalLM holding the trainer's initial weights, on its device."""
    config = trainer.model_config
    fields = {
        k: v for k, v in config_to_hf(config, dtype=torch.float32).items() if k != "architectures"
    }
    hf_config = transformers.LlamaConfig(**fields)
    hf_config._attn_implementation = "sdpa"
    with torch.device(trainer.device):
        hf = transformers.LlamaForCausalLM(hf_config)  # type: ignore[no-untyped-call]
    state = {to_hf_name(k): v.detach().clone() for k, v in trainer.parts[0].state_dict().items()}
    result = hf.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(result.missing_keys) != tied or result.unexpected_keys:
        raise RuntimeError(f"weights did not transfer: {result}")
    return hf.train()


def adamw(model: torch.nn.Module, trainer: Trainer, **extra: Any) -> torch.optim.Optimizer:
    """AdamW with the trainer's settings and its decay groups (matrices decay, gains do not)."""
    o = trainer.config.optimizer
    params = list(model.parameters())
    return torch.optim.AdamW(
        [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": o.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=o.peak_lr,
        betas=o.betas,
        eps=o.eps,
        **extra,
    )


def time_steps(
    step: Callable[[], float], warmup: int, repeats: int, cuda: bool
) -> tuple[list[float], float]:
    """Wall time of each of `repeats` steps after `warmup` untimed ones, and the first loss."""
    first_loss = step()
    for _ in range(warmup - 1):
        step()
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        loss = step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        if not np.isfinite(loss):
            raise FloatingPointError(f"loss {loss} while timing")
    return times, first_loss


def ours_step(
    trainer: Trainer, batch: Batch, *, causal: bool, compiled_loss: bool = False
) -> Callable[[], float]:
    """One Trainer step: zero grads, forward_backward, clip_gradients, AdamW step.

    `causal` calls the trainer's model without document_ids (plain causal attention), and
    `compiled_loss` computes the cross-entropy with a compiled function instead of
    `logits.float()` + `F.cross_entropy` (both benchmark-local versions of `forward_backward`,
    with the trainer's model, clipping and optimizer)."""
    loss_fn = LinearCrossEntropy()  # kept buffers, as the trainer's own

    def step() -> float:
        for optimizer in trainer.optimizers:
            optimizer.zero_grad(set_to_none=True)
        if causal or compiled_loss:
            loss = local_forward_backward(
                trainer, batch, loss_fn, causal=causal, compiled=compiled_loss
            )
        else:
            loss = trainer.forward_backward(batch)
        trainer.clip_gradients()
        for optimizer in trainer.optimizers:
            optimizer.step()
        return loss

    return step


# Compiled, the upcast fuses into the log-softmax: no float32 copy of the [B·T, vocab] logits.
compiled_cross_entropy = torch.compile(summed_cross_entropy)


def autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on `device` for dtype "bfloat16" (fp32 master weights), else nothing."""
    if dtype == "bfloat16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def attention(trainer: Trainer, document_ids: torch.Tensor | None) -> AttentionBackend:
    """The trainer's attention: packed documents (positions restarting per document, its
    configured kernel), or plain causal when `document_ids` is None."""
    if document_ids is None:
        return Causal()
    return Documents(document_ids, kernel=trainer.config.model.attention_kernel)


def local_forward_backward(
    trainer: Trainer,
    batch: Batch,
    loss_fn: LinearCrossEntropy,
    *,
    causal: bool,
    compiled: bool,
) -> float:
    """`Trainer.forward_backward` on one CPU process (`loss_fn`, the chunked cross-entropy of the
    final hidden states), optionally with plain causal attention (no document_ids); `compiled`
    projects to logits and takes the compiled cross-entropy instead."""
    tokens, targets = batch.tokens.to(trainer.device), batch.targets.to(trainer.device)
    document_ids = None if causal else batch.document_ids.to(trainer.device)
    count = (targets != IGNORE_INDEX).sum().to(torch.float32).clamp(min=1.0)
    model = cast(Llama, trainer.parts[0])
    with autocast(trainer.device, trainer.config.dtype):
        if compiled:
            logits = model(tokens, attention=attention(trainer, document_ids))
            summed = compiled_cross_entropy(logits, targets)
        else:
            hidden = model.hidden_states(tokens, attention=attention(trainer, document_ids))
            summed = loss_fn(hidden, model.output_weight(), targets)
    loss = summed / count
    loss.backward()  # type: ignore[no-untyped-call]
    return float(loss.detach())


def hf_step(
    hf: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: Batch,
    device: torch.device,
    dtype: str,
    max_norm: float,
) -> Callable[[], float]:
    """The plain loop: forward, the same summed cross-entropy / target count, clip, AdamW."""
    tokens, targets = batch.tokens.to(device), batch.targets.to(device)
    count = (targets != IGNORE_INDEX).sum().to(torch.float32).clamp(min=1.0)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, dtype):
            logits = hf(input_ids=tokens).logits
        loss = summed_cross_entropy(logits, targets) / count
        loss.backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(hf.parameters(), max_norm)
        optimizer.step()
        return float(loss.detach())

    return step


def make_trainer(args: argparse.Namespace, preset: str, overrides: dict[str, Any], *, shards: Path,
                 out_dir: Path, compile_: bool, dtype: str, extra: list[str]) -> Trainer:  # fmt: skip
    items = [
        f"model.preset={json.dumps(preset)}",
        f"data.sources=[{{path = {json.dumps(str(shards))}}}]",
        f"data.batch_size={args.batch_size}",
        f"data.seq_len={args.seq_len}",
        f"device={json.dumps(args.device)}",
        f"dtype={json.dumps(dtype)}",
        f"compile={str(compile_).lower()}",
        f"out_dir={json.dumps(str(out_dir))}",
        "optimizer.peak_lr=3e-4",  # constant during timing; small so random tokens stay finite
        "optimizer.final_lr=3e-5",
        "logging.progress=false",
        "logging.tensorboard=false",
        "checkpoint.resume=false",
        "export=false",
    ]
    items += [f"model.overrides.{k}={json.dumps(v)}" for k, v in overrides.items()] + extra
    return Trainer(TrainConfig.load(None, items))


def release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    torch._dynamo.reset()


Key = tuple[str, bool, str, str]  # (implementation, compile, attention, dtype)

CPU_VARIANTS: list[tuple[str, bool, str]] = [  # timed in each dtype of --dtypes
    ("ours", False, "document"),
    ("ours", False, "causal"),
    ("hf", False, "causal"),
    ("hf+fused_adamw", False, "causal"),
]
GPU_VARIANTS: list[tuple[str, bool, str]] = [  # bf16
    ("ours", False, "document"),
    ("ours", False, "causal"),
    ("hf", False, "causal"),
    ("ours", True, "document"),
    ("ours", True, "causal"),
    ("ours+fused_adamw", True, "document"),
    ("ours+fused_adamw", True, "causal"),
    ("ours+fused_adamw+flex", True, "document"),
    ("ours+fused_adamw+compiled_ce", True, "causal"),
    ("ours+fused_adamw+flex+compiled_ce", True, "document"),
    ("hf", True, "causal"),
]


def build_step(args: argparse.Namespace, key: Key, preset: str, overrides: dict[str, Any],
               shards: Path, workdir: Path) -> tuple[Callable[[], float], Batch]:  # fmt: skip
    """A fresh trainer (same seed, so the same weights and batch) and the step of variant `key`;
    also the batch."""
    impl, compile_, attention, dtype = key
    extra = ['model.attention_kernel="flex"'] if "+flex" in impl else []
    trainer = make_trainer(
        args, preset, overrides, shards=shards, out_dir=workdir / "run", compile_=compile_,
        dtype=dtype, extra=extra,
    )  # fmt: skip
    batch = trainer.loader.next_batch()
    if impl.startswith("ours"):
        if "fused_adamw" in impl:  # the trainer's optimizer, fused (benchmark-only swap)
            trainer.optimizers = [adamw(trainer.parts[0], trainer, fused=True)]
        step = ours_step(
            trainer, batch, causal=attention == "causal", compiled_loss="compiled_ce" in impl
        )
        return step, batch
    hf = hf_twin(trainer)
    trainer.parts.clear()  # free our copy of the weights
    trainer.optimizers.clear()
    release()
    if compile_:
        hf.compile()
    optimizer = adamw(hf, trainer, fused=True) if "fused_adamw" in impl else adamw(hf, trainer)
    step = hf_step(
        hf, optimizer, batch, trainer.device, dtype, trainer.config.optimizer.max_grad_norm
    )
    return step, batch


def workload(batch: Batch) -> dict[str, int]:
    """What one step trains on: rows, tokens, packed documents, targets that count."""
    ids = batch.document_ids
    return {
        "rows": int(ids.shape[0]),
        "tokens": int(ids.numel()),
        "documents": int((ids[:, 1:] != ids[:, :-1]).sum()) + int(ids.shape[0]),
        "targets": int((batch.targets != IGNORE_INDEX).sum()),
    }


def bench(args: argparse.Namespace, name: str, preset: str, overrides: dict[str, Any],
          workdir: Path) -> list[dict[str, Any]]:  # fmt: skip
    """Time every variant of one model shape; one row per variant."""
    cuda = args.device == "cuda"
    args.config_name = name
    workdir.mkdir(parents=True, exist_ok=True)
    config: LlamaConfig = LlamaConfig.from_preset(preset, **overrides)
    shards = random_shards(
        workdir / f"shards-{name}",
        config.vocab_size,
        tokens=4 * args.batch_size * (args.seq_len + 1),
        max_doc=args.max_doc,
        seed=0,
    )
    batch_tokens = args.batch_size * args.seq_len
    flops = flops_per_token(config, args.seq_len)
    peak = args.peak_tflops * 1e12 if cuda else None
    dtypes = ["bfloat16"] if cuda else args.dtypes
    variants = [(*v, dtype) for dtype in dtypes for v in (GPU_VARIANTS if cuda else CPU_VARIANTS)]
    variants = [v for v in variants if not args.only or "/".join(map(str, v)) in args.only]
    rows: list[dict[str, Any]] = []
    if not cuda:  # CPU: the variants of one dtype are kept and timed in alternation
        for dtype in dtypes:
            group = [v for v in variants if v[3] == dtype]
            if group:
                rows += bench_cpu_group(args, config, group, preset, overrides, shards, workdir)
    for key in variants if cuda else []:
        impl, compile_, attention, _ = key
        release()
        started = time.perf_counter()
        step, batch = build_step(args, key, preset, overrides, shards, workdir)
        counts = workload(batch)
        try:
            times, first_loss = time_steps(step, args.warmup, args.repeats, cuda)
        except Exception as error:  # e.g. out of memory, a compile failure: report, go on
            print(f"{name} {impl} compile={compile_} {attention}: {error!r}"[:2000], flush=True)
            del step
            release()
            continue
        row = make_row(args, config, key, counts, times, first_loss)
        row["warmup_s"] = time.perf_counter() - started - sum(times)
        row["mfu"] = flops * batch_tokens / row["step_s_median"] / peak
        row["max_memory_GiB"] = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
        if args.profile and f"{impl}/{compile_}/{attention}" == args.profile_row:
            path = args.profile.with_name(f"{args.profile.stem}-b{args.batch_size}.txt")
            row["profile"] = profile(step, path)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "profile"}), flush=True)
        del step
        release()
    baseline = {  # the plain transformers loop of the same compile and dtype
        (r["compile"], r["dtype"]): r["tokens_per_s"] for r in rows if r["impl"] == "hf"
    }
    for r in rows:
        if (r["compile"], r["dtype"]) in baseline:
            r["vs_hf"] = r["tokens_per_s"] / baseline[r["compile"], r["dtype"]]
    return rows


def bench_cpu_group(args: argparse.Namespace, config: LlamaConfig, group: list[Key], preset: str,
                    overrides: dict[str, Any], shards: Path, workdir: Path) -> list[dict[str, Any]]:  # fmt: skip
    """CPU: build every variant of `group` (one dtype), then time them in turn. A shared CPU's
    speed drifts over minutes: rotating the order each round gives each variant the same
    conditions, and the ratio to the transformers row is also reported paired, round by round."""
    steps: dict[Key, Callable[[], float]] = {}
    counts: dict[str, int] = {}
    for key in group:
        release()
        steps[key], batch = build_step(args, key, preset, overrides, shards, workdir)
        counts = workload(batch)
    print(f"{args.config_name} {group[0][3]}: workload per step {counts}", flush=True)
    first_losses = {key: step() for key, step in steps.items()}
    for _ in range(args.warmup - 1):
        for step in steps.values():
            step()
    timings: dict[Key, list[float]] = {key: [] for key in steps}
    keys = list(steps)
    for round_ in range(args.repeats):
        for key in keys[round_ % len(keys) :] + keys[: round_ % len(keys)]:
            start = time.perf_counter()
            steps[key]()
            timings[key].append(time.perf_counter() - start)
    hf_key = next((k for k in keys if k[0] == "hf"), None)
    rows = []
    for key in keys:
        row = make_row(args, config, key, counts, timings[key], first_losses[key])
        if hf_key is not None:
            paired = [h / t for h, t in zip(timings[hf_key], timings[key], strict=True)]
            row["vs_hf_paired_median"] = statistics.median(paired)
        rows.append(row)
        print(json.dumps(row), flush=True)
    steps.clear()
    release()
    return rows


def make_row(args: argparse.Namespace, config: LlamaConfig, key: Key, counts: dict[str, int],
             times: list[float], first_loss: float) -> dict[str, Any]:  # fmt: skip
    """One result row: the variant, its step-time percentiles and tokens/s."""
    impl, compile_, attention, dtype = key
    median = statistics.median(times)
    return {
        "config": args.config_name,
        "params": count_parameters(config),
        "impl": impl,
        "compile": compile_,
        "attention": attention,
        "dtype": dtype,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "documents_per_batch": counts["documents"],
        "targets_per_batch": counts["targets"],
        "step_s_median": median,
        "step_s_p20": float(np.percentile(times, 20)),
        "step_s_p80": float(np.percentile(times, 80)),
        "tokens_per_s": args.batch_size * args.seq_len / median,
        "first_loss": first_loss,
    }


def profile(step: Callable[[], float], out: Path) -> list[dict[str, Any]]:
    """Kernel time of two steps by CUDA kernel (top 25), also written as a table to `out`."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
    averages = prof.key_averages()
    out.write_text(averages.table(sort_by="self_cuda_time_total", row_limit=60))
    kernels = sorted(averages, key=lambda e: e.self_device_time_total, reverse=True)[:25]
    return [
        {"name": e.key[:120], "ms_per_step": e.self_device_time_total / 2e3, "calls": e.count // 2}
        for e in kernels
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[4], help="rows per batch")
    parser.add_argument("--seq-len", type=int, default=None, help="cpu: 256, cuda: 2048")
    parser.add_argument("--max-doc", type=int, default=None, help="longest random document")
    parser.add_argument("--warmup", type=int, default=None, help="cpu: 2, cuda: 4")
    parser.add_argument("--repeats", type=int, default=None, help="cpu: 7, cuda: 10")
    parser.add_argument("--configs", nargs="+", default=None)
    parser.add_argument(
        "--dtypes", nargs="+", default=None, choices=["float32", "bfloat16"],
        help="cpu: float32, and bfloat16 (autocast) when the CPU multiplies bf16 natively",
    )  # fmt: skip
    parser.add_argument("--only", nargs="*", default=None, help="impl/compile/attention/dtype rows")
    parser.add_argument("--peak-tflops", type=float, default=H100_BF16_PEAK / 1e12)
    parser.add_argument("--profile", type=Path, default=None, help="cuda: kernel table file")
    parser.add_argument("--profile-row", default="ours+fused_adamw/True/causal")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    cuda = args.device == "cuda"
    args.seq_len = args.seq_len or (2048 if cuda else 256)
    args.max_doc = args.max_doc or args.seq_len
    args.warmup = args.warmup or (4 if cuda else 2)
    args.repeats = args.repeats or (10 if cuda else 7)
    configs = GPU_CONFIGS if cuda else CPU_CONFIGS
    args.configs = args.configs or list(configs)
    if args.dtypes is None:
        args.dtypes = ["float32", "bfloat16"] if bf16_is_fast(torch.device("cpu")) else ["float32"]
    torch.set_num_threads(args.threads)
    matmul = None if cuda else matmul_gflops((torch.float32, torch.bfloat16))
    if matmul:
        print(f"2048^3 matmul, {args.threads} threads: " + ", ".join(
            f"{k} {v:.0f} GFLOP/s" for k, v in matmul.items()
        ) + f" (bf16/float32 {matmul['bfloat16'] / matmul['float32']:.1f}x)", flush=True)  # fmt: skip
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 leftovers (optimizer) on tensor cores
    device_name = torch.cuda.get_device_name() if cuda else cpu_name()
    slug = device_name.lower().replace(" ", "-")
    results = Path(__file__).parent / "results"
    args.out = args.out or results / ("train_cpu.json" if not cuda else f"train_gpu-{slug}.json")

    def save(rows: list[dict[str, Any]]) -> None:  # after each shape: a cut-off run keeps rows
        record = {
            "benchmark": "train_cpu",
            "date": datetime.date.today().isoformat(),
            "device": device_name,
            "threads": args.threads,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "dtypes": ["bfloat16"] if cuda else args.dtypes,
            "cpu_bf16_instructions": None if cuda else list(cpu_bf16_instructions()),
            "matmul_2048_gflops": matmul,
            "peak_flops": args.peak_tflops * 1e12 if cuda else None,
            "best_vs_best": best_vs_best(rows),
            "rows": rows,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2) + "\n")

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs:
            for batch_size in args.batch_sizes:
                args.batch_size = batch_size
                preset, overrides = configs[name]
                rows += bench(args, name, preset, overrides, Path(tmp) / f"b{args.batch_size}")
                save(rows)

    print(
        f"\ntraining step, batch rows x {args.seq_len} tokens, "
        f"{args.threads} threads, median of {args.repeats} after {args.warmup} warm-up"
    )
    header = (
        f"{'config':<12}{'rows':>5}  {'impl':<34}{'compile':>8}{'attention':>10}{'dtype':>10}"
        f"{'step ms':>10}"
    )
    header += f"{'tokens/s':>11}{'vs hf':>7}{'loss0':>8}" + (
        f"{'MFU':>7}{'GiB':>6}" if cuda else ""
    )
    print(header)
    for r in rows:
        line = f"{r['config']:<12}{r['batch_size']:>5}  {r['impl']:<34}{r['compile']!s:>8}{r['attention']:>10}{r['dtype']:>10}"
        line += f"{r['step_s_median'] * 1e3:>10.1f}{r['tokens_per_s']:>11.0f}"
        line += f"{r.get('vs_hf_paired_median', r.get('vs_hf', float('nan'))):>7.2f}{r['first_loss']:>8.3f}"
        if cuda:
            line += f"{r['mfu']:>7.1%}{r['max_memory_GiB']:>6.1f}"
        print(line)
    for b in best_vs_best(rows):
        paired = b["speedup_paired_median"]
        print(
            f"{b['config']} rows={b['batch_size']}: {b['ours_impl']} ({b['ours_dtype']}) "
            f"{b['ours_step_ms']:.0f} ms vs {b['hf_impl']} ({b['hf_dtype']}) "
            f"{b['hf_step_ms']:.0f} ms: {b['speedup']:.2f}x"
            + (f" (paired rounds {paired:.2f}x)" if paired is not None else "")
        )
    print(f"wrote {args.out}")


def best_vs_best(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per config and batch size, for each of our implementations and each transformers baseline
    (the plain transformers + default AdamW loop, "hf", and the fastest transformers variant of the
    run): our fastest dtype against the baseline's fastest dtype (uncompiled), by median step. The
    paired ratio (rounds timed together) is given where both sides share a dtype and the baseline
    is "hf", which every row of a group is paired with."""
    out = []
    for config, batch_size in dict.fromkeys((r["config"], r["batch_size"]) for r in rows):
        same = [r for r in rows if (r["config"], r["batch_size"]) == (config, batch_size)]
        same = [r for r in same if not r["compile"]]
        hf = [r for r in same if r["impl"] == "hf"]
        if not hf:
            continue
        baselines = {
            "hf": min(hf, key=lambda r: r["step_s_median"]),
            "fastest transformers": min(
                (r for r in same if r["impl"].startswith("hf")), key=lambda r: r["step_s_median"]
            ),
        }
        for impl in dict.fromkeys(r["impl"] for r in same if r["impl"].startswith("ours")):
            ours = [r for r in same if r["impl"] == impl and r["attention"] == "document"]
            if not ours:
                continue
            best = min(ours, key=lambda r: r["step_s_median"])
            for baseline, other in baselines.items():
                paired = best["dtype"] == other["dtype"] and other["impl"] == "hf"
                out.append(
                    {
                        "config": config,
                        "batch_size": batch_size,
                        "baseline": baseline,
                        "ours_impl": impl,
                        "ours_dtype": best["dtype"],
                        "ours_step_ms": best["step_s_median"] * 1e3,
                        "hf_impl": other["impl"],
                        "hf_dtype": other["dtype"],
                        "hf_step_ms": other["step_s_median"] * 1e3,
                        "speedup": other["step_s_median"] / best["step_s_median"],
                        "speedup_paired_median": best.get("vs_hf_paired_median")
                        if paired
                        else None,
                    }
                )
    return out


if __name__ == "__main__":
    main()
