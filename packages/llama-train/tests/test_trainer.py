"""The single-process Trainer: activation checkpointing, torch.compile and bf16 change nothing they
should not; configuration mistakes fail with messages that say what to change."""

from __future__ import annotations

import json
from pathlib import Path

import _common  # tests/distributed/_common.py, on sys.path via conftest
import pytest
import torch
from safetensors.torch import load_file

from llama_train import TrainConfig, Trainer, TrainResult


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("shards") / "tiny"
    _common.write_tiny_shards(str(path))
    return path


def _run(shards: Path, out: Path, *overrides: str) -> tuple[TrainResult, dict[str, torch.Tensor]]:
    config = TrainConfig.load(None, [*_common.trainer_overrides(str(shards), str(out)), *overrides])
    trainer = Trainer(config)
    try:
        result = trainer.fit()
    finally:
        trainer.close()
    return result, load_file(out / "model" / "model.safetensors")


def test_model_is_built_on_meta_then_initialised_in_place(
    shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Trainer never builds the model at full size before parallelising it (a 70B model does
    not fit one device): it builds on the meta device and materialises its parts, which start
    from exactly `Llama.init_weights` of the run's seed (the distributed trainer tests check the
    same for shards and pipeline stages)."""
    import llama_train.trainer as trainer_module
    from llama_model import Llama

    built_on: list[str] = []

    class Recording(Llama):
        def __init__(self, config: object) -> None:
            super().__init__(config)  # type: ignore[arg-type]
            built_on.append(self.tok_embeddings.weight.device.type)

    monkeypatch.setattr(trainer_module, "Llama", Recording)
    overrides = [*_common.trainer_overrides(str(shards), str(tmp_path)), "seed=5"]
    trainer = Trainer(TrainConfig.load(None, overrides))
    try:
        assert built_on == ["meta"]
        expected = Llama(trainer.model_config)
        expected.init_weights(seed=5)
        reference = dict(expected.named_parameters())
        (part,) = trainer.parts
        got = dict(part.named_parameters())
        assert got.keys() == reference.keys()
        for name, param in got.items():
            assert param.device.type == "cpu", name
            assert torch.equal(param, reference[name]), name
    finally:
        trainer.close()


def test_activation_checkpointing_is_exact(shards: Path, tmp_path: Path) -> None:
    """Recomputing activations in backward gives the same losses and weights, bit for bit (CPU
    float32 is deterministic and the recomputation repeats the same operations)."""
    plain, plain_weights = _run(shards, tmp_path / "plain")
    checkpointed, weights = _run(shards, tmp_path / "ac", "activation_checkpointing=true")
    assert checkpointed.losses == plain.losses
    for key, value in plain_weights.items():
        assert torch.equal(weights[key], value), key


@pytest.mark.slow  # inductor compiles the blocks on CPU: about a minute
# Warnings raised inside torch while it traces and compiles (not about our code): inductor's CPU
# backend touches torch.jit, and dynamo reads `.grad` of the non-leaf activations it inspects.
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning")
def test_compiled_blocks_match_eager(shards: Path, tmp_path: Path) -> None:
    """torch.compile per block (inductor) matches eager within float32 fusion noise: losses to
    rtol 1e-5, weights to atol 1e-5 (fused kernels reorder a few sums)."""
    eager, eager_weights = _run(shards, tmp_path / "eager")
    compiled, weights = _run(shards, tmp_path / "compiled", "compile=true")
    assert compiled.losses == pytest.approx(eager.losses, rel=1e-5)
    for key, value in eager_weights.items():
        torch.testing.assert_close(weights[key], value, atol=1e-5, rtol=1e-5, msg=key)


def test_bf16_compute_keeps_fp32_master_weights(shards: Path, tmp_path: Path) -> None:
    """bf16 autocast: losses within bf16 rounding of float32 (2% here: 3 steps of a tiny model),
    and the weights that are updated and exported stay float32."""
    fp32, _ = _run(shards, tmp_path / "fp32")
    bf16, weights = _run(shards, tmp_path / "bf16", 'dtype="bfloat16"')
    assert bf16.losses == pytest.approx(fp32.losses, rel=2e-2)
    assert bf16.losses != fp32.losses  # bf16 really ran
    assert all(w.dtype == torch.float32 for w in weights.values())


def test_configuration_mistakes_are_named(shards: Path, tmp_path: Path) -> None:
    common = _common
    base = common.trainer_overrides(str(shards), str(tmp_path / "x"))
    with pytest.raises(ValueError, match=r"data.sources is empty"):
        Trainer(TrainConfig.load(None, [*base, "data.sources=[]"]))
    with pytest.raises(
        ValueError, match=r"vocabulary of 256 ids, larger than the model's vocab_size 128"
    ):
        Trainer(
            TrainConfig.load(
                None,
                [*base, common.TINY_MODEL_OVERRIDES.replace("vocab_size=256", "vocab_size=128")],
            )
        )
    with pytest.raises(
        ValueError, match=r"world size 1 is not divisible by pp·dp_replicate·cp·tp = 2"
    ):
        Trainer(TrainConfig.load(None, [*base, "parallel.tp=2"]))
    with pytest.raises(ValueError, match="attention_kernel = 'flex' cannot train on CPU"):
        Trainer(TrainConfig.load(None, [*base, 'model.attention_kernel="flex"']))
    assert not torch.distributed.is_initialized()  # each failed start released its group


def test_resuming_as_another_model_is_refused(shards: Path, tmp_path: Path) -> None:
    """A checkpoint records the model config; resuming it under another one (here a different
    RoPE base, which loads into the same shapes) is an error naming the field."""
    base = [*_common.trainer_overrides(str(shards), str(tmp_path), steps=2), "export=false"]
    trainer = Trainer(TrainConfig.load(None, base))
    try:
        trainer.fit()
    finally:
        trainer.close()
    other = _common.TINY_MODEL_OVERRIDES.replace("}", ", rope_theta=10000.0}")
    trainer = Trainer(TrainConfig.load(None, [*base, other, "steps=3"]))
    try:
        with pytest.raises(
            ValueError, match=r"trained as another model \(its config differs in rope_theta\)"
        ):
            trainer.resume()
    finally:
        trainer.close()


def test_annealing_mix_continues_the_batch_ramp(shards: Path, tmp_path: Path) -> None:
    """The annealing loader takes over at the ramp position the main loader reached (it does not
    fall back to the first, short stage), and the exported model is the average of the snapshots."""
    ramp = (
        "data.ramp=[{tokens_seen_threshold=0, batch_tokens=64, seq_len=16}, "
        "{tokens_seen_threshold=128, batch_tokens=64, seq_len=32}]"
    )
    _run(
        shards,
        tmp_path,
        ramp,
        "steps=5",
        "anneal.steps=2",
        "anneal.checkpoint_interval=1",
        f'anneal.sources=[{{path="{shards}", name="hq"}}]',
    )
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["seq_len"] for r in records] == [16, 16, 32, 32, 32]  # steps 3-4 anneal
    assert records[4]["lr"] == pytest.approx(0.5 * records[3]["lr"], rel=1e-6)  # linear to 0
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "keep").iterdir()) == [
        "step-00000004",
        "step-00000005",
    ]


def test_sources_of_one_run_share_one_tokenizer(shards: Path, tmp_path: Path) -> None:
    """Mixing shards written by two tokenizers (here the annealing mix) is an error naming both
    sources and both tokenizers; so is mixing in an old manifest that cannot tell. One source of
    either kind alone trains."""
    from llama_data import Document, write_token_shards

    class ReversedBytes:
        """Another tokenizer over the same 256 ids: ids mean other things than in 'tiny'."""

        vocab_size, name, sha256 = 256, "reversed-bytes", "ab" * 32

        def encode(self, text: str) -> list[int]:
            return [255 - b for b in text.encode("utf-8")]

    other = tmp_path / "other"
    docs = [Document(id=str(i), text="alpha beta gamma " * 20) for i in range(8)]
    write_token_shards(docs, ReversedBytes(), other, add_bos=False, add_eos=False)
    base = _common.trainer_overrides(str(shards), str(tmp_path / "x"))
    mixes = {
        "data": f'data.sources=[{{path="{shards}"}}, {{path="{other}"}}]',
        "anneal": f'anneal.sources=[{{path="{other}"}}]',
    }
    for where, mix in mixes.items():
        with pytest.raises(ValueError, match="tokenized differently") as error:
            Trainer(TrainConfig.load(None, [*base, mix, "steps=4", "anneal.steps=2"]))
        message = str(error.value)
        assert "'tiny'" in message and "'other'" in message, where
        assert "'bytes'" in message and "'reversed-bytes'" in message, where

    manifest = json.loads((other / "manifest.json").read_text())
    manifest["tokenizer"].update(name="unknown", sha256="unknown")  # as old manifests say
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="'other' does not record its tokenizer"):
        Trainer(TrainConfig.load(None, [*base, mixes["data"]]))
    trainer = Trainer(TrainConfig.load(None, [*base, f'data.sources=[{{path="{other}"}}]']))
    trainer.close()
