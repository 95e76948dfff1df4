"""How fast is llama_model.Llama at inference on CPU, next to transformers' LlamaForCausalLM?

Both models hold the same weights and run with the same number of threads, in each dtype of
--dtypes: float32, and bfloat16 (both models' weights cast with `.to(torch.bfloat16)`, the usual
inference dtype; the KV caches follow the weights) by default when the CPU multiplies bf16
natively (`llama_kernels.bf16_is_fast`). Measured at batch size 1:
- prefill: one forward over a prompt of --prompt-len tokens, logits for the last position only
  (ours: `generate.prefill`; transformers: `logits_to_keep=1`), reported as prompt tokens/s;
- decode: --decode-steps single-token forwards against a KV cache (ours: the preallocated `KVCache`;
  transformers: its default `DynamicCache`, as `generate()` uses), greedy argmax, reported as
  tokens/s (time of prefill + steps, minus prefill, per step);
- generate: the libraries' own greedy `generate` (ours: `llama_model.generate`; transformers:
  `model.generate(do_sample=False)`), new tokens/s after the first, the number a user sees.
Each measurement runs the two libraries in turn, round by round (medians of --repeats rounds),
so a shared machine's drift hits both alike. Also reported: the weight bytes a decode step must read (every matrix, the input embedding table
excepted unless tied, at the dtype's size) divided by our time per step, in GB/s, to show the
distance to memory bandwidth. Before timing, the two models' logits on a probe prompt are checked
to agree (float32: 1e-4; bf16: 5e-2 absolute, the two libraries round different intermediate
results to bf16's 8 significant bits).

Prints a table and writes benchmarks/results/model_cpu.json. Usage:
    uv run python benchmarks/model_cpu.py [--threads N] [--repeats R] [--dtypes float32 bfloat16]
"""

from __future__ import annotations

import argparse
import datetime
from collections.abc import Callable
from pathlib import Path

import torch
import transformers

from bench_common import cpu_name, matmul_gflops, timed_in_turn, write_results
from llama_kernels import bf16_is_fast, cpu_bf16_instructions
from llama_model import (
    KVCache,
    Llama,
    LlamaConfig,
    config_to_hf,
    count_parameters,
    generate,
    to_hf_name,
)
from llama_model.generate import decode_one_token, prefill

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Agreement of the two models' logits before timing (see the module docstring).
AGREEMENT = {torch.float32: 1e-4, torch.bfloat16: 5e-2}

CONFIGS = {
    "debug": LlamaConfig.from_preset("debug"),
    # ~100M parameters with the full vocabulary: 8 layers of width 512, tied embeddings.
    "100m": LlamaConfig.from_preset(
        "debug", dim=512, n_layers=8, n_heads=8, n_kv_heads=2, tie_word_embeddings=True
    ),
}


