"""Tests for bf16 autocast in training: the dtype every op of a step runs in under CPU bf16
autocast. The probe that chooses bf16 (`bf16_is_fast`) lives in llama_kernels and is tested there;
llama_train re-exports that same function.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import _common  # tests/distributed/_common.py, on sys.path via conftest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import llama_kernels
import llama_train
from llama_model import Documents
from llama_train.loss import linear_cross_entropy


def test_bf16_is_fast_is_the_kernels_probe() -> None:
    """llama_train.bf16_is_fast is llama_kernels' function itself, not a copy."""
    assert llama_train.bf16_is_fast is llama_kernels.bf16_is_fast


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
