"""Polyak averaging of the annealing checkpoints (§3.4.3 of "The Llama 3 Herd of Models").

§3.4.3: "Finally, we compute the average of model checkpoints (Polyak (1991) averaging) during
annealing to produce the final pre-trained model." The average is the plain arithmetic mean of
each parameter over the checkpoints, accumulated in float64 (so averaging many bf16 checkpoints
loses nothing to rounding along the way) and returned in the checkpoints' own dtype.

`average_state_dicts` averages state dicts already in memory. `average_checkpoints` reads the
`"model"` entries of training checkpoints written with `torch.distributed.checkpoint` (DCP) by
`dcp.save({"model": ..., "optim": ..., "train": ...}, checkpoint_id=dir)`, in one process with no
process group (a checkpoint sharded over any number of ranks is read whole), one checkpoint at a
time into the same buffers: peak memory is one model in the checkpoint dtype plus the float64
accumulator, whatever the number of checkpoints. `CheckpointAverage` produces the same average a
group of tensors at a time, for models larger than memory. Optimizer and training state are never
read.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load

__all__ = [
    "MODEL_KEY",
    "CheckpointAverage",
    "average_state_dicts",
    "average_checkpoints",
    "read_model_metadata",
]

MODEL_KEY = "model"  # the top-level entry of a training checkpoint that holds the model weights


class _Accumulator:
    """Running float64 sums of state dicts that must all have the same keys, shapes and dtypes."""

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        self.count = 0

    def add(self, state_dict: Mapping[str, Tensor], source: str) -> None:
        if self.count == 0:
            for key, tensor in state_dict.items():
                _check_tensor(key, tensor, source)
                self.dtypes[key] = tensor.dtype
                if _averageable(tensor.dtype):
                    accumulate = torch.complex128 if tensor.is_complex() else torch.float64
                    self.sums[key] = tensor.detach().to(accumulate, copy=True)
                else:  # integer / bool buffers must agree; kept as they are
                    self.sums[key] = tensor.detach().clone()
            self.count = 1
            return
        missing = self.sums.keys() - state_dict.keys()
        extra = state_dict.keys() - self.sums.keys()
        if missing or extra:
            raise ValueError(
                f"{source} has different keys from the first state dict: "
                f"missing {sorted(missing)[:5]}, unexpected {sorted(extra)[:5]}; "
                "average checkpoints of the same model only"
            )
        for key, tensor in state_dict.items():
            _check_tensor(key, tensor, source)
            total = self.sums[key]
            if tensor.shape != total.shape:
                raise ValueError(
                    f"{key!r} in {source} has shape {tuple(tensor.shape)}, but "
                    f"{tuple(total.shape)} in the first state dict; average checkpoints of the "
                    "same model only"
                )
            if tensor.dtype != self.dtypes[key]:
                raise ValueError(
                    f"{key!r} in {source} has dtype {tensor.dtype}, but {self.dtypes[key]} in the "
                    "first state dict; convert them to one dtype before averaging"
                )
            if _averageable(tensor.dtype):
                total.add_(tensor.detach().to(total.device))
            elif not torch.equal(tensor.detach().to(total.device), total):
                raise ValueError(
                    f"{key!r} in {source} is an integer tensor ({tensor.dtype}) that differs from "
                    "the first state dict, and integers cannot be averaged"
                )
        self.count += 1

    def mean(self) -> dict[str, Tensor]:
        if self.count == 0:
            raise ValueError("nothing to average: got no state dicts / checkpoints")
        return {
            key: (total / self.count).to(self.dtypes[key])
            if _averageable(self.dtypes[key])
            else total
            for key, total in self.sums.items()
        }


def _averageable(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point or dtype.is_complex


def _check_tensor(key: str, tensor: object, source: str) -> None:
    if not isinstance(tensor, Tensor):
        raise TypeError(
            f"{key!r} in {source} is a {type(tensor).__name__}, not a tensor; "
            "pass model state dicts (name -> tensor)"
        )


def average_state_dicts(state_dicts: Iterable[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """The element-wise mean of state dicts, accumulated in float64, in the inputs' dtypes.

    Every state dict must have the same keys, shapes and dtypes (the error names the first key
    that differs). Integer and bool tensors are not averaged: they must be equal and are kept.
    The result is on the first state dict's devices. Consumes `state_dicts` once, so a generator
    that loads one checkpoint at a time keeps only one input in memory.
    """
    accumulator = _Accumulator()
    for index, state_dict in enumerate(state_dicts):
        accumulator.add(state_dict, source=f"state dict {index}")
    return accumulator.mean()


def read_model_metadata(checkpoint: Path) -> dict[str, TensorStorageMetadata]:
    """The `"model"` tensors of a DCP training checkpoint: {model FQN: storage metadata}.

    Raises `FileNotFoundError` if `checkpoint` is not a DCP checkpoint directory and `ValueError`
    if it has no `"model"` entry or a model entry that is not a tensor.
    """
    checkpoint = Path(checkpoint)
    if not (checkpoint / ".metadata").is_file():
        raise FileNotFoundError(
            f"{checkpoint} is not a torch.distributed.checkpoint directory (no .metadata file); "
            "pass checkpoint directories written by dcp.save"
        )
    metadata = FileSystemReader(str(checkpoint)).read_metadata()
    entries: dict[str, TensorStorageMetadata] = {}
    for flat_key, path in _model_paths(metadata).items():
        storage = metadata.state_dict_metadata[flat_key]
        if not isinstance(storage, TensorStorageMetadata):
            raise ValueError(
                f"model entry {path!r} in {checkpoint} is not a tensor "
                f"({type(storage).__name__}); cannot average it"
            )
        entries[path] = storage
    if not entries:
        top = sorted({key.split(".", 1)[0] for key in metadata.state_dict_metadata})
        raise ValueError(
            f"{checkpoint} has no {MODEL_KEY!r} entry (top-level entries: {top}); save the "
            f"checkpoint as dcp.save({{{MODEL_KEY!r}: model_state_dict, ...}})"
        )
    return entries


def _model_paths(metadata: Metadata) -> dict[str, str]:
    """{flattened DCP key: model FQN} for the entries saved under "model"."""
    planner_data = metadata.planner_data
    if isinstance(planner_data, dict) and planner_data:
        # DCP flattens nested dicts; planner_data maps each flat key to its original path,
        # e.g. "model.layers.0.attention.wq.weight" -> ("model", "layers.0.attention.wq.weight").
        return {
            flat: str(path[1])
            for flat, path in planner_data.items()
            if len(path) == 2 and path[0] == MODEL_KEY
        }
    prefix = MODEL_KEY + "."
    return {
        flat: flat.removeprefix(prefix)
        for flat in metadata.state_dict_metadata
        if flat.startswith(prefix)
    }


class _CachedMetadataReader(FileSystemReader):
    """A DCP reader that reads the checkpoint's metadata once, however many loads it serves."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self._metadata: Metadata | None = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if self._metadata is None:
            self._metadata = super().read_metadata(*args, **kwargs)
        return self._metadata


