"""Tests for llama_kernels.precision: whether bf16 compute pays on a device.

The oracle for the real CPU is the kernel's own list of CPU flags (/proc/cpuinfo), read here
independently of PyTorch's cpuinfo; the other branches are driven by replacing the probes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llama_kernels import bf16_is_fast, cpu_bf16_instructions

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
