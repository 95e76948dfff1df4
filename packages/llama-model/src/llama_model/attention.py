"""The attention seam: how a caller tells the model which keys each query sees.

A caller builds one attention backend per forward call and passes it in, ``model(tokens,
attention=...)``; every attention layer asks it for the RoPE positions of its tokens and hands it
the rotated queries, keys and values. The model itself knows no mask kinds, caches or
parallelisms: each is a backend.

=====================  =======================================================================
`Causal`               plain causal attention (SDPA's causal kernel); the default
`Documents`            packed documents (§3.2); positions restart per document
`Segments`             a shared prefix and continuations that do not see each other (§4.1.2)
`ExplicitMask`         any boolean [B, 1, T, T] mask
`CachedAttention`      a KV cache (`llama_model.cache`): decode and chunked prefill, static shapes
=====================  =======================================================================

Context parallelism (llama-train) and the paged KV cache (llama-serve) are backends their packages
supply: anything with the two methods of `AttentionBackend` works.

`Documents` and `Segments` run on a dense boolean mask with `scaled_dot_product_attention`, or on
FlexAttention with a block mask, which skips the blocks no query of a block may see (packed short
documents then cost what they attend to); ``kernel="auto"`` picks FlexAttention on CUDA and the
dense mask elsewhere. Both kernels evaluate one pattern function (`llama_model.masks`).

`Causal`, `Documents`, `Segments`, `ExplicitMask` and their subclasses are PyTorch pytrees of their
per-row tensors, so that `torch.distributed.pipelining` cuts them into micro-batches along with the
tokens (`CachedAttention` is for inference and is not).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from torch.utils import _pytree as pytree

from llama_model.cache import KVCacheProtocol
from llama_model.masks import (
    Pattern,
    block_mask,
    dense_mask,
    document_pattern,
    document_positions,
    segment_pattern,
    segment_positions,
)

__all__ = [
    "AttentionBackend",
    "AttentionKernel",
    "CachedAttention",
    "Causal",
    "Documents",
    "ExplicitMask",
    "Segments",
    "scaled_dot_product",
]

AttentionKernel = Literal["auto", "dense", "flex"]
"""How a pattern is computed: "dense" = a boolean mask with `scaled_dot_product_attention`,
"flex" = FlexAttention with a block mask, "auto" = flex on CUDA and dense elsewhere."""


@runtime_checkable
class AttentionBackend(Protocol):
    """What each attention layer calls. Shapes: B batch rows, T tokens in this call, D head_dim."""

    def positions(self, batch: int, seq_len: int, device: torch.device) -> torch.Tensor:
        """RoPE positions [B or 1, T] of this call's tokens (integers)."""
        ...

    def __call__(
        self, layer_id: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """Attention of rotated queries q [B, heads, T, D] over rotated keys k and values v
        [B, kv_heads, T, D] of layer `layer_id`; returns [B, heads, T, D]."""
        ...


def scaled_dot_product(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    is_causal: bool = False,
) -> torch.Tensor:
    """softmax(q kᵀ / √D + mask) v with grouped-query broadcasting (kv_heads divides heads); `mask`
    is boolean, True = attend, broadcastable to [B, heads, T_q, T_k]."""
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=k.shape[1] != q.shape[1]
    )


class _RowTensors:
    """A backend whose per-row tensors pipeline parallelism cuts into micro-batches.

    Every subclass is a PyTorch pytree: its attributes named in `_row_tensors` that hold a batch
    of rows ([B, ...] with B > 1, or a `BlockMask` of B rows) are the children that
    `torch.distributed.pipelining` splits along dim 0 with the tokens; everything else (a [1, ...]
    tensor broadcast over the rows, options) goes to every micro-batch as it is.
    """

    _row_tensors: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        pytree.register_pytree_node(cls, _flatten_rows, _unflatten_rows)


def _has_rows(value: object) -> bool:
    if isinstance(value, BlockMask):
        return value.kv_num_blocks.shape[0] > 1
    return isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] > 1


# The one leaf of a backend without per-row tensors: a non-tensor leaf, which pipelining hands
# whole to every micro-batch (a pytree with no leaves at all would break its splitting).
_WHOLE = "the same for every row"


def _flatten_rows(backend: _RowTensors) -> tuple[list[Any], Any]:
    # A backend rebuilt by `_unflatten_rows` keeps the names it was split by: pytree maps rebuild
    # it around other leaves (pipelining's chunk specs), which must not change its structure.
    names = backend.__dict__.get("_split_by")
    if names is None:
        candidates = type(backend)._row_tensors
        names = tuple(n for n in candidates if _has_rows(getattr(backend, n, None)))
    hidden = ("_split_by", "_whole", *names)
    rest = {key: value for key, value in vars(backend).items() if key not in hidden}
    if not names:
        return [backend.__dict__.get("_whole", _WHOLE)], (type(backend), names, rest)
    return [getattr(backend, name) for name in names], (type(backend), names, rest)