def twin_models(
    config: LlamaConfig, dtype: torch.dtype
) -> tuple[Llama, transformers.LlamaForCausalLM]:
    """Our model and transformers' holding the same weights, both cast to `dtype`."""
    ours = Llama(config).eval()
    ours.init_weights(seed=0)
    hf_fields = {
        k: v for k, v in config_to_hf(config, dtype=torch.float32).items() if k != "architectures"
    }
    hf_config = transformers.LlamaConfig(**hf_fields)
    hf_config._attn_implementation = "sdpa"
    hf = transformers.LlamaForCausalLM(hf_config).eval()  # type: ignore[no-untyped-call]
    result = hf.load_state_dict(
        {to_hf_name(k): v for k, v in ours.state_dict().items()}, strict=False
    )
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(result.missing_keys) != tied or result.unexpected_keys:
        raise RuntimeError(f"weights did not transfer: {result}")
    ours, hf = ours.to(dtype), hf.to(dtype)
    probe = torch.randint(0, config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # same weights must mean same function before anything is timed
        tol = AGREEMENT[dtype]
        torch.testing.assert_close(ours(probe), hf(probe).logits, atol=tol, rtol=tol)
    return ours, hf


def bench(
    name: str, config: LlamaConfig, dtype: str, prompt_len: int, steps: int, repeats: int
) -> dict[str, object]:
    # Built outside inference mode, as a user would: transformers' LlamaForCausalLM cast to bf16
    # under torch.inference_mode() ran its prefill about 7x slower here (145 vs 20 ms).
    ours, hf = twin_models(config, DTYPES[dtype])
    with torch.inference_mode():
        return time_twins(name, config, dtype, ours, hf, prompt_len, steps, repeats)


def time_twins(name: str, config: LlamaConfig, dtype: str, ours: Llama,
               hf: transformers.LlamaForCausalLM, prompt_len: int, steps: int,
               repeats: int) -> dict[str, object]:  # fmt: skip
    """Prefill, decode and generate speed of both models (see the module docstring)."""
    prompt = torch.randint(
        0, config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(0)
    )
    total = prompt_len + steps

    cache = KVCache.for_model(ours, batch_size=1, max_seq_len=total)

    def ours_prefill() -> None:
        cache.reset()
        prefill(ours, prompt, cache)

    def ours_decode() -> None:
        cache.reset()
        logits = prefill(ours, prompt, cache)
        token = logits.argmax(-1)
        position = torch.tensor([prompt_len])
        for _ in range(steps):
            token = decode_one_token(ours, token, position, cache).argmax(-1)
            position += 1

    def hf_prefill() -> None:
        hf(
            prompt,
            use_cache=True,
            past_key_values=transformers.DynamicCache(config=hf.config),
            logits_to_keep=1,
        )

    def hf_decode() -> None:
        past = transformers.DynamicCache(config=hf.config)
        out = hf(prompt, use_cache=True, past_key_values=past, logits_to_keep=1)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(steps):
            out = hf(token, use_cache=True, past_key_values=past)
            token = out.logits[:, -1].argmax(-1, keepdim=True)

    prompt_list = prompt[0].tolist()

    def ours_generate(n: int) -> Callable[[], object]:
        return lambda: generate(ours, prompt_list, max_new_tokens=n)

    def hf_generate(n: int) -> Callable[[], object]:
        return lambda: hf.generate(  # type: ignore[misc]
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )

    # Decode time = (prefill + steps) - prefill, so each side is charged only for its decode steps.
    # Every measurement runs ours and transformers' in turn (bench_common.timed_in_turn).
    t = timed_in_turn(
        {
            "llama_model prefill": ours_prefill,
            "transformers prefill": hf_prefill,
            "llama_model decode": ours_decode,
            "transformers decode": hf_decode,
            "llama_model generate 1": ours_generate(1),
            "transformers generate 1": hf_generate(1),
            "llama_model generate n": ours_generate(steps + 1),
            "transformers generate n": hf_generate(steps + 1),
        },
        repeats,
    )
    results: dict[str, dict[str, float]] = {}
    for impl in ("llama_model", "transformers"):
        t_prefill = t[f"{impl} prefill"]
        t_decode = max(t[f"{impl} decode"] - t_prefill, 1e-9) / steps
        t_generate = max(t[f"{impl} generate n"] - t[f"{impl} generate 1"], 1e-9) / steps
        results[impl] = {
            "prefill_tok_s": prompt_len / t_prefill,
            "decode_tok_s": 1.0 / t_decode,
            "generate_tok_s": 1.0 / t_generate,
        }
    read_params = count_parameters(config)
    if not config.tie_word_embeddings:
        read_params -= config.vocab_size * config.dim  # only one embedding row is read per token
    weight_bytes = read_params * DTYPES[dtype].itemsize
    row = {
        "config": name,
        "dtype": dtype,
        "params": count_parameters(config),
        "prompt_len": prompt_len,
        "decode_steps": steps,
        **{f"{impl}_{k}": v for impl, r in results.items() for k, v in r.items()},
        "prefill_speedup": results["llama_model"]["prefill_tok_s"]
        / results["transformers"]["prefill_tok_s"],
        "decode_speedup": results["llama_model"]["decode_tok_s"]
        / results["transformers"]["decode_tok_s"],
        "generate_speedup": results["llama_model"]["generate_tok_s"]
        / results["transformers"]["generate_tok_s"],
        "llama_model_decode_GB_s": weight_bytes * results["llama_model"]["decode_tok_s"] / 1e9,
    }
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--decode-steps", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--dtypes", nargs="+", default=None, choices=list(DTYPES))
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "model_cpu.json"
    )
    args = parser.parse_args()
    if args.dtypes is None:
        args.dtypes = ["float32", "bfloat16"] if bf16_is_fast(torch.device("cpu")) else ["float32"]
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    matmul = matmul_gflops((torch.float32, torch.bfloat16))
    print(
        f"2048^3 matmul, {args.threads} threads: "
        + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in matmul.items())
    )
    print(f"workload: batch 1, prompt {args.prompt_len} tokens, {args.decode_steps} decode steps")

    rows = []
    for n in args.configs:
        for dtype in args.dtypes:
            rows.append(
                bench(n, CONFIGS[n], dtype, args.prompt_len, args.decode_steps, args.repeats)
            )
            print(rows[-1], flush=True)
    columns = [  # (title, key, format)
        ("prefill ours", "llama_model_prefill_tok_s", ".0f"),
        ("hf", "transformers_prefill_tok_s", ".0f"),
        ("x", "prefill_speedup", ".2f"),
        ("decode ours", "llama_model_decode_tok_s", ".1f"),
        ("hf", "transformers_decode_tok_s", ".1f"),
        ("x", "decode_speedup", ".2f"),
        ("generate ours", "llama_model_generate_tok_s", ".1f"),
        ("hf", "transformers_generate_tok_s", ".1f"),
        ("x", "generate_speedup", ".2f"),
        ("GB/s", "llama_model_decode_GB_s", ".1f"),
    ]
    print(f"tokens/s at batch 1, {args.threads} threads, prompt {args.prompt_len}")
    print(
        f"{'config':<8}{'dtype':>10}{'params':>12}"
        + "".join(f"{t:>15}" if t not in ("hf", "x") else f"{t:>9}" for t, _, _ in columns)
    )
    for r in rows:
        cells = "".join(
            f"{r[k]:>15{f}}" if t not in ("hf", "x") else f"{r[k]:>9{f}}" for t, k, f in columns
        )
        print(f"{r['config']:<8}{r['dtype']:>10}{r['params']:>12,}{cells}")
    record = {
        "benchmark": "model_cpu",
        "date": datetime.date.today().isoformat(),
        "device": cpu_name(),
        "threads": args.threads,
        "cpu_bf16_instructions": list(cpu_bf16_instructions()),
        "matmul_2048_gflops": matmul,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "rows": rows,
    }
    write_results(args.out, record)


if __name__ == "__main__":
    main()
