"""§6.2's FP8 inference recipe (llama_kernels) applied to the real model (llama_model).

Measure of closeness: the logits of the quantized bfloat16 model against the unquantized bfloat16
model, as relative L2 error and next-token (top-1) agreement. FP8 e4m3 carries 3 mantissa bits, so
each quantized matmul alone is ~3-4% off in relative L2 (about 28 dB SNR); errors partly average out
over the residual stream, and we require < 10% on the logits and >= 90% top-1 agreement.
"""

from __future__ import annotations

import torch

from llama_kernels import Fp8RowwiseLinear, quantize_model_fp8
from llama_model import Llama, LlamaConfig


def test_quantize_model_fp8_follows_the_paper_and_stays_close_to_bf16() -> None:
    """FFN matmuls of the middle layers become FP8; attention, first and last layers stay bf16;
    the logits stay close to the bf16 model's."""
    config = LlamaConfig.from_preset("debug", vocab_size=512, n_layers=4)
    model = Llama(config).to(torch.bfloat16).eval()
    model.init_weights(seed=0, std=0.05)
    tokens = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(tokens).float()
    attention_before = [layer.attention for layer in model.layers]
    quantize_model_fp8(model)
    for i, layer in enumerate(model.layers):
        assert layer.attention is attention_before[i]
        assert isinstance(layer.attention.wq, torch.nn.Linear)
        quantized = [
            isinstance(getattr(layer.feed_forward, w), Fp8RowwiseLinear) for w in ("w1", "w2", "w3")
        ]
        assert quantized == [0 < i < config.n_layers - 1] * 3, f"layer {i}: {quantized}"
    with torch.no_grad():
        out = model(tokens).float()
    relative_l2 = ((out - reference).norm() / reference.norm()).item()
    top1 = (out.argmax(-1) == reference.argmax(-1)).float().mean().item()
    assert relative_l2 < 0.10, f"relative L2 error of logits {relative_l2:.4f}"
    assert top1 >= 0.90, f"top-1 agreement {top1:.3f}"
    assert relative_l2 > 0  # the quantized path really ran
