"""Llama 3 model configuration, the named model sizes, and the parameter and FLOP counts.

Field names follow Meta's `params.json` (`dim`, `n_layers`, `n_heads`, ...), so a Meta checkpoint's
parameters load without renaming; `ffn_dim` is the resolved SwiGLU hidden size that Meta derives from
`multiple_of` and `ffn_dim_multiplier`. The sizes are those of Table 3 of "The Llama 3 Herd of Models"
(arXiv 2407.21783) and of the released Llama 3, 3.1 and 3.2 checkpoints.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, PositiveFloat, PositiveInt, model_validator

__all__ = [
    "PRESETS",
    "LlamaConfig",
    "RopeScaling",
    "count_parameters",
    "flops_per_token",
    "resolve_ffn_dim",
]


def resolve_ffn_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """The SwiGLU hidden size as Meta's reference derives it (llama-models `FeedForward`).

    Start from 4·dim, take 2/3 of it (SwiGLU has three matrices instead of two, §3.2 keeps the
    parameter count of a 4·dim MLP), scale by `ffn_dim_multiplier`, round up to `multiple_of`.
    """
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


class RopeScaling(BaseModel):
    """Llama 3.1 RoPE frequency scaling for long context (llama-models `apply_scaling`).

    Wavelengths longer than `original_max_seq_len / low_freq_factor` are divided by `factor`,
    wavelengths shorter than `original_max_seq_len / high_freq_factor` are kept, and the band in
    between is interpolated smoothly.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    factor: PositiveFloat = 8.0
    """Frequency divisor for long wavelengths: 8 in Llama 3.1, 32 in Llama 3.2 (1B, 3B)."""
    low_freq_factor: PositiveFloat = 1.0
    """Wavelengths above original_max_seq_len / low_freq_factor are fully scaled (Meta: 1)."""
    high_freq_factor: PositiveFloat = 4.0
    """Wavelengths below original_max_seq_len / high_freq_factor are left alone (Meta: 4)."""
    original_max_seq_len: PositiveInt = 8192
    """The context length the model was pretrained with before long-context training (Meta: 8192)."""

    @model_validator(mode="after")
    def _check_band(self) -> Self:
        if self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(
                f"rope_scaling.high_freq_factor ({self.high_freq_factor}) must be greater than "
                f"low_freq_factor ({self.low_freq_factor}); Llama 3.1 uses 4 and 1"
            )
        return self


