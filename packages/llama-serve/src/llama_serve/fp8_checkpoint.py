"""FP8 checkpoints of §6.2's recipe, in the two layouts vLLM and transformers read.

A model quantized with `llama_serve.quantize_fp8` is written as a Hugging Face Llama directory in
one of two formats (`save_fp8_checkpoint(..., format=...)`). Both store the same tensors:

- for each quantized projection, `<module>.weight` in float8_e4m3fn [out, in] and
  `<module>.weight_scale` in float32 [out, 1] (x ≈ weight.float() * weight_scale); every other
  tensor in the model's dtype (bf16), under the names `llama_model` gives it;
- `config.json` as `llama_model.save_checkpoint` writes it plus a `quantization_config`, and
  `generation_config.json` and, given a tokenizer, the tokenizer files.

They differ in the `quantization_config`:

- `"fbgemm_fp8"` (the default), the layout Meta released Llama 3.1 405B Instruct FP8 in, read by
  transformers' `fbgemm_fp8` quantizer and vLLM's `FBGEMMFp8Config`:
  ``{"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0, "modules_to_not_convert":
  [...]}``. It records §6.2's upper bound on the activation scales. `modules_to_not_convert`
  lists, by full Hugging Face module name, every linear layer the recipe left in bf16 (all
  attention projections, the feed-forward projections of the first and the last layer, and
  `lm_head`): vLLM compares the names exactly (`is_layer_skipped`); transformers matches each
  entry as a regular expression at the start of a module name or as its suffix
  (`quantizers_utils.should_convert_module`) and converts every `nn.Linear` not matched,
  `lm_head` included. vLLM 0.32 deprecates the method (it loads only with
  `allow_deprecated_quantization=True`).
- `"compressed-tensors"`, the layout vLLM prefers: what llm-compressor writes for its
  `FP8_DYNAMIC` scheme (compressed-tensors 0.17.0's `ModelCompressor.update_config`, the release
  vLLM 0.32 pins; RedHatAI's Meta-Llama-3.1-*-FP8-dynamic releases use this scheme): one group
  targeting `Linear` with weights `{type: float, num_bits: 8, strategy: channel, symmetric,
  dynamic: false}` and input activations `{type: float, num_bits: 8, strategy: token, symmetric,
  dynamic: true}`, `format: float-quantized`, and `ignore` naming every linear layer left in bf16
  (the same modules, in transformers' module order). The format has no activation scale bound:
  vLLM scales each token by its own maximum, so only a model quantized with `scale_ub=math.inf`
  can be written in it (the bound cannot be dropped silently).

The directory is built in a hidden staging directory beside the target and published with
`llama_model.publish_directory`, so a crash leaves the previous checkpoint or none, never a half
written or a bf16 one under the target's name. `load_fp8_checkpoint` reads either format back into
a `llama_model.Llama` with `llama_kernels.Fp8RowwiseLinear` exactly where the checkpoint holds FP8
weights (with the recorded bound, or none for compressed-tensors), and refuses, naming the tensor
or the field, what does not fit.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from llama_kernels import SCALE_UB, Fp8RowwiseLinear
from llama_model import (
    Llama,
    check_checkpoint_target,
    check_state_dict,
    config_from_hf,
    from_hf_name,
    publish_directory,
    read_hf_tensors,
    save_checkpoint,
    to_hf_name,
)

if TYPE_CHECKING:
    from llama_model import Tokenizer

__all__ = [
    "FBGEMM_FP8",
    "COMPRESSED_TENSORS",
    "Fp8CheckpointFormat",
    "is_fp8_checkpoint",
    "load_fp8_checkpoint",
    "save_fp8_checkpoint",
]

Fp8CheckpointFormat = Literal["fbgemm_fp8", "compressed-tensors"]
# transformers' QuantizationMethod.FBGEMM_FP8 and vLLM's FBGEMMFp8Config.get_name(): the
# quant_method of meta-llama/Llama-3.1-405B-Instruct-FP8's config.json.
FBGEMM_FP8: Fp8CheckpointFormat = "fbgemm_fp8"
# compressed_tensors.quantization.DEFAULT_QUANTIZATION_METHOD and vLLM's
# CompressedTensorsConfig.get_name().
COMPRESSED_TENSORS: Fp8CheckpointFormat = "compressed-tensors"
FP8_DTYPE = torch.float8_e4m3fn
SCALE_SUFFIX = ".weight_scale"
_MODEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # each holds every e4m3 value

# compressed-tensors' FP8_DYNAMIC preset (compressed_tensors.quantization.quant_scheme), as
# compressed-tensors 0.17.0 (the version vLLM 0.32 pins) dumps it into config.json: e4m3 weights
# with a static scale per output channel (a min-max observer: max|w_row| / 448, as ours), e4m3
# activations scaled per token at run time (nothing stored).
CT_VERSION = "0.17.0"
CT_FORMAT = "float-quantized"  # compressed_tensors.CompressionFormat.float_quantized
# Formats that store the weights as they are in the quantized dtype (float-quantized is an alias
# of naive-quantized in compressed_tensors.compressors; neuralmagic's 2024 FP8-dynamic releases
# say naive-quantized).
_CT_STORED_FORMATS = (CT_FORMAT, "naive-quantized")
_CT_ARGS: dict[str, Any] = {
    "actorder": None,
    "block_structure": None,
    "group_size": None,
    "num_bits": 8,
    "observer_kwargs": {},
    "scale_dtype": None,
    "symmetric": True,
    "type": "float",
    "zp_dtype": None,
}
_CT_WEIGHTS = dict(  # keys sorted, as compressed-tensors writes them (json.dump(sort_keys=True))
    sorted(
        {
            **_CT_ARGS,
            "dynamic": False,
            "observer": "memoryless_minmax",
            "strategy": "channel",
        }.items()
    )
)
_CT_INPUT_ACTIVATIONS = dict(
    sorted({**_CT_ARGS, "dynamic": True, "observer": None, "strategy": "token"}.items())
)
# The fields of compressed_tensors.QuantizationArgs that decide the arithmetic, with its defaults
# (a hand-written config may leave them out); the others (observer, scale_dtype...) do not.
_CT_ARG_DEFAULTS: dict[str, Any] = {
    "num_bits": 8,
    "type": "int",
    "symmetric": True,
    "group_size": None,
    "strategy": None,
    "block_structure": None,
    "dynamic": False,
}
# transformers' LlamaDecoderLayer module order (compressed-tensors lists `ignore` in it).
_HF_LAYER_LINEARS = (
    *(f"self_attn.{p}_proj" for p in "qkvo"),
    *(f"mlp.{p}_proj" for p in ("gate", "up", "down")),
)


# --------------------------------------------------------------------------------------------
# Saving


def save_fp8_checkpoint(
    model: Llama,
    path: str | os.PathLike[str],
    *,
    format: Fp8CheckpointFormat = FBGEMM_FP8,
    tokenizer: Tokenizer | None = None,
    max_shard_size: int = 5 * 2**30,
    copy_files: Iterable[str | os.PathLike[str]] = (),
) -> Path:
    """Write `model`, quantized by `quantize_fp8`, as an FP8 Hugging Face directory.

    Every `Fp8RowwiseLinear` becomes `<module>.weight` (float8_e4m3fn [out, in]) and
    `<module>.weight_scale` (float32 [out, 1]), bit for bit; every other tensor is written in the
    model's dtype. `format` picks the `quantization_config` (module docstring): `"fbgemm_fp8"`
    (Meta's 405B FP8 layout; records the modules' `scale_ub` as `activation_scale_ub`, which must
    be finite) or `"compressed-tensors"` (llm-compressor's FP8_DYNAMIC layout, which vLLM prefers;
    it has no activation bound, so the modules' `scale_ub` must be `math.inf`). Either names
    each linear layer left unquantized. `tokenizer` and `max_shard_size` are
    `llama_model.save_checkpoint`'s (shards are sized before the FP8 weights halve them).
    `copy_files` are copied into the directory as they are, after everything else (a source
    checkpoint's `generation_config.json` and tokenizer files, say). An existing checkpoint at
    `path` is replaced only once the new one is complete.

    Raises TypeError if `model` is not a `Llama`, and ValueError for an unknown `format`, or if
    the model holds no `Fp8RowwiseLinear` (quantize it first), is a pipeline stage, mixes
    `scale_ub` values or dtypes, has a quantized layer with a bias, or has a `scale_ub` the
    format cannot record.
    """
    if format not in get_args(Fp8CheckpointFormat):
        raise ValueError(
            f"format must be one of {', '.join(map(repr, get_args(Fp8CheckpointFormat)))}, "
            f"got {format!r}"
        )
    quantized, dtype, scale_ub = _check_quantized_model(model)
    quantization_config = _quantization_config(format, scale_ub, _bf16_linear_modules(model))
    target = check_checkpoint_target(path)  # save_checkpoint's rule for its target
    copies = [Path(file) for file in copy_files]
    for file in copies:
        if not file.is_file():
            raise FileNotFoundError(f"file to copy into the checkpoint {str(file)!r} is missing")
    target.parent.mkdir(parents=True, exist_ok=True)

    # Structure of the bf16 model the FP8 one came from: save_checkpoint writes config.json,
    # generation_config.json, the tokenizer and every weight under its Hugging Face name; each
    # quantized weight goes in as its e4m3 values widened to `dtype` (exact) and is then replaced.
    with torch.device("meta"):
        shell = Llama(model.config).to(dtype)
    state = model.state_dict()

    def weight(name: str) -> torch.Tensor:
        module = quantized.get(name.removesuffix(".weight"))
        return state[name] if module is None else module.weight_fp8.to(dtype)

    hf_quantized = {to_hf_name(f"{name}.weight"): module for name, module in quantized.items()}
    staging = target.with_name(f".{target.name}.{secrets.token_hex(4)}.partial")
    try:
        save_checkpoint(
            shell, staging, tokenizer=tokenizer, max_shard_size=max_shard_size, load_weight=weight
        )
        _write_fp8_weights(staging, hf_quantized)
        config_file = staging / "config.json"
        config = json.loads(config_file.read_text(encoding="utf-8"))
        config["quantization_config"] = quantization_config
        config_file.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        for file in copies:
            shutil.copyfile(file, staging / file.name)
        publish_directory(staging, target)  # fsyncs every file, then renames it into place
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _quantization_config(
    format: Fp8CheckpointFormat, scale_ub: float, bf16_modules: list[str]
) -> dict[str, Any]:
    """config.json's `quantization_config` in `format` (module docstring); refuses a `scale_ub`
    the format cannot carry."""
    if format == FBGEMM_FP8:
        if not math.isfinite(scale_ub):  # JSON has no infinity; fbgemm needs a finite bound
            raise ValueError(
                f"fbgemm_fp8 records a finite activation_scale_ub, but the model's FP8 layers have "
                f"scale_ub={scale_ub}: quantize with a finite scale_ub (§6.2 uses {SCALE_UB}), or "
                "write format='compressed-tensors', which has no bound"
            )
        return {
            "quant_method": FBGEMM_FP8,
            "activation_scale_ub": scale_ub,
            "modules_to_not_convert": bf16_modules,
        }
    if math.isfinite(scale_ub):
        raise ValueError(
            f"compressed-tensors has no activation scale bound (vLLM scales each token by its own "
            f"maximum), but the model's FP8 layers cap it at {scale_ub}: quantize with "
            "scale_ub=math.inf to write this format (the model vLLM will serve), or write "
            "format='fbgemm_fp8', which keeps the bound"
        )
    # Keys sorted, as ModelCompressor.update_config writes them (json.dump(..., sort_keys=True)).
    group = {
        "format": CT_FORMAT,
        "input_activations": dict(_CT_INPUT_ACTIVATIONS),
        "output_activations": None,
        "targets": ["Linear"],
        "weights": dict(_CT_WEIGHTS),
    }
    return {
        "config_groups": {"group_0": group},
        "format": CT_FORMAT,
        "global_compression_ratio": None,
        "ignore": bf16_modules,
        "kv_cache_scheme": None,
        "quant_method": COMPRESSED_TENSORS,
        "quantization_status": "compressed",
        "sparsity_config": {},
        "transform_config": {},
        "version": CT_VERSION,
    }


def _check_quantized_model(model: Llama) -> tuple[dict[str, Fp8RowwiseLinear], torch.dtype, float]:
    """The model's FP8 modules by name, its (one) dtype and its (one) activation scale bound."""
    if not isinstance(model, Llama):
        raise TypeError(f"save_fp8_checkpoint expects a llama_model.Llama, got {type(model)}")
    held = len(model.layers)
    if held != model.config.n_layers or model.tok_embeddings is None or model.norm is None:
        raise ValueError(
            f"the model holds {held} of {model.config.n_layers} layers or lacks its embedding or "
            "final norm (a pipeline stage): save the whole model"
        )
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, Fp8RowwiseLinear)}
    if not quantized:
        raise ValueError(
            "the model has no Fp8RowwiseLinear layer: quantize it with llama_serve.quantize_fp8 "
            "first (or save it unquantized with llama_model.save_checkpoint)"
        )
    dtypes = {p.dtype for p in model.parameters()}  # FP8 weights are buffers, not parameters
    if len(dtypes) != 1 or next(iter(dtypes)) not in _MODEL_DTYPES:
        raise ValueError(
            f"the model's parameters must share one of bfloat16, float16, float32, got {dtypes}"
        )
    scale_ubs = {m.scale_ub for m in quantized.values()}
    if len(scale_ubs) != 1:
        raise ValueError(
            f"the FP8 layers use different activation scale bounds {sorted(scale_ubs)}; a "
            "checkpoint records one: quantize with a single scale_ub"
        )
    with_bias = sorted(n for n, m in quantized.items() if m.bias is not None)
    if with_bias:
        raise ValueError(
            f"FP8 layer {with_bias[0]!r} has a bias; Llama 3's linear layers have none"
        )
    return quantized, next(iter(dtypes)), next(iter(scale_ubs))


