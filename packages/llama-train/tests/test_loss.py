"""Tests for llama_train.loss: the chunked `linear_cross_entropy` and `linear_log_probs` against
the plain loss and log-softmax.

The oracle is `summed_cross_entropy` of the materialised logits `hidden @ weight.T` (PyTorch's
`F.cross_entropy`, differentiated by autograd), and for float64 a log-softmax written out here.
Shapes are odd on purpose (37 rows, chunks of 8: the last chunk has 5 rows; 101 classes).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import _common  # tests/distributed/_common.py, on sys.path via conftest
import pytest
import torch

import llama_train.loss as loss_module
from llama_model import Documents
from llama_train.data import IGNORE_INDEX
from llama_train.loss import (
    LinearCrossEntropy,
    LinearLogProbs,
    linear_cross_entropy,
    linear_log_probs,
    summed_cross_entropy,
)

ROWS, VOCAB, DIM = 37, 101, 16

# float32: both sides add the same float32 terms in a different order (per chunk, then across
# chunks), so they may differ by a few units in the last place of the sums: relative 1e-5 is
# ~80 ulp (2^-23 each), far above that and far below any real mistake (one row's loss is ~5 of ~150).
F32_RTOL, F32_ATOL = 1e-5, 1e-6


def _inputs(
    rows: int = ROWS, *, seed: int = 0, ignored: float = 0.25, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden [rows, DIM], weight [VOCAB, DIM] (leaves requiring grad) and targets [rows] with
    about `ignored` of them IGNORE_INDEX (at least one kept and one ignored when 0 < ignored < 1)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, DIM, generator=g, dtype=dtype)
    weight = torch.randn(VOCAB, DIM, generator=g, dtype=dtype) * 0.5
    targets = torch.randint(0, VOCAB, (rows,), generator=g)
    mask = torch.rand(rows, generator=g) < ignored
    if 0 < ignored < 1 and rows >= 2:
        mask[0], mask[1] = True, False
    targets[mask] = IGNORE_INDEX
    return hidden.requires_grad_(), weight.requires_grad_(), targets


def _with_grads(
    fn: object, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, **kw: object
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, d loss/d hidden, d loss/d weight) of `fn`, on fresh copies of the leaves."""
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    loss = fn(h, w, targets, **kw)  # type: ignore[operator]
    loss.backward()
    assert h.grad is not None and w.grad is not None
    return loss.detach(), h.grad, w.grad