def _unflatten_rows(children: Iterable[Any], context: Any) -> _RowTensors:
    kind, names, rest = context
    backend: _RowTensors = kind.__new__(kind)
    backend.__dict__.update(rest)
    if names:
        backend.__dict__.update(zip(names, children, strict=True))
    else:
        (backend.__dict__["_whole"],) = children
    backend.__dict__["_split_by"] = names
    return backend


class Causal(_RowTensors):
    """Plain causal attention over this call's tokens, at positions 0..T-1 or the given ones."""

    _row_tensors = ("_positions",)

    def __init__(self, positions: torch.Tensor | None = None) -> None:
        self._positions = None if positions is None else _check_positions(positions)

    def positions(self, batch: int, seq_len: int, device: torch.device) -> torch.Tensor:
        if self._positions is None:
            return torch.arange(seq_len, device=device)[None, :]  # [1, T]
        _check_length(self._positions, batch, seq_len, "positions")
        return self._positions

    def __call__(
        self, layer_id: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        return scaled_dot_product(q, k, v, is_causal=q.shape[2] > 1)


class _PatternAttention(_RowTensors):
    """A pattern over this call's tokens, computed once at construction as a dense mask or a
    FlexAttention block mask (never inside the layers, which may be compiled)."""

    _row_tensors = ("document_ids", "segment_ids", "positions_", "mask")

    positions_: torch.Tensor  # [B, T]
    mask: torch.Tensor | BlockMask  # [B, 1, T, T] or a BlockMask of B rows
    _ids_name = "document_ids"  # what errors call the per-token ids

    def _build(
        self, pattern: Pattern, ids: torch.Tensor, positions: torch.Tensor, kernel: AttentionKernel
    ) -> None:
        if kernel not in ("auto", "dense", "flex"):
            raise ValueError(f"kernel must be 'auto', 'dense' or 'flex', got {kernel!r}")
        batch, seq_len = ids.shape
        positions = _check_positions(positions)
        _check_length(positions, batch, seq_len, "positions")
        self.positions_ = positions.expand(batch, seq_len)
        flex = kernel == "flex" or (kernel == "auto" and ids.device.type == "cuda")
        build = block_mask if flex else dense_mask
        self.mask = build(pattern, batch, seq_len, ids.device)

    def positions(self, batch: int, seq_len: int, device: torch.device) -> torch.Tensor:
        _check_length(self.positions_, batch, seq_len, self._ids_name)
        return self.positions_

    def __call__(
        self, layer_id: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        if isinstance(self.mask, BlockMask):
            return _flex_attention(q, k, v, self.mask)
        return scaled_dot_product(q, k, v, self.mask)


class Documents(_PatternAttention):
    """Packed documents (§3.2): a token attends only to earlier tokens of its own document, and by
    default its position restarts at each document, so every document computes what it would
    alone. `document_ids` [B, T]: documents are contiguous runs of one id."""

    def __init__(
        self,
        document_ids: torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        kernel: AttentionKernel = "auto",
    ) -> None:
        self.document_ids = _check_ids(document_ids, "document_ids")
        if positions is None:
            positions = document_positions(self.document_ids)
        self._build(document_pattern(self.document_ids), self.document_ids, positions, kernel)


class Segments(_PatternAttention):
    """A shared prefix and continuations that do not see each other, per document: the reward
    model's rows of §4.1.2 (a prompt, then several responses to it; each response attends to the
    prompt and to itself only, and is positioned right after the prompt).

    segment_ids [B, T]: 0 for the prefix, k > 0 for the k-th continuation. document_ids [B, T]
    (default: one document per row) lets several such groups share a packed row.
    """

    _ids_name = "segment_ids"

    def __init__(
        self,
        segment_ids: torch.Tensor,
        *,
        document_ids: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        kernel: AttentionKernel = "auto",
    ) -> None:
        self.segment_ids = _check_ids(segment_ids, "segment_ids")
        if _readable(segment_ids) and int(segment_ids.min()) < 0:
            raise ValueError(
                f"segment_ids must be >= 0 (0 = the shared prefix), got {int(segment_ids.min())}"
            )
        self.document_ids = (
            torch.zeros_like(self.segment_ids)
            if document_ids is None
            else _check_ids(document_ids, "document_ids")
        )
        if self.document_ids.shape != self.segment_ids.shape:
            raise ValueError(
                f"segment_ids {tuple(self.segment_ids.shape)} and document_ids "
                f"{tuple(self.document_ids.shape)} must have the same [batch, seq_len] shape"
            )
        if positions is None:
            positions = segment_positions(self.segment_ids, self.document_ids)
        pattern = segment_pattern(self.segment_ids, self.document_ids)
        self._build(pattern, self.segment_ids, positions, kernel)


class ExplicitMask(_RowTensors):
    """Any pattern given as a boolean mask [B or 1, 1, T, T] (True = attend) over this call's
    tokens, at positions 0..T-1 or the given ones. A query that sees no key gives NaN."""

    _row_tensors = ("mask", "_positions")

    def __init__(self, mask: torch.Tensor, *, positions: torch.Tensor | None = None) -> None:
        if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1:
            raise ValueError(
                f"mask must be a boolean [batch or 1, 1, T, T] tensor, got {mask.dtype} of shape "
                f"{tuple(mask.shape)}"
            )
        if mask.shape[2] != mask.shape[3]:
            raise ValueError(
                f"mask must be square over this call's tokens, got {tuple(mask.shape)}; keys from "
                "elsewhere (a cache, other ranks) need their own backend"
            )
        self.mask = mask
        self._positions = None if positions is None else _check_positions(positions)

    def positions(self, batch: int, seq_len: int, device: torch.device) -> torch.Tensor:
        _check_length(self.mask[:, 0, :, 0], batch, seq_len, "mask")
        if self._positions is None:
            return torch.arange(seq_len, device=device)[None, :]
        _check_length(self._positions, batch, seq_len, "positions")
        return self._positions

    def __call__(
        self, layer_id: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        return scaled_dot_product(q, k, v, self.mask)


class CachedAttention:
    """Attention through a KV cache (gpt-fast's way): this call's keys and values are written
    into the cache at `positions` [B or 1, T], and the queries attend over the cache's whole
    [S = cache.max_seq_len] buffer, masked to the keys at positions <= their own. Every shape is
    fixed by the cache, so a decode step (T = 1) compiles once whatever the positions; batch rows
    may sit at different positions (continuous batching). Chunked prefill is T > 1 (it attends over
    all S slots too: T x S work).

    Positions beyond the cache are refused on CPU; on a GPU they are not checked (that would wait
    on the device), and the caller must keep them below `cache.max_seq_len`. A cache in another
    dtype than the queries is converted per layer: build it in the compute dtype. A cache whose
    storage cannot give each row's keys in position order cheaply (a paged cache with a paged
    attention kernel) brings its own backend instead: anything with `positions` and `__call__`.
    """

    def __init__(self, cache: KVCacheProtocol, positions: torch.Tensor) -> None:
        self.cache = cache
        self.positions_ = _check_positions(positions)
        if _readable(positions) and int(positions.max()) >= cache.max_seq_len:
            raise ValueError(
                f"KV cache is full: position {int(positions.max())} is beyond its "
                f"max_seq_len {cache.max_seq_len}; build a larger cache"
            )
        slots = torch.arange(cache.max_seq_len, device=positions.device)
        self.mask = (slots <= self.positions_[..., None])[:, None]  # [B or 1, 1, T, S]

    def positions(self, batch: int, seq_len: int, device: torch.device) -> torch.Tensor:
        _check_length(self.positions_, batch, seq_len, "positions")
        return self.positions_

    def __call__(
        self, layer_id: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        keys, values = self.cache.update(layer_id, self.positions_, k, v)  # [B, kv_heads, S, D]
        return scaled_dot_product(q, keys.to(q.dtype), values.to(q.dtype), self.mask)


# ------------------------------------------------------------------------------------ helpers


_COMPILED_FLEX: list[Callable[..., Any]] = []


def _flex_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockMask
) -> torch.Tensor:
    """FlexAttention as a fused kernel: traced in place inside a compiled block, else through a
    once-compiled wrapper on CUDA (eager flex_attention is an unfused reference, used on CPU)."""
    gqa = k.shape[1] != q.shape[1]
    if torch.compiler.is_compiling() or q.device.type != "cuda":
        return flex_attention(q, k, v, block_mask=mask, enable_gqa=gqa)
    if not _COMPILED_FLEX:
        _COMPILED_FLEX.append(torch.compile(flex_attention, dynamic=False))
    return _COMPILED_FLEX[0](q, k, v, block_mask=mask, enable_gqa=gqa)


def _check_ids(ids: torch.Tensor, name: str) -> torch.Tensor:
    if ids.dim() != 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(
            f"{name} must be an integer [batch, seq_len] tensor, got {ids.dtype} of shape "
            f"{tuple(ids.shape)}"
        )
    return ids


def _check_positions(positions: torch.Tensor) -> torch.Tensor:
    if positions.dim() == 1:
        positions = positions[None, :]
    if positions.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"positions must be an integer tensor, got dtype {positions.dtype}")
    if positions.dim() != 2:
        raise ValueError(
            f"positions must be an integer [batch or 1, seq_len] tensor, got {positions.dtype} "
            f"of shape {tuple(positions.shape)}"
        )
    if _readable(positions) and positions.numel() and int(positions.min()) < 0:
        raise ValueError(f"position {int(positions.min())} is negative; positions count from 0")
    return positions


def _readable(t: torch.Tensor) -> bool:
    """Whether value checks may read `t`: on CPU only (a GPU step never waits on the host), and
    not while torch.compile traces (a decode step stays one graph)."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def _check_length(t: torch.Tensor, batch: int, seq_len: int, name: str) -> None:
    if t.shape[-1] != seq_len or t.shape[0] not in (1, batch):
        raise ValueError(
            f"{name} must have the tokens' shape [{batch} or 1, {seq_len}], got {tuple(t.shape)}"
        )
