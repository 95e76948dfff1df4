"""Helpers the CPU benchmarks share: the machine's name, a median wall-clock timer, matmul rates,
resident memory, and writing the results file.

Scripts in this folder import it as `bench_common` (Python puts the script's folder on sys.path).
"""

from __future__ import annotations

import json
import platform
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "cpu_name",
    "matmul_gflops",
    "peak_rss_bytes",
    "rss_bytes",
    "timed",
    "timed_in_turn",
    "write_results",
]


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (platform.processor() is empty on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of `fn` over `repeats` runs after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def timed_in_turn(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median wall time of each function, run in turn each round (the order rotating) after one
    warm-up run each, so a shared machine's drift hits them alike."""
    for fn in fns.values():
        fn()
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(repeats):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def matmul_gflops(
    dtypes: tuple[torch.dtype, ...], size: int = 2048, repeats: int = 5
) -> dict[str, float]:
    """GFLOP/s of a [size, size] @ [size, size] CPU matmul in each dtype (2 size^3 FLOPs), the
    dtypes timed in turn each round so a shared machine's drift hits them alike; median per dtype.
    """
    g = torch.Generator().manual_seed(0)
    pairs = {
        d: (torch.randn(size, size, generator=g).to(d), torch.randn(size, size, generator=g).to(d))
        for d in dtypes
    }
    for a, b in pairs.values():
        a @ b  # warm-up: oneDNN picks and caches its kernel
    times: dict[torch.dtype, list[float]] = {d: [] for d in dtypes}
    for _ in range(repeats):
        for d, (a, b) in pairs.items():
            start = time.perf_counter()
            a @ b
            times[d].append(time.perf_counter() - start)
    return {
        str(d).removeprefix("torch."): 2 * size**3 / statistics.median(t) / 1e9
        for d, t in times.items()
    }


def rss_bytes() -> int:
    """This process's resident memory now (Linux /proc/self/statm)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize()


def peak_rss_bytes() -> int:
    """This process's peak resident memory (VmHWM of /proc/self/status). Not getrusage's
    ru_maxrss: a subprocess inherits its parent's high-water mark there across fork and exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024  # kB
    raise RuntimeError("no VmHWM in /proc/self/status (needs Linux)")


def write_results(path: Path, record: dict[str, Any]) -> None:
    """Write a benchmark's results as indented JSON to `path` (folders made) and say where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")
