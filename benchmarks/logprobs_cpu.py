"""How fast and how large is post-training's per-target log-probability on CPU, plain or chunked?

What llama-align's `Policy` computes for SFT and DPO: log softmax(hidden @ weight.T)[target] per
row, then a loss that weighs each row differently (DPO weighs each sequence by its own sigmoid), so
the backward gets a different incoming gradient per row. The workload: --rows hidden states
(default 1,024) of width --dims (default 128, the post-training notebook's model, and 256, the
`debug` preset the demo post-trains) against Llama 3's 128,256-token vocabulary; random seeded
inputs (the weight at the debug model's init scale), targets uniform in the vocabulary.

Variants, all computing the same [N] float32 log-probs:
- plain: what `Policy` does without the chunked path, `F.linear(hidden, weight)` (under autocast:
  a bf16 matmul) then `llama_align.policy.token_logprobs(logits, targets)`, autograd backward;
- chunked-C: `llama_train.linear_log_probs(hidden, weight, targets, chunk_size=C)` for each
  --chunks size (the backward recomputes each chunk's logits);
- kept-256: one `llama_train.LinearLogProbs()` called every round, which keeps its buffers between
  calls (what `Policy` holds): glibc serves each fresh multi-hundred-MB tensor with a new mmap
  that the kernel zero-fills (page faults, system time).
Modes: train = forward + backward of (logps * upstream).sum() with a fixed random upstream [N] of
both signs (per-row weights, as DPO's), gradients of hidden and weight (float32 leaves); score =
forward only under torch.no_grad() (a frozen reference model). Dtypes: float32, and bfloat16 =
`torch.autocast("cpu", dtype=torch.bfloat16)` over the float32 leaves, as training runs.

Before timing, every variant's log-probs are checked against plain's (rtol = atol = 1e-5; under
bf16 both sides round the same bf16 logits and take a float32 log-softmax). Columns: median ms
over --repeats rounds (the variants timed in turn each round, so a shared machine's drift hits
them alike); the paired median speed-up over plain (per round plain's time / the variant's);
minor page faults per round (getrusage's ru_minflt over the timed rounds); and the peak resident
memory the variant adds, measured in a fresh subprocess per variant as the peak RSS (VmHWM, reset
just before) minus the RSS before it ran (torch has no CPU allocator statistics). Also recorded:
the 2048^3 matmul rate in float32 and bf16 on this CPU.

Prints a table and writes benchmarks/results/logprobs_cpu.json. ``--quick`` is a smoke run (64
rows, dim 32, one chunk size, 2 rounds, a 512^3 matmul rate, the peak memory of the first variant
only: each fresh subprocess spends seconds importing) that writes to a temporary file. Usage:
    uv run python benchmarks/logprobs_cpu.py [--threads 2] [--repeats 5] [--rows 1024]
        [--dims 128 256] [--chunks 128 256 512] [--dtypes float32 bfloat16] [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bench_common import cpu_name, matmul_gflops, peak_rss_bytes, rss_bytes, write_results
from llama_align.policy import token_logprobs  # not re-exported by llama_align
from llama_kernels import cpu_bf16_instructions
from llama_train import LinearLogProbs, linear_log_probs

VOCAB = 128_256  # Llama 3's vocabulary
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MODES = ("train", "score")
Inputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def inputs(rows: int, dim: int, seed: int = 0) -> Inputs:
    """hidden [rows, dim] and weight [VOCAB, dim] (float32 leaves, the debug model's init scale),
    targets [rows] uniform in the vocabulary and the per-row upstream gradient [rows] (both signs)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, dim, generator=g).requires_grad_()
    weight = (torch.randn(VOCAB, dim, generator=g) * 0.02).requires_grad_()
    targets = torch.randint(0, VOCAB, (rows,), generator=g)
    return hidden, weight, targets, torch.randn(rows, generator=g)


def variant(name: str, dtype: str, mode: str, data: Inputs) -> Callable[[], torch.Tensor]:
    """One call of the named variant in `mode`; returns the log-probs [N] (detached)."""
    hidden, weight, targets, upstream = data
    kept = (
        LinearLogProbs(chunk_size=int(name.rsplit("-", 1)[1])) if name.startswith("kept") else None
    )

    def log_probs() -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            if name == "plain":
                return token_logprobs(F.linear(hidden, weight), targets)
            if kept is not None:
                return kept(hidden, weight, targets)
            return linear_log_probs(hidden, weight, targets, chunk_size=int(name.rsplit("-", 1)[1]))

    def step() -> torch.Tensor:
        if mode == "score":
            with torch.no_grad():
                return log_probs()
        hidden.grad = weight.grad = None
        logps = log_probs()
        (logps * upstream).sum().backward()  # type: ignore[no-untyped-call]
        return logps.detach()

    return step


def child(name: str, dtype: str, mode: str, rows: int, dim: int, threads: int) -> None:
    """Subprocess: run one variant twice; print the peak RSS added over the RSS before it."""
    torch.set_num_threads(threads)
    step = variant(name, dtype, mode, inputs(rows, dim))
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the RSS now (Linux >= 4.0)
    before = rss_bytes()
    step()
    step()
    print(json.dumps({"peak_added_MiB": (peak_rss_bytes() - before) / 2**20}))


