"""Tests for llama_train.averaging: Polyak averaging of annealing checkpoints (§3.4.3).

The oracle is a float64 mean computed here with `torch.stack(...).double().mean(0)`; checkpoints
are written with `torch.distributed.checkpoint` the way the trainer writes them
(`{"model": ..., "optim": ..., "train": ...}`), in one process and, for the sharded case, by two
FSDP2 ranks under torchrun.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

import llama_train.averaging as averaging
from llama_model import Llama, LlamaConfig
from llama_train.averaging import (
    CheckpointAverage,
    average_checkpoints,
    average_state_dicts,
    read_model_metadata,
)

TINY = {
    "dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 64,
    "multiple_of": 16, "max_seq_len": 32, "tie_word_embeddings": False,
}  # fmt: skip


def _model(seed: int, **overrides: Any) -> Llama:
    model = Llama(LlamaConfig.model_validate({**TINY, **overrides}))
    model.init_weights(seed=seed, std=0.1)
    return model


def _state(seed: int, dtype: torch.dtype = torch.float32, **overrides: Any) -> dict[str, Tensor]:
    return {k: v.to(dtype) for k, v in _model(seed, **overrides).state_dict().items()}


def _save(directory: Path, model_state: Mapping[str, Tensor], step: int = 0) -> Path:
    """A training checkpoint as the trainer writes it: model, optimizer and train state."""
    optim = {
        "state": {k: {"exp_avg": torch.full_like(v, 0.5), "step": torch.tensor(float(step))}
                  for k, v in model_state.items()},
        "param_groups": [{"lr": 1e-4, "params": list(model_state)}],
    }  # fmt: skip
    with warnings.catch_warnings():  # single-process save is intended here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp_save(
            {"model": dict(model_state), "optim": optim, "train": {"step": step}},
            checkpoint_id=str(directory),
            no_dist=True,
        )
    return directory


def _float64_mean(states: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    return {k: torch.stack([s[k].double() for s in states]).mean(0) for k in states[0]}


def test_average_state_dicts_matches_float64_mean() -> None:
    """Three float32 models average to the float64 mean rounded once to float32."""
    states = [_state(seed) for seed in (1, 2, 3)]
    average = average_state_dicts(states)
    oracle = _float64_mean(states)
    assert average.keys() == oracle.keys()
    for key, value in average.items():
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, oracle[key].float(), rtol=0, atol=0)


def test_average_bf16_accumulates_in_float64() -> None:
    """bf16 inputs: exactly the float64 mean rounded to bf16, unlike a running bf16 sum."""
    states = [_state(seed, torch.bfloat16) for seed in range(8)]
    average = average_state_dicts(iter(states))  # a one-pass iterator is enough
    oracle = {k: v.to(torch.bfloat16) for k, v in _float64_mean(states).items()}
    naive_differs = False
    for key, value in average.items():
        assert value.dtype == torch.bfloat16
        assert torch.equal(value, oracle[key]), key
        naive = states[0][key].clone()
        for state in states[1:]:
            naive += state[key]  # bf16 running sum: rounds at every step
        naive_differs |= not torch.equal(naive / len(states), oracle[key])
    assert naive_differs, "the oracle must be able to tell float64 from bf16 accumulation"


def test_average_of_one_is_identity_and_a_copy() -> None:
    """Averaging a single state dict returns equal tensors that do not alias the input."""
    state = _state(1)
    average = average_state_dicts([state])
    for key, value in state.items():
        assert torch.equal(average[key], value)
        assert average[key].data_ptr() != value.data_ptr()


def test_average_keeps_equal_integer_buffers_and_rejects_different_ones() -> None:
    """Integer tensors cannot be averaged: kept when equal, an error naming them otherwise."""
    first = {"w": torch.ones(2), "count": torch.tensor([3, 4])}
    second = {"w": torch.zeros(2), "count": torch.tensor([3, 4])}
    average = average_state_dicts([first, second])
    assert torch.equal(average["count"], torch.tensor([3, 4]))
    assert torch.equal(average["w"], torch.full((2,), 0.5))
    with pytest.raises(ValueError, match=r"'count' in state dict 1 is an integer tensor"):
        average_state_dicts([first, {"w": torch.zeros(2), "count": torch.tensor([3, 5])}])


def test_average_state_dicts_errors_name_the_problem() -> None:
    """Empty input, different keys, shapes and dtypes each fail with the key named."""
    with pytest.raises(ValueError, match="nothing to average"):
        average_state_dicts([])
    a = {"w": torch.ones(2, 3), "b": torch.ones(3)}
    with pytest.raises(ValueError, match=r"state dict 1 has different keys.*missing \['b'\]"):
        average_state_dicts([a, {"w": torch.ones(2, 3)}])
    with pytest.raises(ValueError, match=r"'w' in state dict 1 has shape \(3, 2\).*\(2, 3\)"):
        average_state_dicts([a, {"w": torch.ones(3, 2), "b": torch.ones(3)}])
    with pytest.raises(ValueError, match=r"'b' in state dict 1 has dtype torch.bfloat16"):
        average_state_dicts([a, {"w": torch.ones(2, 3), "b": torch.ones(3).bfloat16()}])
    with pytest.raises(TypeError, match=r"'w' in state dict 0 is a list, not a tensor"):
        average_state_dicts([{"w": [1.0]}])  # type: ignore[dict-item]


def test_average_checkpoints_matches_float64_mean(tmp_path: Path) -> None:
    """Three DCP training checkpoints average to the float64 mean; the result loads into Llama."""
    states = [_state(seed) for seed in (1, 2, 3)]
    paths = [_save(tmp_path / f"step-{i}", s, step=i) for i, s in enumerate(states)]
    average = average_checkpoints(paths)
    oracle = _float64_mean(states)
    assert sorted(average) == sorted(_model(0).state_dict())  # plain Llama FQNs
    for key, value in average.items():
        assert value.dtype == torch.float32 and value.device.type == "cpu"
        torch.testing.assert_close(value, oracle[key].float(), rtol=0, atol=0)
    model = _model(0)
    model.load_state_dict(average, strict=True)


def test_average_checkpoints_bf16_exact(tmp_path: Path) -> None:
    """bf16 checkpoints come back in bf16, equal to the float64 mean rounded once."""
    states = [_state(seed, torch.bfloat16) for seed in range(4)]
    paths = [_save(tmp_path / str(i), s) for i, s in enumerate(states)]
    average = average_checkpoints(paths)
    for key, value in _float64_mean(states).items():
        assert torch.equal(average[key], value.to(torch.bfloat16)), key


def test_average_checkpoints_reads_only_model_into_reused_buffers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only "model" entries are requested from DCP, into the same buffers for every checkpoint."""
    paths = [_save(tmp_path / str(i), _state(i)) for i in range(3)]
    requests: list[dict[str, Any]] = []
    real_load = averaging.dcp_load  # type: ignore[attr-defined]

    def spy(state_dict: dict[str, Any], **kwargs: Any) -> None:
        requests.append(state_dict)
        real_load(state_dict, **kwargs)

    monkeypatch.setattr(averaging, "dcp_load", spy)
    average_checkpoints(paths)
    assert len(requests) == 3
    assert all(list(request) == ["model"] for request in requests)
    pointers = [{k: v.data_ptr() for k, v in r["model"].items()} for r in requests]
    assert pointers[0] == pointers[1] == pointers[2]


