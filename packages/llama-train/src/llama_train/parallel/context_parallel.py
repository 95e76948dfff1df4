"""Context parallelism the way Llama 3 does it (§3.3.2, "Context parallelism for long sequences").

The sequence dimension is split over the ``cp`` ranks of the mesh. To balance work under the causal
mask, the sequence is cut into 2 × CP equal chunks and CP rank i holds chunks i and 2 × CP − 1 − i:
an early chunk (few keys to attend to) paired with a late one (many). Each rank embeds and projects
only its own tokens; in every attention layer the keys and values of all ranks are all-gathered
(grouped-query attention keeps them small: 8 key/value heads against 128 query heads in 405B, so
the gather moves far less than the queries would) and re-ordered into global sequence order, and the
local queries attend to all keys through an explicit mask: causal by *global* token index and within
the same packed document (§3.2). This is the paper's all-gather variant, not ring attention; unlike
``torch.distributed.tensor.experimental.context_parallel`` it needs no fused attention kernel and
runs on CPU (gloo) as well as on GPUs.

Usage on every rank of a cp group (which all read the same batch)::

    shard = shard_batch(batch, cp_size=mesh["cp"].size(), cp_rank=mesh["cp"].get_local_rank())
    loss = context_parallel_loss(model, shard, mesh["cp"])  # this rank's share of the batch loss
    loss.backward()

The model is not changed: the gather happens inside `ContextParallelAttention`, the attention
backend this module supplies to `llama_model`'s seam (``model(shard.tokens, attention=...)``), so
the same model object serves context-parallel and plain steps. Gradients of parameters then hold
this rank's share and must be summed over the cp group (FSDP2 over the flattened ``dp_shard_cp``
mesh does that reduction; see `context_parallel_loss`).

The key/value gather goes through `torch.distributed._functional_collectives`: an all-gather
whose autograd backward is a reduce-scatter (sum) over the same group, so every rank's keys and
values receive the gradient from all ranks' queries. gloo's reduce-scatter is checked on torch 2.13
(distributed tests); a backend without one fails in the backward with its own error.

Composition: tensor parallelism leaves each rank with tp-local key/value heads, which the gather
handles as they are (it gathers over the cp group only); the gather needs plain (local) tensors,
as DTensor plans produce with ``use_local_output=True``. FSDP2 shards over ``dp_shard_cp``
unchanged. Under pipeline parallelism the backend is cut into micro-batches with the tokens (it is
a pytree of its per-row tensors).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.distributed import _functional_collectives as funcol  # private, but torch's own
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.utils import _pytree as pytree

from llama_model import Llama, document_positions
from llama_train.data import IGNORE_INDEX, Batch
from llama_train.loss import summed_cross_entropy

__all__ = [
    "ContextParallelAttention",
    "ContextParallelShard",
    "load_balanced_index",
    "context_parallel_mask",
    "shard_batch",
    "context_parallel_loss",
    "gather_sequence",
]


def load_balanced_index(seq_len: int, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Global token indices [seq_len / cp_size] held by `cp_rank`, in the order it holds them.

    The sequence is cut into 2 · cp_size chunks of seq_len / (2 · cp_size) tokens; rank i holds
    chunk i followed by chunk 2 · cp_size − 1 − i (§3.3.2), so every rank has the same number of
    causal (query, key) pairs. With cp_size = 1 the rank holds the whole sequence (any length).
    Over the ranks 0..cp_size−1 the indices form a permutation of 0..seq_len−1.
    """
    if cp_size < 1:
        raise ValueError(f"cp_size must be >= 1, got {cp_size}")
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank must be in [0, {cp_size}) for cp_size {cp_size}, got {cp_rank}")
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if cp_size == 1:
        return torch.arange(seq_len)
    n_chunks = 2 * cp_size
    if seq_len % n_chunks:
        raise ValueError(
            f"seq_len {seq_len} is not divisible by 2 · cp_size = {n_chunks}: context parallelism "
            f"cuts the sequence into {n_chunks} equal chunks; use a sequence length that is a "
            f"multiple of {n_chunks}"
        )
    chunk = seq_len // n_chunks
    first, second = cp_rank, n_chunks - 1 - cp_rank
    return torch.cat(
        [
            torch.arange(first * chunk, (first + 1) * chunk),
            torch.arange(second * chunk, (second + 1) * chunk),
        ]
    )


