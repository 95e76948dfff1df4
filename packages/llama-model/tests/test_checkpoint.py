"""Checkpoint I/O against transformers: HF layout both ways, sharded, Meta layout, and bad input.

Tolerance: float32 logits to atol=rtol=1e-5 (see test_model.py: same operations in the same order,
only kernel-internal reduction order differs).
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from llama_model import (
    Llama,
    LlamaConfig,
    RopeScaling,
    Tokenizer,
    load_checkpoint,
    save_checkpoint,
)

TOL = {"atol": 1e-5, "rtol": 1e-5}


def hf_model(seed: int = 0, **overrides: object) -> transformers.LlamaForCausalLM:
    """A random transformers Llama, its config written by hand in transformers' own terms."""
    fields: dict[str, object] = {
        "vocab_size": 320, "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 8193,
        "rms_norm_eps": 1e-5, "initializer_range": 0.2,
        "rope_parameters": {"rope_type": "llama3", "rope_theta": 500_000.0, "factor": 8.0,
                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192},
    }  # fmt: skip
    fields.update(overrides)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**fields)).eval()


def sample_tokens(vocab_size: int = 320) -> torch.Tensor:
    return torch.randint(0, vocab_size, (2, 23), generator=torch.Generator().manual_seed(5))


def assert_same_logits(ours: Llama, hf: transformers.LlamaForCausalLM) -> None:
    x = sample_tokens(ours.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, **TOL)


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({}, id="llama3.1-scaling-gqa"),
        pytest.param(
            {"rope_parameters": {"rope_type": "default", "rope_theta": 500_000.0}}, id="no-scaling"
        ),
        pytest.param({"tie_word_embeddings": True}, id="tied"),
    ],
)
def test_load_transformers_checkpoint(tmp_path: Path, overrides: dict[str, object]) -> None:
    """A directory written by transformers' save_pretrained loads with identical logits."""
    hf = hf_model(**overrides)
    hf.save_pretrained(tmp_path)
    model = load_checkpoint(tmp_path)
    assert model.config.tie_word_embeddings == bool(overrides.get("tie_word_embeddings", False))
    assert_same_logits(model, hf)


def test_load_sharded_transformers_checkpoint(tmp_path: Path) -> None:
    """A sharded transformers checkpoint (several files plus an index) loads with identical logits."""
    hf = hf_model()
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    assert_same_logits(load_checkpoint(tmp_path), hf)


def test_load_legacy_rope_scaling_config(tmp_path: Path) -> None:
    """A transformers-4 config.json (`rope_theta` + `rope_scaling`) is read the same way."""
    hf = hf_model()
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = rope
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert_same_logits(load_checkpoint(tmp_path), hf)


@pytest.mark.parametrize("shard_size", [2**40, 60_000], ids=["single-file", "sharded"])
def test_saved_directory_loads_in_transformers(tmp_path: Path, shard_size: int) -> None:
    """Our save_checkpoint output loads in transformers as-is, with identical logits."""
    config = LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=320,
                         multiple_of=32, rope_scaling=RopeScaling(factor=8.0), max_seq_len=512)  # fmt: skip
    model = Llama(config).eval()
    model.init_weights(seed=1, std=0.2)
    save_checkpoint(model, tmp_path / "ckpt", max_shard_size=shard_size)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    assert_same_logits(model, hf)
    generation = json.loads((tmp_path / "ckpt" / "generation_config.json").read_text())
    assert generation["eos_token_id"] is None  # not a Llama 3 vocabulary: no ids invented
    # HF configs carry the resolved intermediate_size only, not Meta's rule that derived it
    derivation = {"multiple_of", "ffn_dim_multiplier"}
    reloaded = load_checkpoint(tmp_path / "ckpt").config
    assert reloaded.model_dump(exclude=derivation) == config.model_dump(exclude=derivation)


