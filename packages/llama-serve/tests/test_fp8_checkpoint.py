"""FP8 checkpoints in the `fbgemm_fp8` layout of Llama 3.1 405B Instruct FP8 (§6.2).

The files are read back with `safetensors` and `json`, not with our reader, and the expected
tensor names are written out here in Hugging Face's names: FP8 `...mlp.{gate,up,down}_proj.weight`
[out, in] with float32 `...weight_scale` [out, 1] for the layers the recipe quantizes, everything
else bf16, and `modules_to_not_convert` naming exactly the linear layers left in bf16. transformers
is the independent reader: it parses the quantization config, and its own `fbgemm_fp8`
integration (`should_convert_module`, `FbgemmFp8Linear`) builds a model whose state dict our
tensors fill exactly. transformers cannot load the checkpoint end to end here: its quantizer
requires a CUDA or XPU device and fbgemm-gpu (`FbgemmFp8HfQuantizer.validate_environment`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from llama_kernels import Fp8RowwiseLinear
from llama_model import Llama, LlamaConfig, load_checkpoint, save_checkpoint
from llama_serve import quantize_fp8
from llama_serve.cli import main
from llama_serve.fp8_checkpoint import is_fp8_checkpoint, load_fp8_checkpoint, save_fp8_checkpoint

N_LAYERS = 4
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def _config(**overrides: object) -> LlamaConfig:
    """Width 64, 4 heads / 2 KV heads, FFN 192, vocabulary 97."""
    fields = {"dim": 64, "n_layers": N_LAYERS, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 97,
              "multiple_of": 32, "max_seq_len": 64} | overrides  # fmt: skip
    return LlamaConfig.model_validate(fields)


def _bf16_llama(seed: int = 0, **overrides: object) -> Llama:
    model = Llama(_config(**overrides))
    model.init_weights(seed=seed, std=0.05)
    return model.to(torch.bfloat16).eval()


def _fp8_llama(seed: int = 0, *, skip_first_last: bool = True, **overrides: object) -> Llama:
    return quantize_fp8(_bf16_llama(seed, **overrides), skip_first_last=skip_first_last)


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory, read with safetensors (not our reader)."""
    index = directory / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if index.is_file()
        else ["model.safetensors"]
    )
    out: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(directory / file, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                out[name] = f.get_tensor(name)
    return out


def _quantization_config(directory: Path) -> dict[str, object]:
    config = json.loads((directory / "config.json").read_text())
    assert isinstance(config["quantization_config"], dict)
    return config["quantization_config"]


def _expected_bf16_modules(fp8_layers: set[int]) -> set[str]:
    """Hugging Face names of the linear layers §6.2 leaves in bf16."""
    attention = {f"model.layers.{i}.self_attn.{p}" for i in range(N_LAYERS) for p in ATTENTION}
    mlp = {f"model.layers.{i}.mlp.{p}" for i in range(N_LAYERS) if i not in fp8_layers for p in MLP}
    return attention | mlp | {"lm_head"}


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    )


def _logits(model: Llama) -> torch.Tensor:
    tokens = torch.arange(24).reshape(2, 12) * 7 % 97
    with torch.inference_mode():
        return model(tokens)


@pytest.fixture
def fp8_dir(tmp_path: Path) -> Path:
    """The recipe's FP8 checkpoint of a 4-layer model (layers 1 and 2 quantized)."""
    return save_fp8_checkpoint(_fp8_llama(), tmp_path / "fp8")


# --------------------------------------------------------------------------------------------
# The format


def test_tensors_have_the_specified_names_dtypes_and_shapes(fp8_dir: Path) -> None:
    """Layers 1-2's MLP weights are float8_e4m3fn [out, in] with float32 [out, 1] scales; every
    other tensor is bf16 under its transformers name; nothing else is in the file."""
    tensors = _tensors(fp8_dir)
    shapes = {"gate_proj": (192, 64), "up_proj": (192, 64), "down_proj": (64, 192)}
    expected: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {
        "model.embed_tokens.weight": (torch.bfloat16, (97, 64)),
        "model.norm.weight": (torch.bfloat16, (64,)),
        "lm_head.weight": (torch.bfloat16, (97, 64)),
    }
    for i in range(N_LAYERS):
        layer = f"model.layers.{i}"
        expected[f"{layer}.input_layernorm.weight"] = (torch.bfloat16, (64,))
        expected[f"{layer}.post_attention_layernorm.weight"] = (torch.bfloat16, (64,))
        for proj, shape in (("q_proj", (64, 64)), ("k_proj", (32, 64)), ("v_proj", (32, 64)),
                            ("o_proj", (64, 64))):  # fmt: skip
            expected[f"{layer}.self_attn.{proj}.weight"] = (torch.bfloat16, shape)
        for proj, shape in shapes.items():
            if i in (1, 2):
                expected[f"{layer}.mlp.{proj}.weight"] = (torch.float8_e4m3fn, shape)
                expected[f"{layer}.mlp.{proj}.weight_scale"] = (torch.float32, (shape[0], 1))
            else:
                expected[f"{layer}.mlp.{proj}.weight"] = (torch.bfloat16, shape)
    got = {name: (t.dtype, tuple(t.shape)) for name, t in tensors.items()}
    assert got == expected