class LlamaConfig(BaseModel):
    """The shape of a Llama 3 model. Frozen; unknown fields are an error, never silently dropped.

    Build one from a preset (`LlamaConfig.from_preset("llama3.1-8b")`), from Meta's `params.json`
    (`from_meta_params`), from a TOML file (`from_toml`), or field by field.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    dim: PositiveInt
    """Model (residual stream) width: 4096 for 8B, 8192 for 70B, 16384 for 405B (Table 3)."""
    n_layers: PositiveInt
    """Number of Transformer blocks: 32 / 80 / 126 (Table 3)."""
    n_heads: PositiveInt
    """Attention query heads: 32 / 64 / 128 (Table 3)."""
    n_kv_heads: PositiveInt
    """Key/value heads for grouped-query attention: 8 at every size (§3.2, Table 3)."""
    vocab_size: PositiveInt = 128_256
    """128,000 BPE tokens plus 256 special tokens (§3.2)."""
    multiple_of: PositiveInt = 256
    """The SwiGLU hidden size is rounded up to a multiple of this (Meta params.json)."""
    ffn_dim_multiplier: PositiveFloat | None = None
    """Scales the 2/3·4·dim SwiGLU hidden size (Meta params.json: 1.3 for 8B and 70B, 1.2 for 405B)."""
    ffn_dim: PositiveInt
    """Resolved SwiGLU hidden size; derived from the two fields above when not given (14336 for 8B)."""
    norm_eps: PositiveFloat = 1e-5
    """RMSNorm epsilon (Meta params.json)."""
    rope_theta: PositiveFloat = 500_000.0
    """RoPE base frequency, raised to 500,000 for long context (§3.2)."""
    rope_scaling: RopeScaling | None = None
    """Llama 3.1 frequency scaling; None for Llama 3 (params.json `use_scaled_rope`)."""
    max_seq_len: PositiveInt = 8192
    """Longest sequence (positions) the model accepts: 8K for Llama 3, 128K for 3.1 (§3.4.2)."""
    tie_word_embeddings: bool = False
    """Share the input embedding with the output projection (Llama 3.2 1B and 3B)."""

    @model_validator(mode="before")
    @classmethod
    def _fill_ffn_dim(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and data.get("ffn_dim") is None and "dim" in data:
            data = dict(data)
            data["ffn_dim"] = resolve_ffn_dim(
                int(data["dim"]),
                int(data.get("multiple_of", 256)),
                data.get("ffn_dim_multiplier"),
            )
        return data

    @model_validator(mode="after")
    def _check_shapes(self) -> Self:
        if self.dim % self.n_heads:
            raise ValueError(
                f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads}); "
                f"choose n_heads among the divisors of {self.dim}"
            )
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads}) "
                "for grouped-query attention"
            )
        if self.head_dim % 2:
            raise ValueError(
                f"head_dim = dim / n_heads = {self.head_dim} must be even for RoPE; "
                "change dim or n_heads"
            )
        return self

    @property
    def head_dim(self) -> int:
        """Width of one attention head, dim / n_heads (128 in every released Llama 3)."""
        return self.dim // self.n_heads

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> LlamaConfig:
        """A named size from `PRESETS`, optionally with some fields replaced."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
        if not overrides:
            return PRESETS[name]
        fields = PRESETS[name].model_dump()
        if {
            "dim",
            "multiple_of",
            "ffn_dim_multiplier",
        } & overrides.keys() and "ffn_dim" not in overrides:
            fields["ffn_dim"] = None  # re-derive it from the new shape
        return cls.model_validate({**fields, **overrides})

    @classmethod
    def from_meta_params(cls, params: Mapping[str, Any], **overrides: Any) -> LlamaConfig:
        """Read Meta's `params.json`. Keys that describe inference-time batch limits are ignored;
        any other key this class does not know is an error.

        `use_scaled_rope` gives the Llama 3.1 scaling. Meta's files do not record the factor (its
        reference code hard-codes 8), but Llama 3.2 1B and 3B were trained with 32: those two
        shapes get 32, as Hugging Face's converter does; pass `rope_scaling=` to override.
        """
        params = dict(params)
        for key in ("max_batch_size",):
            params.pop(key, None)
        use_scaled_rope = params.pop("use_scaled_rope", False)
        if "rope_scaling" not in params and use_scaled_rope:
            shape = (params.get("dim"), params.get("n_layers"))
            factor = 32.0 if shape in _LLAMA32_SHAPES else 8.0
            params["rope_scaling"] = RopeScaling(factor=factor).model_dump()
        if "n_kv_heads" not in params or params["n_kv_heads"] is None:
            params["n_kv_heads"] = params.get("n_heads")
        if "max_seq_len" not in params and params.get("rope_scaling"):
            params["max_seq_len"] = 131_072  # Llama 3.1 context length (§3.4.2)
        return cls.model_validate({**params, **overrides})

    @classmethod
    def from_toml(cls, path: str | Path) -> LlamaConfig:
        """Load a config from a TOML file: either `preset = "name"` plus overrides, or all fields."""
        with open(path, "rb") as f:
            data = tomllib.load(f)
        preset = data.pop("preset", None)
        return cls.from_preset(preset, **data) if preset else cls.model_validate(data)


def count_parameters(config: LlamaConfig) -> int:
    """Exact number of parameters of `Llama(config)` (a tied output projection counted once)."""
    d, kv = config.dim, config.n_kv_heads * config.head_dim
    attention = 2 * d * d + 2 * d * kv  # wq, wo: d×d; wk, wv: d×(n_kv_heads·head_dim)
    feed_forward = 3 * d * config.ffn_dim  # w1, w3: d→ffn; w2: ffn→d
    block = attention + feed_forward + 2 * d  # + attention_norm, ffn_norm
    embeddings = config.vocab_size * d * (1 if config.tie_word_embeddings else 2)
    return config.n_layers * block + embeddings + d  # + final norm


