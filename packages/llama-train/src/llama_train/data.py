"""Training batches from token shards: packed windows with document ids and shifted targets.

Documents from `llama_data.TokenShards` are concatenated in a seeded order and cut into windows of
`seq_len + 1` tokens (`TokenShards.sample_sequences`). A window gives the inputs (its first
`seq_len` tokens), the targets (its last `seq_len`), and each input token's document id, with which
the model masks attention across documents (§3.2). A target that belongs to a different document
than its input token (the step from one document's last token into the next document's first) is
ignored in the loss. `BatchLoader` mixes sources, splits global batches across data-parallel
ranks and resumes exactly from a few integers of state.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from llama_data import TokenShards, WindowStream
from llama_train.schedules import BatchRamp

__all__ = ["IGNORE_INDEX", "Batch", "BatchLoader", "DataSource"]

IGNORE_INDEX = -100  # targets with this value take no part in the loss (torch cross_entropy's)


@dataclass(frozen=True)
class Batch:
    """One training batch: inputs, targets and document ids, each [batch_size, seq_len]."""

    tokens: torch.Tensor
    targets: torch.Tensor
    document_ids: torch.Tensor


@dataclass(frozen=True)
class DataSource:
    """A named set of token shards and its share of the mixture (weights need not sum to 1)."""

    name: str
    shards: TokenShards
    weight: float = 1.0


class BatchLoader:
    """Global batches from a weighted mixture of token shards, split across data-parallel ranks.

    Step s's global batch is the same whatever the parallel layout: its size and sequence length
    come from `ramp` given the tokens seen so far, the number of rows from each source is drawn
    from `seed` and s (a multinomial over the sources' weights), and each source's rows are its
    next windows in a seeded order (`TokenShards.sample_sequences`). Data-parallel rank r takes
    rows [r·n/dp, (r+1)·n/dp) of the n and reads only those: the other ranks' windows are skipped
    by their lengths. A source that runs out starts a new epoch in a new order.
    When the sequence length changes, each source restarts its stream at the new length.

    `state_dict()` is a few integers; `load_state_dict` continues with exactly the batch that
    would have come next, without reading the skipped tokens.
    """

    def __init__(
        self,
        sources: Sequence[DataSource],
        ramp: BatchRamp,
        *,
        seed: int,
        dp_rank: int = 0,
        dp_size: int = 1,
    ) -> None:
        if not sources:
            raise ValueError("need at least one data source")
        names = [s.name for s in sources]
        if len(set(names)) != len(names):
            raise ValueError(f"data source names must be unique, got {names}")
        for s in sources:
            if not s.weight > 0:
                raise ValueError(
                    f"data source {s.name!r} has weight {s.weight}; weights must be > 0"
                )
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is outside [0, dp_size={dp_size})")
        for index, stage in enumerate(ramp.stages):
            if stage.sequences_per_batch % dp_size:
                raise ValueError(
                    f"batch ramp stage {index} has {stage.sequences_per_batch} sequences per "
                    f"batch, not divisible by the {dp_size} data-parallel ranks"
                )
        self.sources = list(sources)
        self.ramp = ramp
        self.seed = seed
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.step = 0
        self.tokens_seen = 0
        self._seq_len = 0  # sequence length of the open streams (0: none open)
        self._consumed = {s.name: 0 for s in sources}  # windows taken in the current epoch
        self._epoch = {s.name: 0 for s in sources}
        self._streams: dict[str, WindowStream] = {}

    def state_dict(self) -> dict[str, Any]:
        """What `load_state_dict` needs to continue exactly here (plain ints and strings)."""
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "seq_len": self._seq_len,
            "consumed": dict(self._consumed),
            "epoch": dict(self._epoch),
            "sources": [s.name for s in self.sources],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from `state` (from `state_dict()` of a loader over the same sources)."""
        if list(state["sources"]) != [s.name for s in self.sources]:
            raise ValueError(
                f"checkpointed data sources {list(state['sources'])} differ from the configured "
                f"{[s.name for s in self.sources]}; resume with the same data configuration"
            )
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
        self._seq_len = int(state["seq_len"])
        self._consumed = {k: int(v) for k, v in state["consumed"].items()}
        self._epoch = {k: int(v) for k, v in state["epoch"].items()}
        self._streams = {}

    def _stream_seed(self, index: int, seq_len: int, epoch: int) -> int:
        return int(np.random.SeedSequence([self.seed, index, seq_len, epoch]).generate_state(1)[0])

    def _take(self, index: int, count: int, *, read: bool) -> list[tuple[np.ndarray, np.ndarray]]:
        """The next `count` windows of source `index` (an empty list with ``read=False``: they
        are passed over without reading their tokens), starting new epochs as sources run out."""
        source = self.sources[index]
        name = source.name
        windows: list[tuple[np.ndarray, np.ndarray]] = []
        while count:
            if name not in self._streams:
                self._streams[name] = source.shards.sample_sequences(
                    self._seq_len + 1,
                    seed=self._stream_seed(index, self._seq_len, self._epoch[name]),
                    start=self._consumed[name],
                )
            stream = self._streams[name]
            if read:
                window = next(stream, None)
                got = 0 if window is None else 1
                if window is not None:
                    windows.append(window)
            else:
                got = stream.skip(count)
            self._consumed[name] += got
            count -= got
            if count and got == 0:  # this epoch's windows are used up
                if self._consumed[name] == 0:
                    raise ValueError(
                        f"data source {name!r} has fewer than {self._seq_len + 1} tokens: "
                        "no window of that length"
                    )
                self._epoch[name] += 1
                self._consumed[name] = 0
                del self._streams[name]
        return windows

    def next_batch(self) -> Batch:
        """This rank's rows of the next global batch ([global rows / dp, seq_len] each)."""
        batch_tokens, seq_len = self.ramp.at(self.tokens_seen)
        rows = batch_tokens // seq_len
        if seq_len != self._seq_len:  # a new sequence length: new streams from their start
            self._seq_len, self._streams = seq_len, {}
            self._consumed = dict.fromkeys(self._consumed, 0)
        weights = np.array([s.weight for s in self.sources], dtype=np.float64)
        rng = np.random.default_rng([self.seed, self.step])
        counts = rng.multinomial(rows, weights / weights.sum())
        # The global batch is each source's windows in turn; this rank's rows are [lo, hi) of it.
        # Every rank advances every stream by the whole batch (so all keep the same state) but
        # reads only the windows of its own rows.
        lo, hi = self.dp_rank * rows // self.dp_size, (self.dp_rank + 1) * rows // self.dp_size
        local: list[tuple[np.ndarray, np.ndarray]] = []
        offset = 0
        for index, count in enumerate(counts.tolist()):
            first, last = min(max(lo - offset, 0), count), min(max(hi - offset, 0), count)
            self._take(index, first, read=False)
            local += self._take(index, last - first, read=True)
            self._take(index, count - last, read=False)
            offset += count
        tokens = np.stack([w[0] for w in local]).astype(np.int64)  # [b, T + 1]
        ids = np.stack([w[1] for w in local])
        targets = tokens[:, 1:].copy()
        targets[ids[:, 1:] != ids[:, :-1]] = IGNORE_INDEX
        self.step += 1
        self.tokens_seen += rows * seq_len
        return Batch(
            tokens=torch.from_numpy(np.ascontiguousarray(tokens[:, :-1])),
            targets=torch.from_numpy(targets),
            document_ids=torch.from_numpy(np.ascontiguousarray(ids[:, :-1])),
        )
