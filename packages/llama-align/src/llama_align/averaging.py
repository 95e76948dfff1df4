"""Model averaging of Hugging Face Llama checkpoints (§4.1.5 of "The Llama 3 Herd of Models").

§4.1.5: "Finally, we average models obtained from experiments using various versions of data or
hyperparameters at each RLHF stage." `average_hf_checkpoints` averages Hugging Face Llama
directories of one architecture (ours or Meta's) weight by weight, streaming: each weight is read
from every checkpoint with `safetensors.safe_open` (one file or the shards of
`model.safetensors.index.json`), summed in float64 by llama-train's accumulator
(`llama_train.average_state_dicts`, the one that also makes the Polyak average of §3.4.3), rounded
once to the checkpoints' dtype and handed to `llama_model.save_checkpoint` as it writes that
weight's shard. The model passed to the writer is built on the meta device, so the memory held is
one output shard, plus one weight's float64 sum and the checkpoint's copy being added to it:
neither the model's size nor the number of checkpoints changes that.

The first checkpoint's tokenizer and generation defaults are carried byte for byte, and the new
directory is published atomically (`llama_model.publish_directory`).
"""

from __future__ import annotations

import contextlib
import json
import math
import secrets
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from llama_model import (
    Llama,
    LlamaConfig,
    check_checkpoint_target,
    config_from_hf,
    config_to_hf,
    publish_directory,
    save_checkpoint,
    to_hf_name,
)
from llama_train import average_state_dicts

__all__ = ["average_hf_checkpoints"]

