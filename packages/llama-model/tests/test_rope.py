"""RoPE frequencies, Llama 3.1 scaling and the rotation against float64 and complex-number oracles."""

from __future__ import annotations

import math

import torch

from llama_model.config import RopeScaling
from llama_model.rope import apply_rope, rope_angles, rope_frequencies


def reference_scaled_frequencies(head_dim: int, theta: float, s: RopeScaling) -> list[float]:
    """Llama 3.1 scaling written per frequency in float64, as the branches of Meta's description."""
    out = []
    for i in range(0, head_dim, 2):
        freq = 1.0 / theta ** (i / head_dim)
        wavelen = 2 * math.pi / freq
        if wavelen < s.original_max_seq_len / s.high_freq_factor:
            out.append(freq)
        elif wavelen > s.original_max_seq_len / s.low_freq_factor:
            out.append(freq / s.factor)
        else:
            smooth = (s.original_max_seq_len / wavelen - s.low_freq_factor) / (
                s.high_freq_factor - s.low_freq_factor
            )
            out.append((1 - smooth) * freq / s.factor + smooth * freq)
    return out


def test_unscaled_frequencies_match_float64() -> None:
    """θ^(-2i/d) in float32 equals the float64 value rounded (to float32 precision)."""
    got = rope_frequencies(128, 500_000.0)
    expected = torch.tensor(
        [500_000.0 ** (-i / 128) for i in range(0, 128, 2)], dtype=torch.float64
    )
    torch.testing.assert_close(got.double(), expected, rtol=2e-7, atol=0)


def test_scaled_frequencies_match_float64_branches() -> None:
    """Scaled frequencies (factor 8 and 32) match the three-branch float64 definition."""
    for factor in (8.0, 32.0):
        s = RopeScaling(factor=factor)
        got = rope_frequencies(128, 500_000.0, s).double()
        expected = torch.tensor(
            reference_scaled_frequencies(128, 500_000.0, s), dtype=torch.float64
        )
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
        # the highest frequencies are untouched, the lowest divided by the factor
        assert got[0] == expected[0] and torch.isclose(got[-1], expected[-1], rtol=1e-6)


def test_half_split_rotation_equals_interleaved_complex_rotation() -> None:
    """Rotating half-split pairs equals Meta's complex rotation of interleaved pairs, up to the
    row permutation that maps one layout to the other."""
    head_dim, seq_len = 16, 11
    x_interleaved = torch.randn(2, seq_len, 3, head_dim, dtype=torch.float64)
    inv_freq = rope_frequencies(head_dim, 10_000.0, RopeScaling(factor=8.0))
    positions = torch.arange(seq_len)[None]
    # Meta: pairs (2i, 2i+1) are complex numbers multiplied by e^{i·pos·f_i}.
    angles = positions[0, :, None].double() * inv_freq.double()  # [T, head_dim/2]
    rotation = torch.polar(torch.ones_like(angles), angles)[None, :, None, :]
    as_complex = torch.view_as_complex(x_interleaved.reshape(2, seq_len, 3, head_dim // 2, 2))
    expected = torch.view_as_real(as_complex * rotation).reshape(2, seq_len, 3, head_dim)
    # Ours: evens to the first half, odds to the second half, rotate, then map back.
    x_half = torch.cat((x_interleaved[..., 0::2], x_interleaved[..., 1::2]), dim=-1)
    cos, sin = rope_angles(positions, inv_freq)
    rotated = apply_rope(x_half, cos.double(), sin.double())
    back = torch.stack((rotated[..., : head_dim // 2], rotated[..., head_dim // 2 :]), dim=-1)
    torch.testing.assert_close(back.reshape(expected.shape), expected, rtol=1e-6, atol=1e-6)


def test_rope_keeps_dtype_and_norm() -> None:
    """apply_rope returns the input dtype and preserves each head vector's norm (a rotation)."""
    x = torch.randn(1, 5, 2, 8, dtype=torch.bfloat16)
    cos, sin = rope_angles(torch.arange(5)[None], rope_frequencies(8, 500_000.0))
    y = apply_rope(x, cos, sin)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float().norm(dim=-1), x.float().norm(dim=-1), rtol=2e-2, atol=0)
