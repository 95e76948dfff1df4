"""llama_serve: serving Llama 3 models (§6 of "The Llama 3 Herd of Models", arXiv 2407.21783).

An inference engine over `llama_model.Llama` (`Engine`, named after vLLM's API): a paged KV cache
whose blocks the samples of one prompt share (§4.2.2), automatic prefix caching, continuous
batching with chunked prefill and preemption by recomputation, and per-request seeded sampling.
And the FP8 inference recipe of §6.2 (`quantize_fp8`): which matmuls of a `llama_model.Llama` run
in FP8, on top of `llama_kernels.Fp8RowwiseLinear`, and FP8 checkpoints in the `fbgemm_fp8` layout
Meta released Llama 3.1 405B Instruct FP8 in or in compressed-tensors' FP8 layout
(`save_fp8_checkpoint`, `llama-serve quantize`), and how close its logits stay (`compare_logits`).
And the OpenAI-compatible server (`build_app`, `llama-serve serve`) over a `Backend` (this
engine, `NativeBackend`, or vLLM's), with Llama 3.1 tool calls and guard shields (§5.4.7:
`LlamaGuardShield`, or any `Shield`).
"""

from llama_serve.async_engine import AsyncEngine
from llama_serve.backend import Backend, BackendLoad, NativeBackend
from llama_serve.engine import Engine, EngineConfig, Prompt
from llama_serve.fp8 import compare_logits, quantize_fp8
from llama_serve.fp8_checkpoint import is_fp8_checkpoint, load_fp8_checkpoint, save_fp8_checkpoint
from llama_serve.guard import (
    LLAMA_GUARD_CATEGORIES,
    REFUSAL,
    LlamaGuardShield,
    RuleShield,
    Shield,
    Verdict,
    llama_guard_prompt,
    parse_llama_guard,
)
from llama_serve.params import CompletionOutput, RequestOutput, SamplingParams
from llama_serve.server import ServerConfig, build_app, serve_in_background
from llama_serve.vllm_backend import VllmBackend  # imports vLLM only when one is built

__all__ = [
    # the engine
    "Engine",
    "EngineConfig",
    "AsyncEngine",
    "Prompt",
    "SamplingParams",
    "RequestOutput",
    "CompletionOutput",
    # FP8 inference (§6.2)
    "quantize_fp8",
    "compare_logits",
    "save_fp8_checkpoint",
    "load_fp8_checkpoint",
    "is_fp8_checkpoint",
    # the OpenAI-compatible server and what it runs on
    "build_app",
    "ServerConfig",
    "serve_in_background",
    "Backend",
    "BackendLoad",
    "NativeBackend",
    "VllmBackend",
    # guard shields (§5.4.7)
    "Shield",
    "Verdict",
    "LlamaGuardShield",
    "RuleShield",
    "LLAMA_GUARD_CATEGORIES",
    "REFUSAL",
    "llama_guard_prompt",
    "parse_llama_guard",
]
