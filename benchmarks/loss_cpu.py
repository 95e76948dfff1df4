"""How fast and how large is the output projection + cross-entropy, plain or chunked, on CPU?

The workload is the loss of the `debug` model's training step at benchmarks/train_cpu.py's batch
(4 rows x 256 tokens = 1,024 hidden states of width 256, vocabulary 128,256): forward and backward
of the summed next-token cross-entropy of `hidden @ weight.T`, gradients of hidden and weight.

- plain: the logits [1024, 128256] materialised (under autocast: a bf16 matmul), then
  `llama_train.loss.summed_cross_entropy` (float32 copy, log-softmax, NLL), autograd backward;
- chunked (`llama_train.loss.linear_cross_entropy`) at several chunk sizes: both gradients
  computed in the forward, chunk by chunk, the backward only scales them;
- kept-256: the same through a `LinearCrossEntropy` object, which keeps its buffers between calls
  (what a training loop holds);
- chunked, recomputing: a benchmark-local variant that keeps only the log-sum-exp per row in the
  forward and recomputes each chunk's logits in the backward (one more [N, vocab, dim] matmul,
  less held between forward and backward) — the other way to split the work.

Each row: the median wall time over --repeats rounds (the variants timed in turn each round, so a
shared machine's drift hits them alike), the paired median speed-up over plain, the first loss
(all variants compute the same sum) and the peak resident memory the loss adds, measured in a
fresh subprocess per variant as the peak RSS (VmHWM, reset just before) minus the RSS before the
loss ran (torch has no CPU allocator statistics; tracemalloc does not see its allocations). Also recorded: the
2048^3 matmul rate in float32 and bf16 on this CPU.

Prints a table and writes benchmarks/results/loss_cpu.json. Usage:
    uv run python benchmarks/loss_cpu.py [--threads 2] [--repeats 5] [--dtypes float32 bfloat16]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench_common import cpu_name, matmul_gflops, peak_rss_bytes, rss_bytes, write_results
from llama_kernels import cpu_bf16_instructions
from llama_train.loss import LinearCrossEntropy, linear_cross_entropy, summed_cross_entropy

ROWS, DIM, VOCAB = 4 * 256, 256, 128_256  # the debug model at train_cpu.py's batch
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class RecomputingLinearCrossEntropy(torch.autograd.Function):
    """Benchmark-only: the chunked loss that recomputes each chunk's logits in the backward.

    Forward: per chunk, logits -> log-sum-exp (kept, [N]) -> loss. Backward: per chunk, logits
    again, softmax = exp(logits - lse), minus one at the target, times the incoming gradient,
    then the two gradient matmuls. No ignored targets in this workload, so no mask."""

    @staticmethod
    def forward(
        ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
        chunk: int, compute: torch.dtype,
    ) -> torch.Tensor:  # fmt: skip
        with torch.autocast("cpu", enabled=False):
            h, w = hidden.to(compute), weight.to(compute)
            lse = torch.empty(len(targets), 1)
            loss = torch.zeros(())
            for start in range(0, len(targets), chunk):
                logits = (h[start : start + chunk] @ w.t()).float()  # [n, vocab]
                lse[start : start + chunk] = torch.logsumexp(logits, 1, keepdim=True)
                picked = logits.gather(1, targets[start : start + chunk, None])
                loss += (lse[start : start + chunk] - picked).sum()
        ctx.save_for_backward(h, w, targets, lse)
        ctx.chunk, ctx.compute = chunk, compute
        return loss

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        h, w, targets, lse = ctx.saved_tensors
        grad_h, grad_w = torch.empty_like(h), torch.zeros(w.shape)
        with torch.autocast("cpu", enabled=False):
            for start in range(0, len(targets), ctx.chunk):
                stop = start + ctx.chunk
                probs = (h[start:stop] @ w.t()).float().sub_(lse[start:stop]).exp_()
                probs.scatter_add_(1, targets[start:stop, None], -torch.ones(len(probs), 1))
                g = probs.mul_(grad).to(ctx.compute)  # [n, vocab]
                grad_h[start:stop] = g @ w
                grad_w += g.t() @ h[start:stop]
        return grad_h.float(), grad_w, None, None, None


def inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden [ROWS, DIM] and weight [VOCAB, DIM] (float32 leaves, the debug model's init scale)
    and random targets [ROWS]."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(ROWS, DIM, generator=g).requires_grad_()
    weight = (torch.randn(VOCAB, DIM, generator=g) * 0.02).requires_grad_()
    return hidden, weight, torch.randint(0, VOCAB, (ROWS,), generator=g)


def variant(name: str, dtype: str, hidden: torch.Tensor, weight: torch.Tensor,
            targets: torch.Tensor) -> Callable[[], float]:  # fmt: skip
    """One forward + backward of the named variant; returns the loss."""
    bf16 = dtype == "bfloat16"
    kept = (
        LinearCrossEntropy(chunk_size=int(name.rsplit("-", 1)[1]))
        if name.startswith("kept")
        else None
    )

    def autocast() -> contextlib.AbstractContextManager[Any]:
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)

    def step() -> float:
        hidden.grad = weight.grad = None
        with autocast():
            if name == "plain":
                loss = summed_cross_entropy((hidden @ weight.t())[None], targets[None])
            elif kept is not None:
                loss = kept(hidden, weight, targets)
            elif name.startswith("chunked-recompute"):
                chunk = int(name.rsplit("-", 1)[1])
                compute = torch.bfloat16 if bf16 else torch.float32
                loss = RecomputingLinearCrossEntropy.apply(hidden, weight, targets, chunk, compute)  # type: ignore[no-untyped-call]
            else:
                chunk = int(name.rsplit("-", 1)[1])
                loss = linear_cross_entropy(hidden, weight, targets, chunk_size=chunk)
        loss.backward()  # type: ignore[no-untyped-call]
        return float(loss.detach())

    return step


def child(name: str, dtype: str, threads: int) -> None:
    """Subprocess: run one variant twice; print the peak RSS added over the RSS before it."""
    torch.set_num_threads(threads)
    hidden, weight, targets = inputs()
    step = variant(name, dtype, hidden, weight, targets)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the RSS now (Linux >= 4.0)
    before = rss_bytes()
    step()
    step()
    print(json.dumps({"peak_added_MiB": (peak_rss_bytes() - before) / 2**20}))


def peak_memory(name: str, dtype: str, threads: int) -> float:
    result = subprocess.run(
        [sys.executable, __file__, "--child", name, dtype, "--threads", str(threads)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return float(json.loads(result.stdout.strip().splitlines()[-1])["peak_added_MiB"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--chunks", type=int, nargs="+", default=[128, 256, 512, 1024])
    parser.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "loss_cpu.json"
    )
    args = parser.parse_args()
    if args.child:
        name, dtype = args.child
        child(name, dtype, args.threads)
        return
    torch.set_num_threads(args.threads)
    names = ["plain", *(f"chunked-{c}" for c in args.chunks), "kept-256", "chunked-recompute-256"]
    print(f"workload: {ROWS} rows x dim {DIM} -> vocab {VOCAB}, {args.threads} threads")
    rates = matmul_gflops((torch.float32, torch.bfloat16))
    print(f"2048^3 matmul: float32 {rates['float32']:.0f} GFLOP/s, bf16 {rates['bfloat16']:.0f}")
    hidden, weight, targets = inputs()
    rows = []
    for dtype in args.dtypes:
        steps = {n: variant(n, dtype, hidden, weight, targets) for n in names}
        first = {n: s() for n, s in steps.items()}  # also the warm-up
        times: dict[str, list[float]] = {n: [] for n in names}
        for round_ in range(args.repeats):
            for n in names[round_ % len(names) :] + names[: round_ % len(names)]:
                start = time.perf_counter()
                steps[n]()
                times[n].append(time.perf_counter() - start)
        for n in names:
            paired = [p / t for p, t in zip(times["plain"], times[n], strict=True)]
            row = {
                "dtype": dtype,
                "variant": n,
                "ms_median": statistics.median(times[n]) * 1e3,
                "vs_plain_paired_median": statistics.median(paired),
                "first_loss": first[n],
                "peak_added_MiB": peak_memory(n, dtype, args.threads),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\nloss forward + backward, {ROWS} x {DIM} -> {VOCAB}, median of {args.repeats}")
    print(f"{'dtype':<10}{'variant':<24}{'ms':>8}{'vs plain':>10}{'peak MiB':>10}{'loss':>12}")
    for r in rows:
        print(
            f"{r['dtype']:<10}{r['variant']:<24}{r['ms_median']:>8.0f}"
            f"{r['vs_plain_paired_median']:>10.2f}{r['peak_added_MiB']:>10.0f}{r['first_loss']:>12.1f}"
        )
    record = {
        "benchmark": "loss_cpu",
        "date": datetime.date.today().isoformat(),
        "device": cpu_name(),
        "cpu_bf16_instructions": list(cpu_bf16_instructions()),
        "threads": args.threads,
        "torch": torch.__version__,
        "workload": {"rows": ROWS, "dim": DIM, "vocab": VOCAB},
        "matmul_2048_gflops": rates,
        "rows": rows,
    }
    write_results(args.out, record)


if __name__ == "__main__":
    main()
