"""What a post-training loss gives the training loop: `Objective`.

The loop (`llama_align.trainer`) owns the order of examples, their split over data-parallel ranks
and micro-batches, the optimizer, checkpoints and metrics; an objective owns how examples become
tensors and how a batch becomes a loss. To give the same gradients however a global batch is split
(1 process or 2, one micro-batch or 4), a loss is returned as *sums* per denominator, and the loop
divides each by that denominator counted over the whole global batch: for DPO,
``{"pairs": Σ -log σ(β Δ), "tokens": 0.2 · Σ NLL}`` over ``{"pairs": n, "tokens": t}`` gives the
mean over pairs plus 0.2 times the mean over chosen tokens, exactly as on one process.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, TypeVar

import torch
from torch import nn

__all__ = ["Batch", "LossSums", "Metrics", "Objective"]

Batch = dict[str, Any]
"""A collated micro-batch: tensors (on the CPU; the loop moves them) and anything else."""

LossSums = dict[str, torch.Tensor]
"""{denominator name: the summed loss term over this micro-batch (a 0-d tensor with grad)}."""

Metrics = dict[str, tuple[torch.Tensor, torch.Tensor]]
"""{metric name: (sum over this micro-batch, count)}; the loop logs Σ sums / Σ counts."""

Example = TypeVar("Example", contravariant=True)


class Objective(Protocol[Example]):
    """A post-training loss: SFT, the reward model's ranking loss, DPO."""

    def collate(self, examples: Sequence[Example]) -> Batch:
        """A micro-batch of examples as tensors (CPU)."""
        ...

    def denominators(self, batch: Batch) -> Mapping[str, float]:
        """What each loss sum of `loss_sums(batch)` is divided by, counted without a forward pass
        (loss tokens, pairs): the loop adds them over the global batch."""
        ...

    def loss_sums(self, model: nn.Module, batch: Batch) -> tuple[LossSums, Metrics]:
        """The loss terms of `batch` as sums (keys as in `denominators`) and detached metrics.

        Call `model(...)` itself (never a method of an unwrapped module): under data parallelism
        `model` is the DistributedDataParallel wrapper, whose forward synchronises gradients.
        """
        ...