def flops_per_token(config: LlamaConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward) for model-FLOPs utilisation (MFU).

    Formula of PaLM (Chowdhery et al. 2022, appendix B), as torchtitan uses it:
    `6·N + 12·n_layers·n_heads·head_dim·seq_len`, where N counts the parameters that take part in
    matrix multiplications (all but the input embedding table, which is a lookup; a tied table is
    kept since it is the output projection too), and the second term is the QKᵀ and AV products
    over the full (non-causal) seq_len×seq_len attention, forward and backward.
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    matmul_params = count_parameters(config)
    if not config.tie_word_embeddings:
        matmul_params -= config.vocab_size * config.dim
    attention = 12 * config.n_layers * config.n_heads * config.head_dim * seq_len
    return float(6 * matmul_params + attention)


def _preset(**fields: Any) -> LlamaConfig:
    return LlamaConfig.model_validate(fields)


_LLAMA31_SCALING = RopeScaling(factor=8.0)  # llama-models apply_scaling: 8, 1, 4, 8192
_LLAMA32_SCALING = RopeScaling(factor=32.0)  # Llama 3.2 1B/3B config.json: factor 32
_LLAMA31_CONTEXT = 131_072  # 128K tokens after long-context pretraining (§3.4.2)
_LLAMA32_SHAPES = {(2048, 16), (3072, 28)}  # (dim, n_layers) of Llama 3.2 1B and 3B

PRESETS: Mapping[str, LlamaConfig] = MappingProxyType(
    {
        # Llama 3 (April 2024): 8K context, no RoPE scaling.
        "llama3-8b": _preset(
            dim=4096,
            n_layers=32,
            n_heads=32,
            n_kv_heads=8,
            multiple_of=1024,
            ffn_dim_multiplier=1.3,
            max_seq_len=8192,
        ),
        "llama3-70b": _preset(
            dim=8192,
            n_layers=80,
            n_heads=64,
            n_kv_heads=8,
            multiple_of=4096,
            ffn_dim_multiplier=1.3,
            max_seq_len=8192,
        ),
        # Llama 3.1 (the paper's models): 128K context with frequency scaling.
        "llama3.1-8b": _preset(
            dim=4096,
            n_layers=32,
            n_heads=32,
            n_kv_heads=8,
            multiple_of=1024,
            ffn_dim_multiplier=1.3,
            rope_scaling=_LLAMA31_SCALING,
            max_seq_len=_LLAMA31_CONTEXT,
        ),
        "llama3.1-70b": _preset(
            dim=8192,
            n_layers=80,
            n_heads=64,
            n_kv_heads=8,
            multiple_of=4096,
            ffn_dim_multiplier=1.3,
            rope_scaling=_LLAMA31_SCALING,
            max_seq_len=_LLAMA31_CONTEXT,
        ),
        "llama3.1-405b": _preset(
            dim=16384,
            n_layers=126,
            n_heads=128,
            n_kv_heads=8,
            multiple_of=4096,
            ffn_dim_multiplier=1.2,
            rope_scaling=_LLAMA31_SCALING,
            max_seq_len=_LLAMA31_CONTEXT,
        ),
        # Llama 3.2 lightweight text models: tied embeddings, scaling factor 32.
        "llama3.2-1b": _preset(
            dim=2048,
            n_layers=16,
            n_heads=32,
            n_kv_heads=8,
            multiple_of=256,
            ffn_dim_multiplier=1.5,
            rope_scaling=_LLAMA32_SCALING,
            max_seq_len=_LLAMA31_CONTEXT,
            tie_word_embeddings=True,
        ),
        "llama3.2-3b": _preset(
            dim=3072,
            n_layers=28,
            n_heads=24,
            n_kv_heads=8,
            multiple_of=256,
            ffn_dim_multiplier=1.0,
            rope_scaling=_LLAMA32_SCALING,
            max_seq_len=_LLAMA31_CONTEXT,
            tie_word_embeddings=True,
        ),
        # Small enough to train on a laptop CPU in minutes, with the full 128,256-token vocabulary.
        # No RoPE scaling (a change of December 2026: earlier `debug` runs had Llama 3.1's, and
        # their checkpoints predate the recorded model config that refuses a resume as another
        # model: do not resume them with this preset). The scaling slows the RoPE
        # frequencies whose wavelength exceeds the original 8K context, rotations a 2K-context toy
        # barely uses, and transformers warns when loading a model whose context is shorter than
        # the scaling's original one, so the demo's export would not load cleanly.
        "debug": _preset(
            dim=256,
            n_layers=4,
            n_heads=8,
            n_kv_heads=2,
            multiple_of=256,
            rope_scaling=None,
            max_seq_len=2048,
        ),
    }
)