def test_save_keeps_dtype_and_replaces_previous(tmp_path: Path) -> None:
    """bfloat16 weights stay bfloat16; saving over a checkpoint replaces it, leaving no debris."""
    config = LlamaConfig.from_preset("debug", vocab_size=256, n_layers=1)
    model = Llama(config).to(torch.bfloat16)
    model.init_weights(seed=0)
    target = tmp_path / "ckpt"
    save_checkpoint(model, target, max_shard_size=100_000)
    save_checkpoint(model, target)  # now a single file: the old shards must be gone
    assert sorted(p.name for p in target.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors"]  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert json.loads((target / "config.json").read_text())["torch_dtype"] == "bfloat16"
    reloaded = load_checkpoint(target)
    assert reloaded.tok_embeddings.weight.dtype == torch.bfloat16
    for (name, a), b in zip(
        model.state_dict().items(), reloaded.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


def test_save_from_meta_model_with_load_weight(tmp_path: Path) -> None:
    """A meta-device model with `load_weight` writes the same files as the real model, asking for
    each weight once; a wrong shape, or a meta model without weights, is an error."""
    config = LlamaConfig.from_preset("debug", vocab_size=256, n_layers=2)
    model = Llama(config)
    model.init_weights(seed=3)
    weights = model.state_dict()
    save_checkpoint(model, tmp_path / "real", max_shard_size=200_000)
    with torch.device("meta"):
        skeleton = Llama(config)
    asked: list[str] = []

    def load_weight(name: str) -> torch.Tensor:
        asked.append(name)
        return weights[name]

    save_checkpoint(skeleton, tmp_path / "lazy", max_shard_size=200_000, load_weight=load_weight)
    assert sorted(asked) == sorted(weights)  # each once
    files = sorted(p.name for p in (tmp_path / "real").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "lazy").iterdir())
    assert len([f for f in files if f.endswith(".safetensors")]) > 1  # sharded
    for name in files:
        assert (tmp_path / "real" / name).read_bytes() == (tmp_path / "lazy" / name).read_bytes()
    with pytest.raises(ValueError, match=r"load_weight\('norm.weight'\) gave shape \(3,\)"):
        save_checkpoint(
            skeleton,
            tmp_path / "bad",
            load_weight=lambda n: torch.ones(3) if n == "norm.weight" else weights[n],
        )
    with pytest.raises(ValueError, match="meta device"):
        save_checkpoint(skeleton, tmp_path / "none")
    with pytest.raises(ValueError, match=r"gave torch.bfloat16, but the model's weights are"):
        save_checkpoint(skeleton, tmp_path / "bf16", load_weight=lambda n: weights[n].bfloat16())
    save_checkpoint(
        skeleton, tmp_path / "cast", dtype=torch.bfloat16, load_weight=lambda n: weights[n]
    )
    assert load_checkpoint(tmp_path / "cast").tok_embeddings.weight.dtype == torch.bfloat16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cast", "lazy", "real"]  # no debris


def hf_to_meta(
    hf: transformers.LlamaForCausalLM, model_parallel: int
) -> list[dict[str, torch.Tensor]]:
    """Meta's consolidated layout from transformers weights, split over model-parallel ranks:
    names mapped, RoPE rows of wq/wk permuted back to interleaved pairs, column-parallel weights
    split along rows, row-parallel along columns, norms replicated (written independently here)."""
    c = hf.config
    head_dim = c.hidden_size // c.num_attention_heads

    def to_interleaved(w: torch.Tensor, heads: int) -> torch.Tensor:
        halves = w.view(heads, 2, head_dim // 2, w.shape[1])
        return torch.stack((halves[:, 0], halves[:, 1]), dim=2).reshape(w.shape)

    sd = hf.state_dict()
    full = {"tok_embeddings.weight": sd["model.embed_tokens.weight"],
            "norm.weight": sd["model.norm.weight"], "output.weight": sd["lm_head.weight"]}  # fmt: skip
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        full |= {
            f"layers.{i}.attention.wq.weight": to_interleaved(sd[p + "self_attn.q_proj.weight"], c.num_attention_heads),
            f"layers.{i}.attention.wk.weight": to_interleaved(sd[p + "self_attn.k_proj.weight"], c.num_key_value_heads),
            f"layers.{i}.attention.wv.weight": sd[p + "self_attn.v_proj.weight"],
            f"layers.{i}.attention.wo.weight": sd[p + "self_attn.o_proj.weight"],
            f"layers.{i}.feed_forward.w1.weight": sd[p + "mlp.gate_proj.weight"],
            f"layers.{i}.feed_forward.w2.weight": sd[p + "mlp.down_proj.weight"],
            f"layers.{i}.feed_forward.w3.weight": sd[p + "mlp.up_proj.weight"],
            f"layers.{i}.attention_norm.weight": sd[p + "input_layernorm.weight"],
            f"layers.{i}.ffn_norm.weight": sd[p + "post_attention_layernorm.weight"],
        }  # fmt: skip
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(model_parallel)]
    for name, tensor in full.items():
        if name.endswith(("wo.weight", "w2.weight")):
            parts = tensor.chunk(model_parallel, dim=1)
        elif "norm" in name:
            parts = (tensor,) * model_parallel
        else:
            parts = tensor.chunk(model_parallel, dim=0)
        for shard, part in zip(shards, parts, strict=True):
            shard[name] = part.clone()
    return shards


@pytest.mark.parametrize("model_parallel", [1, 2])
def test_load_meta_checkpoint(tmp_path: Path, model_parallel: int) -> None:
    """Meta's layout (params.json + consolidated.NN.pth, merged over ranks) gives identical logits."""
    hf = hf_model()
    for rank, shard in enumerate(hf_to_meta(hf, model_parallel)):
        torch.save(shard, tmp_path / f"consolidated.{rank:02d}.pth")
    params = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 320,
              "ffn_dim": 160, "norm_eps": 1e-5, "rope_theta": 500000.0, "use_scaled_rope": True,
              "max_seq_len": 8193}  # fmt: skip
    (tmp_path / "params.json").write_text(json.dumps(params))
    assert_same_logits(load_checkpoint(tmp_path), hf)