def test_checkpoint_average_in_groups_equals_the_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`CheckpointAverage` with small groups gives the same tensors, bit for bit, as averaging
    whole checkpoints, reading each group from every checkpoint once and holding only that group;
    each entry is produced once, and `order` must list the entries."""
    paths = [_save(tmp_path / str(i), _state(i)) for i in range(3)]
    whole = average_checkpoints(paths)
    order = list(_model(0).state_dict())
    requests: list[list[str]] = []
    real_load = averaging.dcp_load  # type: ignore[attr-defined]

    def spy(state_dict: dict[str, Any], **kwargs: Any) -> None:
        requests.append(list(state_dict["model"]))
        real_load(state_dict, **kwargs)

    monkeypatch.setattr(averaging, "dcp_load", spy)
    metadata_reads = 0
    real_read_metadata = FileSystemReader.read_metadata

    def counting(self: FileSystemReader, *args: Any, **kwargs: Any) -> Any:
        nonlocal metadata_reads
        metadata_reads += 1
        return real_read_metadata(self, *args, **kwargs)

    monkeypatch.setattr(FileSystemReader, "read_metadata", counting)
    largest = max(t.numel() * t.element_size() for t in whole.values())
    average = CheckpointAverage(paths, order=order, chunk_bytes=largest)
    for key in order:
        assert torch.equal(average.tensor(key), whole[key]), key
        held = sum(t.numel() * t.element_size() for t in average._ready.values())
        assert held <= largest  # no more than the rest of one group is kept
    groups = requests[::3]
    assert [k for group in groups for k in group] == order  # each key read in one group
    assert all(requests[3 * i : 3 * i + 3] == [g] * 3 for i, g in enumerate(groups))
    assert 1 < len(groups) < len(order)  # several keys per group, several groups
    assert metadata_reads == 2 * len(paths)  # checked once, then read once per checkpoint
    with pytest.raises(ValueError, match="already produced"):
        average.tensor(order[0])
    with pytest.raises(KeyError, match="not a model entry"):
        average.tensor("nope")
    with pytest.raises(ValueError, match="order must list"):
        CheckpointAverage(paths, order=order[1:])


def test_average_checkpoints_rejects_different_models(tmp_path: Path) -> None:
    """A checkpoint of another shape fails naming the key and the checkpoint."""
    small = _save(tmp_path / "small", _state(1))
    wide = _save(tmp_path / "wide", _state(2, vocab_size=128))
    with pytest.raises(ValueError, match=r"'output.weight' in .*wide is \(128, 32\)"):
        average_checkpoints([small, wide])
    deeper = _save(tmp_path / "deeper", _state(3, n_layers=3))
    with pytest.raises(ValueError, match=r"'layers.2.attention.wk.weight' is only in .*deeper"):
        average_checkpoints([small, deeper])


def test_average_checkpoints_input_errors(tmp_path: Path) -> None:
    """No paths, a directory that is not a DCP checkpoint, and a checkpoint without "model"."""
    with pytest.raises(ValueError, match="no checkpoint paths"):
        average_checkpoints([])
    with pytest.raises(FileNotFoundError, match=r"not a torch.distributed.checkpoint directory"):
        average_checkpoints([tmp_path])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp_save({"weights": {"w": torch.ones(2)}}, checkpoint_id=str(tmp_path / "x"), no_dist=True)
    with pytest.raises(ValueError, match=r"no 'model' entry \(top-level entries: \['weights'\]\)"):
        average_checkpoints([tmp_path / "x"])


def test_read_model_metadata_lists_model_tensors(tmp_path: Path) -> None:
    """The metadata lists exactly the model's FQNs with their shapes, not optimizer entries."""
    state = _state(1)
    metadata = read_model_metadata(_save(tmp_path / "c", state))
    assert {k: tuple(v.size) for k, v in metadata.items()} == {
        k: tuple(v.shape) for k, v in state.items()
    }


