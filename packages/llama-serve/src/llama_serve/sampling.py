"""Choosing each sample's next token from the model's logits.

Each row brings its own `SamplingParams` and its own `torch.Generator`, so a sample's draws depend
on its seed and its logits only, never on what else is in the batch. A draw is inverse-transform
sampling: one uniform number u per token from the row's generator, and the token is the first
whose cumulative probability (a float32 running sum, rounding errors ~1e-5 of the total at a
128k vocabulary) exceeds u, the distribution of `torch.multinomial`. One number per row keeps
the per-row generators cheap (a vector of noise per row, as the exponential race needs, costs
~2 ms per row at a 128k vocabulary on a CPU); the rest runs batched.

top_p (nucleus sampling, Holtzman et al. 2019) is decided on a sorted copy of the probabilities.
Sorting the whole 128k vocabulary costs ~8 ms per row on a CPU core, so on CPU the decision is
first tried on the few hundred most likely tokens (`torch.topk`) and falls back to the full sort
only where that cannot give the same answer (see `_top_p_drop_from_candidates`): the result is
bit-identical to the full sort's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from llama_serve.params import SamplingParams

__all__ = ["filter_logits", "sample_rows", "top_logprobs"]


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """`logits` [V] float32 divided by the temperature, with every token outside top_k and top_p
    set to -inf (temperature > 0)."""
    scaled = logits / params.temperature
    if 0 < params.top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, params.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if params.top_p < 1.0:
        probs = torch.softmax(scaled, dim=-1)
        drop = None
        if probs.device.type == "cpu":  # where the full sort is the cost (see the docstring)
            drop = _top_p_drop_from_candidates(probs, params.top_p)
        if drop is None:
            drop = _top_p_drop_sorted(probs, params.top_p)
        scaled = scaled.masked_fill(drop, float("-inf"))
    return scaled


# How many of the most likely tokens `filter_logits` tries top_p on before sorting the whole
# vocabulary, smallest first: sized for the nucleus of a confident next-token distribution (tens
# of tokens) and, second, a hesitant one. On one CPU core, torch.topk of 256 (4,096) of 128,256
# probabilities takes ~0.16 ms (~1.4 ms), a full sort ~8 ms.
_TOP_P_CANDIDATES = (256, 4096)


def _top_p_drop_sorted(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Which tokens top_p drops, from the full sort of `probs` [V]: a token is dropped when the
    mass of the tokens sorted before it reaches top_p (the most likely token is always kept).
    Tokens of equal probability go in the order `torch.sort` leaves them in (not stable)."""
    sorted_probs, order = probs.sort(descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    drop = torch.zeros_like(probs, dtype=torch.bool)
    drop[order] = mass_before >= top_p  # keep tokens until the mass reaches top_p
    return drop


def _top_p_drop_from_candidates(
    probs: torch.Tensor, top_p: float, candidates: Sequence[int] = _TOP_P_CANDIDATES
) -> torch.Tensor | None:
    """`_top_p_drop_sorted(probs, top_p)` from the `torch.topk` of a few `candidates` counts of
    `probs` [V] on CPU, or None when it cannot be decided from them (then sort everything).

    Why the answer is the same: topk's values are the sorted probabilities' first C values, and
    CPU cumsum is a sequential float64 sum rounded at each step, so `mass_before` agrees with the
    full sort's at these C positions. Along the full sort, cumsum never decreases and the
    probabilities never increase, so `mass_before` (their difference, rounded, and rounding
    keeps order) never decreases after position C - 1: if the last candidate is dropped, every
    token after it is too. The one thing topk does not give is the sort's (arbitrary) order
    among equal probabilities, which decides which of them survive when a run of equal
    probabilities holds both kept and dropped positions: such a cut is left to the sort itself.
    NaN probabilities never count as dropped, so they fall back too. (CUDA's cumsum is a
    parallel scan, whose first C sums need not match the full one's: CUDA always sorts.)
    """
    tried, covered, smallest = 0, 0.0, 0.0  # the last try's count, mass and smallest value
    for count in candidates:
        if count >= probs.shape[-1]:
            return None
        if tried > 0 and covered + (count - tried) * smallest < top_p:
            continue  # even `count` tokens as likely as the smallest tried cannot reach top_p
        values, ids = probs.topk(count)  # [C] values = the first C of probs.sort(descending=True)
        cumulative = values.cumsum(dim=-1)
        mass_before = cumulative - values
        drop_candidates = mass_before >= top_p
        if bool(drop_candidates[-1]):
            tied = values[1:] == values[:-1]
            if bool((tied & (drop_candidates[1:] != drop_candidates[:-1])).any()):
                return None  # the cut splits equal probabilities: more candidates would too
            drop = torch.ones_like(probs, dtype=torch.bool)
            drop[ids] = drop_candidates
            return drop
        tried, covered, smallest = count, float(cumulative[-1]), float(values[-1])
    return None


def sample_rows(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> list[int]:
    """One token per row of `logits` [B, V]: argmax for greedy rows, else a draw from
    softmax(filtered logits) with the row's generator."""
    # Every greedy row at once, in the logits' dtype (max, not argmax: bf16 argmax has no
    # vectorized CPU kernel and takes ~5x longer; both return the first maximum).
    tokens: list[int] = logits.max(dim=-1).indices.tolist()
    rows = [row for row, row_params in enumerate(params) if not row_params.greedy]
    if not rows:
        return tokens
    scaled = torch.stack([filter_logits(logits[row].float(), params[row]) for row in rows])
    cumulative = torch.softmax(scaled, dim=-1).cumsum(dim=-1)  # [R, V]
    uniform = torch.stack([_uniform(generators[row], logits.device) for row in rows])
    picks = torch.searchsorted(cumulative, (uniform * cumulative[:, -1])[:, None], right=True)
    for row, pick in zip(rows, picks[:, 0].clamp_max(logits.shape[-1] - 1).tolist(), strict=True):
        tokens[row] = pick
    return tokens


def _uniform(generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """One U[0, 1) number from `generator` (drawn on its device), on `device`."""
    drawn_on = generator.device if generator is not None else device
    return torch.rand((), generator=generator, device=drawn_on).to(device)


def top_logprobs(logits: torch.Tensor, token: int, k: int) -> dict[int, float]:
    """log-softmax of `logits` [V] at `token` and at the k most likely tokens."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = {token: float(logprobs[token])}
    if k == 0:
        return chosen
    values, ids = logprobs.topk(k)
    return {**dict(zip(ids.tolist(), values.tolist(), strict=True)), **chosen}
