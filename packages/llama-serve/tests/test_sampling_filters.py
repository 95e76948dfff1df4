"""`filter_logits`'s top_p against the full-sort implementation it replaced, bit for bit.

The oracle, `_reference_filter_logits`, is `filter_logits` as it was before top_p learned to decide
from `torch.topk` candidates: it sorts the whole vocabulary. Every comparison is exact
(`torch.equal`), ties included: where probabilities tie at the cut, both must keep the tokens the
(unstable) sort keeps. Each test also checks which path the new code took, so that a fast path
silently falling back everywhere, or never falling back, cannot pass unnoticed.
"""

from __future__ import annotations

import math

import pytest
import torch

from llama_serve import SamplingParams, sampling
from llama_serve.sampling import _top_p_drop_from_candidates, filter_logits, sample_rows

LLAMA3_VOCAB = 128256  # Llama 3's vocabulary: 128K tokens (§3.2) and 256 reserved special ids


def _reference_filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """`filter_logits` before the top_p fast path (commit f6b594c), verbatim."""
    scaled = logits / params.temperature
    if 0 < params.top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, params.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if params.top_p < 1.0:
        probs, order = torch.softmax(scaled, dim=-1).sort(descending=True)
        mass_before = probs.cumsum(dim=-1) - probs
        drop = torch.zeros_like(scaled, dtype=torch.bool)
        drop[order] = mass_before >= params.top_p  # keep tokens until the mass reaches top_p
        scaled = scaled.masked_fill(drop, float("-inf"))
    return scaled


def _peaked(vocab: int, seed: int) -> torch.Tensor:
    """Logits shaped like a language model's: a few likely tokens well above a Gaussian crowd."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(vocab, generator=generator) * 2.0
    boosted = torch.randperm(vocab, generator=generator)[:20]
    logits[boosted] += 12.0 + 4.0 * torch.rand(20, generator=generator)
    return logits


def _flat(vocab: int, seed: int) -> torch.Tensor:
    """Nearly uniform logits: top_p's nucleus holds most of the vocabulary."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(vocab, generator=generator) * 0.1


def _fast_path_decides(logits: torch.Tensor, params: SamplingParams) -> bool:
    """Whether `filter_logits` decides top_p from topk candidates (else it sorts everything)."""
    scaled = logits / params.temperature
    if 0 < params.top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, params.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    return _top_p_drop_from_candidates(probs, params.top_p) is not None


def _assert_same(logits: torch.Tensor, params: SamplingParams) -> None:
    expected = _reference_filter_logits(logits, params)
    actual = filter_logits(logits, params)
    assert actual.dtype == expected.dtype
    kept, expected_kept = int(actual.isfinite().sum()), int(expected.isfinite().sum())
    assert torch.equal(actual, expected), (
        f"{params.temperature=} {params.top_p=} {params.top_k=}: kept {kept} tokens, "
        f"the full sort keeps {expected_kept}"
    )


@pytest.mark.parametrize("vocab", [200, 4097, 5003, LLAMA3_VOCAB])
@pytest.mark.parametrize("temperature", [0.6, 1.0, 1.5])
def test_peaked_logits_take_the_fast_path_and_match(vocab: int, temperature: float) -> None:
    """On language-model-like logits, top_p (alone and with top_k) is decided from topk
    candidates, and the filtered logits equal the full sort's bit for bit."""
    fast = 0
    for seed in range(2):
        logits = _peaked(vocab, seed)
        for top_p in (0.5, 0.9, 0.99):
            for top_k in (-1, 1, 40, 1000):
                params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k)
                _assert_same(logits, params)
                fast += _fast_path_decides(logits, params)
    if vocab > 256:  # a vocabulary within the first try's 256 candidates is simply sorted
        assert fast > 0


