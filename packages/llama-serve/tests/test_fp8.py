"""§6.2's FP8 inference recipe (`quantize_fp8`) on the real `llama_model.Llama`.

What is replaced: the feed-forward projections of every block but the first and the last, and
nothing else (module identity and parameter values of everything else are compared before and
after), with the activation-scale bound asked for (1200 by default, §6.2). Pipeline stages (a
`Llama` with the parts it does not hold removed, built here as llama-train builds them): every
stage of a split can be quantized, and the quantized stages run in turn equal the quantized whole
model exactly. How close: the logits of the quantized bfloat16 model against the unquantized bfloat16
model, as relative L2 error and next-token (top-1) agreement. FP8 e4m3 carries 3 mantissa bits, so
each quantized matmul alone is ~3-4% off in relative L2 (about 28 dB SNR); errors partly average
out over the residual stream. The FP8 ops themselves are tested against float64 in llama-kernels.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import pytest
import torch
from torch import nn

from llama_kernels import Fp8RowwiseLinear
from llama_model import Llama, LlamaConfig
from llama_serve import quantize_fp8

FFN = ("w1", "w2", "w3")


def _llama(n_layers: int, *, seed: int = 0) -> Llama:
    """A small real Llama (width 64, 4 heads / 2 KV heads, FFN 192, vocabulary 97), random weights."""
    config = LlamaConfig.model_validate({"dim": 64, "n_layers": n_layers, "n_heads": 4,
        "n_kv_heads": 2, "vocab_size": 97, "multiple_of": 32, "max_seq_len": 64})  # fmt: skip
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


def _debug_preset_llama(n_layers: int, *, seed: int = 0) -> Llama:
    """The debug preset (width 256) with a 512-token vocabulary, random weights."""
    model = Llama(LlamaConfig.from_preset("debug", vocab_size=512, n_layers=n_layers))
    model.init_weights(seed=seed, std=0.05)
    return model


@pytest.mark.parametrize(
    ("build", "seed", "seq_len", "max_relative_error", "min_top1"),
    [
        # 32 next-token choices among 97 near-tied random logits: 28 of 32 agree on the CPU.
        pytest.param(_llama, 6, 16, 0.05, 0.75, id="width64"),
        pytest.param(_debug_preset_llama, 0, 24, 0.10, 0.90, id="debug-preset"),
    ],
)
def test_quantize_fp8_follows_the_recipe_and_stays_close_to_bf16(
    device: str,
    build: Callable[..., Llama],
    seed: int,
    seq_len: int,
    max_relative_error: float,
    min_top1: float,
) -> None:
    """On a 4-layer model: the middle layers' w1/w2/w3 become Fp8RowwiseLinear; the first and last
    layers, all attention projections (still nn.Linear), norms, embeddings and output are the same
    objects with the same weights; the bf16 logits stay close to the bf16 model's (relative L2
    below the case's bound and > 0, so the FP8 path ran; top-1 agreement at least the case's)."""
    model = build(n_layers=4, seed=seed).to(device=device, dtype=torch.bfloat16).eval()
    vocab_size = model.config.vocab_size
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab_size, (2, seq_len), generator=generator).to(device)
    with torch.no_grad():
        logits_bf16 = model(tokens)
    modules_before = dict(model.named_modules())
    params_before = {name: p.detach().clone() for name, p in model.named_parameters()}
    attention_before = {key: layer.attention for key, layer in model.layers.items()}

    assert quantize_fp8(model) is model

    quantized = _quantized_names(model)
    assert quantized == {f"layers.{i}.feed_forward.{w}" for i in (1, 2) for w in FFN}
    for key, layer in model.layers.items():
        i = int(key)
        attention = layer.attention
        assert attention is attention_before[key]
        assert isinstance(attention, nn.Module) and isinstance(attention.wq, nn.Linear)
        is_fp8 = [isinstance(_ffn(model, key, w), Fp8RowwiseLinear) for w in FFN]
        assert is_fp8 == [0 < i < model.config.n_layers - 1] * 3, f"layer {i}: {is_fp8}"
    for name, module in model.named_modules():
        if name not in quantized:
            assert module is modules_before[name], f"{name} was replaced"
    for name, param in model.named_parameters():
        torch.testing.assert_close(param, params_before[name], rtol=0, atol=0)

    with torch.no_grad():
        logits_fp8 = model(tokens)
    assert logits_fp8.dtype == torch.bfloat16
    reference, out = logits_bf16.double(), logits_fp8.double()
    relative_error = float((out - reference).norm() / reference.norm())
    top1 = float((out.argmax(-1) == reference.argmax(-1)).double().mean())
    assert 0 < relative_error < max_relative_error, (
        f"relative L2 error of logits {relative_error:.4f}"
    )
    assert top1 >= min_top1, f"top-1 agreement {top1:.3f}"


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


def _stage(model: Llama, layer_ids: Sequence[int], *, first: bool, last: bool) -> Llama:
    """A pipeline stage of `model` built as llama-train builds one (without importing it): a `Llama`
    of the same config holding only layers `layer_ids`, the embedding only if `first`, the final
    norm and output only if `last` (the other parts removed), filled with copies of the weights."""
    with torch.device("meta"):
        stage = Llama(model.config)
    held = {str(i) for i in layer_ids}
    for key in [key for key in stage.layers if key not in held]:
        del stage.layers[key]
    if not first:
        stage.tok_embeddings = None
    if not last:
        stage.norm, stage.output = None, None
    weights = model.state_dict()
    copies = {name: weights[name].detach().clone() for name in stage.state_dict()}
    stage.load_state_dict(copies, assign=True)
    return stage


def _split(model: Llama, layers_per_stage: Sequence[int]) -> list[Llama]:
    """`model` as consecutive stages holding `layers_per_stage` layers each."""
    assert sum(layers_per_stage) == model.config.n_layers
    stages, start = [], 0
    for i, count in enumerate(layers_per_stage):
        layer_ids = range(start, start + count)
        stages.append(_stage(model, layer_ids, first=i == 0, last=i == len(layers_per_stage) - 1))
        start += count
    return stages


@pytest.mark.parametrize("layers_per_stage", [(1, 1, 1, 1), (1, 2, 1), (3, 1), (1, 3)])
def test_quantize_fp8_on_every_stage_of_a_split_equals_the_whole_model(
    device: str, layers_per_stage: tuple[int, ...]
) -> None:
    """Every stage of a split of a 4-layer model can be quantized, including one holding only the
    first or only the last layer: such a stage comes back unchanged (same modules, same weights),
    the others get the FP8 layers the whole model gets (layers 1 and 2), and the quantized stages
    run one after another give exactly the quantized whole model's logits."""
    whole = _llama(n_layers=4, seed=3).to(device=device, dtype=torch.bfloat16).eval()
    stages = _split(whole, layers_per_stage)
    quantize_fp8(whole)
    quantized: set[str] = set()
    for stage in stages:
        modules_before = dict(stage.named_modules())
        params_before = {name: p.detach().clone() for name, p in stage.named_parameters()}
        assert quantize_fp8(stage) is stage
        names = _quantized_names(stage)
        if set(stage.layers.keys()) <= {"0", "3"}:  # only the model's first or last layer
            assert names == set()
            assert dict(stage.named_modules()) == modules_before
            for name, param in stage.named_parameters():
                torch.testing.assert_close(param, params_before[name], rtol=0, atol=0)
        quantized |= names
    assert quantized == {f"layers.{i}.feed_forward.{w}" for i in (1, 2) for w in FFN}

    tokens = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(3)).to(device)
    with torch.no_grad():
        expected = whole(tokens)  # [2, 16, 97]
        hidden = tokens
        for stage in stages:
            hidden = stage(hidden)  # [2, 16, 64] between stages, logits [2, 16, 97] at the end
    assert any(isinstance(m, Fp8RowwiseLinear) for m in whole.modules())
    torch.testing.assert_close(hidden, expected, rtol=0, atol=0)