def test_missing_tensor_is_named(tmp_path: Path) -> None:
    """A checkpoint without one tensor fails with that tensor's name."""
    hf_model().save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing tensor 'layers\.1\.feed_forward\.w3\.weight'"):
        load_checkpoint(tmp_path)


def test_mismatched_shape_names_tensor_and_both_shapes(tmp_path: Path) -> None:
    """A tensor of the wrong shape fails naming the tensor, its shape and the expected shape."""
    hf_model().save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    weights["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(64, 64)
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        ValueError, match=r"'layers\.0\.attention\.wk\.weight' has shape \(64, 64\).*\(32, 64\)"
    ):
        load_checkpoint(tmp_path)


def test_unknown_tensor_is_named(tmp_path: Path) -> None:
    """A tensor that is not part of a Llama model fails with its name."""
    hf_model().save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    weights["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"q_proj\.bias"):
        load_checkpoint(tmp_path)


def test_bad_directories_are_explained(tmp_path: Path) -> None:
    """Missing directories, unknown layouts and unsupported configs say what is wrong."""
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"neither config\.json"):
        load_checkpoint(tmp_path)
    hf_model(attention_bias=True).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="attention_bias"):
        load_checkpoint(tmp_path)


def test_meta_checkpoint_is_loaded_without_pickle_code(tmp_path: Path) -> None:
    """A consolidated.pth holding a pickled object (not tensors) is refused (weights_only=True)."""
    (tmp_path / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 1, "n_heads": 4}))
    torch.save(
        {"tok_embeddings.weight": torch.zeros(2), "evil": Path("/")},
        tmp_path / "consolidated.00.pth",
    )
    with pytest.raises(Exception, match=r"[Ww]eights only load failed"):
        load_checkpoint(tmp_path)


