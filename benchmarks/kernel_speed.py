"""How fast are llama_kernels' RMSNorm, RoPE and FP8 GEMM next to what PyTorch offers?

For RMSNorm and RoPE (memory-bound), forward and backward: achieved GB/s (the fewest bytes each op
must move: inputs read once, outputs written once) and that as a fraction of this device's measured
copy bandwidth, for llama_kernels against torch eager and `torch.compile` of the same formula (and
`F.rms_norm`). For FP8 (compute-bound), TFLOP/s of the row-wise GEMM alone and of quantize + GEMM
at the Llama 3 8B/70B/405B feed-forward shapes and at 8192³, against bf16 `torch.matmul` and
`torch._scaled_mm` with row-wise scales.

On a GPU, llama_kernels runs its Triton kernels; on a CPU it runs the PyTorch reference backend with
smaller shapes (and the FP8 rows are skipped: there is no FP8 matrix unit to measure). Prints a table
and writes benchmarks/results/kernel_speed-<device>.json. Usage:
    uv run python benchmarks/kernel_speed.py [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch._functorch.config
import torch.nn.functional as F

from llama_kernels import (
    apply_rope,
    fp8_rowwise_matmul,
    quantize_fp8_rowwise,
    rms_norm,
    rope_frequencies,
)

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# Backward passes are timed by repeating autograd.grad(..., retain_graph=True) over one graph;
# compiled graphs donate their saved buffers by default, which forbids that.
torch._functorch.config.donated_buffer = False  # type: ignore[attr-defined]


def bench(fn: Callable[[], Any], *, repeats: int = 50) -> float:
    """Median seconds per call of `fn`, after warm-up (device events on CUDA)."""
    if CUDA:
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")) / 1e3
    fn()
    times = []
    for _ in range(max(repeats // 10, 3)):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Measured device copy bandwidth in GB/s (bytes read + bytes written)."""
    n = (1 << 28) if CUDA else (1 << 25)  # 1 GiB / 128 MiB of float32
    src = torch.randn(n, device=DEVICE)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / bench(lambda: dst.copy_(src)) / 1e9


def reference_rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * w


def reference_rope(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    angles = positions.float()[..., None] * inv_freq
    cos = torch.cat((angles, angles), -1).cos()[:, :, None]
    sin = torch.cat((angles, angles), -1).sin()[:, :, None]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        a, b = x32.chunk(2, -1)
        return (x32 * cos + torch.cat((-b, a), -1) * sin).type_as(x)

    return rotate(q), rotate(k)


def memory_rows(bandwidth: float, quick: bool) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    dtype = torch.bfloat16
    tokens = 16384 if CUDA else 512  # enough work per call that the GPU, not the launch, is timed
    hiddens = [4096, 8192, 16384] if CUDA else [4096]
    if quick:
        hiddens = hiddens[:1]
    compiled_rms = torch.compile(reference_rms_norm)
    candidates_rms: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
        "llama_kernels": lambda x, w: rms_norm(x, w, 1e-5),
        "torch eager": reference_rms_norm,
        "torch.compile": compiled_rms,
        "F.rms_norm": lambda x, w: F.rms_norm(x, (x.shape[-1],), w, 1e-5),
    }
    for hidden in hiddens:
        x = torch.randn(tokens, hidden, device=DEVICE, dtype=dtype, requires_grad=True)
        w = torch.randn(hidden, device=DEVICE, dtype=dtype, requires_grad=True)
        dy = torch.randn(tokens, hidden, device=DEVICE, dtype=dtype)
        size = x.numel() * x.element_size()
        for name, fn in candidates_rms.items():
            fwd = bench(lambda fn=fn, x=x, w=w: fn(x, w))
            y = fn(x, w)
            bwd = bench(
                lambda y=y, x=x, w=w, dy=dy: torch.autograd.grad(y, (x, w), dy, retain_graph=True)
            )
            # forward: read x, write y; backward: read x and dy, write dx (weight terms are O(hidden))
            for direction, seconds, nbytes in (("fwd", fwd, 2 * size), ("bwd", bwd, 3 * size)):
                gbps = nbytes / seconds / 1e9
                rows.append({"op": "rms_norm", "shape": f"{tokens}x{hidden}", "direction": direction,
                             "impl": name, "ms": seconds * 1e3, "GB/s": gbps,
                             "fraction_of_copy": gbps / bandwidth})  # fmt: skip

    heads, kv_heads, head_dim = 32, 8, 128
    inv_freq = rope_frequencies(head_dim, 500_000.0, scaling_factor=8.0, device=DEVICE)
    compiled_rope = torch.compile(reference_rope)
    candidates_rope = {
        "llama_kernels": lambda q, k, p: apply_rope(q, k, p, inv_freq),
        "torch eager": lambda q, k, p: reference_rope(q, k, p, inv_freq),
        "torch.compile": lambda q, k, p: compiled_rope(q, k, p, inv_freq),
    }
    seq = tokens
    q = torch.randn(1, seq, heads, head_dim, device=DEVICE, dtype=dtype, requires_grad=True)
    k = torch.randn(1, seq, kv_heads, head_dim, device=DEVICE, dtype=dtype, requires_grad=True)
    dq, dk = torch.randn_like(q), torch.randn_like(k)
    positions = torch.arange(seq, device=DEVICE)[None]
    size = (q.numel() + k.numel()) * q.element_size()
    for name, fn in candidates_rope.items():
        fwd = bench(lambda fn=fn: fn(q, k, positions))
        qo, ko = fn(q, k, positions)
        bwd = bench(
            lambda qo=qo, ko=ko: torch.autograd.grad((qo, ko), (q, k), (dq, dk), retain_graph=True)
        )
        for direction, seconds in (("fwd", fwd), ("bwd", bwd)):
            gbps = 2 * size / seconds / 1e9  # read q, k; write q, k (or their gradients)
            rows.append({"op": "apply_rope", "shape": f"{seq}x({heads}+{kv_heads})x{head_dim}",
                         "direction": direction, "impl": name, "ms": seconds * 1e3, "GB/s": gbps,
                         "fraction_of_copy": gbps / bandwidth})  # fmt: skip
    return rows


