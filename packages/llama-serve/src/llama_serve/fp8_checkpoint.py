"""FP8 checkpoints in the layout Meta released Llama 3.1 405B Instruct FP8 in (§6.2).

A model quantized with `llama_serve.quantize_fp8` is written as a Hugging Face Llama directory
that transformers' `fbgemm_fp8` quantizer and vLLM's `FBGEMMFp8Config` read:

- `config.json` as `llama_model.save_checkpoint` writes it, plus
  ``"quantization_config": {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0,
  "modules_to_not_convert": [...]}``. `modules_to_not_convert` lists, by full Hugging Face module
  name, every linear layer the recipe left in bf16: all attention projections, the feed-forward
  projections of the first and the last layer, and `lm_head`. Full names because vLLM compares
  them exactly (`is_layer_skipped`); transformers matches each entry as a regular expression at
  the start of a module name or as its suffix (`quantizers_utils.should_convert_module`), and
  converts every `nn.Linear` not matched, `lm_head` included, so `lm_head` must be listed.
- For each quantized projection, `<module>.weight` in float8_e4m3fn [out, in] and
  `<module>.weight_scale` in float32 [out, 1] (x ≈ weight.float() * weight_scale); every other
  tensor in the model's dtype (bf16), under the names `llama_model` gives it.
- `generation_config.json` and, given a tokenizer, the tokenizer files, as `save_checkpoint`
  writes them.

The directory is built in a hidden staging directory beside the target and published with
`llama_model.publish_directory`, so a crash leaves the previous checkpoint or none, never a half
written or a bf16 one under the target's name. `load_fp8_checkpoint` reads it back into a
`llama_model.Llama` with `llama_kernels.Fp8RowwiseLinear` exactly where the checkpoint holds FP8
weights, and refuses, naming the tensor, what does not fit.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

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

__all__ = ["QUANT_METHOD", "is_fp8_checkpoint", "load_fp8_checkpoint", "save_fp8_checkpoint"]

# transformers' QuantizationMethod.FBGEMM_FP8 and vLLM's FBGEMMFp8Config.get_name(): the
# quant_method of meta-llama/Llama-3.1-405B-Instruct-FP8's config.json.
QUANT_METHOD = "fbgemm_fp8"
FP8_DTYPE = torch.float8_e4m3fn
SCALE_SUFFIX = ".weight_scale"
_MODEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # each holds every e4m3 value


# --------------------------------------------------------------------------------------------
# Saving


def save_fp8_checkpoint(
    model: Llama,
    path: str | os.PathLike[str],
    *,
    tokenizer: Tokenizer | None = None,
    max_shard_size: int = 5 * 2**30,
    copy_files: Iterable[str | os.PathLike[str]] = (),
) -> Path:
    """Write `model`, quantized by `quantize_fp8`, as an `fbgemm_fp8` Hugging Face directory.

    Every `Fp8RowwiseLinear` becomes `<module>.weight` (float8_e4m3fn [out, in]) and
    `<module>.weight_scale` (float32 [out, 1]), bit for bit; every other tensor is written in the
    model's dtype; `modules_to_not_convert` names each linear layer left unquantized and
    `activation_scale_ub` is the modules' `scale_ub`. `tokenizer` and `max_shard_size` are
    `llama_model.save_checkpoint`'s (shards are sized before the FP8 weights halve them).
    `copy_files` are copied into the directory as they are, after everything else (a source
    checkpoint's `generation_config.json` and tokenizer files, say). An existing checkpoint at
    `path` is replaced only once the new one is complete.

    Raises TypeError if `model` is not a `Llama`, and ValueError if it holds no
    `Fp8RowwiseLinear` (quantize it first), is a pipeline stage, mixes `scale_ub` values or
    dtypes, or has a quantized layer with a bias.
    """
    quantized, dtype, scale_ub = _check_quantized_model(model)
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
        config["quantization_config"] = {
            "quant_method": QUANT_METHOD,
            "activation_scale_ub": scale_ub,
            "modules_to_not_convert": _bf16_linear_modules(model),
        }
        config_file.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        for file in copies:
            shutil.copyfile(file, staging / file.name)
        publish_directory(staging, target)  # fsyncs every file, then renames it into place
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


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
            f"the FP8 layers use different activation scale bounds {sorted(scale_ubs)}; the "
            "format records one (activation_scale_ub): quantize with a single scale_ub"
        )
    with_bias = sorted(n for n, m in quantized.items() if m.bias is not None)
    if with_bias:
        raise ValueError(
            f"FP8 layer {with_bias[0]!r} has a bias; Llama 3's linear layers have none"
        )
    scale_ub = next(iter(scale_ubs))
    if not math.isfinite(scale_ub):  # JSON has no infinity; fbgemm needs a finite bound
        raise ValueError(
            f"activation_scale_ub must be finite to be written, got {scale_ub} (quantize with "
            f"a finite scale_ub; §6.2 uses {SCALE_UB})"
        )
    return quantized, next(iter(dtypes)), scale_ub


def _bf16_linear_modules(model: Llama) -> list[str]:
    """Hugging Face names of the model's linear layers that are not FP8, in model order, and
    `lm_head` (a linear layer in transformers even where it is tied to the embedding)."""
    names = [
        to_hf_name(f"{name}.weight").removesuffix(".weight")
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
    ]
    lm_head = to_hf_name("output.weight").removesuffix(".weight")
    return names if lm_head in names else [*names, lm_head]


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
    """Whether `path` is a Hugging Face directory whose config.json declares `fbgemm_fp8`
    quantization (load it with `load_fp8_checkpoint`). A missing config.json is False; one that
    is not JSON raises ValueError naming the file."""
    quantization = _read_config(Path(path)).get("quantization_config")
    return isinstance(quantization, Mapping) and quantization.get("quant_method") == QUANT_METHOD


def load_fp8_checkpoint(
    path: str | os.PathLike[str],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> Llama:
    """Load an `fbgemm_fp8` checkpoint directory into a `Llama` served in FP8 (§6.2).

    Each linear layer whose `<module>.weight` is float8_e4m3fn becomes an `Fp8RowwiseLinear`
    with that weight, its `<module>.weight_scale` ([out, 1] or [out], as float32) and the
    config's `activation_scale_ub` (transformers' default 1200 when absent); every other tensor
    is loaded as `llama_model.load_checkpoint` would, in `dtype` if given (bfloat16, float16 or
    float32), else in the checkpoint's. FP8 weights stay FP8.

    Refuses with ValueError, naming the tensor or the value: a config without
    `quantization_config` or with another `quant_method`, a bad `activation_scale_ub` or
    `modules_to_not_convert`, an FP8 weight without its scale or a scale without its FP8 weight,
    an FP8 tensor that is not a linear layer's weight, a tensor of the wrong shape, a missing or
    unexpected tensor, and a layer quantized although `modules_to_not_convert` names it (or left
    in bf16 although it does not: transformers would read that checkpoint differently).
    """
    if dtype is not None and dtype not in _MODEL_DTYPES:
        raise ValueError(f"dtype must be bfloat16, float16, float32 or None, got {dtype}")
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory {str(directory)!r} does not exist")
    hf_config = _read_config(directory)
    if not hf_config:
        raise FileNotFoundError(f"{str(directory)!r} holds no config.json")
    scale_ub, skip_patterns = _quantization(hf_config, directory)
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
        listed = any(_hf_skips(hf_module, pattern) for pattern in skip_patterns)
        if listed and hf_module in fp8_modules:
            raise ValueError(
                f"tensor '{hf_module}.weight' is {FP8_DTYPE} but quantization_config."
                f"modules_to_not_convert names {hf_module!r} (transformers would load it as bf16)"
            )
        if not listed and hf_module not in fp8_modules and f"{hf_module}.weight" in tensors:
            raise ValueError(
                f"tensor '{hf_module}.weight' is {tensors[f'{hf_module}.weight'].dtype} but "
                f"quantization_config.modules_to_not_convert does not name {hf_module!r} "
                f"(transformers would expect it in {FP8_DTYPE} with a weight_scale)"
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
            raise ValueError(f"tensor '{module}{SCALE_SUFFIX}' must be float32, got {scale.dtype}")
        ours = linears[module]
        model.set_submodule(
            ours,
            Fp8RowwiseLinear(
                torch.empty(shape, dtype=FP8_DTYPE, device="meta"),
                torch.empty(shape[0], dtype=torch.float32, device="meta"),
                scale_ub=scale_ub,
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


def _quantization(hf_config: Mapping[str, Any], directory: Path) -> tuple[float, list[str]]:
    """(activation_scale_ub, modules_to_not_convert) of a config.json, validated."""
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
    if method != QUANT_METHOD:
        raise ValueError(
            f"config.json has quant_method {method!r}; llama-serve reads only {QUANT_METHOD!r} "
            "(row-wise FP8, the format of Llama 3.1 405B Instruct FP8)"
        )
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
    return float(scale_ub), patterns


def _hf_skips(module: str, pattern: str) -> bool:
    """Whether transformers leaves `module` unconverted for this `modules_to_not_convert` entry:
    the entry matches as a regular expression at the start of the name, or is its suffix
    (transformers/quantizers/quantizers_utils.py, `should_convert_module`)."""
    try:
        matched = re.match(pattern, module) is not None
    except re.error:
        matched = False
    return matched or module.endswith(pattern)


def _check_state(model: Llama, state: Mapping[str, torch.Tensor]) -> None:
    """Every tensor the model needs, none it does not, each of its shape (named as in the file)."""

    def file_name(name: str) -> str:  # an FP8 module's weight_fp8 is '.weight' in the file
        module, _, tensor = name.rpartition(".")
        if tensor in ("weight_fp8", "weight_scale"):
            hf_module = to_hf_name(f"{module}.weight").removesuffix(".weight")
            return f"{hf_module}.{tensor.removesuffix('_fp8')}"
        return to_hf_name(name)

    check_state_dict(model, state, file_name=file_name)
