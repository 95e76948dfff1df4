"""§6.2's FP8 inference recipe (`quantize_fp8`) on the real `llama_model.Llama`.

What is replaced: the feed-forward projections of every block but the first and the last, and
nothing else (module identity and parameter values of everything else are compared before and
after). How close: the logits of the quantized bfloat16 model against the unquantized bfloat16
model, as relative L2 error and next-token (top-1) agreement. FP8 e4m3 carries 3 mantissa bits, so
each quantized matmul alone is ~3-4% off in relative L2 (about 28 dB SNR); errors partly average
out over the residual stream. The FP8 ops themselves are tested against float64 in llama-kernels.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from llama_kernels import Fp8RowwiseLinear
from llama_model import Llama, LlamaConfig
from llama_serve import quantize_fp8

FFN = ("w1", "w2", "w3")


def _llama(n_layers: int, *, seed: int = 0) -> Llama:
    """A small real Llama (width 64, 4 heads / 2 KV heads, FFN 192, vocabulary 97), random weights."""
    config = LlamaConfig(dim=64, n_layers=n_layers, n_heads=4, n_kv_heads=2, vocab_size=97,
                         multiple_of=32, max_seq_len=64)  # fmt: skip
    model = Llama(config)
    model.init_weights(seed=seed, std=0.05)
    return model


def _block(model: Llama, key: str) -> nn.Module:
    return model.layers[key]


def _ffn(model: Llama, key: str, name: str) -> nn.Module:
    feed_forward = _block(model, key).feed_forward
    assert isinstance(feed_forward, nn.Module)
    module = getattr(feed_forward, name)
    assert isinstance(module, nn.Module)
    return module


def _quantized_names(model: nn.Module) -> set[str]:
    return {name for name, m in model.named_modules() if isinstance(m, Fp8RowwiseLinear)}


def test_quantize_fp8_follows_the_recipe(device: str) -> None:
    """Middle layers' w1/w2/w3 become Fp8RowwiseLinear; the first and last layers, all attention
    projections, norms, embeddings and output are the same objects with the same weights; the
    logits stay within 5% relative L2 error of the bf16 model's."""
    model = _llama(n_layers=4, seed=6).to(device=device, dtype=torch.bfloat16).eval()
    tokens = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(6)).to(device)
    with torch.no_grad():
        logits_bf16 = model(tokens)
    modules_before = dict(model.named_modules())
    params_before = {name: p.detach().clone() for name, p in model.named_parameters()}

    assert quantize_fp8(model) is model

    quantized = _quantized_names(model)
    assert quantized == {f"layers.{i}.feed_forward.{w}" for i in (1, 2) for w in FFN}
    for name, module in model.named_modules():
        if name not in quantized:
            assert module is modules_before[name], f"{name} was replaced"
    for name, param in model.named_parameters():
        torch.testing.assert_close(param, params_before[name], rtol=0, atol=0)

    with torch.no_grad():
        logits_fp8 = model(tokens)
    assert logits_fp8.dtype == torch.bfloat16
    relative_error = float(
        (logits_fp8.double() - logits_bf16.double()).norm() / logits_bf16.double().norm()
    )
    assert 0 < relative_error < 0.05, f"relative L2 error of logits {relative_error:.4f}"


def test_quantize_fp8_follows_the_paper_and_stays_close_to_bf16() -> None:
    """On the debug preset (width 256, 4 layers): FFN matmuls of the middle layers become FP8;
    attention, first and last layers stay bf16; the logits stay close to the bf16 model's
    (< 10% relative L2, >= 90% top-1 agreement)."""
    config = LlamaConfig.from_preset("debug", vocab_size=512, n_layers=4)
    model = Llama(config).to(torch.bfloat16).eval()
    model.init_weights(seed=0, std=0.05)
    tokens = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(tokens).float()
    attention_before = {key: layer.attention for key, layer in model.layers.items()}
    quantize_fp8(model)
    for key, layer in model.layers.items():
        i = int(key)
        assert layer.attention is attention_before[key]
        assert isinstance(layer.attention.wq, torch.nn.Linear)
        quantized = [isinstance(_ffn(model, key, w), Fp8RowwiseLinear) for w in FFN]
        assert quantized == [0 < i < config.n_layers - 1] * 3, f"layer {i}: {quantized}"
    with torch.no_grad():
        out = model(tokens).float()
    relative_l2 = ((out - reference).norm() / reference.norm()).item()
    top1 = (out.argmax(-1) == reference.argmax(-1)).float().mean().item()
    assert relative_l2 < 0.10, f"relative L2 error of logits {relative_l2:.4f}"
    assert top1 >= 0.90, f"top-1 agreement {top1:.3f}"
    assert relative_l2 > 0  # the quantized path really ran


def test_quantize_fp8_on_a_pipeline_stage_uses_the_models_layer_indices() -> None:
    """A stage holding layers 2 and 3 of a 4-layer model (layers keyed by index, the others
    removed) quantizes layer 2 only: "last" is the model's last layer (3), not the stage's; a stage
    holding layers 0 and 1 quantizes layer 1 only. With skip_first_last=False both are quantized."""
    late = _llama(n_layers=4)
    del late.layers["0"], late.layers["1"]
    quantize_fp8(late)
    assert _quantized_names(late) == {f"layers.2.feed_forward.{w}" for w in FFN}
    early = _llama(n_layers=4)
    del early.layers["2"], early.layers["3"]
    quantize_fp8(early)
    assert _quantized_names(early) == {f"layers.1.feed_forward.{w}" for w in FFN}
    whole = _llama(n_layers=4)
    del whole.layers["1"], whole.layers["2"]
    quantize_fp8(whole, skip_first_last=False)
    assert _quantized_names(whole) == {f"layers.{i}.feed_forward.{w}" for i in (0, 3) for w in FFN}


def test_quantize_fp8_rejects_models_it_cannot_quantize() -> None:
    """Too few layers for skip_first_last, not a Llama, or a missing feed-forward Linear: each a
    clear error naming what is wrong, with the model left unchanged; a quantized model is refused."""
    with pytest.raises(
        ValueError, match=r"2 layer\(s\): nothing would be quantized.*skip_first_last"
    ):
        quantize_fp8(_llama(n_layers=2))
    both = quantize_fp8(_llama(n_layers=2), skip_first_last=False)
    assert all(isinstance(_ffn(both, key, "w1"), Fp8RowwiseLinear) for key in both.layers)
    ends_only = _llama(n_layers=4)
    del ends_only.layers["1"], ends_only.layers["2"]
    with pytest.raises(ValueError, match=r"layers \['0', '3'\] of 4: nothing would be quantized"):
        quantize_fp8(ends_only)
    with pytest.raises(TypeError, match=r"expects a llama_model\.Llama, got Linear"):
        quantize_fp8(nn.Linear(4, 4))  # type: ignore[arg-type]
    model = _llama(n_layers=4)
    feed_forward = _block(model, "2").feed_forward
    assert isinstance(feed_forward, nn.Module)
    del feed_forward.w2
    with pytest.raises(
        TypeError, match=r"layers\.2\.feed_forward\.w2 must be an nn\.Linear, got missing"
    ):
        quantize_fp8(model)
    assert isinstance(_ffn(model, "1", "w1"), nn.Linear)  # checked before changing
    assert _quantized_names(model) == set()
    quantize_fp8(_llama(n_layers=3))  # three layers: the middle one is quantized
    twice = quantize_fp8(_llama(n_layers=3))
    with pytest.raises(TypeError, match=r"layers\.1\.feed_forward\.w1 .*already quantized"):
        quantize_fp8(twice)