FFN_SHAPES = {  # (tokens M, out N, in K) for the w1/w3 (dim→ffn) and w2 (ffn→dim) matmuls
    "8b w1": (8192, 14336, 4096),
    "8b w2": (8192, 4096, 14336),
    "70b w1": (8192, 28672, 8192),
    "70b w2": (8192, 8192, 28672),
    "405b w1": (8192, 53248, 16384),
    "405b w2": (8192, 16384, 53248),
    "square": (8192, 8192, 8192),
}


def fp8_rows(quick: bool) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    shapes = {"square": FFN_SHAPES["square"]} if quick else FFN_SHAPES
    for label, (m, n, k) in shapes.items():
        x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
        w = torch.randn(n, k, device=DEVICE, dtype=torch.bfloat16)
        w_fp8, w_scale = quantize_fp8_rowwise(w)
        x_fp8, x_scale = quantize_fp8_rowwise(x)
        flops = 2 * m * n * k
        timings = {
            "bf16 torch.matmul": bench(lambda x=x, w=w: torch.matmul(x, w.t())),
            "llama_kernels gemm": bench(
                lambda a=x_fp8, sa=x_scale, b=w_fp8, sb=w_scale: fp8_rowwise_matmul(a, sa, b, sb)
            ),
            "llama_kernels quantize+gemm": bench(
                lambda x=x, b=w_fp8, sb=w_scale: fp8_rowwise_matmul(*quantize_fp8_rowwise(x), b, sb)
            ),
        }
        if label == "square":  # the plain-pointer kernel that GPUs without TMA run, for scale
            from llama_kernels._triton_fp8 import fp8_rowwise_matmul_triton

            timings["llama_kernels gemm, pointer kernel"] = bench(
                lambda a=x_fp8, sa=x_scale, b=w_fp8, sb=w_scale: fp8_rowwise_matmul_triton(
                    a, sa, b, sb, None, torch.bfloat16, kernel="pointer"
                )
            )
        # use_fast_accum=False (the default) promotes fp8 partial sums to fp32, as llama_kernels
        # does: the like-for-like reference. True accumulates in the tensor cores' reduced
        # precision throughout: shown for the price of that promotion.
        for suffix, fast in (("", False), (" fast_accum", True)):
            try:
                timings["torch._scaled_mm rowwise" + suffix] = bench(
                    lambda a=x_fp8, sa=x_scale, b=w_fp8, sb=w_scale, fast=fast: torch._scaled_mm(
                        a, b.t(), scale_a=sa[:, None], scale_b=sb[None, :],
                        out_dtype=torch.bfloat16, use_fast_accum=fast,
                    )
                )  # fmt: skip
            except RuntimeError as err:  # older GPUs / torch builds without row-wise scaling
                print(f"torch._scaled_mm row-wise unavailable: {err}")
        for impl, seconds in timings.items():
            rows.append({"op": "fp8_gemm", "shape": f"{label} {m}x{n}x{k}", "impl": impl,
                         "ms": seconds * 1e3, "TFLOP/s": flops / seconds / 1e12,
                         "vs_bf16": timings["bf16 torch.matmul"] / seconds})  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one shape per op")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--no-fp8", action="store_true", help="only the memory-bound ops")
    parser.add_argument(
        "--fp8-only",
        action="store_true",
        help="only the FP8 GEMM rows, replacing those in an existing results file (others kept)",
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    device_name = torch.cuda.get_device_name() if CUDA else "cpu"
    bandwidth = copy_bandwidth()
    print(f"device: {device_name}; measured copy bandwidth {bandwidth:.0f} GB/s")
    slug = device_name.lower().replace(" ", "-")
    out = args.out or Path(__file__).parent / "results" / f"kernel_speed-{slug}.json"

    kept: dict[str, Any] = {}
    if args.fp8_only and out.exists():  # keep the memory-bound rows of an earlier run
        kept = json.loads(out.read_text())
        kept["rows"] = [r for r in kept.get("rows", []) if r["op"] != "fp8_gemm"]
    today = datetime.date.today().isoformat()
    triton_version = None
    if CUDA:
        import triton

        triton_version = triton.__version__

    def save(rows: list[dict[str, Any]]) -> None:  # after each part, so a cut-off run keeps data
        record = {
            **kept,
            "benchmark": "kernel_speed",
            "date": today,
            "device": device_name,
            # the memory-bound rows' fractions are of the bandwidth measured with them
            "copy_bandwidth_GB_s": kept.get("copy_bandwidth_GB_s", bandwidth),
            "torch": torch.__version__,
            "triton": triton_version,
            "rows": rows,
        }
        if args.fp8_only:
            runs = [r for r in kept.get("runs", []) if not r["what"].startswith("fp8_gemm")]
            runs.append({"what": f"fp8_gemm rows ({today}, --fp8-only)", "date": today,
                         "copy_bandwidth_GB_s": bandwidth, "torch": torch.__version__,
                         "triton": triton_version})  # fmt: skip
            record["runs"] = runs
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=2) + "\n")

    if args.fp8_only:
        rows: list[dict[str, Any]] = kept.get("rows", [])
    else:
        rows = memory_rows(bandwidth, args.quick)
        save(rows)
        print(f"\n{'op':<11}{'shape':<22}{'dir':<5}{'impl':<16}{'ms':>9}{'GB/s':>9}{'of copy':>9}")
        for r in rows:
            print(f"{r['op']:<11}{r['shape']:<22}{r['direction']:<5}{r['impl']:<16}{r['ms']:>9.3f}"
                  f"{r['GB/s']:>9.0f}{r['fraction_of_copy']:>9.0%}")  # fmt: skip
    if CUDA and not args.no_fp8:
        gemm = fp8_rows(args.quick)
        rows += gemm
        save(rows)
        print(f"\n{'shape':<26}{'impl':<38}{'ms':>9}{'TFLOP/s':>9}{'vs bf16':>9}")
        for r in gemm:
            print(
                f"{r['shape']:<26}{r['impl']:<38}{r['ms']:>9.3f}{r['TFLOP/s']:>9.0f}{r['vs_bf16']:>9.2f}"
            )
    elif not CUDA:
        print("\nFP8 GEMM rows skipped: no CUDA device (FP8 matrix units are what they measure)")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
