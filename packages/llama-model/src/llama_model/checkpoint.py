"""Checkpoint I/O: read Hugging Face and Meta Llama checkpoints, write the Hugging Face layout.

Two layouts are read:
- Hugging Face: `config.json` + `model.safetensors`, or shards listed in `model.safetensors.index.json`.
- Meta: `params.json` + `consolidated.NN.pth`, one file per model-parallel rank, merged here. Loaded
  with `torch.load(weights_only=True)`: no pickled code is ever executed.

The Hugging Face layout is written (the interchange format of DESIGN.md): `config.json`,
`generation_config.json`, safetensors weights (sharded with an index above `max_shard_size`) and,
given a tokenizer, `tokenizer.json` and `tokenizer_config.json` with the chat template, so that
`transformers` and vLLM load the directory as it is. A save is staged in a temporary directory and
moved into place only when complete (`llama_model.atomic.publish_directory`), so a crash never
leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from llama_model.atomic import publish_directory
from llama_model.config import LlamaConfig, RopeScaling
from llama_model.model import Llama
from llama_model.tokenizer import llama3_special_tokens

if TYPE_CHECKING:
    from llama_model.tokenizer import Tokenizer

__all__ = [
    "check_checkpoint_target",
    "check_state_dict",
    "read_hf_tensors",
    "config_from_hf",
    "config_to_hf",
    "from_hf_name",
    "interleaved_to_half_split",
    "load_checkpoint",
    "save_checkpoint",
    "to_hf_name",
]

# Our (Meta) parameter names ↔ Hugging Face LlamaForCausalLM names, per layer and global.
_LAYER_NAMES = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)\.weight$")
_HF_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)\.weight$")

# Llama 3 tokenizer ids used when no tokenizer is passed to save_checkpoint: the 256 special
# tokens follow the 128,000 BPE tokens, in the order tokenizer.llama3_special_tokens() gives.
_LLAMA3_VOCAB = 128_256
_LLAMA3_SPECIAL = {name: 128_000 + i for i, name in enumerate(llama3_special_tokens())}
_LLAMA3_BOS = _LLAMA3_SPECIAL["<|begin_of_text|>"]
_LLAMA3_STOPS = [_LLAMA3_SPECIAL[t] for t in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")]

# `transformers_version` written into config.json and generation_config.json: the release whose
# layout these files follow. Our keys (`rope_theta`, `rope_scaling` with rope_type "llama3",
# `torch_dtype`) are transformers 4.43's LlamaConfig, the release that added Llama 3.1's RoPE
# scaling; 4.43.2 is the one Hugging Face's Llama 3.1 post recommends (RoPE fix in 4.43.1), and
# transformers 5 reads the same keys. A fixed constant, not the installed version: llama-model does
# not depend on transformers, and the files must not change with what happens to be installed.
# transformers 5 needs the field: without it, `_patch_mistral_regex` (tokenization_utils_tokenizers
# .py) takes any local config.json for a Mistral checkpoint saved before its regex fix and warns
# that the tokenizer has "an incorrect regex pattern".
_TRANSFORMERS_VERSION = "4.43.2"


def to_hf_name(name: str) -> str:
    """Hugging Face name of one of our parameter names."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    match = _LAYER_RE.match(name)
    if match and match.group(2) in _LAYER_NAMES:
        return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}.weight"
    raise KeyError(f"no Hugging Face name for parameter {name!r}")


def from_hf_name(name: str) -> str:
    """Our parameter name for a Hugging Face LlamaForCausalLM tensor name."""
    for ours, theirs in _GLOBAL_NAMES.items():
        if name == theirs:
            return ours
    match = _HF_LAYER_RE.match(name)
    if match:
        for ours, theirs in _LAYER_NAMES.items():
            if match.group(2) == theirs:
                return f"layers.{match.group(1)}.{ours}.weight"
    raise ValueError(f"checkpoint has unexpected tensor {name!r}: not part of a Llama model")


# --------------------------------------------------------------------------------------------
# Configs


def config_from_hf(hf: Mapping[str, Any]) -> LlamaConfig:
    """Translate a Hugging Face `config.json` (transformers 4.x or 5.x keys) to a LlamaConfig."""
    try:
        return _config_from_hf(hf)
    except KeyError as err:
        raise ValueError(
            f"config.json lacks the key {err.args[0]!r} that a Llama config needs"
        ) from None


