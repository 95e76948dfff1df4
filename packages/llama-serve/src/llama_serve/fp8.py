"""The FP8 inference recipe of §6.2 of "The Llama 3 Herd of Models" (arXiv 2407.21783).

The paper serves Llama 3 405B with FP8 matrix multiplications in the feed-forward networks, keeps
self-attention and the first and the last Transformer layers in BF16, quantizes row-wise (FBGEMM's
`quantize_fp8_row` / `f8f8bf16_rowwise`) and caps the dynamic activation scales at 1200 so that an
outlier cannot flush the rest of its row to zero. Here that is the three SwiGLU projections `w1`, `w2`,
`w3` of every Transformer block but the first and the last, each replaced by
`llama_kernels.Fp8RowwiseLinear` (e4m3 weight with one scale per output row; activations quantized
per token with the 1200 cap, `llama_kernels.SCALE_UB`, unless `scale_ub` says otherwise).
Everything else stays in the model's dtype (bf16): attention, norms, embeddings and the output
projection.

The recipe is model knowledge, so it lives with the model's callers and reads the model's structure:
`Llama.layers` is keyed by the layer's index ("0", "1", ...), and "first" and "last" are indices 0
and `config.n_layers - 1` of the whole model, so a pipeline stage holding some layers gets the same
treatment as the full model would give them: quantizing every stage of a split gives the model that
quantizing the whole would, and a stage holding only the first or the last layer (or nothing the
recipe quantizes) is returned as it was.
"""

from __future__ import annotations

import torch
from torch import nn

from llama_kernels import SCALE_UB, Fp8RowwiseLinear
from llama_model import Llama

__all__ = ["compare_logits", "quantize_fp8"]

# §6.2: FP8 in the feed-forward network only (not in self-attention): SwiGLU's gate (w1), down (w2)
# and up (w3) projections, under Meta's names as in llama_model.
FFN_PROJECTIONS = ("w1", "w2", "w3")


def quantize_fp8(
    model: Llama, *, skip_first_last: bool = True, scale_ub: float = SCALE_UB
) -> Llama:
    """Apply §6.2's FP8 recipe to `model` in place and return it.

    Replaces `layers[i].feed_forward.{w1,w2,w3}` (each an `nn.Linear`) with
    `Fp8RowwiseLinear.from_linear(linear, scale_ub=scale_ub)` in every Transformer block the model
    holds, except, with `skip_first_last` (the paper's choice, the default), the first (index 0) and
    the last (index `config.n_layers - 1`) of the model. `scale_ub` is §6.2's upper bound on the
    dynamic activation scales (`llama_kernels`' 1200 by default; `math.inf` for none). Attention,
    norms, embeddings and the output projection are left as they are. Cast the model to its serving
    dtype (bf16) first: `.to(dtype)` afterwards would cast the float8 weights too. Every block is
    checked before any is changed, so a refused model is left as it was.

    `model` may be a pipeline stage (a `Llama` holding some of the layers): a stage holding none the
    recipe quantizes (only the first or the last layer, say) is returned unchanged, so every stage
    of a split can be passed.

    Raises TypeError if `model` is not a `llama_model.Llama`, a projection is not an `nn.Linear`
    (e.g. the model is already quantized) or `scale_ub` is not a number, and ValueError if
    `scale_ub` is not > 0 or the whole model (`config.n_layers`) has too few layers for any block
    to be quantized (one or two with `skip_first_last`).
    """
    if not isinstance(model, Llama):
        raise TypeError(
            f"quantize_fp8 expects a llama_model.Llama, got {type(model).__name__}; build or load "
            "the model with llama_model (Llama(config), load_checkpoint(path)) and quantize that"
        )
    scale_ub = _check_scale_ub(scale_ub)
    n_layers = model.config.n_layers
    bf16_layers = {0, n_layers - 1} if skip_first_last else set()
    if len(bf16_layers) >= n_layers:  # the whole model, not this stage, decides
        raise ValueError(
            f"the model has {n_layers} layer(s): nothing would be quantized (§6.2 keeps the "
            "first and the last layer in bf16; pass skip_first_last=False to quantize them too)"
        )
    held = sorted(model.layers.keys(), key=int)  # "0", "1", ...: the layers' indices in the model
    chosen = [key for key in held if int(key) not in bf16_layers]  # may be empty on a stage

    targets: list[tuple[nn.Module, str, nn.Linear]] = []
    for key in chosen:
        feed_forward = getattr(model.layers[key], "feed_forward", None)
        if not isinstance(feed_forward, nn.Module):
            raise TypeError(
                f"layers.{key} ({type(model.layers[key]).__name__}) has no feed_forward module"
            )
        for name in FFN_PROJECTIONS:
            linear = getattr(feed_forward, name, None)
            where = f"layers.{key}.feed_forward.{name}"
            if isinstance(linear, Fp8RowwiseLinear):
                raise TypeError(
                    f"{where} is already an Fp8RowwiseLinear: the model is already quantized "
                    "(quantize a model loaded in bf16, once)"
                )
            if not isinstance(linear, nn.Linear):
                got = "missing" if linear is None else type(linear).__name__
                raise TypeError(f"{where} must be an nn.Linear, got {got}")
            targets.append((feed_forward, name, linear))
    for feed_forward, name, linear in targets:
        setattr(feed_forward, name, Fp8RowwiseLinear.from_linear(linear, scale_ub=scale_ub))
    return model


def _check_scale_ub(scale_ub: float) -> float:
    """`scale_ub` as a float, refused as `llama_kernels.Fp8RowwiseLinear` refuses it (a bool or a
    non-number: TypeError; not > 0, NaN included: ValueError), but before any block is changed."""
    if isinstance(scale_ub, bool) or not isinstance(scale_ub, int | float):
        raise TypeError(
            f"scale_ub must be a positive number (§6.2 uses {SCALE_UB}), got {scale_ub!r}"
        )
    if not scale_ub > 0:  # also refuses NaN
        raise ValueError(
            f"scale_ub must be > 0 (the cap on an activation row's maximum; §6.2 uses "
            f"{SCALE_UB}; math.inf for no cap), got {scale_ub!r}"
        )
    return float(scale_ub)


def compare_logits(
    reference: torch.Tensor, candidate: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """How far `candidate`'s next-token distributions are from `reference`'s, token by token.

    Both are logits of the same shape, [..., vocab] (say bf16 and FP8 forwards of one batch).
    Returns (kl, agree), each shaped like the logits without the vocabulary axis: ``kl`` is
    KL(reference || candidate) in nats, computed from log-softmaxes in float32 and clamped at 0
    (rounding can make an exact match come out a hair below), and ``agree`` is True where both
    put their largest logit on the same token (top-1 agreement). Memory: a few float32 copies of
    the logits, so call it on a document or a few rows at a time with a large vocabulary.

    Raises ValueError if the shapes differ or there is no vocabulary axis.
    """
    if reference.shape != candidate.shape or reference.dim() < 1:
        raise ValueError(
            "compare_logits needs two logit tensors of one shape [..., vocab], got "
            f"{tuple(reference.shape)} and {tuple(candidate.shape)}"
        )
    ref = torch.log_softmax(reference.float(), dim=-1)
    cand = torch.log_softmax(candidate.float(), dim=-1)
    kl = (ref.exp() * (ref - cand)).sum(-1).clamp_min(0)
    return kl, reference.argmax(-1) == candidate.argmax(-1)
