"""One engine step as one forward: every scheduled chunk (single-token decodes and prefill chunks
of several sequences) packed into one row of tokens, so each weight matrix is read once per step
however many sequences advance (vLLM's way; the linear layers see [1, N] tokens).

`PackedPagedAttention` is the attention backend of that forward (`llama_model`'s seam): each layer
writes its N keys and values into their sequences' cache slots at once, then attends per part:
the decodes in groups of similar length (one query each over its own blocks, masked to its
position; two batched matmuls per group), and each
prefill chunk over its own blocks (causal; a chunk that starts at position 0 attends over the keys
it just computed, with no gather and no mask).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llama_serve.paged_cache import NULL_BLOCK, PagedKVCache

__all__ = ["PackedChunk", "PackedPagedAttention"]


@dataclass(frozen=True)
class PackedChunk:
    """`num_tokens` tokens of one sequence from position `start`; `blocks` is the sequence's
    block table (at least up to its last position)."""

    blocks: Sequence[int]
    start: int
    num_tokens: int


@dataclass(frozen=True)
class _Prefill:
    offset: int  # where its tokens sit in the packed row
    num_tokens: int
    table: torch.Tensor | None  # [1, W]; None when it starts at 0 (attends over its own keys)
    mask: torch.Tensor | None  # [1, 1, T, W * block_size]


@dataclass(frozen=True)
class _DecodeGroup:
    first: int  # its rows are first..end-1 of the packed row
    end: int
    table: torch.Tensor  # [rows, W]
    mask: torch.Tensor  # [rows, W * block_size]: the slots at or before each row's position


class PackedPagedAttention:
    """The attention backend of a packed step: `chunks` in packed order, single-token chunks
    (decodes) first."""

    def __init__(
        self, cache: PagedKVCache, chunks: Sequence[PackedChunk], device: torch.device
    ) -> None:
        size = cache.block_size
        self.cache = cache
        num_decodes = 0
        while num_decodes < len(chunks) and chunks[num_decodes].num_tokens == 1:
            num_decodes += 1
        if any(chunk.num_tokens == 1 for chunk in chunks[num_decodes:]):
            raise ValueError("single-token chunks must come first in a packed step")
        positions: list[int] = []
        slots: list[int] = []
        for chunk in chunks:
            span = range(chunk.start, chunk.start + chunk.num_tokens)
            positions.extend(span)
            slots.extend(chunk.blocks[p // size] * size + p % size for p in span)
        self.positions_ = torch.tensor([positions], device=device)
        self.slots = torch.tensor(slots, device=device)
        # Decodes attend in groups of similar context width (each group gathers its rows' blocks
        # up to its longest row): consecutive rows join a group while their width stays within
        # [1/2, 1] of its first row's, so a step whose rows are ordered longest first pads little.
        self.decode_groups: list[_DecodeGroup] = []
        first = 0
        while first < num_decodes:
            width = chunks[first].start // size + 1
            end = first + 1
            while end < num_decodes and width / 2 <= chunks[end].start // size + 1 <= width:
                end += 1
            table = torch.full((end - first, width), NULL_BLOCK, dtype=torch.long)
            for row, chunk in enumerate(chunks[first:end]):
                blocks = list(chunk.blocks[:width])
                table[row, : len(blocks)] = torch.tensor(blocks)
            group_positions = self.positions_[0, first:end]
            visible = torch.arange(width * size, device=device) <= group_positions[:, None]
            self.decode_groups.append(_DecodeGroup(first, end, table.to(device), visible))
            first = end
        self.prefills: list[_Prefill] = []
        offset = num_decodes
        for chunk in chunks[num_decodes:]:
            if chunk.start == 0:
                self.prefills.append(_Prefill(offset, chunk.num_tokens, None, None))
            else:
                end = chunk.start + chunk.num_tokens
                width = -(-end // size)
                table = torch.tensor([list(chunk.blocks[:width])], device=device)
                chunk_positions = self.positions_[0, offset : offset + chunk.num_tokens]
                visible = torch.arange(width * size, device=device) <= chunk_positions[:, None]
                self.prefills.append(_Prefill(offset, chunk.num_tokens, table, visible[None, None]))
            offset += chunk.num_tokens

    def positions(self, batch: int, seq_len: int, device: torch.device) -> torch.Tensor:
        if (batch, seq_len) != (1, self.positions_.shape[1]):
            raise ValueError(
                f"a packed step runs one row of {self.positions_.shape[1]} tokens, got "
                f"[{batch}, {seq_len}]"
            )
        return self.positions_

    def __call__(
        self, layer_id: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """q [1, heads, N, D], k and v [1, kv_heads, N, D] -> [1, heads, N, D]."""
        self.cache.write(layer_id, self.slots, k[0], v[0])
        parts: list[torch.Tensor] = []
        for group in self.decode_groups:
            keys, values = self.cache.gather(layer_id, group.table)  # [kv_heads, rows, S, D]
            queries = q[0, :, group.first : group.end]
            parts.append(_decode_attention(queries, keys, values, group.mask)[None])
        for part in self.prefills:
            span = slice(part.offset, part.offset + part.num_tokens)
            if part.table is None:
                parts.append(_attend(q[:, :, span], k[:, :, span], v[:, :, span], None))
            else:
                keys, values = self.cache.gather(layer_id, part.table)  # [kv_heads, 1, S, D]
                keys, values = keys.transpose(0, 1).to(q.dtype), values.transpose(0, 1).to(q.dtype)
                parts.append(_attend(q[:, :, span], keys, values, part.mask))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


def _decode_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """One query per row: q [heads, B, D] over keys and values [kv_heads, B, S, D] where `mask`
    [B, S] is True -> [heads, B, D]. Two batched matmuls with the softmax in float32 (PyTorch's
    CPU flash attention takes ~10x longer for single queries than this)."""
    heads, rows, dim = q.shape
    kv_heads = keys.shape[0]
    grouped = (q * dim**-0.5).view(kv_heads, heads // kv_heads, rows, dim).transpose(1, 2)
    scores = torch.matmul(grouped.to(keys.dtype), keys.transpose(-1, -2)).float()  # [kv, B, G, S]
    scores.masked_fill_(~mask[None, :, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(values.dtype)
    out = torch.matmul(probs, values)  # [kv_heads, B, G, D]
    return out.transpose(1, 2).reshape(heads, rows, dim).to(q.dtype)


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """softmax(q kᵀ / √D + mask) v; causal without a mask (kv_heads divides heads)."""
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=k.shape[1] != q.shape[1]
    )
