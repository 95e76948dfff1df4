"""Training batches from token shards: packed windows with document ids and shifted targets.

Documents from `llama_data.TokenShards` are concatenated in a seeded order and cut into windows of
`seq_len + 1` tokens (`TokenShards.sample_sequences`). A window gives the inputs (its first
`seq_len` tokens), the targets (its last `seq_len`), and each input token's document id, with which
the model masks attention across documents (§3.2). A target that belongs to a different document
than its input token (the step from one document's last token into the next document's first) is
ignored in the loss. `start_step` resumes the stream exactly where a run stopped.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from llama_data import TokenShards

__all__ = ["IGNORE_INDEX", "Batch", "packed_batches"]

IGNORE_INDEX = -100  # targets with this value take no part in the loss (torch cross_entropy's)


@dataclass(frozen=True)
class Batch:
    """One training batch: inputs, targets and document ids, each [batch_size, seq_len]."""

    tokens: torch.Tensor
    targets: torch.Tensor
    document_ids: torch.Tensor


def packed_batches(
    shards: TokenShards, *, batch_size: int, seq_len: int, seed: int, start_step: int = 0
) -> Iterator[Batch]:
    """Batches of packed windows, in a fixed order given by `seed`; `start_step` skips that many
    batches without reading them, so a resumed run sees exactly the batches it would have seen.
    Ends when the shards run out (one pass)."""
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size} and {seq_len}")
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    windows = shards.sample_sequences(seq_len + 1, seed=seed, start=start_step * batch_size)
    while True:
        rows = [next(windows, None) for _ in range(batch_size)]
        if rows[-1] is None:
            return
        tokens = np.stack([r[0] for r in rows if r is not None]).astype(np.int64)  # [B, T + 1]
        ids = np.stack([r[1] for r in rows if r is not None])  # [B, T + 1]
        targets = tokens[:, 1:].copy()
        targets[ids[:, 1:] != ids[:, :-1]] = IGNORE_INDEX  # no prediction across documents
        yield Batch(
            tokens=torch.from_numpy(np.ascontiguousarray(tokens[:, :-1])),
            targets=torch.from_numpy(targets),
            document_ids=torch.from_numpy(np.ascontiguousarray(ids[:, :-1])),
        )