def context_parallel_mask(document_ids: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Boolean attention mask [B, 1, len(index), T] of local queries × all keys (True = attend).

    `document_ids` is the FULL [B, T] packed sequence's ids; `index` the global indices of the
    local queries (`load_balanced_index`). Query at global position i sees key j iff j <= i and
    both tokens are in one document: the rows `index` of the single-process document mask.
    """
    if document_ids.dim() != 2:
        raise ValueError(f"document_ids must be [batch, seq_len], got {tuple(document_ids.shape)}")
    seq_len = document_ids.shape[1]
    index = index.to(document_ids.device)
    keys = torch.arange(seq_len, device=document_ids.device)
    causal = keys[None, :] <= index[:, None]  # [T_local, T]
    same_doc = document_ids[:, index, None] == document_ids[:, None, :]  # [B, T_local, T]
    return (same_doc & causal)[:, None]  # [B, 1, T_local, T]: broadcast over heads


@dataclass(frozen=True)
class ContextParallelShard:
    """One cp rank's part of a `Batch`: its tokens, with what it needs to attend to all keys.

    tokens, targets, positions: [B, T_local] (positions restart per document, computed on the full
    sequence); attention_mask: [B, 1, T_local, T]; index: the [T_local] global indices held;
    num_targets: the scalar count of non-ignored targets in the FULL batch (the loss denominator).
    """

    tokens: torch.Tensor
    targets: torch.Tensor
    positions: torch.Tensor
    attention_mask: torch.Tensor
    index: torch.Tensor
    num_targets: torch.Tensor


def shard_batch(batch: Batch, cp_size: int, cp_rank: int) -> ContextParallelShard:
    """`cp_rank`'s load-balanced part of `batch` (every rank of the cp group passes the same batch)."""
    shape = tuple(batch.tokens.shape)
    if batch.tokens.dim() != 2 or batch.targets.shape != shape or batch.document_ids.shape != shape:
        raise ValueError(
            f"tokens, targets and document_ids must all be [batch, seq_len]; got "
            f"{shape}, {tuple(batch.targets.shape)} and {tuple(batch.document_ids.shape)}"
        )
    device = batch.tokens.device
    index = load_balanced_index(shape[1], cp_size, cp_rank).to(device)  # [T_local]
    positions = document_positions(batch.document_ids)  # [B, T], on the full sequence
    return ContextParallelShard(
        tokens=batch.tokens[:, index],
        targets=batch.targets[:, index],
        positions=positions[:, index],
        attention_mask=context_parallel_mask(batch.document_ids, index),
        index=index,
        num_targets=(batch.targets != IGNORE_INDEX).sum(),
    )


def context_parallel_loss(
    model: Llama, shard: ContextParallelShard, cp_mesh: DeviceMesh
) -> torch.Tensor:
    """This rank's share of the batch's mean next-token cross-entropy (float32).

    sum(CE over the local non-ignored targets) / (non-ignored targets in the whole batch): the
    shares of the cp ranks sum to the mean loss of the full batch on one process, and the
    gradients of replicated parameters must be SUMMED over the cp group, not averaged. FSDP2 over
    ``dp_shard_cp`` averages over its dp_shard · cp ranks by default: back-propagate cp_size × this
    loss there (``set_gradient_divide_factor`` would need PREMUL_SUM, which gloo lacks). A batch
    without targets gives 0.
    """
    attention = ContextParallelAttention(cp_mesh, shard.positions, shard.attention_mask)
    logits = model(shard.tokens, attention=attention)  # [B, T_local, vocab]
    total = summed_cross_entropy(logits, shard.targets)
    return total / shard.num_targets.clamp(min=1)


def gather_sequence(x: torch.Tensor, cp_mesh: DeviceMesh) -> torch.Tensor:
    """All-gather load-balanced shards [B, H, T_local, D] into global order [B, H, T, D].

    Differentiable: the backward reduce-scatters (sums) the gradient back to each rank's shard.
    """
    if isinstance(x, DTensor):
        raise TypeError(
            "context parallelism gathers plain (local) keys and values; the tensor-parallel plan "
            "must give wk/wv local outputs (ColwiseParallel's default use_local_output=True)"
        )
    if x.dim() != 4:
        raise ValueError(f"expected [batch, heads, seq_len, head_dim], got {tuple(x.shape)}")
    cp_size = cp_mesh.size()
    if cp_size == 1:
        return x  # one rank holds the whole sequence, in order: nothing to gather
    batch, heads, local_len, head_dim = x.shape
    # Autograd-aware all-gather (backward: reduce-scatter) along dim 0: [cp · B, H, T_local, D].
    if hasattr(funcol, "all_gather_single"):  # torch >= 2.13 (autograd built in)
        gathered = funcol.all_gather_single(x.contiguous(), 0, cp_mesh)
    else:  # pragma: no cover - older torch
        gathered = funcol.all_gather_tensor_autograd(x.contiguous(), 0, cp_mesh)
    if x.requires_grad and not gathered.requires_grad:  # never drop the other ranks' gradient
        raise RuntimeError(f"torch {torch.__version__}'s all-gather is not differentiable")
    gathered = (
        gathered.view(cp_size, batch, heads, local_len, head_dim)
        .permute(1, 2, 0, 3, 4)
        .reshape(batch, heads, cp_size * local_len, head_dim)
    )  # [B, H, T, D] with the ranks' shards one after the other
    order = _global_order(cp_size * local_len, cp_size, x.device)
    return gathered.index_select(2, order)  # [B, H, T, D] in global sequence order


_ORDERS: dict[tuple[int, int, torch.device], torch.Tensor] = {}


def _global_order(seq_len: int, cp_size: int, device: torch.device) -> torch.Tensor:
    """Positions in the rank-by-rank concatenation of the shards of global tokens 0..seq_len−1."""
    key = (seq_len, cp_size, device)
    if key not in _ORDERS:
        held = torch.cat([load_balanced_index(seq_len, cp_size, r) for r in range(cp_size)])
        _ORDERS[key] = torch.argsort(held).to(device)
    return _ORDERS[key]


class ContextParallelAttention:
    """The attention backend of context parallelism (`llama_model.AttentionBackend`): this rank's
    queries attend to the keys and values of all cp ranks, gathered in global order, under the
    mask of `context_parallel_mask`; RoPE positions are the shard's (computed on the full sequence).

    positions: [B, T_local]; mask: [B, 1, T_local, T] (both from `shard_batch`).
    """

    def __init__(self, cp_mesh: DeviceMesh, positions: torch.Tensor, mask: torch.Tensor) -> None:
        if cp_mesh.ndim != 1:
            raise ValueError(
                f"cp_mesh must be the 1-D context-parallel mesh (mesh['cp']), got {cp_mesh.ndim} "
                f"dimensions named {cp_mesh.mesh_dim_names}"
            )
        if mask.dim() != 4 or mask.shape[0] != positions.shape[0]:
            raise ValueError(
                f"mask must be [B, 1, T_local, T] for positions [B, T_local], got "
                f"{tuple(mask.shape)} and {tuple(positions.shape)}"
            )
        self.cp_mesh, self.positions_, self.mask = cp_mesh, positions, mask

    def positions(self, batch: int, seq_len: int, device: torch.device) -> torch.Tensor:
        if tuple(self.positions_.shape) != (batch, seq_len):
            raise ValueError(
                f"the shard's positions {tuple(self.positions_.shape)} do not match this rank's "
                f"[{batch}, {seq_len}] tokens"
            )
        return self.positions_

    def gather(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """All ranks' keys and values [B, kv_heads, T, head_dim] in global order."""
        return gather_sequence(k, self.cp_mesh), gather_sequence(v, self.cp_mesh)

    def __call__(
        self, layer_id: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        k, v = self.gather(k, v)  # [B, kv_heads, T, head_dim]
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=self.mask, enable_gqa=k.shape[1] != q.shape[1]
        )


def _flatten(backend: ContextParallelAttention) -> tuple[list[torch.Tensor], Any]:
    return [backend.positions_, backend.mask], (type(backend), backend.cp_mesh)


def _unflatten(children: Iterable[Any], context: Any) -> ContextParallelAttention:
    # Not through __init__: pytree maps also rebuild the backend around non-tensor leaves (the
    # micro-batch chunk specs of torch.distributed.pipelining).
    kind: type[ContextParallelAttention] = context[0]
    backend = kind.__new__(kind)
    backend.cp_mesh = context[1]
    backend.positions_, backend.mask = children
    return backend


# Pipeline parallelism cuts the backend's per-row tensors into micro-batches with the tokens.
pytree.register_pytree_node(ContextParallelAttention, _flatten, _unflatten)
