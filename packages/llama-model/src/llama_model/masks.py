"""Attention patterns and the RoPE positions that go with them.

A pattern is one function ``visible(b, h, q, kv) -> bool``: may query ``q`` of batch row ``b`` (head
``h``) attend to key ``kv``? It is written once and evaluated two ways: on broadcast index grids
(`dense_mask`: a boolean [B, 1, T, T] tensor for `scaled_dot_product_attention`) and by
FlexAttention's `create_block_mask` (`block_mask`: 128×128 blocks that no query of a block may see
are skipped, and no dense mask is built), so the two kernels cannot disagree about the pattern.

- `document_pattern`: packed documents; a token attends to earlier tokens of its own document
  (§3.2: "an attention mask that prevents self-attention between different documents within the
  same sequence").
- `segment_pattern`: one shared prefix and several continuations per document (a reward-model row
  of §4.1.2: a prompt and its ranked responses); each continuation sees the prefix and itself.

Positions: `document_positions` restarts at 0 in every document; `segment_positions` numbers each
continuation after the prefix, as if it followed the prefix alone. Both are the positions each
token would have if its visible context were run as one sequence.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask

__all__ = [
    "Pattern",
    "block_mask",
    "dense_mask",
    "document_pattern",
    "document_positions",
    "segment_pattern",
    "segment_positions",
]

Pattern = Callable[[Any, Any, Any, Any], Any]
"""``visible(b, h, q, kv)``: tensors of batch, head, query and key indices (broadcastable) to a
boolean tensor of the same broadcast shape; FlexAttention's ``mask_mod`` signature."""


def document_pattern(document_ids: torch.Tensor) -> Pattern:
    """Causal within a document: query q sees key kv iff kv <= q and both carry one id."""

    def visible(b: Any, h: Any, q: Any, kv: Any) -> Any:
        return (kv <= q) & (document_ids[b, q] == document_ids[b, kv])

    return visible


def segment_pattern(segment_ids: torch.Tensor, document_ids: torch.Tensor) -> Pattern:
    """Causal within a document, where segment 0 is a prefix every other segment of the document
    sees and segments k > 0 do not see each other: query q sees key kv iff kv <= q, both are in
    one document, and kv is in segment 0 or in q's segment."""

    def visible(b: Any, h: Any, q: Any, kv: Any) -> Any:
        same_document = document_ids[b, q] == document_ids[b, kv]
        key_segment = segment_ids[b, kv]
        return (kv <= q) & same_document & ((key_segment == 0) | (key_segment == segment_ids[b, q]))

    return visible


def dense_mask(pattern: Pattern, batch: int, seq_len: int, device: torch.device) -> torch.Tensor:
    """The boolean mask [batch, 1, seq_len, seq_len] (True = attend) of `pattern`."""
    b = torch.arange(batch, device=device)[:, None, None, None]  # [B, 1, 1, 1]
    h = torch.zeros(1, 1, 1, 1, dtype=torch.long, device=device)
    q = torch.arange(seq_len, device=device)[None, None, :, None]  # [1, 1, T, 1]
    kv = torch.arange(seq_len, device=device)[None, None, None, :]  # [1, 1, 1, T]
    mask: torch.Tensor = pattern(b, h, q, kv)
    return mask.expand(batch, 1, seq_len, seq_len)


def block_mask(pattern: Pattern, batch: int, seq_len: int, device: torch.device) -> BlockMask:
    """`pattern` as a FlexAttention `BlockMask` (128×128 blocks). On CUDA it is built by a compiled
    `create_block_mask`, which never materialises the dense [B, T, T] pattern (the eager one does:
    16 GiB per row at 128K tokens)."""
    build: Callable[..., BlockMask] = create_block_mask
    if device.type == "cuda" and not torch.compiler.is_compiling():
        if not _COMPILED_CREATE_BLOCK_MASK:
            _COMPILED_CREATE_BLOCK_MASK.append(torch.compile(create_block_mask))
        build = _COMPILED_CREATE_BLOCK_MASK[0]
    return build(pattern, batch, None, seq_len, seq_len, device=device)


_COMPILED_CREATE_BLOCK_MASK: list[Callable[..., BlockMask]] = []


def document_positions(document_ids: torch.Tensor) -> torch.Tensor:
    """Positions [B, T] that restart at 0 at each document boundary of a packed [B, T] sequence.

    Documents must be contiguous runs of one id. Every packed document then sees the positions it
    would see alone.
    """
    batch, seq_len = document_ids.shape
    index = torch.arange(seq_len, device=document_ids.device).expand(batch, seq_len)
    return index - _run_start(document_ids, index)


def segment_positions(segment_ids: torch.Tensor, document_ids: torch.Tensor) -> torch.Tensor:
    """Positions [B, T] under `segment_pattern`: the prefix (segment 0) counts from 0 at its
    document's start, and each other segment continues from the number of prefix tokens before it,
    so a response is positioned as if it followed its prompt alone.

    Equivalently: a token's position is the number of keys it sees, minus one.
    """
    if segment_ids.shape != document_ids.shape:
        raise ValueError(
            f"segment_ids {tuple(segment_ids.shape)} and document_ids "
            f"{tuple(document_ids.shape)} must have the same [batch, seq_len] shape"
        )
    batch, seq_len = document_ids.shape
    index = torch.arange(seq_len, device=document_ids.device).expand(batch, seq_len)
    document_start = _run_start(document_ids, index)
    # Prefix tokens before each token in its document (exclusive count).
    prefix = (segment_ids == 0).long()
    prefix_before = prefix.cumsum(1) - prefix  # in the whole row
    prefix_before = prefix_before - prefix_before.gather(1, document_start)
    # Tokens before each token in its own (document, segment): a stable sort groups each
    # (document, segment) pair in order; a token's rank in its group is the count.
    key = document_ids.long() * (int(segment_ids.max()) + 1 if segment_ids.numel() else 1)
    key = key + segment_ids.long()
    order = torch.sort(key, dim=1, stable=True).indices  # [B, T]
    sorted_key = key.gather(1, order)
    group_start = _run_start(sorted_key, index)
    rank = torch.empty_like(index).scatter_(1, order, index - group_start)
    return torch.where(segment_ids == 0, prefix_before, prefix_before + rank)


def _run_start(ids: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """For each position of each row, the index where its run of equal `ids` began."""
    starts = torch.ones_like(ids, dtype=torch.bool)
    starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
    return torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
