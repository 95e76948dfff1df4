"""Tensor parallelism (with sequence parallelism): validation, and parity with one process (gloo)."""

from __future__ import annotations

from collections.abc import Callable
from subprocess import CompletedProcess
from types import SimpleNamespace
from typing import cast

import pytest
from torch.distributed.device_mesh import DeviceMesh

from llama_model import Llama, LlamaConfig
from llama_train.parallel.tensor_parallel import (
    apply_tensor_parallel,
    check_tensor_parallel_config,
)

RunDistributed = Callable[..., CompletedProcess[str]]  # the conftest fixture's type


def _config(**overrides: object) -> LlamaConfig:
    fields: dict[str, object] = {
        "dim": 64, "n_layers": 1, "n_heads": 8, "n_kv_heads": 4, "vocab_size": 64,
        "multiple_of": 32, "max_seq_len": 32,
    }  # fmt: skip
    fields.update(overrides)
    return LlamaConfig.model_validate(fields)


def _fake_mesh(size: int, ndim: int = 1) -> DeviceMesh:
    """Just enough of a DeviceMesh for the checks that run before any communication."""
    names = ("tp",) if ndim == 1 else ("dp", "tp")
    return cast(DeviceMesh, SimpleNamespace(ndim=ndim, mesh_dim_names=names, size=lambda: size))


def test_heads_must_divide_by_tp() -> None:
    """Query and key/value head counts that tp does not divide are refused, naming the value."""
    with pytest.raises(ValueError, match=r"n_heads=8 is not divisible by tp=3"):
        check_tensor_parallel_config(_config(), 3)
    with pytest.raises(ValueError, match=r"n_kv_heads=4 is not divisible by tp=8"):
        check_tensor_parallel_config(_config(), 8)


def test_ffn_dim_must_divide_by_tp() -> None:
    """A SwiGLU width that tp does not divide is refused."""
    with pytest.raises(ValueError, match=r"ffn_dim=100 is not divisible by tp=8"):
        check_tensor_parallel_config(_config(n_kv_heads=8, ffn_dim=100), 8)


def test_tied_embeddings_are_refused_with_the_fix() -> None:
    """Tied embeddings under tp > 1 raise, saying to untie them or use tp=1; tp=1 accepts them."""
    tied = _config(tie_word_embeddings=True)
    with pytest.raises(ValueError, match=r"tie_word_embeddings=False\) or use tp=1"):
        check_tensor_parallel_config(tied, 2)
    check_tensor_parallel_config(tied, 1)


def test_a_good_config_passes() -> None:
    """Heads, key/value heads and ffn width divisible by tp: no error."""
    for tp in (1, 2, 4):
        check_tensor_parallel_config(_config(), tp)


def test_apply_validates_before_communicating() -> None:
    """apply_tensor_parallel raises the config errors (and a 2-D mesh) before touching the model."""
    with pytest.raises(ValueError, match=r"n_heads=8 is not divisible by tp=3"):
        apply_tensor_parallel(Llama(_config()), _fake_mesh(3))
    with pytest.raises(ValueError, match=r"or use tp=1"):
        apply_tensor_parallel(Llama(_config(tie_word_embeddings=True)), _fake_mesh(2))
    with pytest.raises(ValueError, match=r"tp_mesh must be 1-D .* pass mesh\['tp'\]"):
        apply_tensor_parallel(Llama(_config()), _fake_mesh(4, ndim=2))


def test_one_rank_is_a_no_op() -> None:
    """A 1-rank tp mesh leaves the model's parameters as they were (even with tied embeddings)."""
    model = Llama(_config(tie_word_embeddings=True))
    before = dict(model.named_parameters())
    apply_tensor_parallel(model, _fake_mesh(1))
    assert dict(model.named_parameters()) == before


@pytest.mark.distributed
@pytest.mark.parametrize("nprocs", [2, 4])
def test_tensor_parallel_matches_one_process(run_distributed: RunDistributed, nprocs: int) -> None:
    """TP with and without SP: same loss, gathered gradients and post-AdamW parameters as 1 process."""
    out = run_distributed("check_tensor_parallel.py", nprocs).stdout
    assert f"OK tensor parallel (tp={nprocs})" in out