@pytest.mark.parametrize("vocab", [20000, LLAMA3_VOCAB])
def test_flat_logits_fall_back_to_the_full_sort_and_match(vocab: int) -> None:
    """When the nucleus is larger than every candidate count, the full sort decides, and the
    result is the reference's."""
    for seed in range(2):
        logits = _flat(vocab, seed)
        for temperature, top_p in [(1.0, 0.5), (0.7, 0.9), (2.0, 0.95)]:
            params = SamplingParams(temperature=temperature, top_p=top_p)
            assert not _fast_path_decides(logits, params)
            _assert_same(logits, params)


def test_nucleus_between_the_candidate_counts_takes_the_second_try() -> None:
    """A nucleus of ~1,000 tokens (more than the first 256 candidates, fewer than 4,096) is decided
    from the second try and matches."""
    logits = torch.full((LLAMA3_VOCAB,), -10.0)
    logits[:1000] = torch.linspace(0.0, -1.0, 1000)  # ~1,000 tokens hold almost all the mass
    params = SamplingParams(top_p=0.9)
    assert _fast_path_decides(logits, params)
    assert 256 < int(filter_logits(logits, params).isfinite().sum()) < 4096
    _assert_same(logits, params)


def _tied() -> torch.Tensor:
    """Logits whose probabilities are ~0.3, then eight tied tokens of ~0.05 each at spread-out
    ids, then 200 distinct ones of ~0.0015: top_p in (0.3, 0.65] cuts inside the tied run."""
    logits = torch.full((LLAMA3_VOCAB,), -30.0)
    logits[77] = math.log(0.3)
    tied_ids = torch.arange(8) * 9973 + 5  # not contiguous, not in id order of anything
    logits[tied_ids] = math.log(0.05)
    logits[1000:1200] = math.log(0.3 / 200) + torch.linspace(0.05, -0.05, 200)  # distinct
    return logits


def test_cut_inside_tied_probabilities_falls_back_and_matches() -> None:
    """When top_p's cut splits a run of equal probabilities, which of them survive is the sort's
    (unstable) choice: the fast path declines, and the result is exactly the sort's."""
    logits = _tied()
    for top_p in (0.45, 0.5, 0.55, 0.62):
        params = SamplingParams(top_p=top_p)
        assert not _fast_path_decides(logits, params)
        _assert_same(logits, params)


def test_tied_probabilities_wholly_kept_or_dropped_take_the_fast_path() -> None:
    """Ties inside the nucleus (all kept) or wholly past it (all dropped) do not stop the fast
    path: which token sits where among them does not change the kept set."""
    logits = _tied()
    for top_p in (0.2, 0.25, 0.8, 0.9):
        params = SamplingParams(top_p=top_p)
        assert _fast_path_decides(logits, params)
        _assert_same(logits, params)


def test_ties_across_the_last_candidate_take_the_fast_path() -> None:
    """A run of equal probabilities that starts inside the 256 candidates and goes on past them,
    all of it dropped, is decided by the fast path even though topk chose an arbitrary part of
    the run."""
    logits = torch.full((LLAMA3_VOCAB,), -30.0)
    logits[:10] = 5.0 + torch.arange(10.0)  # the nucleus
    logits[torch.arange(1000) * 97 + 3] = -2.0  # 1,000 tied tokens around candidates 10 .. 1009
    params = SamplingParams(top_p=0.9)
    assert _fast_path_decides(logits, params)
    _assert_same(logits, params)


def test_top_p_at_the_mass_of_the_first_tokens_matches() -> None:
    """top_p equal to (or one float32 step either side of) the float32 mass before one of the
    first tokens, where rounding alone decides whether that token is kept, matches."""
    logits = _peaked(LLAMA3_VOCAB, seed=3)
    probs = torch.softmax(logits, dim=-1).sort(descending=True).values
    mass_before = (probs.cumsum(dim=-1) - probs)[1:5]
    for mass in mass_before:
        below, above = (
            torch.nextafter(mass, torch.tensor(0.0)),
            torch.nextafter(mass, torch.tensor(1.0)),
        )
        for top_p in (float(below), float(mass), float(above)):
            params = SamplingParams(top_p=top_p)
            assert _fast_path_decides(logits, params)
            _assert_same(logits, params)