def test_config_carries_the_fbgemm_fp8_quantization_config(fp8_dir: Path) -> None:
    """quant_method fbgemm_fp8, activation_scale_ub 1200.0, and modules_to_not_convert naming
    exactly (and once each) the attention projections, layers 0 and 3's MLP and lm_head."""
    quantization = _quantization_config(fp8_dir)
    assert set(quantization) == {"quant_method", "activation_scale_ub", "modules_to_not_convert"}
    assert quantization["quant_method"] == "fbgemm_fp8"
    assert quantization["activation_scale_ub"] == 1200.0
    skipped = quantization["modules_to_not_convert"]
    assert isinstance(skipped, list)
    assert len(skipped) == len(set(skipped))
    assert set(skipped) == _expected_bf16_modules(fp8_layers={1, 2})
    config = json.loads((fp8_dir / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16"
    assert config["num_hidden_layers"] == N_LAYERS


def test_fp8_tensors_are_the_models_bits(tmp_path: Path) -> None:
    """Each written FP8 weight and scale is the quantized module's, bit for bit."""
    model = _fp8_llama()
    tensors = _tensors(save_fp8_checkpoint(model, tmp_path / "fp8"))
    names = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
    for i in (1, 2):
        for ours, theirs in names.items():
            module = model.get_submodule(f"layers.{i}.feed_forward.{ours}")
            assert isinstance(module, Fp8RowwiseLinear)
            prefix = f"model.layers.{i}.mlp.{theirs}"
            assert _same_bits(tensors[f"{prefix}.weight"], module.weight_fp8)
            assert torch.equal(tensors[f"{prefix}.weight_scale"], module.weight_scale[:, None])


def test_no_skip_first_last_quantizes_every_layer(tmp_path: Path) -> None:
    """Without skip_first_last every layer's MLP is FP8 and only attention and lm_head stay bf16."""
    directory = save_fp8_checkpoint(_fp8_llama(skip_first_last=False), tmp_path / "fp8")
    tensors = _tensors(directory)
    skipped = _quantization_config(directory)["modules_to_not_convert"]
    assert isinstance(skipped, list)
    assert set(skipped) == _expected_bf16_modules(fp8_layers=set(range(N_LAYERS)))
    fp8 = {n for n, t in tensors.items() if t.dtype == torch.float8_e4m3fn}
    assert fp8 == {f"model.layers.{i}.mlp.{p}.weight" for i in range(N_LAYERS) for p in MLP}


def test_scale_ub_is_recorded_and_restored(tmp_path: Path) -> None:
    """A model quantized with scale_ub=600 writes activation_scale_ub 600.0 and loads with it."""
    model = quantize_fp8(_bf16_llama(), scale_ub=600)
    directory = save_fp8_checkpoint(model, tmp_path / "fp8")
    assert _quantization_config(directory)["activation_scale_ub"] == 600.0
    loaded = load_fp8_checkpoint(directory)
    assert {m.scale_ub for m in loaded.modules() if isinstance(m, Fp8RowwiseLinear)} == {600.0}


# --------------------------------------------------------------------------------------------
# transformers as the independent reader


def test_transformers_parses_the_quantization_config(fp8_dir: Path) -> None:
    """transformers reads config.json's quantization_config as an FbgemmFp8Config with our values."""
    transformers = pytest.importorskip("transformers")
    from transformers.quantizers.auto import AutoQuantizationConfig

    config = transformers.AutoConfig.from_pretrained(fp8_dir)
    parsed = AutoQuantizationConfig.from_dict(config.quantization_config)
    assert type(parsed).__name__ == "FbgemmFp8Config"
    assert parsed.activation_scale_ub == 1200.0
    assert parsed.modules_to_not_convert == _quantization_config(fp8_dir)["modules_to_not_convert"]


def test_transformers_fbgemm_integration_takes_our_tensors(fp8_dir: Path) -> None:
    """The model transformers' fbgemm_fp8 integration builds from our config.json (each
    nn.Linear that `should_convert_module` converts becomes an `FbgemmFp8Linear`) has exactly
    our tensors' names, dtypes and shapes, and loads them strictly."""
    transformers = pytest.importorskip("transformers")
    from transformers.integrations.fbgemm_fp8 import FbgemmFp8Linear
    from transformers.quantizers.quantizers_utils import should_convert_module

    config = transformers.AutoConfig.from_pretrained(fp8_dir)
    skipped = config.quantization_config["modules_to_not_convert"]
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    converted = []
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and should_convert_module(name, skipped):
            fp8 = FbgemmFp8Linear(module.in_features, module.out_features, bias=False)  # type: ignore[no-untyped-call]
            model.set_submodule(name, fp8)
            converted.append(name)
    assert sorted(converted) == sorted(f"model.layers.{i}.mlp.{p}" for i in (1, 2) for p in MLP)
    theirs = {n: (t.dtype, tuple(t.shape)) for n, t in model.state_dict().items()}
    tensors = _tensors(fp8_dir)
    assert theirs == {n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()}
    model.load_state_dict(tensors, strict=True)


# --------------------------------------------------------------------------------------------
# Round trip


def test_round_trip_is_bit_identical(tmp_path: Path) -> None:
    """save → load gives the same FP8 weights and scales (bits), the same bf16 parameters, FP8
    layers in the same places, and identical logits."""
    model = _fp8_llama()
    loaded = load_fp8_checkpoint(save_fp8_checkpoint(model, tmp_path / "fp8"))
    ours = dict(model.named_modules())
    theirs = dict(loaded.named_modules())
    assert {n for n, m in ours.items() if isinstance(m, Fp8RowwiseLinear)} == {
        n for n, m in theirs.items() if isinstance(m, Fp8RowwiseLinear)
    }
    expected, got = model.state_dict(), loaded.state_dict()
    assert expected.keys() == got.keys()
    for name, tensor in expected.items():
        assert _same_bits(got[name], tensor), name
    assert torch.equal(_logits(loaded), _logits(model))


@pytest.mark.parametrize("case", ["tied", "sharded"])
def test_round_trip_tied_and_sharded(tmp_path: Path, case: str) -> None:
    """Tied embeddings (lm_head still listed, as transformers has one) and a sharded checkpoint
    (each scale in its weight's shard, the index updated) round-trip exactly."""
    tied = case == "tied"
    model = _fp8_llama(tie_word_embeddings=tied)
    directory = save_fp8_checkpoint(
        model, tmp_path / "fp8", max_shard_size=1 if not tied else 2**30
    )
    skipped = _quantization_config(directory)["modules_to_not_convert"]
    assert isinstance(skipped, list) and "lm_head" in skipped
    if not tied:
        index = json.loads((directory / "model.safetensors.index.json").read_text())
        weight_map = index["weight_map"]
        assert weight_map.keys() == _tensors(directory).keys()
        for name, file in weight_map.items():
            if name.endswith(".weight_scale"):
                assert weight_map[name.removesuffix("_scale")] == file
        sizes = sum(t.numel() * t.element_size() for t in _tensors(directory).values())
        assert index["metadata"]["total_size"] == sizes
    loaded = load_fp8_checkpoint(directory)
    assert torch.equal(_logits(loaded), _logits(model))


def test_load_in_another_dtype_keeps_fp8(fp8_dir: Path) -> None:
    """dtype=float32 casts the bf16 tensors; FP8 weights stay float8 and scales float32."""
    loaded = load_fp8_checkpoint(fp8_dir, dtype=torch.float32)
    dtypes = {t.dtype for n, t in loaded.state_dict().items() if not n.endswith(("_fp8", "_scale"))}
    assert dtypes == {torch.float32}
    fp8 = [m for m in loaded.modules() if isinstance(m, Fp8RowwiseLinear)]
    assert len(fp8) == 6 and all(m.weight_fp8.dtype == torch.float8_e4m3fn for m in fp8)


def test_is_fp8_checkpoint(tmp_path: Path, fp8_dir: Path) -> None:
    """True for an fbgemm_fp8 directory; False for a bf16 checkpoint and a directory without one."""
    bf16 = save_checkpoint(_bf16_llama(), tmp_path / "bf16")
    assert is_fp8_checkpoint(fp8_dir)
    assert not is_fp8_checkpoint(bf16)
    assert not is_fp8_checkpoint(tmp_path / "nothing")


# --------------------------------------------------------------------------------------------
# Refusals


def _rewrite(directory: Path, edit: dict[str, torch.Tensor | None]) -> None:
    """Replace (tensor) or drop (None) tensors of a single-file checkpoint."""
    tensors = load_file(directory / "model.safetensors")
    for name, tensor in edit.items():
        if tensor is None:
            del tensors[name]
        else:
            tensors[name] = tensor
    save_file(tensors, directory / "model.safetensors")


def _edit_quantization(directory: Path, **fields: object) -> None:
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"].update(fields)
    (directory / "config.json").write_text(json.dumps(config))


GATE = "model.layers.1.mlp.gate_proj"


def test_refuses_unknown_quant_method(fp8_dir: Path) -> None:
    """Another quant_method is refused by name."""
    _edit_quantization(fp8_dir, quant_method="gptq")
    with pytest.raises(ValueError, match=r"quant_method 'gptq'.*fbgemm_fp8"):
        load_fp8_checkpoint(fp8_dir)


def test_refuses_a_checkpoint_that_is_not_quantized(tmp_path: Path) -> None:
    """A bf16 checkpoint is sent to llama_model.load_checkpoint."""
    bf16 = save_checkpoint(_bf16_llama(), tmp_path / "bf16")
    with pytest.raises(ValueError, match=r"no quantization_config.*load_checkpoint"):
        load_fp8_checkpoint(bf16)


@pytest.mark.parametrize("value", [0, -1.0, "1200", True])
def test_refuses_bad_activation_scale_ub(fp8_dir: Path, value: object) -> None:
    """activation_scale_ub must be a number > 0; the message shows the value."""
    _edit_quantization(fp8_dir, activation_scale_ub=value)
    with pytest.raises(ValueError, match=r"activation_scale_ub must be a number > 0.*got"):
        load_fp8_checkpoint(fp8_dir)


def test_refuses_missing_weight_scale(fp8_dir: Path) -> None:
    """An FP8 weight without its scale is named."""
    _rewrite(fp8_dir, {f"{GATE}.weight_scale": None})
    with pytest.raises(ValueError, match=rf"'{GATE}.weight' is .*no '{GATE}.weight_scale'"):
        load_fp8_checkpoint(fp8_dir)


def test_refuses_scale_without_fp8_weight(fp8_dir: Path) -> None:
    """A scale beside a bf16 weight is named."""
    _rewrite(fp8_dir, {f"{GATE}.weight": torch.zeros(192, 64, dtype=torch.bfloat16)})
    with pytest.raises(ValueError, match=rf"'{GATE}.weight_scale' has no"):
        load_fp8_checkpoint(fp8_dir)


@pytest.mark.parametrize(
    ("name", "tensor", "message"),
    [
        (f"{GATE}.weight", torch.zeros(191, 64).to(torch.float8_e4m3fn), r"\(191, 64\).*\(192, 64\)"),
        (f"{GATE}.weight_scale", torch.ones(192, 2), r"\(192, 2\).*\(192, 1\)"),
        ("model.layers.0.self_attn.q_proj.weight", torch.zeros(64, 63, dtype=torch.bfloat16),
         r"\(64, 63\).*\(64, 64\)"),
    ],
)  # fmt: skip
def test_refuses_shape_mismatch(
    fp8_dir: Path, name: str, tensor: torch.Tensor, message: str
) -> None:
    """A tensor of the wrong shape is named with both shapes."""
    _rewrite(fp8_dir, {name: tensor})
    with pytest.raises(ValueError, match=rf"'{name}' has shape {message}"):
        load_fp8_checkpoint(fp8_dir)


def test_refuses_fp8_layer_listed_as_not_converted(fp8_dir: Path) -> None:
    """An FP8 layer that modules_to_not_convert names (transformers would read it as bf16)."""
    skipped = _quantization_config(fp8_dir)["modules_to_not_convert"]
    assert isinstance(skipped, list)
    _edit_quantization(fp8_dir, modules_to_not_convert=[*skipped, GATE])
    with pytest.raises(ValueError, match=rf"modules_to_not_convert names '{GATE}'"):
        load_fp8_checkpoint(fp8_dir)


def test_refuses_bf16_layer_not_listed(fp8_dir: Path) -> None:
    """A bf16 layer missing from modules_to_not_convert (transformers would expect FP8)."""
    skipped = _quantization_config(fp8_dir)["modules_to_not_convert"]
    assert isinstance(skipped, list)
    _edit_quantization(fp8_dir, modules_to_not_convert=[s for s in skipped if s != "lm_head"])
    with pytest.raises(ValueError, match="does not name 'lm_head'"):
        load_fp8_checkpoint(fp8_dir)


def test_refuses_to_save_an_unquantized_or_uncapped_model(tmp_path: Path) -> None:
    """save_fp8_checkpoint needs FP8 layers, and for fbgemm_fp8 a finite activation_scale_ub."""
    with pytest.raises(ValueError, match=r"no Fp8RowwiseLinear.*quantize_fp8"):
        save_fp8_checkpoint(_bf16_llama(), tmp_path / "a")
    with pytest.raises(ValueError, match=r"fbgemm_fp8 records a finite.*scale_ub=inf"):
        save_fp8_checkpoint(quantize_fp8(_bf16_llama(), scale_ub=math.inf), tmp_path / "b")
    assert not any(tmp_path.iterdir())


def test_failed_save_leaves_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A save that fails while writing FP8 shards leaves the earlier checkpoint as it was and no
    staging directory behind."""
    target = save_fp8_checkpoint(_fp8_llama(seed=0), tmp_path / "fp8")
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def fail(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("llama_serve.fp8_checkpoint.save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        save_fp8_checkpoint(_fp8_llama(seed=1), target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["fp8"]


# --------------------------------------------------------------------------------------------
# `llama-serve quantize`


@pytest.fixture
def bf16_dir(tmp_path: Path) -> Path:
    """A tiny random bf16 checkpoint written by llama_model, with a tokenizer file and sampling
    defaults of its own (to be copied as they are)."""
    directory = save_checkpoint(_bf16_llama(seed=3), tmp_path / "src")
    (directory / "generation_config.json").write_text('{"eos_token_id": [5, 6], "top_p": 0.5}\n')
    (directory / "tokenizer.json").write_text('{"model": "stand-in"}\n')
    return directory


def test_cli_quantize_end_to_end(
    tmp_path: Path, bf16_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`llama-serve quantize SRC DST` writes the recipe's checkpoint (the model equals
    quantize_fp8 of SRC loaded in bf16) and copies SRC's tokenizer and generation config."""
    dst = tmp_path / "dst"
    assert main(["quantize", str(bf16_dir), str(dst)]) == 0
    assert "6 linear layers in FP8" in capsys.readouterr().out
    assert is_fp8_checkpoint(dst)
    for name in ("generation_config.json", "tokenizer.json"):
        assert (dst / name).read_bytes() == (bf16_dir / name).read_bytes()
    expected = quantize_fp8(load_checkpoint(bf16_dir, dtype=torch.bfloat16))
    loaded = load_fp8_checkpoint(dst)
    for name, tensor in expected.state_dict().items():
        assert _same_bits(loaded.state_dict()[name], tensor), name
    assert torch.equal(_logits(loaded), _logits(expected))


def test_cli_quantize_compressed_tensors(tmp_path: Path, bf16_dir: Path) -> None:
    """`--format compressed-tensors` writes that layout: the recipe's model without the
    activation bound, equal to quantize_fp8(scale_ub=inf) of SRC."""
    dst = tmp_path / "dst"
    assert main(["quantize", str(bf16_dir), str(dst), "--format", "compressed-tensors"]) == 0
    assert _quantization_config(dst)["quant_method"] == "compressed-tensors"
    expected = quantize_fp8(load_checkpoint(bf16_dir, dtype=torch.bfloat16), scale_ub=math.inf)
    loaded = load_fp8_checkpoint(dst)
    for name, tensor in expected.state_dict().items():
        assert _same_bits(loaded.state_dict()[name], tensor), name
    assert torch.equal(_logits(loaded), _logits(expected))


def test_cli_no_skip_first_last_and_scale_ub(tmp_path: Path, bf16_dir: Path) -> None:
    """--no-skip-first-last quantizes every layer's MLP; --scale-ub is recorded."""
    dst = tmp_path / "dst"
    assert (
        main(["quantize", str(bf16_dir), str(dst), "--no-skip-first-last", "--scale-ub", "600"])
        == 0
    )
    quantization = _quantization_config(dst)
    assert quantization["activation_scale_ub"] == 600.0
    skipped = quantization["modules_to_not_convert"]
    assert isinstance(skipped, list)
    assert set(skipped) == _expected_bf16_modules(fp8_layers=set(range(N_LAYERS)))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["missing", "out"], "SRC 'missing' is not a checkpoint directory"),
        (["{src}", "{src}"], "is SRC"),
        (["{src}", "out", "--scale-ub", "0"], "--scale-ub must be a finite number > 0.*got 0.0"),
        (["{src}", "out", "--scale-ub", "nan"], "--scale-ub must be.*got nan"),
        (["{fp8}", "out"], "is already an FP8 checkpoint"),
        (
            ["{src}", "out", "--format", "compressed-tensors", "--scale-ub", "1200"],
            "--scale-ub does not apply to --format compressed-tensors",
        ),
    ],
)
def test_cli_usage_errors(
    tmp_path: Path,
    bf16_dir: Path,
    fp8_dir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    message: str,
) -> None:
    """Usage errors exit with 2 and one line on stderr naming the value; nothing is written."""
    monkeypatch.chdir(tmp_path)
    argv = ["quantize", *(a.format(src=bf16_dir, fp8=fp8_dir) for a in args)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()


def test_cli_refused_checkpoint_exits_1(
    tmp_path: Path, bf16_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A checkpoint the library refuses (two layers: nothing to quantize) exits with 1, one line."""
    src = save_checkpoint(_bf16_llama(n_layers=2), tmp_path / "two")
    assert main(["quantize", str(src), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "2 layer(s): nothing would be quantized" in err


def test_cli_without_a_command_is_a_usage_error() -> None:
    """`llama-serve` alone exits with argparse's code 2."""
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2


# --------------------------------------------------------------------------------------------
# Serving it: `Engine.from_pretrained`


def test_engine_serves_an_fp8_checkpoint_as_the_recipe_would(
    tmp_path: Path, bf16_dir: Path
) -> None:
    """An FP8 checkpoint is served in FP8 from its stored weights (with or without
    quantization="fp8"), and a bf16 checkpoint with quantization="fp8" is quantized on load: all
    three give the greedy tokens of quantize_fp8 applied in memory; generation_config's stop ids
    come along."""
    from llama_serve import Engine, SamplingParams

    dst = tmp_path / "dst"
    assert main(["quantize", str(bf16_dir), str(dst)]) == 0
    reference = Engine(quantize_fp8(load_checkpoint(bf16_dir, dtype=torch.bfloat16)))
    prompts = [[1, 2, 3, 4], [50, 40, 30]]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in reference.generate(prompts, params)]
    engines = [
        Engine.from_pretrained(dst, dtype="bfloat16", device="cpu"),
        Engine.from_pretrained(dst, dtype="bfloat16", device="cpu", quantization="fp8"),
        Engine.from_pretrained(bf16_dir, dtype="bfloat16", device="cpu", quantization="fp8"),
    ]
    for engine in engines:
        fp8 = [m for m in engine.model.modules() if isinstance(m, Fp8RowwiseLinear)]
        assert len(fp8) == 6  # the feed-forward matmuls of layers 1 and 2
        assert engine.eos_token_ids == {5, 6}
        got = [o.outputs[0].token_ids for o in engine.generate(prompts, params)]
        assert got == expected
    with pytest.raises(ValueError, match="quantization must be None or 'fp8', got 'int4'"):
        Engine.from_pretrained(dst, quantization="int4")  # type: ignore[arg-type]


def test_save_refuses_a_target_that_holds_no_checkpoint(tmp_path: Path) -> None:
    """Like save_checkpoint: a file, or a non-empty directory without config.json, is refused
    before anything is written, and stays as it was."""
    occupied = tmp_path / "notes"
    occupied.mkdir()
    (occupied / "todo.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="non-empty directory that holds no checkpoint"):
        save_fp8_checkpoint(_fp8_llama(), occupied)
    assert [p.name for p in occupied.iterdir()] == ["todo.txt"]
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(FileExistsError, match="exists and is not a directory"):
        save_fp8_checkpoint(_fp8_llama(), a_file)


# --------------------------------------------------------------------------------------------
# compressed-tensors: the layout vLLM prefers (llm-compressor's FP8_DYNAMIC), no activation bound

# What compressed-tensors 0.17.0 (the release vLLM 0.32 pins) writes into config.json for
# llm-compressor's FP8_DYNAMIC scheme targeting Linear: transcribed from
# `ModelCompressor.update_config` run on a transformers Llama with §6.2's layers quantized
# (test_fp8_compressed_vllm.py reruns that comparison wherever compressed-tensors is installed).
CT_ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
CT_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")  # LlamaMLP's order, not ours
FP8_DYNAMIC_ARGS: dict[str, Any] = {"actorder": None, "block_structure": None, "group_size": None, "num_bits": 8,
                    "observer_kwargs": {}, "scale_dtype": None, "symmetric": True,
                    "type": "float", "zp_dtype": None}  # fmt: skip
EXPECTED_CT_CONFIG = {
    "config_groups": {
        "group_0": {
            "format": "float-quantized",
            "input_activations": FP8_DYNAMIC_ARGS
            | {"dynamic": True, "observer": None, "strategy": "token"},
            "output_activations": None,
            "targets": ["Linear"],
            "weights": FP8_DYNAMIC_ARGS
            | {"dynamic": False, "observer": "memoryless_minmax", "strategy": "channel"},
        }
    },
    "format": "float-quantized",
    "global_compression_ratio": None,
    "ignore": [  # every bf16 linear layer, in transformers' module order; lm_head last
        *(f"model.layers.0.{p}" for p in (*CT_ATTENTION, *CT_MLP)),
        *(f"model.layers.{i}.{p}" for i in (1, 2) for p in CT_ATTENTION),
        *(f"model.layers.3.{p}" for p in (*CT_ATTENTION, *CT_MLP)),
        "lm_head",
    ],
    "kv_cache_scheme": None,
    "quant_method": "compressed-tensors",
    "quantization_status": "compressed",
    "sparsity_config": {},
    "transform_config": {},
    "version": "0.17.0",
}


def _uncapped_llama(seed: int = 0, **overrides: object) -> Llama:
    """§6.2's recipe without the activation bound: what a compressed-tensors checkpoint holds."""
    return quantize_fp8(_bf16_llama(seed, **overrides), scale_ub=math.inf)


@pytest.fixture
def ct_dir(tmp_path: Path) -> Path:
    """The uncapped recipe's compressed-tensors checkpoint of the 4-layer model."""
    return save_fp8_checkpoint(_uncapped_llama(), tmp_path / "ct", format="compressed-tensors")


def test_ct_config_is_llm_compressors_fp8_dynamic(ct_dir: Path) -> None:
    """config.json's quantization_config is, key for key and in order of `ignore`, what
    compressed-tensors writes for FP8_DYNAMIC with §6.2's bf16 layers ignored."""
    assert _quantization_config(ct_dir) == EXPECTED_CT_CONFIG
    assert json.loads((ct_dir / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_ct_tensors_are_the_fbgemm_checkpoints(tmp_path: Path) -> None:
    """Both formats store the same tensors, bit for bit: only the quantization_config differs."""
    fbgemm = _tensors(save_fp8_checkpoint(_fp8_llama(), tmp_path / "fbgemm"))
    ct = _tensors(save_fp8_checkpoint(_uncapped_llama(), tmp_path / "ct", format="compressed-tensors"))  # fmt: skip
    assert fbgemm.keys() == ct.keys()
    for name, tensor in fbgemm.items():
        assert _same_bits(ct[name], tensor), name


def test_ct_round_trip_is_bit_identical_and_uncapped(tmp_path: Path) -> None:
    """save → load gives FP8 layers in the same places with no activation bound (scale_ub inf),
    the same bits, and the in-memory uncapped model's logits."""
    model = _uncapped_llama()
    loaded = load_fp8_checkpoint(
        save_fp8_checkpoint(model, tmp_path / "ct", format="compressed-tensors")
    )
    fp8 = {n: m for n, m in loaded.named_modules() if isinstance(m, Fp8RowwiseLinear)}
    assert sorted(fp8) == sorted(f"layers.{i}.feed_forward.w{j}" for i in (1, 2) for j in (1, 2, 3))
    assert {m.scale_ub for m in fp8.values()} == {math.inf}
    expected, got = model.state_dict(), loaded.state_dict()
    assert expected.keys() == got.keys()
    for name, tensor in expected.items():
        assert _same_bits(got[name], tensor), name
    assert torch.equal(_logits(loaded), _logits(model))


def test_ct_load_applies_no_bound_where_activations_exceed_1200(tmp_path: Path) -> None:
    """With an input to an FP8 layer above 1200 (layer 1's up projection scaled by 2**14 and its
    down projection by 2**-14: the same bf16 function), the loaded compressed-tensors model has
    the uncapped model's logits, not those of the model capped at 1200."""

    def scaled(scale_ub: float) -> Llama:
        model = _bf16_llama()
        with torch.no_grad():
            model.get_parameter("layers.1.feed_forward.w3.weight").mul_(2.0**14)
            model.get_parameter("layers.1.feed_forward.w2.weight").mul_(2.0**-14)
        return quantize_fp8(model, scale_ub=scale_ub)

    uncapped, capped = scaled(math.inf), scaled(1200.0)
    seen: list[float] = []
    capped.get_submodule("layers.1.feed_forward.w2").register_forward_pre_hook(
        lambda _, inputs: seen.append(float(inputs[0].abs().max()))
    )
    capped_logits = _logits(capped)
    assert max(seen) > 1200  # the bound binds in the capped model
    directory = save_fp8_checkpoint(uncapped, tmp_path / "ct", format="compressed-tensors")
    loaded_logits = _logits(load_fp8_checkpoint(directory))
    assert torch.equal(loaded_logits, _logits(uncapped))
    assert not torch.equal(loaded_logits, capped_logits)


def test_ct_engine_serves_it_as_the_uncapped_recipe(ct_dir: Path) -> None:
    """Engine.from_pretrained serves a compressed-tensors checkpoint in FP8 from its stored
    weights, with the greedy tokens of the uncapped recipe applied in memory."""
    from llama_serve import Engine, SamplingParams

    prompts = [[1, 2, 3, 4], [50, 40, 30]]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in Engine(_uncapped_llama()).generate(prompts, params)]
    engine = Engine.from_pretrained(ct_dir, dtype="bfloat16", device="cpu")
    fp8 = [m for m in engine.model.modules() if isinstance(m, Fp8RowwiseLinear)]
    assert len(fp8) == 6 and {m.scale_ub for m in fp8} == {math.inf}
    assert [o.outputs[0].token_ids for o in engine.generate(prompts, params)] == expected


def test_is_fp8_checkpoint_reads_compressed_tensors(ct_dir: Path) -> None:
    """True for compressed-tensors with 8-bit float weights; False for an INT8 (W8A8) one."""
    assert is_fp8_checkpoint(ct_dir)
    _edit_ct(ct_dir, lambda q: q["config_groups"]["group_0"]["weights"].update(type="int"))
    assert not is_fp8_checkpoint(ct_dir)


def test_ct_reads_hand_written_configs_and_bf16_scales(tmp_path: Path, ct_dir: Path) -> None:
    """A minimal hand-written config (compressed-tensors' defaults for omitted fields, `ignore`
    as "re:" patterns, the older "naive-quantized" format name) and bf16 weight scales (as
    llm-compressor writes them) load: the same FP8 layers, each scale the bf16 value widened to
    float32."""
    group = {
        "targets": ["Linear"],
        "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "dynamic": False},
        "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True},
    }
    config = json.loads((ct_dir / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "format": "naive-quantized",
        "config_groups": {"group_0": group},
        "ignore": ["lm_head", "re:.*self_attn.*", r"re:model\.layers\.(0|3)\.mlp\."],
    }
    (ct_dir / "config.json").write_text(json.dumps(config))
    scale = f"{GATE}.weight_scale"
    bf16_scale = _tensors(ct_dir)[scale].to(torch.bfloat16)
    _rewrite(ct_dir, {scale: bf16_scale})
    loaded = load_fp8_checkpoint(ct_dir)
    fp8 = {n: m for n, m in loaded.named_modules() if isinstance(m, Fp8RowwiseLinear)}
    assert len(fp8) == 6
    assert torch.equal(fp8["layers.1.feed_forward.w1"].weight_scale, bf16_scale.float().flatten())


def _edit_ct(directory: Path, edit: Callable[[dict[str, Any]], object]) -> None:
    config = json.loads((directory / "config.json").read_text())
    edit(config["quantization_config"])
    (directory / "config.json").write_text(json.dumps(config))


def _group(q: dict[str, Any]) -> dict[str, Any]:
    group = q["config_groups"]["group_0"]
    assert isinstance(group, dict)
    return group


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda q: _group(q)["weights"].update(strategy="tensor"),
         r"group_0\.weights\.strategy is 'tensor'.*FP8_DYNAMIC.*'channel'"),
        (lambda q: _group(q)["weights"].update(num_bits=4), r"weights\.num_bits is 4"),
        (lambda q: _group(q)["input_activations"].update(dynamic=False, strategy="tensor"),
         r"input_activations\.strategy is 'tensor'"),
        (lambda q: _group(q)["input_activations"].update(dynamic=False),
         r"input_activations\.dynamic is False"),
        (lambda q: _group(q).update(input_activations=None),
         r"input_activations must be an object"),  # weight-only FP8 (W8A16)
        (lambda q: _group(q).update(output_activations={"num_bits": 8}),
         r"output_activations is .*must be null"),
        (lambda q: q.update(format="pack-quantized") or _group(q).pop("format"),
         r"group_0 has format 'pack-quantized'; llama-serve reads 'float-quantized'"),
        (lambda q: q.update(kv_cache_scheme={"num_bits": 8, "type": "float"}),
         r"kv_cache_scheme is .*without one"),
        (lambda q: q.update(transform_config={"config_groups": {}}), r"transform_config is"),
        (lambda q: q.update(config_groups={}), r"config_groups must be a non-empty object"),
        (lambda q: _group(q).update(targets=[]), r"targets must be a list"),
        (lambda q: q.update(ignore=["re:(unclosed"]), r"ignore entry 're:\(unclosed' is not a"),
        (lambda q: q.update(ignore=[*q["ignore"], GATE]),
         rf"'{GATE}.weight' is .*float8.* but quantization_config.ignore names '{GATE}' \(compressed-tensors"),
        (lambda q: q["ignore"].remove("lm_head"),
         r"'lm_head.weight' is torch.bfloat16 but quantization_config.ignore does not name"),
        (lambda q: _group(q).update(targets=[r"re:.*\.(gate|up)_proj$"]),
         r"down_proj.weight' is .*float8.* but no quantization_config.config_groups target "
         "matches"),
    ],
)  # fmt: skip
def test_ct_refuses_what_vllm_would_read_differently(
    ct_dir: Path, edit: Callable[[dict[str, Any]], object], message: str
) -> None:
    """A compressed-tensors config with another scheme or format, extra quantization, bad
    targets or ignore entries, or one that disagrees with the tensors is refused by field."""
    _edit_ct(ct_dir, edit)
    with pytest.raises(ValueError, match=message):
        load_fp8_checkpoint(ct_dir)


def test_ct_refuses_to_save_a_capped_model_and_unknown_formats(tmp_path: Path) -> None:
    """compressed-tensors cannot record §6.2's bound, so a capped model is refused (not written
    with the bound silently dropped); an unknown format is refused by name; nothing is written."""
    with pytest.raises(ValueError, match=r"no activation scale bound.*cap it at 1200.0.*math.inf"):
        save_fp8_checkpoint(_fp8_llama(), tmp_path / "a", format="compressed-tensors")
    with pytest.raises(ValueError, match=r"format must be one of 'fbgemm_fp8', 'compressed-tensors', got 'gguf'"):  # fmt: skip
        save_fp8_checkpoint(_fp8_llama(), tmp_path / "b", format="gguf")  # type: ignore[arg-type]
    assert not any(tmp_path.iterdir())
