"""Gradient clipping by the global L2 norm over every shard, replica and pipeline stage.

Under FSDP2 and tensor parallelism gradients are `DTensor`s: a sharded dimension holds different
pieces (their squares add up across the ranks of that mesh dimension), a replicated one holds
copies (counted once), and a partial one (a norm gain's gradient under sequence parallelism) holds
summands that are reduced first. Pipeline stages hold different parameters: their squares add up
across the pipeline group. Llama 2's recipe clips at 1.0 (Touvron et al. 2023, §2.2).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Replicate

__all__ = ["clip_grad_norm"]


def clip_grad_norm(
    modules: Iterable[nn.Module], max_norm: float, *, pp_group: dist.ProcessGroup | None = None
) -> float:
    """Scale the gradients of `modules` (this rank's model parts) so that their global L2 norm is
    at most `max_norm`; returns the norm before clipping. `pp_group`: the pipeline group when the
    parts are pipeline stages (their squares are summed across it)."""
    params = [q for module in modules for q in module.parameters() if q.grad is not None]
    # Grouped by (mesh, placements) so each group costs one collective per sharded dimension.
    groups: dict[Any, list[torch.Tensor]] = {}
    for q in params:
        assert q.grad is not None
        key = (q.grad.device_mesh, q.grad.placements) if isinstance(q.grad, DTensor) else None
        groups.setdefault(key, []).append(q)
    device = params[0].device if params else torch.device("cpu")
    squared = torch.zeros((), dtype=torch.float32, device=device)
    for key, group in groups.items():
        local = [_local_for_norm(q.grad) for q in group if q.grad is not None]
        part = torch.stack(torch._foreach_norm(local)).float().pow(2).sum()  # one fused kernel
        if key is not None:  # add the squares of the other shards (not of replicas)
            grad_mesh, placements = key
            for dim, placement in enumerate(placements):
                # Sharded (plain or strided) dims hold different pieces: add them up.
                # Replicated ones hold copies, and partial ones were reduced above.
                if not (placement.is_replicate() or placement.is_partial()):
                    dist.all_reduce(part, group=grad_mesh.get_group(dim))
        squared = squared + part
    if pp_group is not None:  # each stage holds different parameters: add their squares
        dist.all_reduce(squared, group=pp_group)
    norm = squared.sqrt()
    for group in groups.values():
        torch.nn.utils.clip_grads_with_norm_(group, max_norm, norm)
    return float(norm)


def _local_for_norm(grad: torch.Tensor) -> torch.Tensor:
    """This rank's piece of `grad` for a sum of squares: partial sums (a norm gain's gradient
    under tensor parallelism) are reduced first, shards and replicas are taken as they are."""
    if not isinstance(grad, DTensor):
        return grad
    if any(p.is_partial() for p in grad.placements):
        grad = grad.redistribute(
            placements=[Replicate() if p.is_partial() else p for p in grad.placements]
        )
    return grad.to_local()
