"""LlamaConfig, the named sizes, and the parameter and FLOP counts."""

from __future__ import annotations

import pydantic
import pytest
import torch

from llama_model import PRESETS, Llama, LlamaConfig, RopeScaling, count_parameters, flops_per_token

# Published parameter counts of the released checkpoints (Meta's model cards / HF safetensors index).
PUBLISHED_COUNTS = {
    "llama3-8b": 8_030_261_248,
    "llama3.1-8b": 8_030_261_248,
    "llama3-70b": 70_553_706_496,
    "llama3.1-70b": 70_553_706_496,
    "llama3.1-405b": 405_853_388_800,
    "llama3.2-1b": 1_235_814_400,
    "llama3.2-3b": 3_212_749_824,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_COUNTS))
def test_count_parameters_matches_released_checkpoints(name: str) -> None:
    """count_parameters gives the exact published parameter count of each released size."""
    assert count_parameters(LlamaConfig.from_preset(name)) == PUBLISHED_COUNTS[name]


@pytest.mark.parametrize("name", ["llama3.1-405b", "llama3.2-3b", "debug"])
def test_meta_device_model_has_counted_parameters(name: str) -> None:
    """A model built on the meta device (no memory, even for 405B) has exactly count_parameters."""
    config = LlamaConfig.from_preset(name)
    with torch.device("meta"):
        model = Llama(config)
    assert sum(p.numel() for p in model.parameters()) == count_parameters(config)


def test_table3_shapes() -> None:
    """Presets carry the shapes of Table 3 of the paper (layers, width, FFN, heads, KV heads)."""
    table3 = {  # name: (layers, dim, ffn_dim, heads, kv_heads)
        "llama3.1-8b": (32, 4096, 14336, 32, 8),
        "llama3.1-70b": (80, 8192, 28672, 64, 8),
        "llama3.1-405b": (126, 16384, 53248, 128, 8),
    }
    for name, shape in table3.items():
        c = PRESETS[name]
        assert (c.n_layers, c.dim, c.ffn_dim, c.n_heads, c.n_kv_heads) == shape
        assert c.rope_theta == 500_000.0 and c.vocab_size == 128_256 and c.norm_eps == 1e-5
        assert c.rope_scaling == RopeScaling(
            factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=8192
        )


def test_llama32_presets_tie_embeddings_and_scale_by_32() -> None:
    """Llama 3.2 1B/3B tie the output projection to the embeddings and use RoPE factor 32."""
    for name in ("llama3.2-1b", "llama3.2-3b"):
        assert PRESETS[name].tie_word_embeddings
        assert PRESETS[name].rope_scaling is not None
        assert PRESETS[name].rope_scaling.factor == 32.0


def test_debug_preset_is_small_with_full_vocab() -> None:
    """The debug preset has 4 layers, width 256 and the full 128,256-token vocabulary."""
    c = PRESETS["debug"]
    assert (c.n_layers, c.dim, c.vocab_size) == (4, 256, 128_256)
    assert count_parameters(c) < 80_000_000


def test_unknown_preset_lists_valid_ones() -> None:
    """An unknown preset name is an error that lists every valid preset."""
    with pytest.raises(ValueError, match="unknown preset 'llama3-9b'") as info:
        LlamaConfig.from_preset("llama3-9b")
    for name in PRESETS:
        assert name in str(info.value)


def test_from_preset_overrides_rederive_ffn_dim() -> None:
    """Overriding dim re-derives ffn_dim with Meta's rule; other fields are kept."""
    c = LlamaConfig.from_preset("llama3.1-8b", dim=2048, n_heads=16)
    assert c.ffn_dim == 7168  # int(int(2*4*2048/3)*1.3) = 7099, rounded up to a multiple of 1024
    assert c.n_layers == 32


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"dim": 100, "n_layers": 1, "n_heads": 3, "n_kv_heads": 1}, "divisible by n_heads"),
        ({"dim": 128, "n_layers": 1, "n_heads": 4, "n_kv_heads": 3}, "multiple of n_kv_heads"),
        ({"dim": 12, "n_layers": 1, "n_heads": 4, "n_kv_heads": 2}, "must be even for RoPE"),
        ({"dim": 128, "n_layers": 0, "n_heads": 4, "n_kv_heads": 2}, "n_layers"),
        ({"dim": 128, "n_layers": 1, "n_heads": 4, "n_kv_heads": 2, "norm_eps": 0}, "norm_eps"),
        ({"dim": 128, "n_layers": 1, "n_heads": 4, "n_kv_heads": 2, "dropout": 0.1}, "dropout"),
    ],
)
def test_invalid_config_names_the_problem(fields: dict[str, object], message: str) -> None:
    """Invalid shapes and unknown fields raise a validation error naming the field."""
    with pytest.raises(pydantic.ValidationError, match=message):
        LlamaConfig.model_validate(fields)


def test_rope_scaling_band_must_be_ordered() -> None:
    """high_freq_factor must exceed low_freq_factor."""
    with pytest.raises(pydantic.ValidationError, match="high_freq_factor"):
        RopeScaling(low_freq_factor=4.0, high_freq_factor=1.0)


def test_config_is_frozen() -> None:
    """Configs are immutable."""
    with pytest.raises(pydantic.ValidationError):
        PRESETS["debug"].dim = 512  # type: ignore[misc]


def test_from_meta_params_reads_released_params_json() -> None:
    """Meta's Llama 3.1 8B params.json gives the 8B preset."""
    params = {
        "dim": 4096, "ffn_dim_multiplier": 1.3, "multiple_of": 1024, "n_heads": 32,
        "n_kv_heads": 8, "n_layers": 32, "norm_eps": 1e-05, "rope_theta": 500000.0,
        "use_scaled_rope": True, "vocab_size": 128256,
    }  # fmt: skip
    assert LlamaConfig.from_meta_params(params) == PRESETS["llama3.1-8b"]


def test_from_meta_params_gives_llama32_factor_32() -> None:
    """Meta's Llama 3.2 1B params.json (use_scaled_rope, no factor recorded) gets factor 32,
    the value the model was trained with, not the 8 Meta's reference code hard-codes."""
    params = {
        "dim": 2048, "ffn_dim_multiplier": 1.5, "multiple_of": 256, "n_heads": 32,
        "n_kv_heads": 8, "n_layers": 16, "norm_eps": 1e-05, "rope_theta": 500000.0,
        "use_scaled_rope": True, "vocab_size": 128256,
    }  # fmt: skip
    config = LlamaConfig.from_meta_params(params, tie_word_embeddings=True)
    assert config == PRESETS["llama3.2-1b"]


def test_from_toml(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A TOML file names a preset and overrides fields; an unknown key is rejected."""
    path = tmp_path / "model.toml"
    path.write_text('preset = "debug"\nn_layers = 2\n')
    assert LlamaConfig.from_toml(path) == PRESETS["debug"].model_copy(update={"n_layers": 2})
    path.write_text('preset = "debug"\nlayers = 2\n')
    with pytest.raises(pydantic.ValidationError, match="layers"):
        LlamaConfig.from_toml(path)


def test_flops_per_token_formula() -> None:
    """flops_per_token is 6·(non-embedding matmul params) + 12·L·H·Dh·T, computed by hand for 8B."""
    c = PRESETS["llama3.1-8b"]
    n_matmul = 8_030_261_248 - 128_256 * 4096  # all but the input embedding table
    assert flops_per_token(c, 8192) == 6 * n_matmul + 12 * 32 * 32 * 128 * 8192
    with pytest.raises(ValueError, match="seq_len"):
        flops_per_token(c, 0)