_FSDP_WORKER = textwrap.dedent(
    """
    import os
    import sys
    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    from torch.distributed.checkpoint.state_dict_saver import save
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from llama_model import Llama, LlamaConfig

    dist.init_process_group("gloo")
    config = LlamaConfig.model_validate({config!r})
    for seed in (1, 2, 3):
        model = Llama(config)
        model.init_weights(seed=seed, std=0.1)
        for layer in model.layers.values():
            fully_shard(layer)
        fully_shard(model)
        state = get_model_state_dict(model)
        assert all(isinstance(v, DTensor) for v in state.values())
        save({{"model": state, "train": {{"step": seed}}}}, checkpoint_id=sys.argv[1] + f"/{{seed}}")
    dist.barrier()  # no rank tears its gloo connections down while the other still uses them
    dist.destroy_process_group()
    # Leave without the interpreter's teardown, which after FSDP2 on gloo sometimes aborts under
    # CPU contention ("terminate called without an active exception"), as in distributed/_common.
    sys.stdout.flush()
    os._exit(0)
    """
)


@pytest.mark.distributed
def test_average_checkpoints_of_fsdp_sharded_runs(tmp_path: Path) -> None:
    """Checkpoints saved by 2 FSDP2 ranks (DTensor shards) are read whole and averaged exactly."""
    worker = tmp_path / "save_fsdp.py"
    worker.write_text(_FSDP_WORKER.format(config=TINY))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
        str(worker), str(tmp_path),
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    average = average_checkpoints([tmp_path / str(seed) for seed in (1, 2, 3)])
    oracle = _float64_mean([_state(seed) for seed in (1, 2, 3)])
    assert average.keys() == oracle.keys()
    for key, value in oracle.items():
        torch.testing.assert_close(average[key], value.float(), rtol=0, atol=0)
