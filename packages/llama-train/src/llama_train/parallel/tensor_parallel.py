"""Tensor parallelism with sequence parallelism for `llama_model.Llama`, as DTensor plans.

The Megatron-LM layout (Shoeybi et al. 2019, arXiv 1909.08053; sequence parallelism: Korthikanti et
al. 2022, arXiv 2205.05198), which §3.3.2 of "The Llama 3 Herd of Models" (arXiv 2407.21783) uses as
its innermost parallelism. Every Transformer block splits its two matmul pairs across the `tp` ranks
so that each pair costs one collective in the forward and one in the backward:

- attention: ``wq``, ``wk``, ``wv`` column-wise (each rank holds n_heads / tp query heads and
  n_kv_heads / tp key/value heads, whole), ``wo`` row-wise;
- feed-forward: ``w1`` (gate) and ``w3`` (up) column-wise, ``w2`` (down) row-wise;
- ``tok_embeddings`` row-wise (a vocabulary slice per rank), ``output`` column-wise (a vocabulary
  slice per rank), gathered back to full logits so that the loss works unchanged.

With sequence parallelism (the default) the residual stream between the matmul pairs is split along
the sequence instead of replicated: the embedding and each row-wise projection reduce-scatter onto
``Shard(1)`` where they would all-reduce, the RMSNorms (``attention_norm``, ``ffn_norm``, ``norm``)
run on the local [B, T / tp, dim] slice with replicated weights whose gradients DTensor all-reduces,
and attention / feed-forward inputs are all-gathered back to the full sequence. Same traffic as
plain TP (an all-reduce is a reduce-scatter plus an all-gather), tp times less activation memory
outside the matmuls. Attention itself always sees the whole sequence, so the attention backend
(document masks and positions) stays as in a single process.

The parallelised model takes the same full (replicated) `tokens` on every tensor-parallel rank and
returns the same full logits [B, T, vocab_size] on each, as plain tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Placement, Replicate, Shard
from torch.distributed.tensor.experimental import register_sharding
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

import llama_kernels  # noqa: F401  (registers the llama_kernels::rms_norm custom ops)
from llama_model import Llama, LlamaConfig

__all__ = ["apply_tensor_parallel", "check_tensor_parallel_config"]

# Attention.forward(x, inv_freq, attention): only x is sharded.
_ATTENTION_EXTRA_ARGS = 2


def check_tensor_parallel_config(config: LlamaConfig, tp: int) -> None:
    """Raise ValueError, naming the values, if `config` cannot be split across `tp` ranks.

    Query heads, key/value heads and the feed-forward width must divide evenly (each rank holds
    whole heads and an equal slice of the SwiGLU columns), and the embeddings must be untied.
    """
    if tp < 1:
        raise ValueError(f"the tensor-parallel degree must be >= 1, got tp={tp}")
    if tp == 1:
        return
    for name, value in (
        ("n_heads", config.n_heads),
        ("n_kv_heads", config.n_kv_heads),
        ("ffn_dim", config.ffn_dim),
    ):
        if value % tp:
            raise ValueError(
                f"tensor parallelism splits {name} across the tp ranks, but {name}={value} is not "
                f"divisible by tp={tp}; choose a tp that divides {name}"
            )
    if config.tie_word_embeddings:
        raise ValueError(
            f"tensor parallelism (tp={tp}) does not support tied embeddings "
            "(tie_word_embeddings=True): the output projection would share a vocabulary-sharded "
            "embedding table through a plain F.linear; untie the embeddings "
            "(tie_word_embeddings=False) or use tp=1"
        )


def apply_tensor_parallel(
    model: Llama, tp_mesh: DeviceMesh, *, sequence_parallel: bool = True
) -> None:
    """Split `model` in place across the ranks of `tp_mesh` (Megatron layout; see the module doc).

    Args:
        model: a `Llama` holding the same weights on every rank of `tp_mesh` (initialised from
            the same seed or loaded from the same checkpoint everywhere: sharded weights are
            taken from rank 0, the norms' replicated weights from each rank as they are). A
            meta-device model works too: `to_empty` it afterwards, then `init_weights` (each
            rank keeps its shard of the single-process values) or load a full state dict
            (`torch.distributed.checkpoint.state_dict.set_model_state_dict`).
            Blocks are taken from `model.layers`; a pipeline stage whose `tok_embeddings`, `norm`
            or `output` was removed (set to None) is fine.
        tp_mesh: the 1-D tensor-parallel mesh, e.g. ``build_mesh(...)["tp"]``. With one rank this
            is a no-op.
        sequence_parallel: shard the residual stream and the RMSNorms along the sequence. The
            sequence length must then be divisible by the tp degree (checked on every forward).

    Weights become DTensors on `tp_mesh` (``Shard(0)`` for column-wise and embedding tables,
    ``Shard(1)`` for row-wise, ``Replicate()`` for the norms under sequence parallelism; plain
    tensors otherwise). Under sequence parallelism the norms' gradients come out as ``Partial()``
    DTensors (each rank's sum over its slice of the sequence): exact, and all-reduced by DTensor
    where they are read (`full_tensor`, the optimizer, a gradient norm) or by FSDP's reduction.
    Apply this before FSDP's `fully_shard`, which then shards the same parameters along the
    data-parallel mesh (2-D).

    Raises:
        ValueError: `tp_mesh` is not 1-D, the model is already distributed, or its shape does not
            split (see `check_tensor_parallel_config`).
    """
    if tp_mesh.ndim != 1:
        raise ValueError(
            f"tp_mesh must be 1-D (the 'tp' dimension of the mesh), got {tp_mesh.ndim} dimensions "
            f"{tp_mesh.mesh_dim_names}; pass mesh['tp']"
        )
    tp = tp_mesh.size()
    check_tensor_parallel_config(model.config, tp)
    if tp == 1:
        return
    if any(isinstance(p, DTensor) for p in model.parameters()):
        raise ValueError(
            "the model already holds DTensor parameters: apply tensor parallelism once, before "
            "fully_shard, to a model of plain tensors"
        )
    _register_rms_norm_sharding()

    sequence: Placement = Shard(1) if sequence_parallel else Replicate()
    top: dict[str, ParallelStyle] = {}
    embeddings: nn.Module | None = getattr(model, "tok_embeddings", None)
    if embeddings is not None:
        if sequence_parallel:
            embeddings.register_forward_pre_hook(_sequence_divisible_by(tp))
        # A vocabulary slice per rank; the partial embeddings are summed onto `sequence`.
        top["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=sequence)
    if sequence_parallel and getattr(model, "norm", None) is not None:
        top["norm"] = SequenceParallel()
    if getattr(model, "output", None) is not None:
        # A vocabulary slice of the logits per rank, gathered: full logits, loss unchanged.
        top["output"] = ColwiseParallel(
            input_layouts=sequence, output_layouts=Replicate(), use_local_output=True
        )
    parallelize_module(model, tp_mesh, top)

    for block in model.layers.children():  # keyed by layer index (a stage holds some)
        parallelize_module(block, tp_mesh, _block_plan(sequence_parallel))


def _block_plan(sequence_parallel: bool) -> dict[str, ParallelStyle]:
    """The plan for one `TransformerBlock` (keys are its submodule names)."""
    sequence: Placement = Shard(1) if sequence_parallel else Replicate()
    plan: dict[str, ParallelStyle] = {
        "attention.wq": ColwiseParallel(),
        "attention.wk": ColwiseParallel(),
        "attention.wv": ColwiseParallel(),
        "attention.wo": RowwiseParallel(output_layouts=sequence),
        "feed_forward.w1": ColwiseParallel(),
        "feed_forward.w3": ColwiseParallel(),
        "feed_forward.w2": RowwiseParallel(output_layouts=sequence),
    }
    if sequence_parallel:
        extra: Sequence[None] = (None,) * _ATTENTION_EXTRA_ARGS
        plan |= {
            "attention_norm": SequenceParallel(),
            "ffn_norm": SequenceParallel(),
            # All-gather the normed sequence once per sub-layer (as a DTensor, so that the
            # backward is one reduce-scatter for wq, wk and wv together).
            "attention": PrepareModuleInput(
                input_layouts=(Shard(1), *extra), desired_input_layouts=(Replicate(), *extra)
            ),
            "feed_forward": PrepareModuleInput(
                input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)
            ),
        }
    return plan


def _sequence_divisible_by(tp: int) -> Callable[[nn.Module, tuple[Any, ...]], None]:
    """A forward pre-hook for `tok_embeddings` that rejects a sequence sequence parallelism cannot split."""

    def check(module: nn.Module, args: tuple[Any, ...]) -> None:
        tokens = args[0]
        if tokens.dim() == 2 and tokens.shape[1] % tp:
            raise ValueError(
                f"sequence parallelism splits the sequence across tp={tp} ranks, but the sequence "
                f"length is {tokens.shape[1]}; use a seq_len divisible by {tp} or "
                "sequence_parallel=False"
            )

    return check


_registered = False


def _register_rms_norm_sharding() -> None:
    """Teach DTensor how `llama_kernels::rms_norm` (a custom op) shards: along any dim but the last.

    RMSNorm normalises each row over its last (hidden) dimension, so rows may be split any way;
    the weight stays replicated and its gradient, a sum over rows, is partial on each rank.
    """
    global _registered
    if _registered:
        return
    ops = torch.ops.llama_kernels

    @register_sharding(ops.rms_norm.default)  # type: ignore[untyped-decorator]
    def _forward(x: Any, weight: Any, eps: float) -> list[tuple[list[Any], list[Any]]]:
        # (outputs y, rstd), (inputs x, weight, eps)
        strategies: list[tuple[list[Any], list[Any]]] = [
            ([Replicate(), Replicate()], [Replicate(), Replicate(), None])
        ]
        for dim in range(x.ndim - 1):
            strategies.append(([Shard(dim), Shard(dim)], [Shard(dim), Replicate(), None]))
        return strategies

    @register_sharding(ops.rms_norm_backward.default)  # type: ignore[untyped-decorator]
    def _backward(
        grad_out: Any, x: Any, weight: Any, rstd: Any
    ) -> list[tuple[list[Any], list[Any]]]:
        # (outputs dx, dweight), (inputs grad_out, x, weight, rstd)
        strategies: list[tuple[list[Any], list[Any]]] = [
            ([Replicate(), Replicate()], [Replicate(), Replicate(), Replicate(), Replicate()])
        ]
        for dim in range(x.ndim - 1):
            strategies.append(
                ([Shard(dim), Partial()], [Shard(dim), Shard(dim), Replicate(), Shard(dim)])
            )
        return strategies

    _registered = True
