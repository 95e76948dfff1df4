"""Choosing each sample's next token from the model's logits.

Each row brings its own `SamplingParams` and its own `torch.Generator`, so a sample's draws depend
on its seed and its logits only, never on what else is in the batch. A draw is inverse-transform
sampling: one uniform number u per token from the row's generator, and the token is the first
whose cumulative probability (a float32 running sum, rounding errors ~1e-5 of the total at a
128k vocabulary) exceeds u, the distribution of `torch.multinomial`. One number per row keeps the per-row generators cheap (a vector of noise per row, as the exponential
race needs, costs ~2 ms per row at a 128k vocabulary on a CPU); the rest runs batched.
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
        probs, order = torch.softmax(scaled, dim=-1).sort(descending=True)
        mass_before = probs.cumsum(dim=-1) - probs
        drop = torch.zeros_like(scaled, dtype=torch.bool)
        drop[order] = mass_before >= params.top_p  # keep tokens until the mass reaches top_p
        scaled = scaled.masked_fill(drop, float("-inf"))
    return scaled


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
