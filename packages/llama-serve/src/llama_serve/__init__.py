"""llama_serve: serving Llama 3 models (§6 of "The Llama 3 Herd of Models", arXiv 2407.21783).

For now it holds the FP8 inference recipe of §6.2 (`quantize_fp8`): the model knowledge of which
matmuls of a `llama_model.Llama` run in FP8, on top of `llama_kernels.Fp8RowwiseLinear`. The
inference engine, the OpenAI-compatible server and the vLLM backend come next.
"""

from llama_serve.fp8 import quantize_fp8

__all__ = [
    # FP8 inference (§6.2)
    "quantize_fp8",
]