# config.json keys (as `config_to_hf` writes them) that do not describe the architecture: two
# checkpoints of one model may differ in them. Everything else must be equal.
_NOT_ARCHITECTURE = frozenset(
    {"torch_dtype", "bos_token_id", "eos_token_id", "transformers_version", "use_cache"}
)
# Files carried from the first checkpoint as they are: the tokenizer (with its chat template) and
# the sampling defaults. Hugging Face tokenizer files cannot be turned back into a
# `llama_model.Tokenizer` (a tiktoken file), and copying keeps a Meta release's own files exact.
_CARRIED_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def average_hf_checkpoints(
    paths: Sequence[str | Path],
    out: str | Path,
    *,
    weights: Sequence[float] | None = None,
    max_shard_size: int = 5 * 2**30,
) -> Path:
    """Write to `out` the weight-by-weight average of the Hugging Face Llama checkpoints `paths`.

    The checkpoints must share one architecture (config.json equal in every key but the dtype,
    token ids and versions) and hold the same tensors in one dtype; the error names the differing
    key or tensor and both paths. `weights` (non-negative, one per checkpoint, normalised to sum
    1; default uniform) gives a weighted average. Sums are float64 and rounded once to the
    checkpoints' dtype, so averaging bf16 checkpoints loses nothing along the way. The output
    (sharded above `max_shard_size` bytes) carries the first checkpoint's tokenizer files and
    generation_config.json, and replaces an existing checkpoint at `out` only once complete.
    Returns `out`.
    """
    sources = [Path(p) for p in paths]
    if not sources:
        raise ValueError("nothing to average: got no checkpoint paths")
    target = check_checkpoint_target(out)
    for source in sources:
        if target.resolve() == source.resolve():
            raise ValueError(
                f"out {str(target)!r} is one of the checkpoints to average; write the average "
                "to a new directory"
            )
    factors = _scale_factors(weights, len(sources))
    config = _common_config(sources)
    with contextlib.ExitStack() as stack:
        readers = [_HfTensors(source, stack) for source in sources]
        with torch.device("meta"):
            model = Llama(config)
        dtype = _check_tensors(model, readers)
        model.to(dtype)

        def load_weight(name: str) -> torch.Tensor:
            hf_name = to_hf_name(name)

            def one_at_a_time() -> Iterator[dict[str, torch.Tensor]]:
                if factors is None:  # the plain mean: the accumulator's float64 sums of the
                    for reader in readers:  # stored tensors, as in llama-train's average
                        yield {name: reader.read(hf_name)}
                    return
                for reader, factor in zip(readers, factors, strict=True):
                    if factor != 0.0:  # the mean of factor_i · x_i = the sum of w_i · x_i
                        yield {name: reader.read(hf_name).to(torch.float64).mul_(factor)}

            return average_state_dicts(one_at_a_time())[name].to(dtype)

        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.with_name(f".{target.name}.{secrets.token_hex(4)}.averaging")
        try:
            save_checkpoint(model, staging, load_weight=load_weight, max_shard_size=max_shard_size)
            for file in _CARRIED_FILES:
                if (sources[0] / file).is_file():
                    shutil.copyfile(sources[0] / file, staging / file)
            publish_directory(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return target


def _scale_factors(weights: Sequence[float] | None, count: int) -> list[float] | None:
    """None for the plain mean (no weights, or equal ones); else the factor each checkpoint's
    tensors are multiplied by (in float64) before the accumulator's mean over the m checkpoints of
    non-zero weight, w_i · m / sum(w), so that the mean is the weighted average."""
    if weights is None:
        return None
    values = [float(w) for w in weights]
    if len(values) != count:
        raise ValueError(
            f"got {len(values)} weights for {count} checkpoints; pass one weight per checkpoint"
        )
    for i, w in enumerate(values):
        if not math.isfinite(w) or w < 0:
            raise ValueError(f"weight {i} is {w}; weights must be finite and non-negative")
    total = math.fsum(values)
    if total == 0:
        raise ValueError(f"weights {values} sum to 0; give at least one checkpoint a weight")
    if len(set(values)) == 1:
        return None
    used = sum(1 for w in values if w > 0)
    return [w / total * used for w in values]


def _common_config(sources: list[Path]) -> LlamaConfig:
    """The checkpoints' LlamaConfig, refused unless every config.json gives the same architecture."""
    first: dict[str, Any] | None = None
    config: LlamaConfig | None = None
    for source in sources:
        file = source / "config.json"
        if not file.is_file():
            raise FileNotFoundError(
                f"{str(source)!r} has no config.json; pass Hugging Face Llama checkpoint "
                "directories"
            )
        raw = json.loads(file.read_text())
        architectures = raw.get("architectures") or ["LlamaForCausalLM"]
        if architectures != ["LlamaForCausalLM"]:
            raise ValueError(
                f"{str(source)!r} is a {architectures} checkpoint; average_hf_checkpoints "
                "averages LlamaForCausalLM checkpoints only"
            )
        try:
            this = config_from_hf(raw)
        except ValueError as error:
            raise ValueError(f"{file}: {error}") from None
        normal = {
            key: value for key, value in config_to_hf(this).items() if key not in _NOT_ARCHITECTURE
        }
        if first is None:
            first, config = normal, this
            continue
        for key in sorted(first):
            if normal[key] != first[key]:
                raise ValueError(
                    f"the checkpoints differ in architecture: {key!r} is {first[key]!r} in "
                    f"{sources[0] / 'config.json'} but {normal[key]!r} in {file}; average "
                    "checkpoints of one architecture only"
                )
    assert config is not None
    return config


class _HfTensors:
    """The tensors of one Hugging Face checkpoint directory, memory-mapped and read one at a time."""

    def __init__(self, directory: Path, stack: contextlib.ExitStack) -> None:
        self.directory = directory
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        elif (directory / "model.safetensors").is_file():
            weight_map = {}
        else:
            raise FileNotFoundError(
                f"{str(directory)!r} has no model.safetensors or model.safetensors.index.json"
            )
        files = sorted(set(weight_map.values())) or ["model.safetensors"]
        self._files: dict[str, Any] = {}
        for file in files:
            if not (directory / file).is_file():
                raise FileNotFoundError(
                    f"shard {file!r} listed in {index} is missing from {directory}"
                )
            handle = stack.enter_context(safe_open(directory / file, framework="pt"))
            for name in handle.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                if weight_map and weight_map.get(name) != file:
                    raise ValueError(
                        f"{directory / file} holds {name!r}, which {index} places in "
                        f"{weight_map.get(name)!r}; the index and the shards disagree"
                    )
                self._files[name] = handle

    def names(self) -> set[str]:
        """Every tensor name in the checkpoint (Hugging Face names)."""
        return set(self._files)

    def describe(self, name: str) -> tuple[tuple[int, ...], str]:
        """(shape, safetensors dtype string) of tensor `name`, from the file header only."""
        view = self._files[name].get_slice(name)
        return tuple(view.get_shape()), str(view.get_dtype())

    def read(self, name: str) -> torch.Tensor:
        """Tensor `name`, as stored."""
        tensor: torch.Tensor = self._files[name].get_tensor(name)
        return tensor


def _check_tensors(model: Llama, readers: list[_HfTensors]) -> torch.dtype:
    """The checkpoints' one dtype, once every checkpoint is known to hold exactly the model's
    tensors with its shapes (from the safetensors headers: nothing is loaded)."""
    expected = {to_hf_name(name): tuple(p.shape) for name, p in model.state_dict().items()}
    first_dtype: str | None = None
    for reader in readers:
        names = reader.names()
        if model.config.tie_word_embeddings:
            names.discard("lm_head.weight")  # tied: the output projection is the embedding table
        missing, extra = sorted(expected.keys() - names), sorted(names - expected.keys())
        if missing or extra:
            what = f"lacks {missing[0]!r}" if missing else f"has unexpected tensor {extra[0]!r}"
            raise ValueError(
                f"{str(reader.directory)!r} {what} for the architecture of its config.json; "
                "average complete Llama checkpoints only"
            )
        for name, shape in expected.items():
            found, dtype = reader.describe(name)
            if found != shape:
                raise ValueError(
                    f"{name!r} has shape {found} in {str(reader.directory)!r}, but its config.json "
                    f"gives {shape}"
                )
            if first_dtype is None:
                first_dtype, first_source = dtype, (readers[0].directory, name)
            if dtype != first_dtype:
                raise ValueError(
                    f"{name!r} is {dtype} in {str(reader.directory)!r} but {first_source[1]!r} is "
                    f"{first_dtype} in {str(first_source[0])!r}; convert the checkpoints to one "
                    "dtype before averaging"
                )
    assert first_dtype is not None
    if first_dtype not in _DTYPES:
        raise ValueError(
            f"the checkpoints hold {first_dtype} tensors; floating-point weights "
            f"({', '.join(_DTYPES)}) are averaged"
        )
    return _DTYPES[first_dtype]