def _load_model_into(reader: FileSystemReader, buffers: dict[str, Tensor]) -> None:
    with warnings.catch_warnings():
        # Reading in one process is the point here; DCP warns that it "assumes" so.
        warnings.filterwarnings(
            "ignore",
            message="torch.distributed is disabled, unavailable or uninitialized",
            category=UserWarning,
        )
        dcp_load({MODEL_KEY: buffers}, storage_reader=reader, no_dist=True)


class CheckpointAverage:
    """The Polyak average of the `"model"` entries of DCP training checkpoints, produced a group
    of tensors at a time: `tensor(key)` reads the group starting at `key` (in `order`, up to
    `chunk_bytes` of the checkpoint dtype) from every checkpoint, one checkpoint after the other,
    and averages it in float64. Exporting a model of any size thus needs memory for one group and
    its float64 sums, not for the model (`Trainer.export` passes each tensor to the writer as it is
    produced).

    Fails on construction, naming the checkpoint and key, if the checkpoints do not hold the same
    model (only their metadata is read for that).
    """

    def __init__(
        self,
        paths: Sequence[Path],
        *,
        order: Sequence[str] | None = None,
        chunk_bytes: int = 2**30,
    ) -> None:
        if not paths:
            raise ValueError("nothing to average: got no checkpoint paths")
        if chunk_bytes <= 0:
            raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
        self.paths = [Path(p) for p in paths]
        first = read_model_metadata(self.paths[0])
        for path in self.paths[1:]:
            entries = read_model_metadata(path)
            for key in sorted(entries.keys() | first.keys()):
                if key not in entries or key not in first:
                    where = f"only in {path}" if key not in first else f"missing from {path}"
                    raise ValueError(
                        f"model entry {key!r} is {where} (compared with {self.paths[0]}); "
                        "average checkpoints of the same model only"
                    )
                shape, dtype = entries[key].size, entries[key].properties.dtype
                if shape != first[key].size or dtype != first[key].properties.dtype:
                    raise ValueError(
                        f"model entry {key!r} in {path} is {tuple(shape)} {dtype}, but "
                        f"{tuple(first[key].size)} {first[key].properties.dtype} in "
                        f"{self.paths[0]}; average checkpoints of the same model only"
                    )
        self._entries = first
        keys = list(order) if order is not None else list(first)
        if sorted(keys) != sorted(first):
            twice = sorted({k for k in keys if keys.count(k) > 1})[:5]
            raise ValueError(
                f"order must list the checkpoints' model entries once each: missing "
                f"{sorted(first.keys() - set(keys))[:5]}, unknown "
                f"{sorted(set(keys) - first.keys())[:5]}, repeated {twice}"
            )
        # One reader per checkpoint: its metadata (every rank's chunks, the optimizer's entries)
        # is read once, not once per group.
        self._readers = [_CachedMetadataReader(str(path)) for path in self.paths]
        self.keys = keys
        self._position = {key: i for i, key in enumerate(keys)}
        self._chunk_bytes = chunk_bytes
        self._ready: dict[str, Tensor] = {}
        self._done: set[str] = set()

    def shape(self, key: str) -> tuple[int, ...]:
        """The shape of entry `key` (from the metadata: nothing is loaded)."""
        return tuple(self._entries[key].size)

    def dtype(self, key: str) -> torch.dtype:
        """The checkpoints' dtype of entry `key`, which `tensor(key)` returns."""
        return self._entries[key].properties.dtype

    def _nbytes(self, key: str) -> int:
        return math.prod(self.shape(key)) * self.dtype(key).itemsize

    def tensor(self, key: str) -> Tensor:
        """The average of `key` over the checkpoints, in their dtype (each key once)."""
        if key not in self._position:
            raise KeyError(f"{key!r} is not a model entry of the checkpoints")
        if key in self._done:
            raise ValueError(f"{key!r} was already produced (each entry is averaged once)")
        if key not in self._ready:
            group: list[str] = []
            size = 0
            for candidate in self.keys[self._position[key] :]:
                if candidate in self._done or candidate in self._ready:
                    continue
                if group and size + self._nbytes(candidate) > self._chunk_bytes:
                    break
                group.append(candidate)
                size += self._nbytes(candidate)
            buffers = {k: torch.empty(self.shape(k), dtype=self.dtype(k)) for k in group}
            accumulator = _Accumulator()
            for path, reader in zip(self.paths, self._readers, strict=True):
                _load_model_into(reader, buffers)
                accumulator.add(buffers, source=str(path))
            self._ready.update(accumulator.mean())
        self._done.add(key)
        return self._ready.pop(key)


def average_checkpoints(paths: Sequence[Path]) -> dict[str, Tensor]:
    """Polyak average of the `"model"` entries of DCP training checkpoints (CPU tensors).

    Reads one checkpoint at a time (see `CheckpointAverage`, which bounds the memory by a group of
    tensors for models that do not fit). Keys are the model's plain FQNs (as saved), values have
    the checkpoint's dtype. Fails, naming the checkpoint and key, if the checkpoints do not hold
    the same model.
    """
    average = CheckpointAverage(paths, chunk_bytes=2**62)
    return {key: average.tensor(key) for key in average.keys}
