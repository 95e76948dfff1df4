"""Choosing each sample's next token from the model's logits, a row at a time.

Each row brings its own `SamplingParams` and its own `torch.Generator`, so a sample's draws depend
on its seed and its logits only, never on what else is in the batch. A draw is the exponential
race (argmax of p / E with E ~ Exp(1), the same distribution as `torch.multinomial`): one vector
of noise per token from the row's generator.
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
    logits = logits.float()
    tokens: list[int] = []
    for row, (row_params, generator) in enumerate(zip(params, generators, strict=True)):
        if row_params.greedy:
            tokens.append(int(logits[row].argmax()))
            continue
        probs = torch.softmax(filter_logits(logits[row], row_params), dim=-1)
        noise = torch.empty_like(probs).exponential_(generator=generator)
        tokens.append(int((probs / noise).argmax()))
    return tokens


def top_logprobs(logits: torch.Tensor, token: int, k: int) -> dict[int, float]:
    """log-softmax of `logits` [V] at `token` and at the k most likely tokens."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = {token: float(logprobs[token])}
    if k == 0:
        return chosen
    values, ids = logprobs.topk(k)
    return {**dict(zip(ids.tolist(), values.tolist(), strict=True)), **chosen}
