"""Tests for llama_train.precision: when bf16 autocast is chosen.

The oracle for the real CPU is the kernel's own list of CPU flags (/proc/cpuinfo), read here
independently of PyTorch's cpuinfo; the other branches are driven by replacing the probes. The
last test records the dtype every op of a training step runs in under CPU bf16 autocast.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import _common  # tests/distributed/_common.py, on sys.path via conftest
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from llama_model import Documents
from llama_train.loss import linear_cross_entropy
from llama_train.precision import bf16_is_fast, cpu_bf16_instructions

CPU = torch.device("cpu")


def _proc_cpuinfo_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="needs Linux's /proc/cpuinfo")
def test_cpu_instructions_agree_with_proc_cpuinfo() -> None:
    """The bf16 instruction sets reported are exactly those the kernel lists for this CPU."""
    expected = tuple(f for f in ("amx_bf16", "avx512_bf16") if f in _proc_cpuinfo_flags())
    assert cpu_bf16_instructions() == expected
    onednn = torch.backends.mkldnn.is_available()  # type: ignore[no-untyped-call]
    assert bf16_is_fast(CPU) == (bool(expected) and onednn)


@pytest.mark.parametrize(
    ("capabilities", "fast"),
    [
        ({"amx_bf16": True, "avx512_bf16": False}, True),
        ({"amx_bf16": False, "avx512_bf16": True}, True),
        ({"amx_bf16": False, "avx512_bf16": False, "avx512_f": True, "amx_tile": True}, False),
        ({}, False),
    ],
)
def test_cpu_is_fast_only_with_a_native_bf16_matmul(
    monkeypatch: pytest.MonkeyPatch, capabilities: dict[str, bool], fast: bool
) -> None:
    """AMX-BF16 or AVX512-BF16 -> True; AVX-512 or AMX tiles without bf16 -> False."""
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: True)
    assert bf16_is_fast(CPU) is fast


def test_cpu_without_onednn_is_not_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 instructions but a torch built without oneDNN: False (the matmuls would not use them)."""
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"amx_bf16": True})
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    assert bf16_is_fast(CPU) is False


def test_a_torch_that_cannot_tell_means_not_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    """No `torch.cpu.get_capabilities`, or one that raises: no instructions, not fast."""
    monkeypatch.delattr(torch.cpu, "get_capabilities")
    assert cpu_bf16_instructions() == ()
    assert bf16_is_fast(CPU) is False

    def broken() -> dict[str, bool]:
        raise RuntimeError("cpuinfo failed to initialize")

    monkeypatch.setattr(torch.cpu, "get_capabilities", broken, raising=False)
    assert cpu_bf16_instructions() == ()


def test_cuda_asks_for_native_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA: False without a GPU; else what torch says about native (not emulated) bf16."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bf16_is_fast(torch.device("cuda", 0)) is False
    asked: list[bool] = []

    def supported(including_emulation: bool = True) -> bool:
        asked.append(including_emulation)
        return False  # a pre-Ampere GPU

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device", lambda _device: _NullContext())
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", supported)
    assert bf16_is_fast(torch.device("cuda", 0)) is False
    assert asked == [False]


def test_other_devices_are_not_assumed_fast() -> None:
    """A device type this module has not measured (meta, mps, ...) gives False."""
    assert bf16_is_fast(torch.device("meta")) is False


class _NullContext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


class _OpDtypes(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """Records, per op, the dtypes of its floating-point inputs and outputs."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.seen: dict[str, set[tuple[tuple[torch.dtype, ...], tuple[torch.dtype, ...]]]]
        self.seen = defaultdict(set)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))

        def floats(tree: Any) -> tuple[torch.dtype, ...]:
            leaves = tree_flatten(tree)[0]
            return tuple(
                t.dtype for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point()
            )

        self.seen[str(func.overloadpacket)].add((floats((args, kwargs)), floats(out)))
        return out


def test_cpu_bf16_autocast_step_dtypes() -> None:
    """A training step (tiny Llama, packed documents, linear_cross_entropy) under CPU bf16
    autocast: every matmul and attention runs in bf16; RMSNorm, RoPE's angles, the softmax and
    the loss in float32; parameters and their gradients stay float32 (fp32 master weights)."""
    config = _common.tiny_config()
    model = _common.tiny_model(config)
    batch = _common.tiny_batch(config)
    with _OpDtypes() as log:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            hidden = model.hidden_states(batch.tokens, attention=Documents(batch.document_ids))
            loss = linear_cross_entropy(hidden, model.output_weight(), batch.targets)
        loss.backward()  # type: ignore[no-untyped-call]
    bf16, f32 = torch.bfloat16, torch.float32
    matmuls = [s for op in ("aten.mm", "aten.addmm", "aten.bmm") for s in log.seen.get(op, ())]
    assert matmuls and all(set(inputs) == {bf16} for inputs, _ in matmuls), matmuls
    attention = {op: s for op, s in log.seen.items() if "scaled_dot_product" in op}
    assert attention and all(
        inputs[:3] == (bf16,) * 3 for s in attention.values() for inputs, _ in s
    ), attention
    for op in ("llama_kernels.rms_norm", "llama_kernels.apply_rope", "aten.softmax"):
        assert log.seen.get(op), f"{op} did not run: {sorted(log.seen)}"
    for inputs, outputs in log.seen["llama_kernels.rms_norm"]:
        assert set(inputs) | set(outputs) == {f32}  # float32 residual stream and statistics
    for inputs, outputs in log.seen["llama_kernels.apply_rope"]:
        assert inputs == (bf16, bf16, f32) and outputs == (bf16, bf16)  # q, k; float32 inv_freq
    assert all(set(i) | set(o) == {f32} for i, o in log.seen["aten.softmax"])
    assert loss.dtype == f32
    for name, parameter in model.named_parameters():
        assert parameter.dtype == f32 and parameter.grad is not None, name
        assert parameter.grad.dtype == f32, name
