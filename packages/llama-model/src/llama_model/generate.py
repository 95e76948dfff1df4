"""Simple KV-cached text generation for tests, demos and rejection sampling at small scale.

Split into small pure steps, as gpt-fast does, so that each can be timed or compiled on its own:
`prefill` (the whole prompt, one forward), `decode_one_token` (one new token per row against the
cache, at positions given as a tensor: static shapes, so ``torch.compile(decode_one_token,
fullgraph=True)`` compiles it once for every position) and `sample` (greedy, temperature,
nucleus/top-p of Holtzman et al. 2019). Production serving lives in llama-serve; this is the
readable reference loop.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from llama_model.attention import CachedAttention
from llama_model.cache import KVCache, KVCacheProtocol
from llama_model.model import Llama

__all__ = ["decode_one_token", "generate", "prefill", "sample"]


def sample(
    logits: torch.Tensor,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick one token per row of `logits` [B, vocab]: argmax when temperature is 0, else sample from
    softmax(logits / temperature) restricted to the smallest set of tokens whose mass reaches top_p."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_probs[mass_before >= top_p] = 0.0  # keep tokens until the mass reaches top_p
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


@torch.inference_mode()
def prefill(model: Llama, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Run the prompt [B, T] through the model after what `cache` holds (`KVCache.append`);
    returns the last logits [B, vocab]."""
    hidden = model.hidden_states(tokens, attention=cache.append(tokens.shape[1]))
    return model.logits(hidden[:, -1])


def decode_one_token(
    model: Llama, token: torch.Tensor, positions: torch.Tensor, cache: KVCacheProtocol
) -> torch.Tensor:
    """Feed one token per row, token [B] at positions [B] (rows may differ), writing its keys and
    values into `cache`; returns the next logits [B, vocab]. Shapes never depend on the positions,
    so a compiled decode step is traced once. (Call it under `torch.inference_mode()`.)"""
    attention = CachedAttention(cache, positions[:, None])
    hidden = model.hidden_states(token[:, None], attention=attention)  # [B, 1, dim]
    return model.logits(hidden[:, -1])


@torch.inference_mode()
def generate(
    model: Llama,
    prompt: Sequence[int],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop_tokens: Iterable[int] = (),
    seed: int | None = None,
    cache: KVCache | None = None,
) -> list[int]:
    """Continue `prompt` (token ids) by at most `max_new_tokens` tokens and return the new tokens.

    Stops early after emitting any of `stop_tokens` (the stop token is included in the result).
    `seed` makes sampling reproducible. A given `cache` is reset and reused; by default one is built
    for exactly prompt + max_new_tokens positions.
    """
    if len(prompt) == 0:
        raise ValueError("prompt is empty: pass at least one token (e.g. the BOS token)")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    vocab_size = model.config.vocab_size
    bad = [t for t in prompt if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"prompt token {bad[0]} is outside the vocabulary [0, {vocab_size})")
    total = len(prompt) + max_new_tokens
    if total > model.config.max_seq_len:
        raise ValueError(
            f"prompt ({len(prompt)} tokens) + max_new_tokens ({max_new_tokens}) = {total} exceeds "
            f"the model's max_seq_len {model.config.max_seq_len}"
        )
    if cache is None:
        cache = KVCache.for_model(model, batch_size=1, max_seq_len=total)
    if cache.batch_size != 1 or cache.max_seq_len < total - 1:
        raise ValueError(
            f"the given cache holds {cache.batch_size} row(s) of {cache.max_seq_len} positions; "
            f"generate needs 1 row of at least {total - 1} (prompt + max_new_tokens - 1)"
        )
    cache.reset()
    device = model.output_weight().device
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    stops = set(stop_tokens)

    logits = prefill(model, torch.tensor([list(prompt)], device=device), cache)
    position = torch.tensor([len(prompt)], device=device)
    new_tokens: list[int] = []
    while True:
        token = sample(logits, temperature=temperature, top_p=top_p, generator=generator)
        new_tokens.append(int(token[0]))
        if new_tokens[-1] in stops or len(new_tokens) == max_new_tokens:
            cache.length = int(position)  # the positions written: the cache can be extended
            return new_tokens
        logits = decode_one_token(model, token, position, cache)
        position += 1