def test_quantize_fp8_on_a_stage_holding_nothing_it_quantizes_returns_it_unchanged() -> None:
    """A stage holding only the first and the last layer of a 4-layer model (nothing §6.2 puts in
    FP8) is returned as it was; a stage of a 2-layer model is refused, since the whole model has
    too few layers (negative control: what decides is config.n_layers, not the stage)."""
    ends_only = _llama(n_layers=4)
    del ends_only.layers["1"], ends_only.layers["2"]
    assert quantize_fp8(ends_only) is ends_only
    assert _quantized_names(ends_only) == set()
    first_of_two = _stage(_llama(n_layers=2), [0], first=True, last=False)
    with pytest.raises(ValueError, match=r"2 layer\(s\): nothing would be quantized"):
        quantize_fp8(first_of_two)
    assert _quantized_names(quantize_fp8(first_of_two, skip_first_last=False)) == {
        f"layers.0.feed_forward.{w}" for w in FFN
    }


@pytest.mark.parametrize("scale_ub", [1200.0, 600.0, 1, math.inf])
def test_quantize_fp8_gives_every_quantized_layer_the_scale_bound(scale_ub: float) -> None:
    """Every FP8 layer carries the given activation-scale bound, 1200 (§6.2) by default, and
    computes what `Fp8RowwiseLinear.from_linear(linear, scale_ub=...)` of the bf16 layer does."""
    default = quantize_fp8(_llama(n_layers=4).to(torch.bfloat16))
    assert {m.scale_ub for m in default.modules() if isinstance(m, Fp8RowwiseLinear)} == {1200.0}

    model = _llama(n_layers=4).to(torch.bfloat16)
    original = _ffn(model, "1", "w2")
    assert isinstance(original, nn.Linear)
    quantize_fp8(model, scale_ub=scale_ub)
    layers = [m for m in model.modules() if isinstance(m, Fp8RowwiseLinear)]
    assert len(layers) == 6 and {m.scale_ub for m in layers} == {float(scale_ub)}
    x = 4.0 * torch.randn(3, original.in_features, generator=torch.Generator().manual_seed(1))
    x = x.to(torch.bfloat16)
    x[0, 0] = 2000.0  # an outlier above the default bound: the cap decides this row's scale
    expected = Fp8RowwiseLinear.from_linear(original, scale_ub=scale_ub)(x)
    torch.testing.assert_close(_ffn(model, "1", "w2")(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("scale_ub", "error", "message"),
    [
        (0, ValueError, r"scale_ub must be > 0 .*§6\.2 uses 1200\.0.*got 0$"),
        (-1.0, ValueError, r"scale_ub must be > 0 .*got -1\.0$"),
        (math.nan, ValueError, r"scale_ub must be > 0 .*got nan$"),
        (True, TypeError, r"scale_ub must be a positive number .*got True$"),
        ("1200", TypeError, r"scale_ub must be a positive number .*got '1200'$"),
    ],
)
def test_quantize_fp8_refuses_a_bad_scale_bound_as_the_kernels_do(
    scale_ub: object, error: type[Exception], message: str
) -> None:
    """A bound that is not a number > 0 is refused with the value named, the same exception
    llama_kernels' `Fp8RowwiseLinear.from_linear` raises for it, before any layer is changed, and
    also by a stage that holds nothing to quantize."""
    with pytest.raises(error):
        Fp8RowwiseLinear.from_linear(nn.Linear(4, 4), scale_ub=scale_ub)  # type: ignore[arg-type]
    model = _llama(n_layers=4)
    with pytest.raises(error, match=message):
        quantize_fp8(model, scale_ub=scale_ub)  # type: ignore[arg-type]
    assert _quantized_names(model) == set()
    first_only = _stage(_llama(n_layers=4), [0], first=True, last=False)
    with pytest.raises(error, match=message):
        quantize_fp8(first_only, scale_ub=scale_ub)  # type: ignore[arg-type]


def test_quantize_fp8_rejects_models_it_cannot_quantize() -> None:
    """Too few layers for skip_first_last, not a Llama, or a missing feed-forward Linear: each a
    clear error naming what is wrong, with the model left unchanged; a quantized model is refused."""
    with pytest.raises(
        ValueError, match=r"2 layer\(s\): nothing would be quantized.*skip_first_last"
    ):
        quantize_fp8(_llama(n_layers=2))
    both = quantize_fp8(_llama(n_layers=2), skip_first_last=False)
    assert all(isinstance(_ffn(both, key, "w1"), Fp8RowwiseLinear) for key in both.layers)
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


def test_compare_logits_matches_float64_kl_and_argmax() -> None:
    """Per-token KL(reference || candidate) against float64 math (tolerance 1e-5 nats: the
    log-softmaxes are float32, whose rounding on a 97-way softmax stays below that), top-1
    agreement against argmax, shapes without the vocabulary axis; a copy gives 0 and all True."""
    from llama_serve import compare_logits

    generator = torch.Generator().manual_seed(0)
    reference = torch.randn(3, 5, 97, generator=generator) * 3
    candidate = reference + 0.3 * torch.randn(3, 5, 97, generator=generator)
    candidate[0, 0] = -candidate[0, 0]  # one token where the two surely disagree
    kl, agree = compare_logits(reference.bfloat16(), candidate.bfloat16())
    assert kl.shape == agree.shape == (3, 5) and kl.dtype == torch.float32
    p = torch.log_softmax(reference.bfloat16().double(), dim=-1)
    q = torch.log_softmax(candidate.bfloat16().double(), dim=-1)
    expected = (p.exp() * (p - q)).sum(-1)
    torch.testing.assert_close(kl.double(), expected, rtol=0, atol=1e-5)
    assert torch.equal(agree, reference.bfloat16().argmax(-1) == candidate.bfloat16().argmax(-1))
    assert not agree[0, 0] and agree.sum() > 1 and kl[0, 0] > 1
    same_kl, same_agree = compare_logits(reference, reference.clone())
    assert torch.equal(same_kl, torch.zeros(3, 5)) and bool(same_agree.all())


def test_compare_logits_refuses_mismatched_shapes() -> None:
    from llama_serve import compare_logits

    with pytest.raises(ValueError, match=r"one shape \[..., vocab\], got \(2, 97\) and \(2, 96\)"):
        compare_logits(torch.zeros(2, 97), torch.zeros(2, 96))
