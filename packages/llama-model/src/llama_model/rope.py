"""Rotary position embeddings (RoPE, Su et al. 2021) with Llama 3.1 frequency scaling.

The math follows Meta's reference (`precompute_freqs_cis`, `apply_scaling`, `apply_rotary_emb` in
llama-models) and is computed in float32 exactly as the reference and Hugging Face compute it
(inverse frequencies, then one float32 product per position and frequency), so that a checkpoint sees
the same angles it was trained with.

Pair layout. A head vector of width `head_dim` is rotated in `head_dim / 2` pairs. Meta's checkpoints
pair neighbours (x[2i], x[2i+1]) — the "interleaved" layout; Hugging Face checkpoints pair the two
halves (x[i], x[i + head_dim/2]) — the "half-split" layout — and permute the rows of wq and wk to
match. This package's model uses the half-split layout, so a Hugging Face checkpoint loads without
permutation and a Meta checkpoint is permuted once at load time (`checkpoint.py`).
"""

from __future__ import annotations

import math

import torch

from llama_model.config import RopeScaling

__all__ = ["apply_rope", "apply_scaling", "rope_angles", "rope_frequencies"]


def apply_scaling(inv_freq: torch.Tensor, scaling: RopeScaling) -> torch.Tensor:
    """Llama 3.1 long-context scaling of the inverse frequencies (llama-models `apply_scaling`)."""
    low_freq_wavelen = scaling.original_max_seq_len / scaling.low_freq_factor
    high_freq_wavelen = scaling.original_max_seq_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths (low frequencies) are stretched by `factor`; short ones are kept.
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    # In between, interpolate linearly in 1/wavelength between the scaled and unscaled value.
    smooth = (scaling.original_max_seq_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    interpolated = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    in_band = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(in_band, interpolated, scaled)


def rope_frequencies(
    head_dim: int,
    theta: float,
    scaling: RopeScaling | None = None,
    *,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Inverse frequencies θ^(-2i/head_dim), i < head_dim/2, float32, scaled if `scaling` is given."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)  # [head_dim/2]
    return apply_scaling(inv_freq, scaling) if scaling is not None else inv_freq


def rope_angles(
    positions: torch.Tensor, inv_freq: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position·frequency for the half-split layout.

    positions: [..., T] integer positions. Returns two float32 tensors of shape [..., T, head_dim],
    each half repeated (cat(f, f)) so they multiply a half-split head vector elementwise.
    """
    angles = positions.to(torch.float32)[..., None] * inv_freq  # [..., T, head_dim/2]
    angles = torch.cat((angles, angles), dim=-1)  # [..., T, head_dim]
    return angles.cos(), angles.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the half-split pairs of `x` [B, T, n_heads, head_dim] by the angles of
    `rope_angles` ([B or 1, T, head_dim]); the product is taken in float32 and cast back."""
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # [B, T, 1, head_dim]: broadcast over heads
    x32 = x.float()
    return (x32 * cos + _rotate_half(x32) * sin).type_as(x)
