"""A preallocated key/value cache for autoregressive decoding.

Keys and values of every layer live in two tensors allocated once, [n_layers, B, n_kv_heads,
max_seq_len, head_dim], so decoding never reallocates or concatenates. All batch rows share one fill
level (`length`). Only the n_kv_heads key/value heads are stored: grouped-query attention shrinks the
cache by n_heads / n_kv_heads (4x for 8B, 16x for 405B; §3.2).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from llama_model.config import LlamaConfig

if TYPE_CHECKING:
    from llama_model.model import Llama

__all__ = ["KVCache"]


class KVCache:
    """Keys and values of the tokens seen so far, for every layer of one model.

    The model writes a layer's new keys and values with `update` and, after its last layer, calls
    `advance`; `reset` empties the cache for a new sequence without reallocating.
    """

    def __init__(
        self,
        config: LlamaConfig,
        batch_size: int = 1,
        max_seq_len: int | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        max_seq_len = config.max_seq_len if max_seq_len is None else max_seq_len
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if not 1 <= max_seq_len <= config.max_seq_len:
            raise ValueError(
                f"cache max_seq_len must be in [1, {config.max_seq_len}] (the model's max_seq_len), "
                f"got {max_seq_len}"
            )
        shape = (config.n_layers, batch_size, config.n_kv_heads, max_seq_len, config.head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0

    @classmethod
    def for_model(
        cls, model: Llama, batch_size: int = 1, max_seq_len: int | None = None
    ) -> KVCache:
        """A cache matching `model`'s config, parameter dtype and device."""
        weight = model.tok_embeddings.weight
        return cls(model.config, batch_size, max_seq_len, dtype=weight.dtype, device=weight.device)

    @property
    def batch_size(self) -> int:
        return self.keys.shape[1]

    @property
    def max_seq_len(self) -> int:
        return self.keys.shape[3]

    def check_room(self, batch_size: int, seq_len: int) -> None:
        """Raise a clear error if `seq_len` more tokens of `batch_size` rows do not fit."""
        if batch_size != self.batch_size:
            raise ValueError(
                f"tokens have batch size {batch_size} but the cache was built for {self.batch_size}"
            )
        if self.length + seq_len > self.max_seq_len:
            raise ValueError(
                f"KV cache is full: {self.length} cached + {seq_len} new tokens exceed its "
                f"max_seq_len {self.max_seq_len}; build a larger cache or call reset()"
            )

    def update(
        self, layer: int, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store a layer's new keys/values [B, n_kv_heads, T, head_dim] after the cached ones and
        return all of them, [B, n_kv_heads, length + T, head_dim] (views, no copy)."""
        end = self.length + keys.shape[2]
        self.keys[layer, :, :, self.length : end] = keys
        self.values[layer, :, :, self.length : end] = values
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def advance(self, seq_len: int) -> None:
        """Mark `seq_len` more positions as filled (called once per forward, after all layers)."""
        self.length += seq_len

    def reset(self) -> None:
        """Forget every cached token; the memory is kept for the next sequence."""
        self.length = 0
