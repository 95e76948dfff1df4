"""Joining the process group: torchrun's when launched by it, else a private one-process group.

Every code path of the trainer runs under a process group, so one process and a cluster share it;
a single process needs no ports (a `HashStore`).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = ["init_distributed"]


def init_distributed(device_choice: str) -> tuple[torch.device, bool]:
    """Join torchrun's process group (or make a one-process group) and pick this rank's device
    ("auto": CUDA when available, the rank's ``LOCAL_RANK`` GPU). Returns the device and whether
    this call created the group (its creator should destroy it)."""
    use_cuda = device_choice == "cuda" or (device_choice == "auto" and torch.cuda.is_available())
    if device_choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device = 'cuda' but CUDA is not available; use device = 'cpu'")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))  # set by torchrun, read once at start
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if dist.is_initialized():
        return device, False
    backend = "cuda:nccl,cpu:gloo" if use_cuda else "gloo"
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # under torchrun
        dist.init_process_group(backend)
    else:  # one process: a private store, no ports
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)  # type: ignore[attr-defined]
    return device, True