def _plain(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The oracle: materialised logits (under autocast when it is on), then F.cross_entropy."""
    logits = hidden @ weight.T  # [N, vocab]
    return summed_cross_entropy(logits[None], targets[None])


def _close(
    ours: tuple[torch.Tensor, ...], ref: tuple[torch.Tensor, ...], *, rtol: float, atol: float
) -> None:
    """assert_close on (loss, grad hidden, grad weight), naming the one that differs."""
    for name, a, b in zip(("loss", "grad hidden", "grad weight"), ours, ref, strict=True):
        try:
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
        except AssertionError as error:
            raise AssertionError(f"{name}: {error}") from None


@pytest.mark.parametrize("chunk_size", [1, 5, 8, 36, 37, 64])
def test_float32_loss_and_gradients_match_plain_cross_entropy(chunk_size: int) -> None:
    """float32, ignored targets present, rows not a multiple of the chunk: same loss and grads."""
    hidden, weight, targets = _inputs()
    ours = _with_grads(linear_cross_entropy, hidden, weight, targets, chunk_size=chunk_size)
    _close(ours, _with_grads(_plain, hidden, weight, targets), rtol=F32_RTOL, atol=F32_ATOL)


def test_float64_matches_a_written_out_log_softmax() -> None:
    """float64 inputs compute in float64: equal to sum(logsumexp - target logit) to 1e-12."""
    hidden, weight, targets = _inputs(dtype=torch.float64)

    def oracle(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        logits = h @ w.T  # [N, vocab], float64
        keep = t != IGNORE_INDEX
        rows = logits[keep]
        lse = rows.max(1).values + (rows - rows.max(1, keepdim=True).values).exp().sum(1).log()
        return (lse - rows.gather(1, t[keep][:, None]).squeeze(1)).sum()

    ours = _with_grads(linear_cross_entropy, hidden, weight, targets, chunk_size=8)
    assert ours[0].dtype == torch.float64
    _close(ours, _with_grads(oracle, hidden, weight, targets), rtol=1e-12, atol=1e-12)


def test_batch_by_time_shape_equals_flat_rows() -> None:
    """hidden [B, T, dim] with targets [B, T] gives the [N, dim] result and [B, T, dim] grads."""
    hidden, weight, targets = _inputs(rows=36)
    flat = _with_grads(linear_cross_entropy, hidden, weight, targets, chunk_size=7)
    shaped = _with_grads(
        linear_cross_entropy, hidden.reshape(4, 9, DIM), weight, targets.reshape(4, 9),
        chunk_size=7,
    )  # fmt: skip
    assert shaped[1].shape == (4, 9, DIM)
    _close((shaped[0], shaped[1].reshape(36, DIM), shaped[2]), flat, rtol=0.0, atol=0.0)


def test_bf16_autocast_matches_plain_autocast_loss() -> None:
    """Under CPU bf16 autocast: float32 loss and grads, close to the autocast oracle's."""
    hidden, weight, targets = _inputs(rows=300, seed=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = _with_grads(linear_cross_entropy, hidden, weight, targets, chunk_size=64)
        ref = _with_grads(_plain, hidden, weight, targets)
    assert all(t.dtype == torch.float32 for t in ours)  # fp32 master weights keep fp32 grads
    # The loss: both sides take the same bf16 logits and reduce them in float32.
    torch.testing.assert_close(ours[0], ref[0], rtol=F32_RTOL, atol=F32_ATOL)
    # The gradients: bf16 keeps 8 significant bits (unit roundoff 2^-9). Both sides round the
    # softmax gradient to bf16 for the backward matmuls, but the oracle's weight gradient is one
    # bf16 matmul result while ours sums per-chunk bf16 results in float32, so entries may differ
    # by a few bf16 ulps of the largest entry: 2^-6 of the largest (8 ulps) is allowed.
    for a, b in zip(ours[1:], ref[1:], strict=True):
        torch.testing.assert_close(a, b, rtol=2**-6, atol=2**-6 * float(b.abs().max()))


def test_bf16_autocast_runs_the_matmuls_in_bf16() -> None:
    """Autocast is honoured: the loss differs from float32's as bf16 logits do (not a no-op)."""
    hidden, weight, targets = _inputs(rows=300, seed=1)
    with torch.no_grad():
        exact = linear_cross_entropy(hidden, weight, targets)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = linear_cross_entropy(hidden, weight, targets)
            oracle = _plain(hidden, weight, targets)
    assert abs(float(bf16 - exact)) > 1e-4 * abs(float(exact))
    torch.testing.assert_close(bf16, oracle, rtol=F32_RTOL, atol=F32_ATOL)


def test_all_targets_ignored_gives_zero_loss_and_zero_finite_grads() -> None:
    """A batch with every target ignored: loss 0, gradients exactly 0 (no NaN from 0/0)."""
    hidden, weight, targets = _inputs(ignored=1.0)
    assert bool((targets == IGNORE_INDEX).all())
    loss, grad_h, grad_w = _with_grads(linear_cross_entropy, hidden, weight, targets)
    assert float(loss) == 0.0
    assert bool((grad_h == 0).all()) and bool((grad_w == 0).all())


def test_the_ignore_mask_is_what_makes_the_match() -> None:
    """Negative control: the oracle without the ignore mask (ignored -> class 0) fails the match."""
    hidden, weight, targets = _inputs()
    ours = _with_grads(linear_cross_entropy, hidden, weight, targets, chunk_size=8)
    unmasked = targets.masked_fill(targets == IGNORE_INDEX, 0)
    with pytest.raises(AssertionError):
        _close(ours, _with_grads(_plain, hidden, weight, unmasked), rtol=F32_RTOL, atol=F32_ATOL)


def test_a_wrong_chunk_boundary_fails_the_match(monkeypatch: pytest.MonkeyPatch) -> None:
    """Negative control: chunks that skip the last row of each chunk fail the comparison."""

    def short_chunks(rows: int, chunk_size: int) -> Iterator[tuple[int, int]]:
        for start in range(0, rows, chunk_size):
            yield start, min(start + chunk_size, rows) - 1

    hidden, weight, targets = _inputs()
    ref = _with_grads(_plain, hidden, weight, targets)
    monkeypatch.setattr(loss_module, "_chunk_bounds", short_chunks)
    with pytest.raises(AssertionError):
        _close(
            _with_grads(linear_cross_entropy, hidden, weight, targets, chunk_size=8),
            ref,
            rtol=F32_RTOL,
            atol=F32_ATOL,
        )


def test_without_grad_mode_only_the_loss_is_computed() -> None:
    """Under no_grad the same loss comes back, with no graph attached."""
    hidden, weight, targets = _inputs()
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, targets, chunk_size=8)
    assert loss.grad_fn is None
    torch.testing.assert_close(
        loss, _plain(hidden, weight, targets).detach(), rtol=F32_RTOL, atol=F32_ATOL
    )


def test_frozen_weight_gets_no_gradient() -> None:
    """Only hidden requires grad: hidden's gradient is the oracle's, the weight gets none."""
    hidden, weight, targets = _inputs()
    frozen = weight.detach()
    h = hidden.detach().clone().requires_grad_()
    linear_cross_entropy(h, frozen, targets, chunk_size=8).backward()  # type: ignore[no-untyped-call]
    ref = _with_grads(_plain, hidden, weight, targets)[1]
    assert frozen.grad is None and h.grad is not None
    torch.testing.assert_close(h.grad, ref, rtol=F32_RTOL, atol=F32_ATOL)


def test_the_gradient_is_scaled_by_the_incoming_gradient() -> None:
    """loss / count (the trainer's mean) backpropagates 1 / count times the summed gradient."""
    hidden, weight, targets = _inputs()

    def mean(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return linear_cross_entropy(h, w, t, chunk_size=8) / 7.0

    def plain_mean(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return _plain(h, w, t) / 7.0

    _close(
        _with_grads(mean, hidden, weight, targets),
        _with_grads(plain_mean, hidden, weight, targets),
        rtol=F32_RTOL,
        atol=F32_ATOL,
    )


def test_a_second_backward_is_refused() -> None:
    """The gradients live in the forward's buffers: backpropagating twice is an error, not a 2x."""
    hidden, weight, targets = _inputs()
    loss = linear_cross_entropy(hidden, weight, targets)
    loss.backward(retain_graph=True)  # type: ignore[no-untyped-call]
    with pytest.raises(RuntimeError, match="backpropagated twice"):
        loss.backward()  # type: ignore[no-untyped-call]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("target", "outside the vocabulary"),
        ("shape", "leading shape"),
        ("weight", r"\[vocab, dim\]"),
        ("chunk", "chunk_size"),
    ],
)
def test_bad_arguments_are_named(change: str, message: str) -> None:
    """Wrong inputs raise an error that names the offending value."""
    hidden, weight, targets = _inputs()
    chunk_size = 8
    if change == "target":
        targets = targets.clone()
        targets[3] = VOCAB
    elif change == "shape":
        targets = targets[:-1]
    elif change == "weight":
        weight = weight[:, :-1]
    else:
        chunk_size = 0
    with pytest.raises(ValueError, match=message):
        linear_cross_entropy(hidden, weight, targets, chunk_size=chunk_size)


@pytest.mark.parametrize("tied", [False, True])
def test_model_parameter_gradients_match_the_logits_path(tied: bool) -> None:
    """On a tiny Llama with packed documents, hidden_states + linear_cross_entropy against
    output_weight() gives the loss and every parameter gradient of model(...) + the plain loss
    (tied: the output weight is the embedding table, used twice)."""
    config = _common.tiny_config(tie_word_embeddings=tied)
    model = _common.tiny_model(config)
    batch = _common.tiny_batch(config)
    attention = Documents(batch.document_ids)

    def summed(fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if fused:
            hidden = model.hidden_states(batch.tokens, attention=attention)
            loss = linear_cross_entropy(hidden, model.output_weight(), batch.targets, chunk_size=24)
        else:
            loss = summed_cross_entropy(model(batch.tokens, attention=attention), batch.targets)
        return loss, loss

    loss, fused = _parameter_grads(model, lambda: summed(True))
    ref_loss, ref = _parameter_grads(model, lambda: summed(False))
    torch.testing.assert_close(loss, ref_loss, rtol=F32_RTOL, atol=F32_ATOL)
    _assert_parameter_grads_close(fused, ref)


def _parameter_grads(
    model: torch.nn.Module, compute: Callable[[], tuple[torch.Tensor, torch.Tensor]]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`compute()` gives (a value to compare, a scalar to backpropagate): the value, detached, and
    every parameter's gradient of the scalar."""
    model.zero_grad(set_to_none=True)
    value, scalar = compute()
    scalar.backward()  # type: ignore[no-untyped-call]
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return value.detach(), grads


def _assert_parameter_grads_close(
    ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]
) -> None:
    """The same parameters have gradients, each equal to the reference's. Backpropagated through 4
    layers, both float32 paths differ from a float64 run by up to ~1e-6 of a gradient's largest
    entry (measured: 9e-6 and 6e-6 on the embedding's, max 11.9), so entries are compared to 1e-5
    of that (rtol 1e-5 as above)."""
    assert ours.keys() == ref.keys()
    for name, grad in ref.items():
        atol = 1e-5 * float(grad.abs().max())
        torch.testing.assert_close(ours[name], grad, rtol=F32_RTOL, atol=atol, msg=name)


def test_kept_buffers_give_the_functional_result_call_after_call() -> None:
    """LinearCrossEntropy reuses its buffers: two losses of different row counts, both computed
    before either backward, equal linear_cross_entropy's (float32 and bf16 autocast), and the
    second call reuses the first call's buffers."""
    loss_fn = LinearCrossEntropy(chunk_size=8)
    first, second, third = (_inputs(rows=37, seed=3), _inputs(rows=20, seed=4),
                            _inputs(rows=30, seed=5))  # fmt: skip
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            expected = [
                _with_grads(linear_cross_entropy, *x, chunk_size=8) for x in (first, second)
            ]
            leaves = [(h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_(), t)
                      for h, w, t in (first, second)]  # fmt: skip
            losses = [loss_fn(h, w, t) for h, w, t in leaves]
            pointers = {name: b.data_ptr() for name, b in loss_fn._buffers.tensors.items()}
            loss_fn(*third)  # a third call, after both: the same buffers again
            assert {name: b.data_ptr() for name, b in loss_fn._buffers.tensors.items()} == pointers
        for loss, (h, w, _), want in zip(losses, leaves, expected, strict=True):
            loss.backward()  # type: ignore[no-untyped-call]
            assert h.grad is not None and w.grad is not None
            _close((loss.detach(), h.grad, w.grad), want, rtol=0.0, atol=0.0)


# ---- linear_log_probs: log softmax(hidden @ weight.T)[target] per row ----


def _plain_log_probs(hidden: torch.Tensor, weight: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The oracle: materialised logits (under autocast when it is on), float32 log_softmax."""
    logits = hidden @ weight.T  # [..., vocab]
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, t[..., None]).squeeze(-1)


def _log_prob_grads(
    fn: object,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    upstream: torch.Tensor,
    **kw: object,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log-probs, d/d hidden, d/d weight) of sum(upstream * fn(...)): a different incoming
    gradient per row, as DPO's per-sequence weights give, on fresh copies of the leaves."""
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    logps = fn(h, w, targets, **kw)  # type: ignore[operator]
    (logps * upstream).sum().backward()
    assert h.grad is not None and w.grad is not None
    return logps.detach(), h.grad, w.grad


def _log_prob_inputs(
    rows: int = ROWS, *, seed: int = 0, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden, weight, targets (none ignored) and an upstream gradient [rows] of both signs."""
    hidden, weight, targets = _inputs(rows, seed=seed, ignored=0.0, dtype=dtype)
    upstream = torch.randn(rows, generator=torch.Generator().manual_seed(seed + 100), dtype=dtype)
    return hidden, weight, targets, upstream


@pytest.mark.parametrize("chunk_size", [1, 5, 8, 36, 37, 64])
def test_log_probs_and_gradients_match_log_softmax(chunk_size: int) -> None:
    """float32, rows not a multiple of the chunk, a different upstream gradient per row: the same
    log-probs and gradients as log_softmax of the materialised logits."""
    hidden, weight, targets, upstream = _log_prob_inputs()
    ours = _log_prob_grads(
        linear_log_probs, hidden, weight, targets, upstream, chunk_size=chunk_size
    )
    ref = _log_prob_grads(_plain_log_probs, hidden, weight, targets, upstream)
    assert ours[0].dtype == torch.float32 and ours[0].shape == (ROWS,)
    _close(ours, ref, rtol=F32_RTOL, atol=F32_ATOL)


def test_log_probs_float64_match_a_written_out_log_softmax() -> None:
    """float64 inputs compute in float64: equal to target logit - logsumexp to 1e-12."""
    hidden, weight, targets, upstream = _log_prob_inputs(dtype=torch.float64)

    def oracle(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        logits = h @ w.T  # [N, vocab], float64
        top = logits.max(1, keepdim=True).values
        lse = top.squeeze(1) + (logits - top).exp().sum(1).log()
        return logits.gather(1, t[:, None]).squeeze(1) - lse

    ours = _log_prob_grads(linear_log_probs, hidden, weight, targets, upstream, chunk_size=8)
    assert ours[0].dtype == torch.float64
    ref = _log_prob_grads(oracle, hidden, weight, targets, upstream)
    _close(ours, ref, rtol=1e-12, atol=1e-12)


def test_log_probs_keep_the_targets_shape() -> None:
    """hidden [B, T, dim] with targets [B, T]: log-probs [B, T], equal to the flat rows'."""
    hidden, weight, targets, upstream = _log_prob_inputs(rows=36)
    flat = _log_prob_grads(linear_log_probs, hidden, weight, targets, upstream, chunk_size=7)
    shaped = _log_prob_grads(
        linear_log_probs, hidden.reshape(4, 9, DIM), weight, targets.reshape(4, 9),
        upstream.reshape(4, 9), chunk_size=7,
    )  # fmt: skip
    assert shaped[0].shape == (4, 9) and shaped[1].shape == (4, 9, DIM)
    _close((shaped[0].flatten(), shaped[1].reshape(36, DIM), shaped[2]), flat, rtol=0, atol=0)


def test_log_probs_under_bf16_autocast_match_the_autocast_oracle() -> None:
    """Under CPU bf16 autocast the matmuls run in bf16 (the log-probs move away from float32's)
    and match the autocast oracle's; float32 results and gradients."""
    hidden, weight, targets, upstream = _log_prob_inputs(rows=300, seed=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = _log_prob_grads(linear_log_probs, hidden, weight, targets, upstream, chunk_size=64)
        ref = _log_prob_grads(_plain_log_probs, hidden, weight, targets, upstream)
    exact = _log_prob_grads(_plain_log_probs, hidden, weight, targets, upstream)[0]
    assert all(t.dtype == torch.float32 for t in ours)
    assert float((ours[0] - exact).abs().max()) > 1e-3  # bf16 logits, not float32 ones
    torch.testing.assert_close(ours[0], ref[0], rtol=F32_RTOL, atol=F32_ATOL)
    # Gradients: as in test_bf16_autocast_matches_plain_autocast_loss (bf16 matmuls on both sides,
    # ours summed over chunks in float32): a few bf16 ulps of the largest entry.
    for a, b in zip(ours[1:], ref[1:], strict=True):
        torch.testing.assert_close(a, b, rtol=2**-6, atol=2**-6 * float(b.abs().max()))


def test_log_probs_without_grad_mode_have_no_graph() -> None:
    """Under no_grad (a frozen reference model) the same values come back with no graph."""
    hidden, weight, targets, _ = _log_prob_inputs()
    with torch.no_grad():
        logps = linear_log_probs(hidden, weight, targets, chunk_size=8)
        ref = _plain_log_probs(hidden, weight, targets)
    assert logps.grad_fn is None
    torch.testing.assert_close(logps, ref, rtol=F32_RTOL, atol=F32_ATOL)


def test_log_probs_give_a_frozen_weight_no_gradient() -> None:
    """Only hidden requires grad (a frozen output layer under LoRA): hidden's gradient is the
    oracle's and the weight gets none."""
    hidden, weight, targets, upstream = _log_prob_inputs()
    frozen = weight.detach()
    h = hidden.detach().clone().requires_grad_()
    (linear_log_probs(h, frozen, targets, chunk_size=8) * upstream).sum().backward()
    ref = _log_prob_grads(_plain_log_probs, hidden, weight, targets, upstream)[1]
    assert frozen.grad is None and h.grad is not None
    torch.testing.assert_close(h.grad, ref, rtol=F32_RTOL, atol=F32_ATOL)


def test_log_probs_of_no_rows_are_empty_with_zero_gradients() -> None:
    """Zero rows (a batch with nothing to score): an empty result and zero gradients."""
    hidden, weight, targets, upstream = _log_prob_inputs(rows=0)
    logps, grad_h, grad_w = _log_prob_grads(linear_log_probs, hidden, weight, targets, upstream)
    assert logps.shape == (0,) and grad_h.shape == (0, DIM)
    assert bool((grad_w == 0).all())


def test_log_probs_with_a_wrong_chunk_boundary_fail_the_match(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Negative control: chunks that skip the last row of each chunk fail the comparison."""

    def short_chunks(rows: int, chunk_size: int) -> Iterator[tuple[int, int]]:
        for start in range(0, rows, chunk_size):
            yield start, min(start + chunk_size, rows) - 1

    hidden, weight, targets, upstream = _log_prob_inputs()
    ref = _log_prob_grads(_plain_log_probs, hidden, weight, targets, upstream)
    monkeypatch.setattr(loss_module, "_chunk_bounds", short_chunks)
    ours = _log_prob_grads(linear_log_probs, hidden, weight, targets, upstream, chunk_size=8)
    with pytest.raises(AssertionError):
        _close(ours, ref, rtol=F32_RTOL, atol=F32_ATOL)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("ignored", r"outside the vocabulary \[0, 101\)$"),
        ("target", "outside the vocabulary"),
        ("shape", "leading shape"),
        ("chunk", "chunk_size"),
    ],
)
def test_log_probs_name_bad_arguments(change: str, message: str) -> None:
    """Wrong inputs raise an error naming the value; IGNORE_INDEX is not a target here."""
    hidden, weight, targets, _ = _log_prob_inputs()
    chunk_size = 8
    if change in ("ignored", "target"):
        targets = targets.clone()
        targets[3] = IGNORE_INDEX if change == "ignored" else VOCAB
    elif change == "shape":
        targets = targets[:-1]
    else:
        chunk_size = 0
    with pytest.raises(ValueError, match=message):
        linear_log_probs(hidden, weight, targets, chunk_size=chunk_size)


def test_log_probs_refuse_a_double_backward() -> None:
    """The gradient is computed without a graph: asking for its gradient is an error."""
    hidden, weight, targets, upstream = _log_prob_inputs()
    h, u = hidden.detach().clone().requires_grad_(), upstream.requires_grad_()
    logps = linear_log_probs(h, weight.detach(), targets)
    (grad,) = torch.autograd.grad((logps * u).sum(), h, create_graph=True)  # depends on u
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad.sum().backward()


@pytest.mark.parametrize("tied", [False, True])
def test_log_probs_model_gradients_match_the_logits_path(tied: bool) -> None:
    """On a tiny Llama: hidden_states + linear_log_probs against output_weight() gives the
    log-probs and every parameter gradient of log_softmax(model(...)) (tied: the output weight is
    the embedding table, used twice)."""
    config = _common.tiny_config(tie_word_embeddings=tied)
    model = _common.tiny_model(config)
    batch = _common.tiny_batch(config)
    targets = batch.targets.clamp(min=0)
    upstream = torch.randn(targets.shape, generator=torch.Generator().manual_seed(5))

    def log_probs(fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if fused:
            hidden = model.hidden_states(batch.tokens)
            logps = linear_log_probs(hidden, model.output_weight(), targets, chunk_size=24)
        else:
            logits = model(batch.tokens)
            logps = torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)
        return logps, (logps * upstream).sum()

    logps, fused = _parameter_grads(model, lambda: log_probs(True))
    ref_logps, ref = _parameter_grads(model, lambda: log_probs(False))
    torch.testing.assert_close(logps, ref_logps, rtol=F32_RTOL, atol=F32_ATOL)
    _assert_parameter_grads_close(fused, ref)


def test_kept_log_prob_buffers_serve_two_results_before_either_backward() -> None:
    """LinearLogProbs: a policy pass and a second pass of another row count, both computed before
    either backward (DPO's pattern), equal linear_log_probs' (float32 and bf16 autocast), and a
    third call reuses the same buffers."""
    log_probs = LinearLogProbs(chunk_size=8)
    first, second = _log_prob_inputs(rows=37, seed=3), _log_prob_inputs(rows=20, seed=4)
    third = _log_prob_inputs(rows=30, seed=5)[:3]
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            expected = [
                _log_prob_grads(linear_log_probs, *x, chunk_size=8) for x in (first, second)
            ]
            leaves = [(h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_(), t)
                      for h, w, t, _ in (first, second)]  # fmt: skip
            results = [log_probs(h, w, t) for h, w, t in leaves]
            pointers = {name: b.data_ptr() for name, b in log_probs._buffers.tensors.items()}
            log_probs(*third)  # between the forwards and their backwards: scratch space only
            assert {n: b.data_ptr() for n, b in log_probs._buffers.tensors.items()} == pointers
        for logps, (h, w, _), (*_, upstream), want in zip(
            results, leaves, (first, second), expected, strict=True
        ):
            (logps * upstream).sum().backward()
            assert h.grad is not None and w.grad is not None
            _close((logps.detach(), h.grad, w.grad), want, rtol=0.0, atol=0.0)


def test_kept_buffers_made_under_inference_mode_serve_training_later() -> None:
    """A first call under torch.inference_mode (scoring) allocates the buffers; a later training
    call writes into them outside inference mode and gets the functional result."""
    hidden, weight, targets, upstream = _log_prob_inputs()
    log_probs, loss_fn = LinearLogProbs(chunk_size=8), LinearCrossEntropy(chunk_size=8)
    with torch.inference_mode():
        log_probs(hidden, weight, targets)
        loss_fn(hidden, weight, targets)
    want = _log_prob_grads(linear_log_probs, hidden, weight, targets, upstream, chunk_size=8)
    _close(_log_prob_grads(log_probs, hidden, weight, targets, upstream), want, rtol=0, atol=0)
    want = _with_grads(linear_cross_entropy, hidden, weight, targets, chunk_size=8)
    _close(_with_grads(loss_fn, hidden, weight, targets), want, rtol=0, atol=0)


@pytest.mark.parametrize("case", ["weight only", "bf16 parameters", "int32 targets"])
def test_log_prob_gradients_follow_the_inputs(case: str) -> None:
    """Only the inputs that require grad get one, in their own dtype: the weight alone (hidden
    frozen); bf16 hidden and weight without autocast (bf16 matmuls, bf16 gradients, float32
    log-probs); int32 target ids (the same as int64)."""
    hidden, weight, targets, upstream = _log_prob_inputs()
    if case == "int32 targets":
        ours = _log_prob_grads(linear_log_probs, hidden, weight, targets.int(), upstream)
        _close(ours, _log_prob_grads(linear_log_probs, hidden, weight, targets, upstream),
               rtol=0, atol=0)  # fmt: skip
        return
    if case == "bf16 parameters":
        hidden, weight = hidden.detach().bfloat16(), weight.detach().bfloat16()
        ours = _log_prob_grads(linear_log_probs, hidden, weight, targets, upstream)
        ref = _log_prob_grads(_plain_log_probs, hidden, weight, targets, upstream)
        assert ours[0].dtype == torch.float32
        assert ours[1].dtype == ours[2].dtype == torch.bfloat16
        torch.testing.assert_close(ours[0], ref[0], rtol=F32_RTOL, atol=F32_ATOL)
        for a, b in zip(ours[1:], ref[1:], strict=True):  # bf16 tolerance as above
            torch.testing.assert_close(a, b, rtol=2**-6, atol=2**-6 * float(b.abs().max()))
        return
    w = weight.detach().clone().requires_grad_()
    frozen = hidden.detach()
    (linear_log_probs(frozen, w, targets, chunk_size=8) * upstream).sum().backward()
    ref = _log_prob_grads(_plain_log_probs, hidden, weight, targets, upstream)[2]
    assert frozen.grad is None and w.grad is not None
    torch.testing.assert_close(w.grad, ref, rtol=F32_RTOL, atol=F32_ATOL)


def test_float64_stays_float64_under_autocast() -> None:
    """As F.linear does, a float64 matmul is left alone by bf16 autocast: float64 results, equal
    to the float64 computation without autocast."""
    hidden, weight, targets, _ = _log_prob_inputs(dtype=torch.float64)
    with torch.no_grad():
        exact = linear_log_probs(hidden, weight, targets, chunk_size=8)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ours = linear_log_probs(hidden, weight, targets, chunk_size=8)
            loss = linear_cross_entropy(hidden, weight, targets, chunk_size=8)
    assert ours.dtype == loss.dtype == torch.float64
    torch.testing.assert_close(ours, exact, rtol=0, atol=0)
    torch.testing.assert_close(loss, -exact.sum(), rtol=1e-12, atol=1e-12)
