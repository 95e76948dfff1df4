"""Key/value caches for autoregressive decoding: the protocol and a contiguous implementation.

`KVCacheProtocol` is what `llama_model.attention.CachedAttention` needs from a cache: write a
layer's new keys and values at their positions, and return every key and value each row can attend
to, laid out so that slot s holds position s. Shapes are fixed by the cache, never by how many
tokens it holds, so a decode step compiles once (gpt-fast's way).

`KVCache` keeps each row's keys and values in one preallocated buffer per layer: [n_layers, B,
n_kv_heads, max_seq_len, head_dim] for keys and for values, written in place, never reallocated or
concatenated. Only the n_kv_heads key/value heads are stored: grouped-query attention shrinks the
cache by n_heads / n_kv_heads (4x for 8B, 16x for 405B; §3.2).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch

from llama_model.config import LlamaConfig

if TYPE_CHECKING:
    from llama_model.attention import CachedAttention
    from llama_model.model import Llama

__all__ = ["KVCache", "KVCacheProtocol"]


@runtime_checkable
class KVCacheProtocol(Protocol):
    """The storage behind `CachedAttention`.

    A paged cache (llama-serve) implements it with a block table per row: `update` writes position
    p of row b into block ``block_table[b, p // block_size]`` at offset ``p % block_size`` and
    returns the row's blocks gathered in table order (a fixed number of blocks per row), so that
    slot s again holds position s. Rows that share a prompt share its blocks.
    """

    @property
    def max_seq_len(self) -> int:
        """S: the key/value slots `update` returns per row; positions must be below it."""
        ...

    def update(
        self, layer_id: int, positions: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store layer `layer_id`'s new keys and values [B, n_kv_heads, T, head_dim] at
        `positions` [B or 1, T]; return all of the layer's keys and values [B, n_kv_heads, S,
        head_dim], slot s holding position s (slots not yet written hold anything: the attention
        mask hides every slot beyond a query's position)."""
        ...


class KVCache:
    """A contiguous cache for `batch_size` rows of up to `max_seq_len` positions each.

    Positions are the caller's: `CachedAttention(cache, positions)` writes wherever they say (rows
    may be at different positions). For the common case of rows that advance together, `append(n)`
    returns the backend for the next n positions and counts them in `length`; `reset` starts over
    without reallocating.
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
        # Written in place by compiled decode steps: static addresses, so that CUDA graphs
        # (mode="reduce-overhead") capture them as they capture a module's buffers.
        torch._dynamo.mark_static_address(self.keys)
        torch._dynamo.mark_static_address(self.values)
        self.length = 0  # positions handed out by `append` (explicit positions do not count)

    @classmethod
    def for_model(
        cls,
        model: Llama,
        batch_size: int = 1,
        max_seq_len: int | None = None,
        *,
        dtype: torch.dtype | None = None,
    ) -> KVCache:
        """A cache matching `model`'s config and device, in `dtype` (default: the parameters'
        dtype; pass the compute dtype, e.g. bfloat16 under autocast, to avoid a conversion of the
        whole cache in every layer)."""
        weight = model.output_weight()
        dtype = weight.dtype if dtype is None else dtype
        return cls(model.config, batch_size, max_seq_len, dtype=dtype, device=weight.device)

    @property
    def batch_size(self) -> int:
        return self.keys.shape[1]

    @property
    def max_seq_len(self) -> int:
        return self.keys.shape[3]

    def update(
        self, layer_id: int, positions: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write keys/values [B, n_kv_heads, T, head_dim] at positions [B or 1, T]; return the
        layer's buffers [B, n_kv_heads, max_seq_len, head_dim] (views, no copy)."""
        batch, heads, seq_len, head_dim = keys.shape
        if batch != self.batch_size:
            raise ValueError(
                f"tokens have batch size {batch} but the cache was built for {self.batch_size}"
            )
        index = positions[:, None, :, None].expand(batch, heads, seq_len, head_dim)
        self.keys[layer_id].scatter_(2, index, keys.to(self.keys.dtype))
        self.values[layer_id].scatter_(2, index, values.to(self.values.dtype))
        return self.keys[layer_id], self.values[layer_id]

    def append(self, seq_len: int) -> CachedAttention:
        """The attention backend for the next `seq_len` positions of every row (positions
        ``length .. length + seq_len - 1``); counts them in `length`."""
        from llama_model.attention import CachedAttention

        if self.length + seq_len > self.max_seq_len:
            raise ValueError(
                f"KV cache is full: {self.length} cached + {seq_len} new tokens exceed its "
                f"max_seq_len {self.max_seq_len}; build a larger cache or call reset()"
            )
        positions = torch.arange(self.length, self.length + seq_len, device=self.keys.device)
        self.length += seq_len
        return CachedAttention(self, positions[None, :])

    def reset(self) -> None:
        """Forget every cached token; the memory is kept for the next sequence."""
        self.length = 0
