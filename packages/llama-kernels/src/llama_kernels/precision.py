"""Whether bf16 compute pays on a device: float32 or bf16, for training and for inference.

Llama 3 trains in bf16 with float32 master weights (arXiv 2407.21783, Table 4 lists bf16 for
every run); llama-train's `TrainConfig.dtype = "bfloat16"` does the same through `torch.autocast`
(float32 parameters, gradients and AdamW state; matmuls in bf16), and an inference engine that
serves in bf16 makes the same bet. Either is faster only where the hardware multiplies bf16
natively:

- CUDA: tensor cores with bf16, compute capability 8.0 (Ampere) and later
  (`torch.cuda.is_bf16_supported(including_emulation=False)`);
- CPU: oneDNN's bf16 GEMM on AMX-BF16 (Intel Sapphire Rapids and later) or AVX512-BF16 (Intel
  Cooper Lake, AMD Zen 4 and later), the two instruction sets oneDNN uses for bf16 matmuls. Without
  them bf16 matmuls are emulated and slower than float32. `torch.cpu.get_capabilities()` (cpuinfo)
  reports both.

This is knowledge about the hardware, not about training, so it lives here, in the package every
other one depends on: llama-train picks its autocast dtype with it, and inference needs the same
answer (llama-serve does not depend on llama-train).

Measured on this project's CPU machine, an AMD EPYC with AVX512-BF16 and no AMX (2 threads, a
2048^3 matmul, `benchmarks/bench_common.matmul_gflops`): bf16 413 GFLOP/s against float32's 172
(2.4x; 2.2-3.4x over runs on the shared machine). Issue 11 reports about 10x on a Xeon with
AMX; not measured here.
"""

from __future__ import annotations

import torch

__all__ = ["bf16_is_fast", "cpu_bf16_instructions"]

# The cpuinfo capability names (torch.cpu.get_capabilities) of native bf16 matmul instructions.
_CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_bf16_instructions() -> tuple[str, ...]:
    """The native bf16 matmul instruction sets this CPU has (`amx_bf16`, `avx512_bf16`), as
    PyTorch's cpuinfo reports them; empty when none, or when this torch cannot tell."""
    get_capabilities = getattr(torch.cpu, "get_capabilities", None)
    if get_capabilities is None:  # an older torch: no way to ask, so assume none
        return ()
    try:
        capabilities = get_capabilities()
    except (RuntimeError, AttributeError):  # cpuinfo failed to initialise (unusual platforms)
        return ()
    return tuple(flag for flag in _CPU_BF16_FLAGS if capabilities.get(flag, False))


def bf16_is_fast(device: torch.device) -> bool:
    """True when bf16 compute (autocast in training, bf16 weights in inference) should beat
    float32 on `device`.

    CUDA: the device has native bf16 (compute capability >= 8.0). CPU: the CPU has AMX-BF16 or
    AVX512-BF16 and PyTorch was built with oneDNN (mkldnn), which runs bf16 matmuls on them.
    Any other device type: False (not measured here; choose the dtype explicitly).
    """
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False
        with torch.cuda.device(device):
            return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    if device.type == "cpu":
        onednn = bool(torch.backends.mkldnn.is_available())  # type: ignore[no-untyped-call]
        return onednn and bool(cpu_bf16_instructions())
    return False