def _config_from_hf(hf: Mapping[str, Any]) -> LlamaConfig:
    model_type = hf.get("model_type", "llama")
    if model_type != "llama":
        raise ValueError(f"config.json has model_type {model_type!r}; only 'llama' is supported")
    for key, ok in (("attention_bias", False), ("mlp_bias", False), ("hidden_act", "silu")):
        if hf.get(key, ok) != ok:
            raise ValueError(f"config.json has {key}={hf[key]!r}; Llama 3 requires {key}={ok!r}")
    dim, n_heads = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or dim // n_heads
    if head_dim * n_heads != dim:
        raise ValueError(
            f"config.json has head_dim={head_dim} with hidden_size={dim} and "
            f"num_attention_heads={n_heads}; Llama 3 requires head_dim = hidden_size / heads"
        )
    # transformers 5 nests rope_theta in `rope_parameters`; 4.x has `rope_theta` + `rope_scaling`.
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope_theta = rope.get("rope_theta", hf.get("rope_theta", 500_000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "llama3":
        scaling: RopeScaling | None = RopeScaling(
            factor=rope["factor"],
            low_freq_factor=rope["low_freq_factor"],
            high_freq_factor=rope["high_freq_factor"],
            original_max_seq_len=rope["original_max_position_embeddings"],
        )
    elif rope_type == "default":
        scaling = None
    else:
        raise ValueError(f"config.json has rope type {rope_type!r}; supported: 'llama3', 'default'")
    return LlamaConfig(
        dim=dim,
        n_layers=hf["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        vocab_size=hf["vocab_size"],
        ffn_dim=hf["intermediate_size"],
        norm_eps=hf.get("rms_norm_eps", 1e-5),
        rope_theta=rope_theta,
        rope_scaling=scaling,
        max_seq_len=hf.get("max_position_embeddings", 8192),
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
    )


def config_to_hf(
    config: LlamaConfig,
    *,
    dtype: torch.dtype = torch.bfloat16,
    bos_token_id: int | None = None,
    eos_token_id: int | list[int] | None = None,
) -> dict[str, Any]:
    """A transformers `LlamaConfig` dict (keys that both transformers 4.x and 5.x read)."""
    rope_scaling = None
    if config.rope_scaling is not None:
        s = config.rope_scaling
        rope_scaling = {
            "rope_type": "llama3",
            "factor": s.factor,
            "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_seq_len,
        }
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": config.dim,
        "intermediate_size": config.ffn_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "vocab_size": config.vocab_size,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": rope_scaling,
        "max_position_embeddings": config.max_seq_len,
        "tie_word_embeddings": config.tie_word_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "transformers_version": _TRANSFORMERS_VERSION,
    }


# --------------------------------------------------------------------------------------------
# Loading


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> Llama:
    """Load a Hugging Face or Meta Llama checkpoint directory into a `Llama`.

    The layout is detected from `config.json` (Hugging Face) or `params.json` (Meta). Tensors keep
    the checkpoint's dtype unless `dtype` is given. Missing, unexpected or misshapen tensors raise a
    ValueError naming the tensor (and both shapes).
    """
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory {str(directory)!r} does not exist")
    if (directory / "config.json").is_file():
        config, state = _read_hf(directory)
    elif (directory / "params.json").is_file():
        config, state = _read_meta(directory)
    else:
        raise FileNotFoundError(
            f"{str(directory)!r} holds neither config.json (Hugging Face layout) nor params.json "
            "(Meta layout)"
        )
    with torch.device("meta"):
        model = Llama(config)
    check_state_dict(model, state)
    for name in list(state):  # one tensor at a time: never two copies of the model in memory
        state[name] = state[name].to(device=device, dtype=dtype or state[name].dtype)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def check_checkpoint_target(path: str | os.PathLike[str]) -> Path:
    """`path` as a Path if a checkpoint may be written there: it does not exist, or is an empty
    directory, or holds a checkpoint (a config.json) to replace. Anything else is a
    FileExistsError, so that a mistyped path never replaces unrelated files."""
    target = Path(path)
    if target.exists():
        if not target.is_dir():
            raise FileExistsError(f"{str(target)!r} exists and is not a directory")
        if any(target.iterdir()) and not (target / "config.json").is_file():
            raise FileExistsError(
                f"{str(target)!r} is a non-empty directory that holds no checkpoint (no "
                "config.json); refusing to replace it: choose a new or empty directory"
            )
    return target


def check_state_dict(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    *,
    file_name: Callable[[str], str] = str,
) -> None:
    """Refuse `state` unless it holds every tensor of `model`'s state dict, none other, each of
    its shape: ValueError naming the first offending tensor as `file_name` spells it (the name
    in the checkpoint's files; default: the state-dict name)."""
    expected = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    missing = sorted(expected.keys() - state.keys())
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"checkpoint is missing tensor {file_name(missing[0])!r}{more}")
    unexpected = sorted(state.keys() - expected.keys())
    if unexpected:
        raise ValueError(
            f"checkpoint has unexpected tensor {file_name(unexpected[0])!r} for this config"
        )
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise ValueError(
                f"tensor {file_name(name)!r} has shape {tuple(state[name].shape)} in the "
                f"checkpoint but the config expects {shape}"
            )


def read_hf_tensors(directory: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face checkpoint directory's safetensors files (one file or the
    shards its `model.safetensors.index.json` lists), by Hugging Face name, as stored."""
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    elif (directory / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(
            f"{str(directory)!r} has config.json but no model.safetensors or "
            "model.safetensors.index.json"
        )
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        if not (directory / file).is_file():
            raise FileNotFoundError(
                f"shard {file!r} listed in the index is missing from {directory}"
            )
        with safe_open(directory / file, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                tensors[name] = f.get_tensor(name)
    return tensors


def _read_hf(directory: Path) -> tuple[LlamaConfig, dict[str, torch.Tensor]]:
    config = config_from_hf(json.loads((directory / "config.json").read_text()))
    state: dict[str, torch.Tensor] = {}
    for hf_name, tensor in read_hf_tensors(directory).items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # tied: the output projection is the embedding table
        state[from_hf_name(hf_name)] = tensor
    return config, state


# Meta's model-parallel layout (fairscale): column-parallel weights are split along dim 0,
# row-parallel weights along dim 1, norms are replicated.
_COLUMN_PARALLEL = (
    "attention.wq.weight",
    "attention.wk.weight",
    "attention.wv.weight",
    "feed_forward.w1.weight",
    "feed_forward.w3.weight",
    "output.weight",
    "tok_embeddings.weight",
)  # Llama 3 uses VocabParallelEmbedding: split by vocab
_ROW_PARALLEL = ("attention.wo.weight", "feed_forward.w2.weight")


def _read_meta(directory: Path) -> tuple[LlamaConfig, dict[str, torch.Tensor]]:
    params = json.loads((directory / "params.json").read_text())
    shard_files = sorted(directory.glob("consolidated.*.pth"))
    if not shard_files:
        raise FileNotFoundError(f"{str(directory)!r} has params.json but no consolidated.*.pth")
    shards = [torch.load(f, map_location="cpu", weights_only=True, mmap=True) for f in shard_files]
    names = set(shards[0])
    for file, shard in zip(shard_files[1:], shards[1:], strict=True):
        if set(shard) != names:
            odd = sorted(names.symmetric_difference(shard))[0]
            raise ValueError(
                f"model-parallel shards disagree: {odd!r} is in only one of {shard_files[0].name} "
                f"and {file.name}"
            )
    # Llama 3.2 1B/3B tie the output projection to the embeddings: their files hold no output.
    config = LlamaConfig.from_meta_params(
        params, **({} if "output.weight" in names else {"tie_word_embeddings": True})
    )
    state: dict[str, torch.Tensor] = {}
    for name in shards[0]:
        if name == "rope.freqs":  # precomputed RoPE table in some Meta checkpoints; recomputed here
            continue
        parts = [shard[name] for shard in shards]
        if len(parts) == 1 or not name.endswith(_COLUMN_PARALLEL + _ROW_PARALLEL):
            tensor = parts[0]
        else:
            tensor = torch.cat(parts, dim=0 if name.endswith(_COLUMN_PARALLEL) else 1)
        if name.endswith("attention.wq.weight"):
            tensor = interleaved_to_half_split(tensor, config.n_heads)
        elif name.endswith("attention.wk.weight"):
            tensor = interleaved_to_half_split(tensor, config.n_kv_heads)
        state[name] = tensor
    return config, state


def interleaved_to_half_split(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Permute the rows of a Meta wq/wk [n_heads·head_dim, dim] from RoPE pairs (2i, 2i+1) to
    pairs (i, i + head_dim/2), the layout this model (and Hugging Face) uses."""
    rows, dim = weight.shape
    head_dim = rows // n_heads
    if head_dim * n_heads != rows:
        raise ValueError(f"weight with {rows} rows cannot hold {n_heads} heads")
    # [heads, head_dim/2, 2, dim] -> [heads, 2, head_dim/2, dim]: evens first, then odds
    return weight.view(n_heads, head_dim // 2, 2, dim).transpose(1, 2).reshape(rows, dim)


# --------------------------------------------------------------------------------------------
# Saving


def save_checkpoint(
    model: Llama,
    path: str | os.PathLike[str],
    *,
    tokenizer: Tokenizer | None = None,
    max_shard_size: int = 5 * 2**30,
    dtype: torch.dtype | None = None,
    load_weight: Callable[[str], torch.Tensor] | None = None,
) -> Path:
    """Write `model` as a Hugging Face Llama directory that transformers and vLLM load as is.

    Weights are saved in their dtype (or `dtype`), split into shards of at most `max_shard_size`
    bytes. With a `tokenizer`, the tokenizer files and the chat template are written too. An existing
    checkpoint at `path` is replaced only once the new one is complete.

    With `load_weight`, the weights come from ``load_weight(name)`` (our parameter names, e.g.
    ``"layers.0.attention.wq.weight"``), each called once while its shard is written, and `model`
    only gives the structure and dtype (build it on the meta device): a model larger than memory
    is written with one shard in memory at a time. Weights of another dtype than the model's are
    an error unless `dtype` is given.
    """
    if max_shard_size <= 0:
        raise ValueError(f"max_shard_size must be positive, got {max_shard_size}")
    target = check_checkpoint_target(path)
    target.parent.mkdir(parents=True, exist_ok=True)

    # References only: each shard is moved to the CPU and converted while it is written.
    params = {name: tensor.detach() for name, tensor in model.state_dict().items()}
    weight_dtype = dtype or next(iter(params.values())).dtype
    if load_weight is None and any(t.is_meta for t in params.values()):
        raise ValueError(
            "the model is on the meta device (no weights): load its weights first, or pass "
            "load_weight= to produce each weight while it is written"
        )
    state = {
        to_hf_name(name): _Weight(name, tensor, load_weight, convert=dtype is not None)
        for name, tensor in params.items()
    }
    if tokenizer is not None:
        bos, eos = tokenizer.bos_id, list(tokenizer.stop_tokens)
    elif model.config.vocab_size == _LLAMA3_VOCAB:
        bos, eos = _LLAMA3_BOS, list(_LLAMA3_STOPS)
    else:
        bos, eos = None, None

    # Made with the permissions the umask gives (not tempfile.mkdtemp's private 0o700), so the
    # published checkpoint is as readable as a directory made in place.
    staging = target.with_name(f".{target.name}.{secrets.token_hex(4)}.partial")
    staging.mkdir()
    try:
        _write_weights(state, staging, max_shard_size, weight_dtype)
        _write_json(
            staging / "config.json",
            config_to_hf(model.config, dtype=weight_dtype, bos_token_id=bos, eos_token_id=eos),
        )
        generation = {
            "bos_token_id": bos,
            "eos_token_id": eos,
            "do_sample": True,
            "temperature": 0.6,
            "top_p": 0.9,
            "transformers_version": _TRANSFORMERS_VERSION,
        }  # Meta's defaults for Llama 3.1 Instruct
        _write_json(staging / "generation_config.json", generation)
        if tokenizer is not None:
            from llama_model._hf_tokenizer import write_hf_tokenizer

            write_hf_tokenizer(tokenizer, staging, model_max_length=model.config.max_seq_len)
        publish_directory(staging, target)  # fsyncs every file, then renames it into place
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


class _Weight:
    """A weight to write: the model's tensor, or (with `load`) one produced when it is written."""

    def __init__(
        self,
        name: str,
        tensor: torch.Tensor,
        load: Callable[[str], torch.Tensor] | None,
        *,
        convert: bool,
    ) -> None:
        self.name, self.tensor, self.load, self.convert = name, tensor, load, convert

    def numel(self) -> int:
        return self.tensor.numel()

    def materialise(self, dtype: torch.dtype) -> torch.Tensor:
        value = self.tensor if self.load is None else self.load(self.name)
        if value.shape != self.tensor.shape:
            raise ValueError(
                f"load_weight({self.name!r}) gave shape {tuple(value.shape)}; the model's is "
                f"{tuple(self.tensor.shape)}"
            )
        if self.load is not None and not self.convert and value.dtype != dtype:
            raise ValueError(  # never cast what load_weight gives silently
                f"load_weight({self.name!r}) gave {value.dtype}, but the model's weights are "
                f"{dtype}; pass dtype= to write them in another dtype"
            )
        return value.detach().to(device="cpu", dtype=dtype).contiguous()


def _write_weights(
    state: dict[str, _Weight], directory: Path, max_shard_size: int, dtype: torch.dtype
) -> None:
    """Write `state` as safetensors shards of at most `max_shard_size` bytes (in `dtype`), with an
    index when there is more than one; only one shard is held on the CPU at a time."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    shards: list[list[str]] = [[]]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * itemsize
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes

    def materialise(names: list[str]) -> dict[str, torch.Tensor]:
        return {n: state[n].materialise(dtype) for n in names}

    if len(shards) == 1:
        save_file(
            materialise(shards[0]), directory / "model.safetensors", metadata={"format": "pt"}
        )
        return
    weight_map = {}
    for i, names in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(materialise(names), directory / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
    total = sum(t.numel() * itemsize for t in state.values())
    _write_json(
        directory / "model.safetensors.index.json",
        {"metadata": {"total_size": total}, "weight_map": weight_map},
    )


def _write_json(path: Path, obj: Any) -> None:
    """Indented UTF-8 JSON with a trailing newline. Only for files inside the staging directory:
    `publish_directory` makes the whole directory durable and visible at once."""
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
