"""Training checkpoints: sharded with `torch.distributed.checkpoint` (DCP), crash-safe, resumable.

A checkpoint is a directory ``<root>/step-NNNNNNNN`` holding

- the DCP shards of ``model`` (plain `Llama` parameter names, whatever the parallel layout, so a
  run can resume on a different mesh and `average_checkpoints` can read it) and ``optim``
  (AdamW state, flattened to the same names);
- ``train_state.json``: step, data-loader position, loss-spike statistics (rank 0 writes it);
- ``rng-rank<r>.pt``: each rank's torch RNG states (tensors only, read with weights_only=True).

A save first writes ``.tmp-step-NNNNNNNN`` and publishes it (`llama_model.publish_directory`:
every file fsynced, then renamed into place) only after every rank's shards are on disk, so a save
killed half-way never replaces or damages the last good checkpoint; leftovers are removed on the
next start. Re-saving an existing step first moves the old one to ``.tmp-old-step-NNNNNNNN``, a
name the next start recognises and puts back if the process died before the new one was in place
(`publish_directory`'s own move-aside uses a random name that only it knows). The single files
(``train_state.json``, ``rng-rank<r>.pt``) are written with `llama_model.atomic_write`.
`keep_last` prunes older checkpoints (directories under ``<root>/keep`` are never pruned: annealing snapshots for Polyak
averaging go there). With `async_save` the DCP write runs in a background thread on a separate
gloo process group while training continues; the rename happens when it has finished.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import async_save as dcp_async_save
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save
from torch.distributed.checkpoint.stateful import Stateful

from llama_model import atomic_write, publish_directory

__all__ = ["ModelState", "OptimizerState", "TrainCheckpointer", "step_dir_name"]

log = logging.getLogger(__name__)
_STEP_DIR = re.compile(r"^step-(\d{8})$")
TRAIN_STATE = "train_state.json"


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


class ModelState(Stateful):
    """The parameters of one or more model parts (pipeline stages) under plain `Llama` names."""

    def __init__(self, parts: list[nn.Module]) -> None:
        self.parts = parts

    def state_dict(self) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for part in self.parts:
            merged.update(get_model_state_dict(part))
        return merged

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for part in self.parts:
            set_model_state_dict(part, state_dict, options=StateDictOptions(strict=False))


class OptimizerState(Stateful):
    """AdamW states of the model parts, flattened to parameter names (layout-independent)."""

    def __init__(self, parts: list[nn.Module], optimizers: list[torch.optim.Optimizer]) -> None:
        self.parts, self.optimizers = parts, optimizers
        self._options = StateDictOptions(flatten_optimizer_state_dict=True)

    def state_dict(self) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for part, optimizer in zip(self.parts, self.optimizers, strict=True):
            merged.update(get_optimizer_state_dict(part, optimizer, options=self._options))
        return merged

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for part, optimizer in zip(self.parts, self.optimizers, strict=True):
            set_optimizer_state_dict(part, optimizer, state_dict, options=self._options)


class TrainCheckpointer:
    """Saves and finds training checkpoints under `root` (a directory shared by all ranks)."""

    def __init__(self, root: Path, *, keep_last: int = 2, async_save: bool = False) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.root = Path(root)
        self.keep_last = keep_last
        self.async_save = async_save
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        # Checkpoint collectives get their own gloo group so that an async save's background
        # thread never interleaves with the training step's collectives.
        self._group = dist.new_group(backend="gloo") if dist.is_initialized() else None
        self._pending: tuple[Future[Any], Path, Path] | None = None
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for parent in (self.root, self.root / "keep"):
                _recover(parent)
        self._barrier()

    # ---------------------------------------------------------------------------------------
    def latest(self) -> Path | None:
        """The newest complete checkpoint directory, or None."""
        steps = self.steps()
        return self.root / step_dir_name(steps[-1]) if steps else None

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints under root, ascending."""
        if not self.root.is_dir():
            return []
        found = []
        for path in self.root.iterdir():
            match = _STEP_DIR.match(path.name)
            if match and (path / TRAIN_STATE).is_file():
                found.append(int(match.group(1)))
        return sorted(found)

    def save(
        self,
        step: int,
        state: dict[str, Stateful],
        train_state: Mapping[str, Any],
        *,
        keep: bool = False,
    ) -> Path:
        """Save `state` (DCP; collective: every rank calls this) as checkpoint `step`.

        `train_state` is JSON data from rank 0. `keep=True` stores it under ``root/keep``, exempt
        from pruning. Returns the final directory (being written in the background if async).
        """
        self.wait()
        parent = self.root / "keep" if keep else self.root
        final = parent / step_dir_name(step)
        tmp = parent / f".tmp-{step_dir_name(step)}"
        if self.rank == 0:
            parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            _write_json(tmp / TRAIN_STATE, dict(train_state))
        self._barrier()
        _save_rng(tmp / f"rng-rank{self.rank}.pt")
        if self.async_save:
            future = dcp_async_save(state, checkpoint_id=tmp, process_group=self._group)
            self._pending = (
                future if isinstance(future, Future) else future.upload_completion,
                tmp,
                final,
            )
        else:
            dcp_save(state, checkpoint_id=tmp, process_group=self._group)
            self._publish(tmp, final)
        return final

    def wait(self) -> None:
        """Finish a pending async save (collective)."""
        if self._pending is None:
            return
        future, tmp, final = self._pending
        self._pending = None
        future.result()
        self._publish(tmp, final)

    def load(self, path: Path, state: dict[str, Stateful]) -> dict[str, Any]:
        """Load checkpoint `path` into `state` (collective); returns its train_state."""
        if not (path / TRAIN_STATE).is_file():
            raise FileNotFoundError(
                f"{path} is not a complete training checkpoint (no {TRAIN_STATE})"
            )
        dcp_load(state, checkpoint_id=path, process_group=self._group)
        rng = path / f"rng-rank{self.rank}.pt"
        if rng.is_file():
            _load_rng(rng)
        else:
            log.warning("%s has no RNG state for rank %d (different world size?)", path, self.rank)
        train_state: dict[str, Any] = json.loads((path / TRAIN_STATE).read_text())
        return train_state

    # ---------------------------------------------------------------------------------------
    def _publish(self, tmp: Path, final: Path) -> None:
        self._barrier()  # every rank's shards are written (and fsynced by DCP)
        if self.rank == 0:
            trash = final.with_name(f".tmp-old-{final.name}")
            if final.exists():  # re-saving a step (after a rollback): drop the old one last
                # Aside under the name _recover() puts back at the next start if we die before
                # the new one is in place (publish_directory's own aside name is random).
                os.replace(final, trash)
            publish_directory(tmp, final)  # fsyncs the files, then renames; fsyncs the parent
            shutil.rmtree(trash, ignore_errors=True)
            if final.parent == self.root:
                for old in self.steps()[: -self.keep_last]:
                    # Renamed first: a prune killed half-way leaves a .tmp-* (removed at the
                    # next start), never a damaged step-N that looks complete.
                    doomed = self.root / f".tmp-prune-{step_dir_name(old)}"
                    os.replace(self.root / step_dir_name(old), doomed)
                    shutil.rmtree(doomed, ignore_errors=True)
        self._barrier()

    def _barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier(group=self._group)


def _recover(parent: Path) -> None:
    """Undo what a killed save left in `parent`: a re-save killed between its two renames leaves
    the old checkpoint as ``.tmp-old-step-N`` with no ``step-N``; it is renamed back. Every other
    ``.tmp-*`` directory is an incomplete save and is removed."""
    if not parent.is_dir():
        return
    for old in parent.glob(".tmp-old-step-*"):
        final = parent / old.name.removeprefix(".tmp-old-")
        if not final.exists() and (old / TRAIN_STATE).is_file():
            log.warning("restoring checkpoint %s from an interrupted re-save", final)
            os.replace(old, final)
    for stale in parent.glob(".tmp-*"):
        log.warning("removing incomplete checkpoint %s", stale)
        shutil.rmtree(stale, ignore_errors=True)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")


def _save_rng(path: Path) -> None:
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    with atomic_write(path) as tmp:
        torch.save(states, tmp)


def _load_rng(path: Path) -> None:
    states = torch.load(path, weights_only=True)
    torch.set_rng_state(states["cpu"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
