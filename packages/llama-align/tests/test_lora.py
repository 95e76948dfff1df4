"""LoRA through PEFT on our Llama: only adapters train, adapters off is the base model, and the
merged model equals the adapted one and loads in transformers (the independent reference)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import transformers
from pydantic import ValidationError

from llama_align.lora import LoraSettings, add_lora, merge_lora
from llama_model import Causal, Documents, Llama, LlamaConfig, save_checkpoint
from llama_train import bf16_is_fast

CONFIG = LlamaConfig(
    dim=64, n_layers=2, n_heads=2, n_kv_heads=1, multiple_of=32, max_seq_len=512, rope_scaling=None
)
TOL = {"atol": 1e-5, "rtol": 1e-5}  # float32: the merged weight rounds W + s·BA once


@pytest.fixture(scope="module")
def base_model() -> Llama:
    model = Llama(CONFIG)
    model.init_weights(seed=0)
    return model


@pytest.fixture
def model(base_model: Llama) -> Llama:
    """A fresh copy of the base model (add_lora changes its argument in place)."""
    return copy.deepcopy(base_model)


def _tokens(seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, CONFIG.vocab_size, (2, 16), generator=generator)


def _packed() -> Documents:
    """Two documents per row: the kwarg must reach Llama.forward to matter."""
    return Documents(torch.tensor([[0] * 6 + [1] * 10, [0] * 11 + [1] * 5]))


@torch.no_grad()
def _random_adapters(peft_model: torch.nn.Module, seed: int = 1) -> None:
    """Give every B a non-zero value, as training would."""
    generator = torch.Generator().manual_seed(seed)
    for name, parameter in peft_model.named_parameters():
        if ".lora_B." in name:
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)


def test_settings_are_validated() -> None:
    """Unknown layers, empty or repeated targets, a zero rank and unknown fields are refused."""
    with pytest.raises(ValidationError, match=r"\['q_proj'\] are not linear layers of Llama"):
        LoraSettings(target_modules=("wq", "q_proj"))
    with pytest.raises(ValidationError, match="target_modules is empty"):
        LoraSettings(target_modules=())
    with pytest.raises(ValidationError, match=r"lists \['wq'\] more than once"):
        LoraSettings(target_modules=("wq", "wq"))
    with pytest.raises(ValidationError, match="greater than 0"):
        LoraSettings(r=0)
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        LoraSettings(rank=8)  # type: ignore[call-arg]


def test_only_adapters_train_and_init_is_reproducible(base_model: Llama) -> None:
    """Only lora_A/lora_B require grad, one pair per target layer; the same seed gives the same A,
    another seed another A; B is zero and the A bound is PEFT's 1/sqrt(in)."""
    settings = LoraSettings(r=4, alpha=8, seed=3)
    first = add_lora(copy.deepcopy(base_model), settings)
    again = add_lora(copy.deepcopy(base_model), settings)
    other = add_lora(copy.deepcopy(base_model), settings.model_copy(update={"seed": 4}))
    trainable = {n for n, p in first.named_parameters() if p.requires_grad}
    assert len(trainable) == 2 * 7 * CONFIG.n_layers
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable)
    a_first, a_again, a_other = (
        {n: p for n, p in m.named_parameters() if ".lora_A." in n} for m in (first, again, other)
    )
    for name, value in a_first.items():
        assert value.shape[0] == 4
        assert torch.equal(value, a_again[name]), name
        assert not torch.equal(value, a_other[name]), name
        assert value.abs().max() <= 1 / value.shape[1] ** 0.5
    assert all(p.count_nonzero() == 0 for n, p in first.named_parameters() if ".lora_B." in n)


def test_forward_reaches_llama_with_the_attention(model: Llama, base_model: Llama) -> None:
    """peft_model(tokens, attention=...) is Llama.forward with that backend (zero B: the base)."""
    peft_model = add_lora(model, LoraSettings())
    with torch.no_grad():
        got = peft_model(_tokens(), attention=_packed())
        assert torch.equal(got, base_model(_tokens(), attention=_packed()))
        assert not torch.allclose(got, base_model(_tokens(), attention=Causal()))