def test_saved_tokenizer_and_chat_template_load_in_transformers(
    tmp_path: Path, tokenizer, chat_format
) -> None:  # type: ignore[no-untyped-def]
    """With a tokenizer, the directory carries tokenizer files that transformers loads, and its
    chat template produces exactly ChatFormat's tokens; generation_config has the Llama 3 stops."""
    from llama_model import Message

    config = LlamaConfig.from_preset("debug", dim=64, n_layers=1, n_heads=4, n_kv_heads=2)
    model = Llama(config)
    model.init_weights(seed=0)
    save_checkpoint(model, tmp_path / "ckpt", tokenizer=tokenizer)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "ckpt")
    dialog = [
        Message(role="system", content="You are terse."),
        Message(role="user", content="Name a prime."),
        Message(role="assistant", content="Seven."),
        Message(role="user", content="Another?"),
    ]
    ids = hf_tokenizer.apply_chat_template(
        [m.to_hf_dict() for m in dialog], add_generation_prompt=True
    )
    ids = ids["input_ids"] if isinstance(ids, Mapping) else ids
    assert list(ids) == chat_format.encode_dialog(dialog).tokens
    generation = json.loads((tmp_path / "ckpt" / "generation_config.json").read_text())
    assert generation["bos_token_id"] == 128_000
    assert generation["eos_token_id"] == [128_001, 128_008, 128_009]
    tokenizer_config = json.loads((tmp_path / "ckpt" / "tokenizer_config.json").read_text())
    assert tokenizer_config["model_max_length"] == config.max_seq_len


def test_save_refuses_to_replace_a_directory_that_is_not_a_checkpoint(tmp_path: Path) -> None:
    """Saving into a non-empty directory without config.json fails and leaves it untouched."""
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "notes.txt").write_text("keep me")
    model = Llama(LlamaConfig.from_preset("debug", vocab_size=64, n_layers=1))
    with pytest.raises(FileExistsError, match="holds no checkpoint"):
        save_checkpoint(model, tmp_path / "runs")
    assert (tmp_path / "runs" / "notes.txt").read_text() == "keep me"


def test_failed_save_keeps_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A save that fails midway leaves the previous checkpoint complete and no debris behind."""
    import llama_model.checkpoint as checkpoint

    model = Llama(LlamaConfig.from_preset("debug", vocab_size=64, n_layers=1))
    model.init_weights(seed=0)
    save_checkpoint(model, tmp_path / "ckpt")
    before = {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()}

    def fail(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "publish_directory", fail)  # everything written, not published
    model.init_weights(seed=1)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(model, tmp_path / "ckpt")
    assert {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_saved_files_are_readable_by_others(tmp_path: Path) -> None:
    """Saved files get the umask's permissions, not the private ones of temporary files."""
    import os

    umask = os.umask(0o022)
    try:
        save_checkpoint(
            Llama(LlamaConfig.from_preset("debug", vocab_size=64, n_layers=1)), tmp_path / "c"
        )
    finally:
        os.umask(umask)
    assert (tmp_path / "c").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "c" / "config.json").stat().st_mode & 0o777 == 0o644


def test_index_listing_a_missing_shard_is_named(tmp_path: Path) -> None:
    """A sharded checkpoint whose index names a file that is absent fails naming that file."""
    hf_model().save_pretrained(tmp_path, max_shard_size="100KB")
    victim = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        load_checkpoint(tmp_path)


def test_bad_config_json_is_explained(tmp_path: Path) -> None:
    """Unsupported RoPE types and missing keys in config.json are errors naming them."""
    hf_model().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["rope_parameters"]["rope_type"] = "yarn"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="rope type 'yarn'"):
        load_checkpoint(tmp_path)
    del config["hidden_size"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="lacks the key 'hidden_size'"):
        load_checkpoint(tmp_path)


def test_meta_shards_that_disagree_are_named(tmp_path: Path) -> None:
    """Model-parallel shards with different tensor names fail naming the tensor and files."""
    shards = hf_to_meta(hf_model(), 2)
    del shards[1]["norm.weight"]
    for rank, shard in enumerate(shards):
        torch.save(shard, tmp_path / f"consolidated.{rank:02d}.pth")
    (tmp_path / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 2, "n_heads": 4}))
    with pytest.raises(ValueError, match=r"'norm\.weight' is in only one of consolidated\.00\.pth"):
        load_checkpoint(tmp_path)