def peak_memory(name: str, dtype: str, mode: str, rows: int, dim: int, threads: int) -> float:
    command = [sys.executable, __file__, "--child", name, dtype, mode, "--rows", str(rows),
               "--dims", str(dim), "--threads", str(threads)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return float(json.loads(result.stdout.strip().splitlines()[-1])["peak_added_MiB"])


def time_cell(
    steps: dict[str, Callable[[], torch.Tensor]], repeats: int
) -> tuple[dict[str, list[float]], dict[str, float], dict[str, float]]:
    """Each variant `repeats` times, in turn each round (the order rotating): the wall times, and
    the minor page faults and system ms per round."""
    names = list(steps)
    times: dict[str, list[float]] = {n: [] for n in names}
    faults, system = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0)
    for round_ in range(repeats):
        for n in names[round_ % len(names) :] + names[: round_ % len(names)]:
            usage = resource.getrusage(resource.RUSAGE_SELF)
            start = time.perf_counter()
            steps[n]()
            times[n].append(time.perf_counter() - start)
            after = resource.getrusage(resource.RUSAGE_SELF)
            faults[n] += (after.ru_minflt - usage.ru_minflt) / repeats
            system[n] += (after.ru_stime - usage.ru_stime) * 1e3 / repeats
    return times, faults, system


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--dims", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--chunks", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child", nargs=3, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        name, dtype, mode = args.child
        child(name, dtype, mode, args.rows, args.dims[0], args.threads)
        return
    if args.quick:
        args.rows, args.dims, args.repeats, args.chunks = 64, [32], 2, [32]
    if args.out is None:  # a smoke run never overwrites the results file
        folder = Path(tempfile.gettempdir()) if args.quick else Path(__file__).parent / "results"
        args.out = folder / ("logprobs_cpu-quick.json" if args.quick else "logprobs_cpu.json")
    if args.rows < 1 or args.repeats < 1:
        parser.error("--rows and --repeats must be at least 1")
    torch.set_num_threads(args.threads)
    names = ["plain", *(f"chunked-{c}" for c in args.chunks), "kept-256"]
    cells = [(d, t, m) for d in args.dims for t in args.dtypes for m in args.modes]
    print(
        f"workload: {args.rows} rows x dims {args.dims} -> vocab {VOCAB}; {len(names)} variants x "
        f"{len(cells)} cells (dim, dtype, mode) x {args.repeats} rounds; {args.threads} threads"
    )
    size = 512 if args.quick else 2048
    rates = matmul_gflops((torch.float32, torch.bfloat16), size=size)
    print(f"{size}^3 matmul: float32 {rates['float32']:.0f} GFLOP/s, bf16 {rates['bfloat16']:.0f}")
    rows: list[dict[str, Any]] = []
    for dim, dtype, mode in cells:
        data = inputs(args.rows, dim)
        steps = {n: variant(n, dtype, mode, data) for n in names}
        first = {n: s() for n, s in steps.items()}  # also the warm-up
        for n in names:  # rtol = atol = 1e-5 (bf16: the same bf16 logits on both sides)
            try:
                torch.testing.assert_close(first[n], first["plain"], rtol=1e-5, atol=1e-5)
            except AssertionError as error:
                raise AssertionError(
                    f"{n} != plain (dim {dim}, {dtype}, {mode}): {error}"
                ) from None
        print(f"checked: same log-probs (dim {dim}, {dtype}, {mode}, {len(names)} variants)")
        times, faults, system = time_cell(steps, args.repeats)
        for n in names:
            measure = not args.quick or (dim, dtype, mode, n) == (*cells[0], names[0])
            row = {
                "dim": dim,
                "dtype": dtype,
                "mode": mode,
                "variant": n,
                "ms_median": statistics.median(times[n]) * 1e3,
                "vs_plain_paired_median": statistics.median(
                    [p / t for p, t in zip(times["plain"], times[n], strict=True)]
                ),
                "minor_faults_per_round": faults[n],
                "system_ms_per_round": system[n],
                "mean_logp": float(first[n].mean()),
                "peak_added_MiB": (
                    peak_memory(n, dtype, mode, args.rows, dim, args.threads) if measure else None
                ),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\nper-target log-probs, {args.rows} rows x dim -> {VOCAB}, median of {args.repeats}")
    header = f"{'dim':>5}  {'dtype':<10}{'mode':<7}{'variant':<13}{'ms':>8}{'vs plain':>10}"
    print(f"{header}{'faults/round':>14}{'peak MiB':>10}")
    for r in rows:
        peak = "-" if r["peak_added_MiB"] is None else f"{r['peak_added_MiB']:.0f}"
        print(
            f"{r['dim']:>5}  {r['dtype']:<10}{r['mode']:<7}{r['variant']:<13}{r['ms_median']:>8.1f}"
            f"{r['vs_plain_paired_median']:>10.2f}{r['minor_faults_per_round']:>14.0f}{peak:>10}"
        )
    record = {
        "benchmark": "logprobs_cpu",
        "date": datetime.date.today().isoformat(),
        "device": cpu_name(),
        "cpu_bf16_instructions": list(cpu_bf16_instructions()),
        "threads": args.threads,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            **{p: version(p) for p in ("llama-train", "llama-align")},
        },
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "workload": {"rows": args.rows, "dims": args.dims, "vocab": VOCAB},
        f"matmul_{size}_gflops": rates,
        "rows": rows,
    }
    write_results(args.out, record)


if __name__ == "__main__":
    main()
