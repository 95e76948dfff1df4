"""The pretraining loss: next-token cross-entropy, summed, for a global mean over every layout.

Every layout (one process, data/context/pipeline parallel) divides one summed cross-entropy by the
number of non-ignored targets of the *global* batch and sums the shares (gradients are summed, not
averaged, across ranks), so every layout computes the same mean loss and the same update.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llama_train.data import IGNORE_INDEX

__all__ = ["summed_cross_entropy"]


def summed_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of logits [B, T, vocab] against targets [B, T] in float32, summed
    over the targets that are not `IGNORE_INDEX`."""
    return F.cross_entropy(
        logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
