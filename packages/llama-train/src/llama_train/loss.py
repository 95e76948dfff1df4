"""The pretraining loss: next-token cross-entropy, summed, for a global mean over every layout.

Every layout (one process, data/context/pipeline parallel) divides one summed cross-entropy by the
number of non-ignored targets of the *global* batch and sums the shares (gradients are summed, not
averaged, across ranks), so every layout computes the same mean loss and the same update.

Two ways to compute the same sum:
- `summed_cross_entropy(logits, targets)` takes logits the model already projected;
- `linear_cross_entropy(hidden, weight, targets)` takes the final hidden states and the output
  projection and works through the rows a chunk at a time, computing the gradients of hidden and
  weight while it goes, so the logits (and their float32 copy and gradient) exist for one chunk
  only, never for the whole batch. With a 128,256-token vocabulary these are the largest tensors
  of a small model's step (`debug`: 4 rows x 256 tokens -> 525 MB per float32 copy). The idea is
  the fused linear cross-entropy of Liger-Kernel (Hsu et al. 2024, arXiv 2410.10989, §3.3), written
  here in plain PyTorch. On the debug model's loss (1,024 rows, bf16 autocast, 2 CPU threads) it
  is 1.8x faster than the plain loss (2.0x with `LinearCrossEntropy`'s kept buffers) and its peak
  adds 470 MiB instead of 1,585 (benchmarks/loss_cpu.py).

The same chunking serves post-training, which needs the log-probability of each target rather than
their sum (llama-align's SFT and DPO): `linear_log_probs(hidden, weight, targets)` returns one
per row and is differentiable for any loss built on them (`LinearLogProbs` keeps its buffers).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.distributed.tensor import DTensor

from llama_train.data import IGNORE_INDEX

__all__ = [
    "LinearCrossEntropy",
    "LinearLogProbs",
    "linear_cross_entropy",
    "linear_log_probs",
    "summed_cross_entropy",
]

# Rows of hidden states per chunk. A chunk holds [chunk, vocab] logits in the compute dtype and
# their float32 probabilities (the gradient reuses the logits' buffer): 256 rows x 128,256 classes
# -> 66 + 131 MB under bf16 autocast. benchmarks/loss_cpu.py, the debug model's 1,024 rows on 2
# CPU threads, bf16 autocast: 256 rows 1.84x the plain loss's speed, 128 rows 1.68x, 512 1.76x,
# 1,024 1.57x (float32: 1.31x at 256, 1.39x at 512).
DEFAULT_CHUNK_SIZE = 256


def summed_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of logits [B, T, vocab] against targets [B, T] in float32, summed
    over the targets that are not `IGNORE_INDEX`."""
    return F.cross_entropy(
        logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """The summed next-token cross-entropy of the logits `hidden @ weight.T`, without them.

    Equal to `summed_cross_entropy(hidden @ weight.T, targets)` (up to summation order): a float32
    scalar, the sum over targets that are not `IGNORE_INDEX` (0 when all are ignored). The rows are
    processed `chunk_size` at a time; for each chunk the forward pass computes the logits, their
    log-sum-exp, the loss and the gradient of the loss with respect to the chunk's hidden states
    and to the weight (Liger's way: the backward only scales these by the incoming gradient, no
    second matmul over the vocabulary). So no [rows, vocab] tensor of the whole batch is made.

    Dtypes: the two matmuls per chunk and the two of its gradient run in the *compute dtype*:
    the autocast dtype when `torch.autocast` is on for the inputs' device (bf16 on CPU and CUDA,
    as `F.linear` would run under autocast; float64 inputs stay float64 as they do there), otherwise
    `torch.promote_types(hidden, weight)` (float32 for an exact check, float64 for a reference). The
    logits come out of the matmul in
    that dtype, then the max, exp, sum, log-sum-exp, loss and softmax are float32 (float64 for
    float64); the softmax gradient is rounded to the compute dtype for the backward matmuls, and
    the weight gradient is summed over chunks in float32. The gradients come back in the dtypes of
    `hidden` and `weight` (fp32 master weights keep fp32 gradients).

    Args:
        hidden: final (normed) hidden states [B, T, dim] or [N, dim].
        weight: the output projection [vocab, dim] as a plain tensor (`Llama.output_weight()`).
            Not for layouts where the projection is sharded or wrapped: under tensor parallelism
            (a DTensor weight, column-sharded over the vocabulary), FSDP (the weight is sharded
            outside the module's forward) or a pipeline stage (the stage applies the projection
            itself), project with the model and use `summed_cross_entropy`.
        targets: next-token ids [B, T] or [N] (the leading shape of `hidden`); `IGNORE_INDEX`
            positions take no part.
        chunk_size: rows per chunk; the chunk's buffers take chunk_size x vocab x 6 bytes under
            bf16 autocast (4 in float32), beside a float32 [vocab, dim] weight gradient and,
            under autocast, a bf16 copy of the weight and one bf16 [vocab, dim] partial product.

    The gradient is computed in the forward when `hidden` or `weight` requires grad and grad mode
    is on; the returned loss can be backpropagated once (its backward reuses those buffers).
    `LinearCrossEntropy` is the same with its buffers kept between calls (a training loop's loss).
    """
    return _linear_cross_entropy(hidden, weight, targets, chunk_size, _fresh)


class _WithKeptBuffers:
    """What `LinearCrossEntropy` and `LinearLogProbs` hold: their chunk size and kept buffers."""

    def __init__(self, chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        _check_chunk_size(chunk_size)
        self.chunk_size = chunk_size
        self._buffers = _KeptBuffers()


class LinearCrossEntropy(_WithKeptBuffers):
    """`linear_cross_entropy` that keeps its working buffers between calls, for a training loop.

    On CPU a fresh buffer of a few hundred MB costs page faults when first written and unmapping
    when freed (about 10% of the debug model's loss: 742 vs 827 ms); this object allocates the
    chunk buffers, the compute-dtype copy of the weight and the partial weight gradient once and
    reuses them while shapes and dtypes stay the same. It holds them between calls (debug model,
    bf16: 256 x 128,256 x 6 bytes + 2 x 128,256 x 256 x 2 bytes = 328 MB). The gradients it
    returns are fresh tensors, so several losses may be computed before their backward. Not for
    concurrent calls from several threads.
    """

    def __call__(
        self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        """The summed cross-entropy of `hidden @ weight.T` (see `linear_cross_entropy`)."""
        return _linear_cross_entropy(hidden, weight, targets, self.chunk_size, self._buffers)


def linear_log_probs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """log softmax(hidden @ weight.T)[target] for every row, without the [rows, vocab] logits.

    What post-training needs of the output layer: the log-probability of one chosen token per
    position (SFT's loss sums them, DPO's sums them per sequence and weighs each sequence by its
    own sigmoid). Equal to ``log_softmax(hidden @ weight.T).gather(targets)`` up to rounding; the
    result has `targets`' shape, float32 (float64 for float64 inputs), and it is differentiable with
    respect to `hidden` and `weight` for any incoming gradient.

    The rows are processed `chunk_size` at a time. The forward keeps only the inputs; the backward
    computes each chunk's logits a second time (one more [chunk, dim] x [dim, vocab] matmul) and
    from them the softmax, d logp_i / d logit_ij = [j == t_i] - softmax_ij scaled by the incoming
    gradient of row i, and that chunk's share of both gradients. Unlike `linear_cross_entropy`,
    whose scalar loss lets its gradients be computed in the forward and scaled afterwards, a
    per-row result has a gradient that depends on the caller's loss, hence the second matmul.

    Dtypes are `linear_cross_entropy`'s: matmuls in the autocast dtype when autocast is on (else
    `torch.promote_types(hidden, weight)`), softmax and log-sum-exp in float32 (float64), the
    gradient rounded to the compute dtype for the backward matmuls, and the weight gradient summed
    over chunks in float32; both gradients come back in the dtypes of `hidden` and `weight`.

    Args:
        hidden: final (normed) hidden states [B, T, dim] or [N, dim].
        weight: the output projection [vocab, dim] as a plain tensor (`Llama.output_weight()`), not
            a DTensor (project with the model in sharded layouts).
        targets: token ids [B, T] or [N], each in [0, vocab) (no `IGNORE_INDEX`: select the
            positions to score first).
        chunk_size: rows per chunk (buffers of chunk_size x vocab x 6 bytes under bf16 autocast).

    Its gradient is not itself differentiable (no double backward). `LinearLogProbs` is the same
    with its buffers kept between calls.
    """
    return _linear_log_probs(hidden, weight, targets, chunk_size, _fresh)


class LinearLogProbs(_WithKeptBuffers):
    """`linear_log_probs` that keeps its working buffers between calls, for a training loop.

    The buffers (the chunk's logits and float32 softmax, the compute-dtype copy of the weight and
    the partial weight gradient) are scratch space used during one forward or one backward, so
    several results may be computed before their backward (DPO's policy and reference passes).
    Under bf16 autocast with Llama 3's vocabulary and dim 128: 256 x 128,256 x 6 + 2 x 128,256 x
    128 x 2 bytes = 263 MB kept. Not for concurrent calls from several threads.
    """

    def __call__(
        self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        """log softmax(hidden @ weight.T)[targets] (see `linear_log_probs`)."""
        return _linear_log_probs(hidden, weight, targets, self.chunk_size, self._buffers)


# (name, shape, dtype, device) -> an uninitialised tensor of that shape: where buffers come from.
_Allocator = Callable[[str, tuple[int, ...], torch.dtype, torch.device], torch.Tensor]


def _fresh(
    name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=device)


class _KeptBuffers:
    """An `_Allocator` that keeps one buffer per name and hands it out again while it fits."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}

    def __call__(
        self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """The kept buffer `name` if it fits (same dtype, device and trailing sizes, at least as
        many rows), else a new one kept in its place; returned at exactly `shape`."""
        kept = self.tensors.get(name)
        fits = (
            kept is not None
            and kept.dtype == dtype
            and kept.device == device
            and kept.shape[1:] == shape[1:]
            and kept.shape[0] >= shape[0]
        )
        if not fits:
            self.tensors.pop(name, None)  # free the old one before allocating
            # A tensor made under torch.inference_mode cannot be written outside it: allocate a
            # normal one even there, so a kept buffer serves scoring and training alike.
            with torch.inference_mode(False):
                kept = torch.empty(shape, dtype=dtype, device=device)
            self.tensors[name] = kept
        assert kept is not None
        return kept[: shape[0]]


def _linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int,
    allocate: _Allocator,
) -> torch.Tensor:
    _check_arguments(hidden, weight, targets, chunk_size)
    hidden_2d = hidden.reshape(-1, hidden.shape[-1])  # [N, dim]
    targets_1d = targets.reshape(-1)  # [N]
    compute = _compute_dtype(hidden, weight)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        loss: torch.Tensor = _LinearCrossEntropy.apply(  # type: ignore[no-untyped-call]
            hidden_2d, weight, targets_1d, chunk_size, compute, allocate
        )
        return loss
    with torch.no_grad():
        needs = (False, False)
        return _chunked(hidden_2d, weight, targets_1d, chunk_size, compute, needs, allocate)[0]


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of hidden @ weight.T with both gradients computed in the forward."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        chunk_size: int,
        compute: torch.dtype,
        allocate: _Allocator,
    ) -> torch.Tensor:
        needs = (bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1]))
        loss, grad_hidden, grad_weight = _chunked(
            hidden, weight, targets, chunk_size, compute, needs, allocate
        )
        ctx.grads = [grad_hidden, grad_weight]
        return loss

    @staticmethod
    def backward(
        ctx: Any, grad_loss: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None, None, None]:
        if ctx.grads is None:
            raise RuntimeError(
                "linear_cross_entropy's loss was backpropagated twice; its gradients were computed "
                "in the forward and scaled in place by the first backward. Compute the loss again "
                "for a second backward."
            )
        grad_hidden, grad_weight = ctx.grads
        ctx.grads = None
        # d(sum)/d(input) scaled in place by the incoming gradient (1 / target count in training).
        if grad_hidden is not None:
            grad_hidden.mul_(grad_loss.to(grad_hidden.dtype))
        if grad_weight is not None:
            grad_weight.mul_(grad_loss.to(grad_weight.dtype))
        return grad_hidden, grad_weight, None, None, None, None


def _chunk_bounds(rows: int, chunk_size: int) -> Iterator[tuple[int, int]]:
    """(start, stop) of each chunk of `rows` rows, `chunk_size` each, the last one shorter."""
    for start in range(0, rows, chunk_size):
        yield start, min(start + chunk_size, rows)


def _chunked(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int,
    compute: torch.dtype,
    needs: tuple[bool, bool],
    allocate: _Allocator,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(summed loss, d loss / d hidden or None, d loss / d weight or None), chunk by chunk.

    hidden [N, dim], weight [vocab, dim], targets [N]; `needs` says which gradient to compute;
    `allocate` gives the working buffers (the gradients returned are always fresh tensors).
    Per chunk: loss = log-sum-exp - x_target (`_softmax_log_sum_exp`); d loss / d x = p -
    onehot(target)."""
    acc = torch.promote_types(compute, torch.float32)  # softmax and sums: float32 (or float64)
    device = hidden.device
    with torch.autocast(device.type, enabled=False):  # every dtype below is chosen explicitly
        loss = torch.zeros((), dtype=acc, device=device)
        if hidden.shape[0] == 0:
            return _finish(loss, None, None, hidden, weight, needs)
        h, w = hidden.to(compute), _weight_in(weight, compute, allocate)  # [N, dim], [vocab, dim]
        valid = targets != IGNORE_INDEX  # [N]
        safe_targets = targets.long().masked_fill(~valid, 0)  # [N], ignored rows -> class 0
        grad_h, grad_w, partial_w = _gradient_buffers(h, w, needs, allocate)
        for start, stop, logits, probs in _chunk_logits(h, w, chunk_size, allocate):
            t_c, valid_c = safe_targets[start:stop, None], valid[start:stop]
            target_logit = logits.gather(1, t_c).to(acc)  # [n, 1]
            log_sum_exp = _softmax_log_sum_exp(logits, probs)  # [n, 1]; probs = softmax
            loss = loss + torch.where(valid_c, (log_sum_exp - target_logit).squeeze(1), 0.0).sum()
            if grad_h is None and grad_w is None:
                continue
            # d loss_i / d logit_ij = softmax_ij - [j == t_i] for valid rows, 0 for ignored ones.
            probs.scatter_add_(1, t_c, -valid_c.to(acc)[:, None])
            # Ignored rows get no gradient: on CPU fill just those rows (a full masked pass costs
            # 10 ms per chunk of the debug model); elsewhere nonzero() would wait on the device.
            if device.type == "cpu":
                probs.index_fill_(0, (~valid_c).nonzero().flatten(), 0.0)
            else:
                probs.masked_fill_(~valid_c[:, None], 0.0)
            _add_chunk_gradients(
                probs, logits, h, w, start, stop, grad_h=grad_h, grad_w=grad_w, partial_w=partial_w
            )
        return _finish(loss, grad_h, grad_w, hidden, weight, needs)


def _weight_in(weight: torch.Tensor, compute: torch.dtype, allocate: _Allocator) -> torch.Tensor:
    """The weight in the compute dtype: itself, or a copy in the kept "weight" buffer."""
    if weight.dtype == compute:
        return weight
    return allocate("weight", tuple(weight.shape), compute, weight.device).copy_(weight)


def _chunk_logits(
    h: torch.Tensor, w: torch.Tensor, chunk_size: int, allocate: _Allocator
) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
    """For each chunk of the rows of h [N, dim]: (start, stop, logits, probs) with logits =
    h[start:stop] @ w.T [n, vocab] in h's and w's (compute) dtype and `probs` an uninitialised
    [n, vocab] buffer in float32 (float64), the logits themselves when the dtypes agree. Both buffers
    are reused by every chunk (on CPU a fresh [chunk, vocab] tensor costs page faults). Call with
    autocast disabled."""
    rows, vocab, device = h.shape[0], w.shape[0], h.device
    acc = torch.promote_types(h.dtype, torch.float32)
    width = min(chunk_size, rows)
    probs_buf = allocate("probs", (width, vocab), acc, device)
    logits_buf = (
        probs_buf if h.dtype == acc else allocate("logits", (width, vocab), h.dtype, device)
    )
    for start, stop in _chunk_bounds(rows, chunk_size):
        logits = torch.mm(h[start:stop], w.t(), out=logits_buf[: stop - start])  # [n, vocab]
        yield start, stop, logits, logits if h.dtype == acc else probs_buf[: stop - start]


def _softmax_log_sum_exp(logits: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Write softmax(logits) into `probs` (`_softmax_into`) and return the rows' log-sum-exp
    [n, 1] as m - log(max p), with m = max x: exact up to rounding because max p = 1 / sum
    exp(x - m) lies in [1 / vocab, 1] (no underflow)."""
    row_max = logits.amax(dim=1, keepdim=True).to(probs.dtype)  # [n, 1]
    _softmax_into(logits, probs)
    return row_max - probs.amax(dim=1, keepdim=True).log()


def _softmax_into(logits: torch.Tensor, probs: torch.Tensor) -> None:
    """probs = softmax(logits) in float32 or float64 (PyTorch's fused kernel, in place). `probs`
    may be `logits` itself (float32 compute): read what you need of the logits before."""
    if probs is not logits:
        probs.copy_(logits)  # float32 copy of this chunk only
    torch.softmax(probs, dim=1, out=probs)


def _gradient_buffers(
    h: torch.Tensor, w: torch.Tensor, needs: tuple[bool, bool], allocate: _Allocator
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(grad h [N, dim] in the compute dtype, grad w [vocab, dim] in float32 (float64), the kept
    compute-dtype partial weight gradient when that differs), each None when not needed."""
    acc = torch.promote_types(h.dtype, torch.float32)
    grad_h = torch.empty_like(h) if needs[0] else None
    grad_w = torch.empty(w.shape, dtype=acc, device=w.device) if needs[1] else None
    partial_w = None
    if grad_w is not None and h.dtype != acc:
        partial_w = allocate("partial_weight_grad", tuple(w.shape), h.dtype, w.device)
    return grad_h, grad_w, partial_w


def _add_chunk_gradients(
    grad_logits: torch.Tensor,
    logits: torch.Tensor,
    h: torch.Tensor,
    w: torch.Tensor,
    start: int,
    stop: int,
    *,
    grad_h: torch.Tensor | None,
    grad_w: torch.Tensor | None,
    partial_w: torch.Tensor | None,
) -> None:
    """Given a chunk's d/d logits [n, vocab] (float32 or float64), write its rows of grad_h and
    add its share of grad_w (the first chunk sets it). The gradient is rounded to the compute
    dtype into the logits' buffer for the matmuls; a bf16 weight gradient is summed in float32."""
    grad = grad_logits if logits is grad_logits else logits.copy_(grad_logits)  # compute dtype
    if grad_h is not None:
        torch.mm(grad, w, out=grad_h[start:stop])  # [n, dim]
    if grad_w is None:
        return
    h_c, first = h[start:stop], start == 0
    if partial_w is None:  # float32 or float64: accumulate in the matmul
        if first:
            torch.mm(grad.t(), h_c, out=grad_w)  # [vocab, dim]
        else:
            grad_w.addmm_(grad.t(), h_c)
    else:  # bf16 matmul, summed over chunks in float32
        torch.mm(grad.t(), h_c, out=partial_w)  # [vocab, dim], compute dtype
        _accumulate(grad_w, partial_w, first=first)


# Rows per block when adding a compute-dtype partial weight gradient into the float32 sum: a
# float32 copy of 2^21 elements (8 MB) at a time. One mixed-dtype `add_` over the whole [vocab, dim]
# is about 4x slower on CPU (measured: 46 vs 10 ms for 128,256 x 256).
_ACCUMULATE_ELEMENTS = 2**21


def _accumulate(total: torch.Tensor, partial: torch.Tensor, *, first: bool) -> None:
    """total (float32) = partial (first chunk) or total + partial, a block of rows at a time."""
    if first:
        total.copy_(partial)
        return
    rows = max(1, _ACCUMULATE_ELEMENTS // max(1, partial.shape[1]))
    for start in range(0, partial.shape[0], rows):
        total[start : start + rows].add_(partial[start : start + rows].to(total.dtype))


def _finish(
    loss: torch.Tensor,
    grad_h: torch.Tensor | None,
    grad_w: torch.Tensor | None,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    needs: tuple[bool, bool],
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The float32 loss and the gradients in the inputs' dtypes (zeros for an empty batch)."""
    if needs[0] and grad_h is None:
        grad_h = torch.zeros_like(hidden)
    if needs[1] and grad_w is None:
        grad_w = torch.zeros_like(weight)
    return (
        loss.float() if loss.dtype != torch.float64 else loss,
        None if grad_h is None else grad_h.to(hidden.dtype),
        None if grad_w is None else grad_w.to(weight.dtype),
    )


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The matmul dtype: autocast's when it is on for the inputs' device, else the promoted one;
    float64 inputs stay float64 (autocast leaves float64 matmuls alone too)."""
    promoted = torch.promote_types(hidden.dtype, weight.dtype)
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type) and promoted != torch.float64:
        return torch.get_autocast_dtype(device_type)
    return promoted


def _linear_log_probs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int,
    allocate: _Allocator,
) -> torch.Tensor:
    _check_arguments(hidden, weight, targets, chunk_size, ignore_allowed=False)
    hidden_2d = hidden.reshape(-1, hidden.shape[-1])  # [N, dim]
    targets_1d = targets.reshape(-1).long()  # [N]
    compute = _compute_dtype(hidden, weight)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        logps: torch.Tensor = _LinearLogProbs.apply(  # type: ignore[no-untyped-call]
            hidden_2d, weight, targets_1d, chunk_size, compute, allocate
        )
    else:
        with torch.no_grad():
            logps = _log_probs_forward(hidden_2d, weight, targets_1d, chunk_size, compute, allocate)
    return logps.reshape(targets.shape)


class _LinearLogProbs(torch.autograd.Function):
    """log softmax(hidden @ weight.T)[targets] [N]; the backward recomputes the logits a chunk at a
    time."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        chunk_size: int,
        compute: torch.dtype,
        allocate: _Allocator,
    ) -> torch.Tensor:
        ctx.save_for_backward(hidden, weight, targets)
        ctx.chunk_size, ctx.compute, ctx.allocate = chunk_size, compute, allocate
        return _log_probs_forward(hidden, weight, targets, chunk_size, compute, allocate)

    @staticmethod
    @once_differentiable
    def backward(
        ctx: Any, grad_logps: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None, None, None]:
        hidden, weight, targets = ctx.saved_tensors
        needs = (bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1]))
        grad_h, grad_w = _log_probs_backward(
            hidden, weight, targets, grad_logps, ctx.chunk_size, ctx.compute, needs, ctx.allocate
        )
        return grad_h, grad_w, None, None, None, None


def _log_probs_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int,
    compute: torch.dtype,
    allocate: _Allocator,
) -> torch.Tensor:
    """log p(targets) [N] (float32, or float64): per chunk, logit_target - log-sum-exp."""
    acc = torch.promote_types(compute, torch.float32)
    logps = torch.empty(hidden.shape[0], dtype=acc, device=hidden.device)
    if hidden.shape[0] == 0:
        return logps
    with torch.autocast(hidden.device.type, enabled=False):
        h, w = hidden.to(compute), _weight_in(weight, compute, allocate)
        for start, stop, logits, probs in _chunk_logits(h, w, chunk_size, allocate):
            target_logit = logits.gather(1, targets[start:stop, None]).to(acc)  # [n, 1]
            logps[start:stop] = (target_logit - _softmax_log_sum_exp(logits, probs)).squeeze(1)
    return logps


def _log_probs_backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    grad_logps: torch.Tensor,
    chunk_size: int,
    compute: torch.dtype,
    needs: tuple[bool, bool],
    allocate: _Allocator,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(d/d hidden, d/d weight) of sum_i g_i log p_i(t_i), recomputing the logits chunk by chunk:
    d / d logit_ij = g_i ([j == t_i] - softmax_ij)."""
    acc = torch.promote_types(compute, torch.float32)
    if hidden.shape[0] == 0:
        return (
            torch.zeros_like(hidden) if needs[0] else None,
            torch.zeros_like(weight) if needs[1] else None,
        )
    with torch.autocast(hidden.device.type, enabled=False):
        h, w = hidden.to(compute), _weight_in(weight, compute, allocate)
        grad_h, grad_w, partial_w = _gradient_buffers(h, w, needs, allocate)
        g = grad_logps.to(acc)[:, None]  # [N, 1]
        for start, stop, logits, probs in _chunk_logits(h, w, chunk_size, allocate):
            _softmax_into(logits, probs)
            probs.mul_(g[start:stop].neg())
            probs.scatter_add_(1, targets[start:stop, None], g[start:stop])
            _add_chunk_gradients(
                probs, logits, h, w, start, stop, grad_h=grad_h, grad_w=grad_w, partial_w=partial_w
            )
    return (
        None if grad_h is None else grad_h.to(hidden.dtype),
        None if grad_w is None else grad_w.to(weight.dtype),
    )


def _check_chunk_size(chunk_size: int) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of rows; got {chunk_size!r}")


def _check_arguments(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int,
    *,
    ignore_allowed: bool = True,
) -> None:
    caller, instead = (
        ("linear_cross_entropy", "summed_cross_entropy")
        if ignore_allowed
        else ("linear_log_probs", "a log-softmax of them")
    )
    if isinstance(weight, DTensor) or isinstance(hidden, DTensor):
        raise TypeError(
            f"{caller} needs a plain (unsharded) output weight and hidden states; got a DTensor "
            "(tensor parallelism or FSDP). Project with the model (`model.logits(h)`) and use "
            f"{instead} in that layout."
        )
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden must be [B, T, dim] or [N, dim]; got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight must be [vocab, dim] with dim = hidden's last size {hidden.shape[-1]}; "
            f"got shape {tuple(weight.shape)}"
        )
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"targets must have hidden's leading shape {tuple(hidden.shape[:-1])}; "
            f"got {tuple(targets.shape)}"
        )
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"targets must be int64 (or int32) token ids; got {targets.dtype}")
    if not (hidden.is_floating_point() and weight.is_floating_point()):
        raise TypeError(
            f"hidden and weight must be floating point; got {hidden.dtype} and {weight.dtype}"
        )
    if hidden.device != weight.device or hidden.device != targets.device:
        raise ValueError(
            f"hidden, weight and targets must share a device; got {hidden.device}, "
            f"{weight.device}, {targets.device}"
        )
    _check_chunk_size(chunk_size)
    if targets.device.type != "cpu":  # reading values would make a GPU step wait on the host
        return
    out_of_range = (targets < 0) | (targets >= weight.shape[0])
    if ignore_allowed:
        out_of_range &= targets != IGNORE_INDEX
    if bool(out_of_range.any()):
        bad = int(targets[out_of_range].flatten()[0])
        allowed = f" and not IGNORE_INDEX ({IGNORE_INDEX})" if ignore_allowed else ""
        raise ValueError(
            f"targets hold id {bad}, outside the vocabulary [0, {weight.shape[0]}){allowed}"
        )