def test_top_p_near_one_and_ties_at_top_k() -> None:
    """top_p close to 1 (where the float32 total of the kept mass may stay below it) and top_k
    whose k-th logit ties with others give the reference's result."""
    logits = _peaked(LLAMA3_VOCAB, seed=5).round(decimals=1)  # many ties at every value
    for top_k in (-1, 3, 500):
        for top_p in (0.9, 0.999999, 0.99999999):
            _assert_same(logits, SamplingParams(top_p=top_p, top_k=top_k))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_other_dtypes_match(dtype: torch.dtype) -> None:
    """float64 and bfloat16 logits (bfloat16: probabilities tie everywhere) match the reference."""
    fast = 0
    for seed in range(4):
        logits = _peaked(LLAMA3_VOCAB, seed).to(dtype)
        for top_p in (0.5, 0.8, 0.9, 0.95):
            params = SamplingParams(temperature=0.8, top_p=top_p)
            _assert_same(logits, params)
            fast += _fast_path_decides(logits, params)
    assert fast > 0


def test_non_finite_logits_match() -> None:
    """NaN or +inf logits (NaN probabilities) fall back to the full sort and give its result."""
    for bad in (float("nan"), float("inf")):
        logits = _peaked(LLAMA3_VOCAB, seed=1)
        logits[123] = bad
        params = SamplingParams(top_p=0.9)
        assert not _fast_path_decides(logits, params)
        expected = _reference_filter_logits(logits, params)
        torch.testing.assert_close(
            filter_logits(logits, params), expected, rtol=0, atol=0, equal_nan=True
        )


def test_random_sweep_matches() -> None:
    """Random vocabularies, spreads, temperatures, top_p and top_k: every result equals the
    reference's, and both paths are taken."""
    generator = torch.Generator().manual_seed(0)
    paths = {True: 0, False: 0}
    for case in range(60):
        vocab = int(torch.randint(257, 20000, (), generator=generator))
        spread = float(torch.empty(()).uniform_(0.05, 6.0, generator=generator))
        logits = torch.randn(vocab, generator=generator) * spread
        params = SamplingParams(
            temperature=float(torch.empty(()).uniform_(0.2, 2.0, generator=generator)),
            top_p=float(torch.empty(()).uniform_(0.05, 1.0, generator=generator)),
            top_k=[-1, 0, 1, 7, 100, 2000][case % 6],
        )
        _assert_same(logits, params)
        paths[_fast_path_decides(logits, params)] += 1
    assert paths[True] > 0 and paths[False] > 0, paths


def test_sample_rows_draws_the_same_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch with different params per row (greedy, top_p, top_k with top_p, flat and peaked
    rows) samples the same tokens as with the reference filter, seed for seed."""
    rows = [_peaked(LLAMA3_VOCAB, seed) for seed in range(4)] + [_flat(LLAMA3_VOCAB, 9)]
    logits = torch.stack(rows + rows)  # [10, V]
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.6, top_p=0.9),
        SamplingParams(temperature=1.0, top_p=0.95, top_k=50),
        SamplingParams(temperature=1.3, top_p=0.5),
        SamplingParams(temperature=1.0, top_p=0.9),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.8, top_k=5),
        SamplingParams(temperature=1.0, top_p=0.999),
        SamplingParams(temperature=0.7, top_p=0.8, top_k=1000),
        SamplingParams(temperature=2.0, top_p=0.99),
    ]

    def draw() -> list[int]:
        generators = [torch.Generator().manual_seed(100 + row) for row in range(len(params))]
        tokens: list[list[int]] = [sample_rows(logits, params, generators) for _ in range(2)]
        return [token for step in tokens for token in step]

    actual = draw()
    monkeypatch.setattr(sampling, "filter_logits", _reference_filter_logits)
    assert actual == draw()