def test_meta_checkpoint_without_output_is_tied(tmp_path: Path) -> None:
    """A Meta checkpoint with no output.weight (Llama 3.2 1B/3B) loads as tied embeddings and
    matches the tied transformers model."""
    hf = hf_model(tie_word_embeddings=True)
    shard = hf_to_meta(hf, 1)[0]
    del shard["output.weight"]
    torch.save(shard, tmp_path / "consolidated.00.pth")
    params = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 320,
              "ffn_dim": 160, "use_scaled_rope": True, "max_seq_len": 8193}  # fmt: skip
    (tmp_path / "params.json").write_text(json.dumps(params))
    model = load_checkpoint(tmp_path)
    assert model.config.tie_word_embeddings
    assert_same_logits(model, hf)


def test_save_converts_dtype_on_the_way_out(tmp_path: Path) -> None:
    """save_checkpoint(dtype=bfloat16) writes bfloat16 tensors and config from a float32 model,
    leaving the model itself in float32."""
    model = Llama(LlamaConfig.from_preset("debug", vocab_size=64, n_layers=1))
    model.init_weights(seed=0)
    save_checkpoint(model, tmp_path / "c", dtype=torch.bfloat16, max_shard_size=50_000)
    assert json.loads((tmp_path / "c" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    reloaded = load_checkpoint(tmp_path / "c")
    assert model.tok_embeddings.weight.dtype == torch.float32
    for (name, a), b in zip(
        model.state_dict().items(), reloaded.state_dict().values(), strict=True
    ):
        assert b.dtype == torch.bfloat16, name
        assert torch.equal(a.to(torch.bfloat16), b), name


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def transformers_complaints() -> Iterator[list[str]]:
    """Collect what transformers logs at WARNING or above (it logs with `logging`, not
    `warnings`, and its library logger does not propagate) while turning Python warnings into
    errors; the list is filled when the block ends."""
    from transformers.utils import logging as hf_logging

    hf_logging.warning_once.cache_clear()  # a message logged once by an earlier test shows again
    library = logging.getLogger("transformers")
    handler, level = _Collect(), library.level
    library.addHandler(handler)
    library.setLevel(logging.WARNING)  # whatever TRANSFORMERS_VERBOSITY says
    complaints: list[str] = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            yield complaints
    finally:
        library.removeHandler(handler)
        library.setLevel(level)
        complaints.extend(record.getMessage() for record in handler.records)


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({}, id="debug-preset"),  # what llama-demo exports: 2K context, no scaling
        # Llama 3.1's scaling needs a context above its original 8192 (transformers warns else).
        pytest.param({"rope_scaling": RopeScaling(factor=8.0), "max_seq_len": 131_072}, id="3.1"),
    ],
)
def test_export_loads_in_transformers_without_warnings(
    tmp_path: Path, tokenizer: Tokenizer, overrides: dict[str, object]
) -> None:
    """An export with the real tokenizer loads through AutoConfig, AutoTokenizer and
    AutoModelForCausalLM with no warning raised or logged, and still tokenizes and computes like
    ours; without `transformers_version` in config.json the same tokenizer load logs the Mistral
    "incorrect regex pattern" warning (the cause, and proof that the capture sees it)."""
    config = LlamaConfig.from_preset(
        "debug", dim=64, n_layers=1, n_heads=4, n_kv_heads=2, **overrides
    )
    model = Llama(config).eval()
    model.init_weights(seed=0)
    ckpt = save_checkpoint(model, tmp_path / "ckpt", tokenizer=tokenizer)
    assert json.loads((ckpt / "config.json").read_text())["transformers_version"] == "4.43.2"

    with transformers_complaints() as complaints:
        transformers.AutoConfig.from_pretrained(ckpt)
        hf_tokenizer = transformers.AutoTokenizer.from_pretrained(ckpt)
        hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt).eval()
    assert complaints == []
    text = "Crash-safe exports, 128K tokens!"
    assert hf_tokenizer.encode(text) == tokenizer.encode(text, bos=True, eos=False)
    assert_same_logits(model, hf)

    hf_config = json.loads((ckpt / "config.json").read_text())
    del hf_config["transformers_version"]
    (ckpt / "config.json").write_text(json.dumps(hf_config))
    with transformers_complaints() as complaints:
        transformers.AutoTokenizer.from_pretrained(ckpt)
    assert len(complaints) == 1 and "incorrect regex pattern" in complaints[0]