def _bf16_linear_modules(model: Llama) -> list[str]:
    """Hugging Face names of the model's linear layers that are not FP8, in transformers' module
    order (layer by layer: q, k, v, o, gate, up, down), and `lm_head` last (a linear layer in
    transformers even where it is tied to the embedding)."""
    names = [
        to_hf_name(f"{name}.weight").removesuffix(".weight")
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
    ]
    lm_head = to_hf_name("output.weight").removesuffix(".weight")
    names = names if lm_head in names else [*names, lm_head]

    def hf_position(name: str) -> tuple[int, int, int]:
        match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
        if match is None or match[2] not in _HF_LAYER_LINEARS:
            return (1, 0, 0)  # after the layers, in model order (a stable sort)
        return (0, int(match[1]), _HF_LAYER_LINEARS.index(match[2]))

    return sorted(names, key=hf_position)


def _write_fp8_weights(directory: Path, quantized: Mapping[str, Fp8RowwiseLinear]) -> None:
    """Rewrite the shards in `directory` with each quantized weight (by Hugging Face name) in
    float8 and its scale beside it, in the same shard; update the index when there is one."""
    index_file = directory / "model.safetensors.index.json"
    index = json.loads(index_file.read_text()) if index_file.is_file() else None
    files = sorted(set(index["weight_map"].values())) if index else ["model.safetensors"]
    total = 0
    for file in files:
        tensors = load_file(directory / file)
        for name in [n for n in tensors if n in quantized]:
            module = quantized[name]
            scale_name = name.removesuffix(".weight") + SCALE_SUFFIX
            tensors[name] = module.weight_fp8.detach().cpu().contiguous()  # [out, in]
            tensors[scale_name] = module.weight_scale.detach().cpu().reshape(-1, 1)  # [out, 1]
            if index:
                index["weight_map"][scale_name] = file
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        save_file(tensors, directory / file, metadata={"format": "pt"})
    if index:
        index["metadata"]["total_size"] = total
        index["weight_map"] = dict(sorted(index["weight_map"].items()))
        index_file.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------------