def test_a_training_step_changes_only_adapters(model: Llama, base_model: Llama) -> None:
    """One AdamW step moves every B and leaves every base weight bit for bit as it was."""
    peft_model = add_lora(model, LoraSettings(r=4))
    optimizer = torch.optim.AdamW(
        [p for p in peft_model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0
    )
    tokens = _tokens()
    logits = peft_model(tokens[:, :-1], attention=Causal())
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    optimizer.step()
    base = dict(base_model.named_parameters())
    for name, parameter in peft_model.get_base_model().named_parameters():
        if ".lora_B." in name:
            assert parameter.count_nonzero() > 0, name
        elif ".lora_A." not in name:
            plain = name.replace(".base_layer", "")
            assert parameter.grad is None, name
            assert torch.equal(parameter, base[plain]), name


def test_adapters_off_is_the_base_model(model: Llama, base_model: Llama) -> None:
    """Inside disable_adapter() the logits are the base model's, bit for bit; after it, adapted."""
    peft_model = add_lora(model, LoraSettings())
    _random_adapters(peft_model)
    tokens, attention = _tokens(), _packed()
    with torch.no_grad():
        want = base_model(tokens, attention=attention)
        with peft_model.disable_adapter():
            assert torch.equal(peft_model(tokens, attention=attention), want)
        assert not torch.allclose(peft_model(tokens, attention=attention), want)


def test_merged_model_equals_the_adapted_one(model: Llama, base_model: Llama) -> None:
    """merge_lora gives a plain, trainable Llama with the base's parameter names and the adapted
    model's logits (float32, 1e-5)."""
    peft_model = add_lora(model, LoraSettings(target_modules=("wq", "wv", "w2", "output")))
    _random_adapters(peft_model)
    tokens, attention = _tokens(), _packed()
    with torch.no_grad():
        adapted = peft_model(tokens, attention=attention)
    merged = merge_lora(peft_model)
    assert type(merged) is Llama
    assert [n for n, _ in merged.named_parameters()] == [
        n for n, _ in base_model.named_parameters()
    ]
    assert all(p.requires_grad for p in merged.parameters())
    with torch.no_grad():
        got = merged(tokens, attention=attention)
        torch.testing.assert_close(got, adapted, **TOL)
        assert not torch.allclose(got, base_model(tokens, attention=attention))


def test_merged_export_loads_in_transformers(model: Llama, tmp_path: Path) -> None:
    """save_checkpoint of the merged model loads in transformers with the adapted logits."""
    peft_model = add_lora(model, LoraSettings())
    _random_adapters(peft_model)
    tokens = _tokens()
    with torch.no_grad():
        adapted = peft_model(tokens)
    save_checkpoint(merge_lora(peft_model), tmp_path / "merged")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(tokens).logits, adapted, **TOL)


@pytest.mark.skipif(
    not bf16_is_fast(torch.device("cpu")), reason="this CPU has no fast bf16 (no AMX / AVX512-BF16)"
)
def test_bf16_forward_backward_and_merge(model: Llama) -> None:
    """A bf16 model trains float32 adapters (finite gradients) and merges back to bf16 weights."""
    peft_model = add_lora(model.to(torch.bfloat16), LoraSettings(r=4))
    tokens = _tokens()
    logits = peft_model(tokens[:, :-1], attention=_packed_short())
    assert logits.dtype == torch.bfloat16
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
    loss.backward()
    adapters = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
    for name, parameter in adapters:
        assert parameter.dtype == torch.float32, name
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
    assert any(p.grad.count_nonzero() > 0 for n, p in adapters if ".lora_B." in n)  # type: ignore[union-attr]
    merged = merge_lora(peft_model)
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}


def _packed_short() -> Documents:
    return Documents(torch.tensor([[0] * 6 + [1] * 9, [0] * 11 + [1] * 4]))
