"""Tests for llama_train.loss: the chunked `linear_cross_entropy` against the plain loss.

The oracle is `summed_cross_entropy` of the materialised logits `hidden @ weight.T` (PyTorch's
`F.cross_entropy`, differentiated by autograd), and for float64 a log-softmax written out here.
Shapes are odd on purpose (37 rows, chunks of 8: the last chunk has 5 rows; 101 classes).
"""

from __future__ import annotations

from collections.abc import Iterator

import _common  # tests/distributed/_common.py, on sys.path via conftest
import pytest
import torch

import llama_train.loss as loss_module
from llama_model import Documents
from llama_train.data import IGNORE_INDEX
from llama_train.loss import LinearCrossEntropy, linear_cross_entropy, summed_cross_entropy

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

    def grads(fused: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        if fused:
            hidden = model.hidden_states(batch.tokens, attention=attention)
            loss = linear_cross_entropy(hidden, model.output_weight(), batch.targets, chunk_size=24)
        else:
            loss = summed_cross_entropy(model(batch.tokens, attention=attention), batch.targets)
        loss.backward()  # type: ignore[no-untyped-call]
        return loss.detach(), {
            n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
        }

    loss, fused = grads(True)
    ref_loss, ref = grads(False)
    torch.testing.assert_close(loss, ref_loss, rtol=F32_RTOL, atol=F32_ATOL)
    assert fused.keys() == ref.keys()
    # Backpropagated through 4 layers, both float32 paths differ from a float64 run by up to ~1e-6
    # of a gradient's largest entry (measured: 9e-6 and 6e-6 on the embedding's, max 11.9), so
    # entries are compared to 1e-5 of that (rtol 1e-5 as above).
    for name, grad in ref.items():
        atol = 1e-5 * float(grad.abs().max())
        torch.testing.assert_close(fused[name], grad, rtol=F32_RTOL, atol=atol, msg=name)


def test_kept_buffers_give_the_functional_result_call_after_call() -> None:
    """LinearCrossEntropy reuses its buffers: two losses of different row counts, both computed
    before either backward, equal linear_cross_entropy's (float32 and bf16 autocast), and the
    second call reuses the first call's buffers."""
    loss_fn = LinearCrossEntropy(chunk_size=8)
    first, second = _inputs(rows=37, seed=3), _inputs(rows=20, seed=4)
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            expected = [
                _with_grads(linear_cross_entropy, *x, chunk_size=8) for x in (first, second)
            ]
            leaves = [(h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_(), t)
                      for h, w, t in (first, second)]  # fmt: skip
            losses = [loss_fn(h, w, t) for h, w, t in leaves]
            pointers = {name: b.data_ptr() for name, b in loss_fn._buffers.items()}
            loss_fn(*leaves[0])  # a third call, after both: the same buffers again
            assert {name: b.data_ptr() for name, b in loss_fn._buffers.items()} == pointers
        for loss, (h, w, _), want in zip(losses, leaves, expected, strict=True):
            loss.backward()  # type: ignore[no-untyped-call]
            assert h.grad is not None and w.grad is not None
            _close((loss.detach(), h.grad, w.grad), want, rtol=0.0, atol=0.0)