# Loading


def is_fp8_checkpoint(path: str | os.PathLike[str]) -> bool:
    """Whether `path` is a Hugging Face directory whose config.json declares FP8 quantization in
    a format `load_fp8_checkpoint` reads: `fbgemm_fp8`, or `compressed-tensors` with a config
    group of 8-bit float weights (whether its scheme is the one llama-serve serves is for
    `load_fp8_checkpoint` to check). A missing config.json is False; one that is not JSON raises
    ValueError naming the file."""
    quantization = _read_config(Path(path)).get("quantization_config")
    if not isinstance(quantization, Mapping):
        return False
    method = quantization.get("quant_method")
    if method == FBGEMM_FP8:
        return True
    groups = quantization.get("config_groups")
    if method != COMPRESSED_TENSORS or not isinstance(groups, Mapping):
        return False
    return any(
        isinstance(group, Mapping)
        and isinstance(weights := group.get("weights"), Mapping)
        and weights.get("type") == "float"
        and weights.get("num_bits", _CT_ARG_DEFAULTS["num_bits"]) == 8
        for group in groups.values()
    )


def load_fp8_checkpoint(
    path: str | os.PathLike[str],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> Llama:
    """Load an `fbgemm_fp8` or `compressed-tensors` FP8 checkpoint into a `Llama` served in FP8.

    Each linear layer whose `<module>.weight` is float8_e4m3fn becomes an `Fp8RowwiseLinear`
    with that weight and its `<module>.weight_scale` ([out, 1] or [out], any float dtype, held as
    float32). Its activation bound is the config's `activation_scale_ub` for `fbgemm_fp8`
    (transformers' default 1200 when absent) and none (`math.inf`) for `compressed-tensors`,
    whose scheme must be FP8_DYNAMIC's (8-bit float weights, static, one scale per output
    channel; 8-bit float input activations, dynamic, per token: vLLM's
    `CompressedTensorsW8A8Fp8`). Every other tensor is loaded as `llama_model.load_checkpoint`
    would, in `dtype` if given (bfloat16, float16 or float32), else in the checkpoint's. FP8
    weights stay FP8.

    Refuses with ValueError, naming the tensor or the field: a config without
    `quantization_config` or with another `quant_method`; a bad `activation_scale_ub` or
    `modules_to_not_convert`; a compressed-tensors config with another scheme or format, output
    activation, KV-cache, sparsity or transform quantization, or bad `targets` / `ignore`; an
    FP8 weight without its scale or a scale without its FP8 weight; an FP8 tensor that is not a
    linear layer's weight; a tensor of the wrong shape; a missing or unexpected tensor; and a
    layer in FP8 that the config leaves unquantized (or in bf16 although the config quantizes
    it: vLLM and transformers would read that checkpoint differently).
    """
    if dtype is not None and dtype not in _MODEL_DTYPES:
        raise ValueError(f"dtype must be bfloat16, float16, float32 or None, got {dtype}")
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory {str(directory)!r} does not exist")
    hf_config = _read_config(directory)
    if not hf_config:
        raise FileNotFoundError(f"{str(directory)!r} holds no config.json")
    scheme = _quantization_scheme(hf_config, directory)
    config = config_from_hf(hf_config)
    tensors = read_hf_tensors(directory)
    if config.tie_word_embeddings:
        tensors.pop(to_hf_name("output.weight"), None)  # tied: the embedding table is the output

    scales = {
        n.removesuffix(SCALE_SUFFIX): t for n, t in tensors.items() if n.endswith(SCALE_SUFFIX)
    }
    fp8_modules = {n.removesuffix(".weight") for n, t in tensors.items() if t.dtype == FP8_DTYPE}
    not_weights = sorted(
        n for n, t in tensors.items() if t.dtype == FP8_DTYPE and n == n.removesuffix(".weight")
    )
    if not_weights:
        raise ValueError(f"tensor {not_weights[0]!r} is {FP8_DTYPE} but is no layer's weight")
    unscaled = sorted(fp8_modules - scales.keys())
    if unscaled:
        raise ValueError(
            f"tensor '{unscaled[0]}.weight' is {FP8_DTYPE} but the checkpoint has no "
            f"'{unscaled[0]}{SCALE_SUFFIX}' (its per-row scales)"
        )
    orphans = sorted(scales.keys() - fp8_modules)
    if orphans:
        raise ValueError(
            f"tensor '{orphans[0]}{SCALE_SUFFIX}' has no {FP8_DTYPE} weight "
            f"'{orphans[0]}.weight' to scale"
        )

    with torch.device("meta"):
        model = Llama(config)
    linears = {
        to_hf_name(f"{name}.weight").removesuffix(".weight"): name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
    }
    for hf_module in linears:
        why_bf16 = scheme.why_unquantized(hf_module)
        if why_bf16 is not None and hf_module in fp8_modules:
            raise ValueError(
                f"tensor '{hf_module}.weight' is {FP8_DTYPE} but {why_bf16} ({scheme.reader} "
                "would load it unquantized)"
            )
        if why_bf16 is None and hf_module not in fp8_modules and f"{hf_module}.weight" in tensors:
            raise ValueError(
                f"tensor '{hf_module}.weight' is {tensors[f'{hf_module}.weight'].dtype} but "
                f"quantization_config.{scheme.skip_field} does not name {hf_module!r} "
                f"({scheme.reader} would expect it in {FP8_DTYPE} with a weight_scale)"
            )

    state: dict[str, torch.Tensor] = {}
    for hf_name, tensor in tensors.items():
        if hf_name.endswith(SCALE_SUFFIX):
            continue
        module = hf_name.removesuffix(".weight")
        if module not in fp8_modules:
            state[from_hf_name(hf_name)] = tensor
            continue
        if module not in linears:
            raise ValueError(
                f"tensor {hf_name!r} is {FP8_DTYPE} but {from_hf_name(hf_name)!r} is not a "
                "linear layer (only linear layers can be served in FP8)"
            )
        linear = model.get_submodule(linears[module])
        assert isinstance(linear, nn.Linear)
        shape = (linear.out_features, linear.in_features)
        scale = scales[module]
        if tuple(tensor.shape) != shape:
            raise ValueError(
                f"tensor {hf_name!r} has shape {tuple(tensor.shape)} in the checkpoint but the "
                f"config expects {shape}"
            )
        if tuple(scale.shape) not in ((shape[0], 1), (shape[0],)):
            raise ValueError(
                f"tensor '{module}{SCALE_SUFFIX}' has shape {tuple(scale.shape)} in the "
                f"checkpoint but the config expects {(shape[0], 1)} (one scale per output row)"
            )
        if not scale.dtype.is_floating_point or scale.dtype == FP8_DTYPE:
            raise ValueError(
                f"tensor '{module}{SCALE_SUFFIX}' must be float32 (or bfloat16 / float16), got "
                f"{scale.dtype}"
            )
        ours = linears[module]
        model.set_submodule(
            ours,
            Fp8RowwiseLinear(
                torch.empty(shape, dtype=FP8_DTYPE, device="meta"),
                torch.empty(shape[0], dtype=torch.float32, device="meta"),
                scale_ub=scheme.scale_ub,
            ),
        )
        state[f"{ours}.weight_fp8"] = tensor
        state[f"{ours}.weight_scale"] = scale.reshape(-1).float()

    _check_state(model, state)
    for name in list(state):  # one tensor at a time: never two copies of the model in memory
        tensor = state[name]
        keep = tensor.dtype == FP8_DTYPE or name.endswith(".weight_scale") or dtype is None
        state[name] = tensor.to(device=device, dtype=tensor.dtype if keep else dtype)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def _read_config(directory: Path) -> dict[str, Any]:
    """config.json as a dict, {} when there is none."""
    file = directory / "config.json"
    if not file.is_file():
        return {}
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{str(file)!r} is not valid JSON: {error}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{str(file)!r} holds {type(config).__name__}, not a JSON object")
    return config


@dataclass(frozen=True)
class _Scheme:
    """What a checkpoint's quantization_config says about its linear layers."""

    scale_ub: float  # the FP8 layers' activation scale bound (math.inf: none)
    reader: str  # who reads the format, for messages
    skip_field: str  # the field that names the unquantized layers
    why_unquantized: Callable[[str], str | None]  # why the config leaves a module in bf16, or None


def _quantization_scheme(hf_config: Mapping[str, Any], directory: Path) -> _Scheme:
    """The validated quantization_config of a config.json."""
    quantization = hf_config.get("quantization_config")
    if quantization is None:
        raise ValueError(
            f"{str(directory)!r} is not quantized (config.json has no quantization_config): "
            "load it with llama_model.load_checkpoint, or write an FP8 one with "
            "`llama-serve quantize`"
        )
    if not isinstance(quantization, Mapping):
        raise ValueError(
            f"config.json's quantization_config must be an object, got {quantization!r}"
        )
    method = quantization.get("quant_method")
    if method == FBGEMM_FP8:
        return _fbgemm_scheme(quantization)
    if method == COMPRESSED_TENSORS:
        return _compressed_tensors_scheme(quantization)
    raise ValueError(
        f"config.json has quant_method {method!r}; llama-serve reads only {FBGEMM_FP8!r} (the "
        f"format of Llama 3.1 405B Instruct FP8) and {COMPRESSED_TENSORS!r} (FP8_DYNAMIC) "
        "checkpoints"
    )


def _fbgemm_scheme(quantization: Mapping[str, Any]) -> _Scheme:
    """`activation_scale_ub` and `modules_to_not_convert`, validated, matched as transformers
    matches them."""
    scale_ub = quantization.get("activation_scale_ub", SCALE_UB)
    if isinstance(scale_ub, bool) or not isinstance(scale_ub, int | float) or not scale_ub > 0:
        raise ValueError(
            f"quantization_config.activation_scale_ub must be a number > 0 (§6.2 uses "
            f"{SCALE_UB}), got {scale_ub!r}"
        )
    patterns = quantization.get("modules_to_not_convert") or []
    if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
        raise ValueError(
            f"quantization_config.modules_to_not_convert must be a list of module names, got "
            f"{patterns!r}"
        )

    def why_unquantized(module: str) -> str | None:
        listed = any(_hf_skips(module, pattern) for pattern in patterns)
        return f"quantization_config.modules_to_not_convert names {module!r}" if listed else None

    return _Scheme(float(scale_ub), "transformers", "modules_to_not_convert", why_unquantized)


def _hf_skips(module: str, pattern: str) -> bool:
    """Whether transformers leaves `module` unconverted for this `modules_to_not_convert` entry:
    the entry matches as a regular expression at the start of the name, or is its suffix
    (transformers/quantizers/quantizers_utils.py, `should_convert_module`)."""
    try:
        matched = re.match(pattern, module) is not None
    except re.error:
        matched = False
    return matched or module.endswith(pattern)


def _compressed_tensors_scheme(quantization: Mapping[str, Any]) -> _Scheme:
    """A compressed-tensors config, validated as FP8_DYNAMIC (the only scheme `Fp8RowwiseLinear`
    computes exactly), its `targets` and `ignore` matched as vLLM matches them for a linear layer
    (vllm/model_executor/layers/quantization/compressed_tensors/utils.py: `find_matched_target`,
    `should_ignore_layer`): the entry equals the name, or is "re:" and a regular expression
    matching at its start, or, for a target, is the class name of every transformers projection
    ("Linear")."""
    for field in ("kv_cache_scheme", "sparsity_config", "transform_config"):
        if quantization.get(field) not in (None, {}):
            raise ValueError(
                f"quantization_config.{field} is {quantization.get(field)!r}; llama-serve reads "
                "compressed-tensors checkpoints without one (it changes the arithmetic)"
            )
    groups = quantization.get("config_groups")
    if not isinstance(groups, Mapping) or not groups:
        raise ValueError(
            f"quantization_config.config_groups must be a non-empty object, got {groups!r}"
        )
    targets: list[str] = []
    for name, group in groups.items():
        where = f"quantization_config.config_groups.{name}"
        if not isinstance(group, Mapping):
            raise ValueError(f"{where} must be an object, got {group!r}")
        group_format = group.get("format") or quantization.get("format")
        if group_format not in _CT_STORED_FORMATS:
            raise ValueError(
                f"{where} has format {group_format!r}; llama-serve reads {CT_FORMAT!r} or "
                "'naive-quantized' (FP8 weights stored as float8_e4m3fn)"
            )
        _check_ct_args(f"{where}.weights", group.get("weights"), _CT_WEIGHTS)
        inputs = group.get("input_activations")
        _check_ct_args(f"{where}.input_activations", inputs, _CT_INPUT_ACTIVATIONS)
        if group.get("output_activations") is not None:
            raise ValueError(
                f"{where}.output_activations is {group['output_activations']!r}; llama-serve "
                "does not quantize layer outputs (it must be null)"
            )
        targets += _ct_patterns(f"{where}.targets", group.get("targets"), allow_empty=False)
    ignore = _ct_patterns("quantization_config.ignore", quantization.get("ignore") or [])

    def why_unquantized(module: str) -> str | None:
        if any(_ct_matches(module, pattern) for pattern in ignore):
            return f"quantization_config.ignore names {module!r}"
        if not any(t == "Linear" or _ct_matches(module, t) for t in targets):
            return f"no quantization_config.config_groups target matches {module!r}"
        return None

    return _Scheme(math.inf, "compressed-tensors", "ignore", why_unquantized)


def _check_ct_args(where: str, args: object, expected: Mapping[str, Any]) -> None:
    """Refuse QuantizationArgs (with compressed-tensors' defaults) that differ from FP8_DYNAMIC's
    in a field that decides the arithmetic."""
    if not isinstance(args, Mapping):
        raise ValueError(
            f"{where} must be an object (FP8_DYNAMIC quantizes weights and input activations), "
            f"got {args!r}"
        )
    for field, default in _CT_ARG_DEFAULTS.items():
        got = args.get(field, default)
        if got != expected[field] or type(got) is not type(expected[field]):
            raise ValueError(
                f"{where}.{field} is {got!r}, but llama-serve reads only compressed-tensors' "
                "FP8_DYNAMIC scheme (8-bit float weights, static, per channel; 8-bit float "
                f"input activations, dynamic, per token; symmetric), which has {expected[field]!r}"
            )


def _ct_patterns(where: str, patterns: object, *, allow_empty: bool = True) -> list[str]:
    """A list of module names / "re:" regular expressions, each regular expression compiled."""
    if (
        not isinstance(patterns, list)
        or not all(isinstance(p, str) for p in patterns)
        or not (patterns or allow_empty)
    ):
        raise ValueError(
            f"{where} must be a list of module names or 're:' patterns, got {patterns!r}"
        )
    for pattern in patterns:
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as error:
                raise ValueError(
                    f"{where} entry {pattern!r} is not a regular expression: {error}"
                ) from None
    return patterns


def _ct_matches(module: str, pattern: str) -> bool:
    """vLLM's `is_equal_or_regex_match` for a layer name."""
    if pattern.startswith("re:"):
        return re.match(pattern[3:], module) is not None
    return pattern == module


def _check_state(model: Llama, state: Mapping[str, torch.Tensor]) -> None:
    """Every tensor the model needs, none it does not, each of its shape (named as in the file)."""

    def file_name(name: str) -> str:  # an FP8 module's weight_fp8 is '.weight' in the file
        module, _, tensor = name.rpartition(".")
        if tensor in ("weight_fp8", "weight_scale"):
            hf_module = to_hf_name(f"{module}.weight").removesuffix(".weight")
            return f"{hf_module}.{tensor.removesuffix('_fp8')}"
        return to_hf_name(name)

    check_state_dict(model, state, file_name=file_name)
