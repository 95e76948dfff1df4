"""llama_kernels: the kernels Llama 3 relies on, each a Triton kernel with a PyTorch reference.

Fused RMSNorm (forward and backward), fused RoPE for q and k in one launch with Llama 3.1
frequency scaling, and FP8 row-wise quantisation and matmul for inference (§6.2 of "The Llama 3
Herd of Models", arXiv 2407.21783). Every op is a registered `torch.library` custom op with an
autograd formula, so `torch.compile(fullgraph=True)` traces through it. The Triton kernels run on
CUDA tensors and the PyTorch references everywhere else; `set_backend("torch" | "triton")` changes
that (the environment variable `LLAMA_KERNELS_BACKEND` gives the initial choice, read once at
import), and `TRITON_INTERPRET=1` runs the Triton kernels on the CPU (how CI tests them). Also
the hardware probe that says whether bf16 compute pays on a device, `bf16_is_fast(device)`, for
training's autocast and inference's dtype alike.
"""

from llama_kernels._backend import BackendChoice, set_backend
from llama_kernels.fp8 import (
    SCALE_UB,
    Fp8RowwiseLinear,
    fp8_rowwise_matmul,
    quantize_fp8_rowwise,
)
from llama_kernels.precision import bf16_is_fast, cpu_bf16_instructions
from llama_kernels.rms_norm import rms_norm
from llama_kernels.rope import RopeLayout, apply_rope, rope_frequencies

__all__ = [
    # which implementation runs
    "BackendChoice",
    "set_backend",
    # normalisation
    "rms_norm",
    # rotary position embeddings
    "RopeLayout",
    "apply_rope",
    "rope_frequencies",
    # FP8 inference (§6.2)
    "SCALE_UB",
    "Fp8RowwiseLinear",
    "fp8_rowwise_matmul",
    "quantize_fp8_rowwise",
    # which dtype pays on this device
    "bf16_is_fast",
    "cpu_bf16_instructions",
]
