"""Tests for llama_align.Policy: the log-probabilities of chosen targets and their gradients.

The reference is the model's own full forward, `Llama(tokens)` -> [B, T, vocab] logits, then a
float32 log-softmax gathered at the targets: independent of the chunked path (`LinearLogProbs`)
that Policy takes for a plain output layer and of the `Llama.logits` path it falls back to.
"""

from __future__ import annotations

import pytest
import torch

from align_fixtures import TINY, tiny_llama
from llama_align import Policy
from llama_align.policy import shifted_targets
from llama_model import Llama
from llama_train import LinearLogProbs

# float32 on both sides, the same terms summed in another order (per chunk, over fewer positions):
# relative 1e-5 is ~80 float32 ulps, far below a real mistake (a log-prob is ~-12, a wrong target
# or position moves it by whole nats).
RTOL, ATOL = 1e-5, 1e-5


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """tokens [3, 40], next-token targets and a mask of about half the positions, and an upstream
    gradient per scored position (different per position, of both signs)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, TINY.vocab_size, (3, 40), generator=g)
    learn = torch.rand(3, 40, generator=g) < 0.5
    targets, mask = shifted_targets(tokens, learn)
    upstream = torch.randn(int(mask.sum()), generator=g)
    return tokens, targets, mask, upstream


def _reference(
    model: torch.nn.Module, tokens: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """log p(targets[mask]) from the full forward."""
    logits = model(tokens)  # [B, T, vocab]: the full forward, every position
    logps = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[..., None]).squeeze(-1)
    return logps[mask]


def _grads(
    model: torch.nn.Module, logps: torch.Tensor, upstream: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Every parameter's gradient of sum(upstream * logps)."""
    model.zero_grad(set_to_none=True)
    (logps * upstream).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _compare(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    """The same parameters got gradients, each equal to the reference's."""
    assert ours.keys() == ref.keys() and ours
    for name, grad in ref.items():  # entries to 1e-5 of the gradient's largest (float32 paths)
        atol = 1e-5 * float(grad.abs().max())
        torch.testing.assert_close(ours[name], grad, rtol=RTOL, atol=atol, msg=name)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("chunk_size", [256, 16])
def test_log_probs_and_gradients_equal_the_full_forward(tied: bool, chunk_size: int) -> None:
    """Plain output layer (or the tied embedding table): Policy's log-probs and every parameter
    gradient equal the full forward's, and they came through the kept chunk buffers (one chunk
    at the default size, several at 16 rows)."""
    torch.manual_seed(0)
    model = Llama(TINY.model_copy(update={"tie_word_embeddings": tied}))
    model.init_weights(seed=0)
    tokens, targets, mask, upstream = _batch()
    policy = Policy(model)
    policy._log_probs = LinearLogProbs(chunk_size=chunk_size)
    logps = policy(tokens, targets, mask)
    assert logps.dtype == torch.float32
    ours = _grads(model, logps, upstream)
    assert policy._log_probs._buffers.tensors  # the chunked path ran
    ref_logps = _reference(model, tokens, targets, mask)
    torch.testing.assert_close(logps, ref_logps.detach(), rtol=RTOL, atol=ATOL)
    _compare(ours, _grads(model, ref_logps, upstream))


def test_a_lora_wrapped_output_layer_takes_the_model_s_projection() -> None:
    """With LoRA on `output` the plain weight is not the projection: Policy projects through the
    model (its adapters included, initialised non-zero) and matches the full forward."""
    # Imported here, not at the top: importing peft imports Triton, and a workspace-wide pytest
    # collects this file before llama-kernels' conftest sets TRITON_INTERPRET for the kernel tests.
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=4, target_modules=["wq", "output"], init_lora_weights=False)
    model = get_peft_model(tiny_llama(), lora)
    tokens, targets, mask, upstream = _batch(seed=1)
    policy = Policy(model)
    logps = policy(tokens, targets, mask)
    ours = _grads(model, logps, upstream)
    assert not policy._log_probs._buffers.tensors  # not the chunked path
    ref_logps = _reference(model, tokens, targets, mask)
    torch.testing.assert_close(logps, ref_logps.detach(), rtol=RTOL, atol=ATOL)
    _compare(ours, _grads(model, ref_logps, upstream))
    assert any("output.lora_" in name for name in ours)


def _halve_logits(output: torch.nn.Module, how: str) -> None:
    """Make `output` return half its logits: by a forward hook, a forward pre-hook (halving its
    input) or a replaced `forward` on the instance (as accelerate's offloading hooks do)."""
    if how == "forward hook":
        output.register_forward_hook(lambda module, args, out: out * 0.5)
    elif how == "pre-hook":
        output.register_forward_pre_hook(lambda module, args: (args[0] * 0.5,))
    else:
        plain_forward = output.forward
        output.forward = lambda x: plain_forward(x) * 0.5  # type: ignore[method-assign]


@pytest.mark.parametrize("how", ["forward hook", "pre-hook", "replaced forward"])
def test_a_changed_output_layer_is_honoured(how: str) -> None:
    """When calling `output` is not ``hidden @ weight.T`` any more, Policy goes through the
    module, so the change applies (the chunked path would skip it)."""
    model = tiny_llama()
    tokens, targets, mask, _ = _batch(seed=2)
    plain = Policy(model)(tokens, targets, mask).detach()
    assert model.output is not None
    _halve_logits(model.output, how)
    policy = Policy(model)
    with torch.no_grad():
        changed = policy(tokens, targets, mask)
        ref = _reference(model, tokens, targets, mask)
    assert not policy._log_probs._buffers.tensors  # not the chunked path
    torch.testing.assert_close(changed, ref, rtol=RTOL, atol=ATOL)
    assert float((changed - plain).abs().max()) > 0.1


def test_bf16_autocast_log_probs_equal_the_autocast_forward() -> None:
    """Under CPU bf16 autocast (training's "auto" dtype here) both sides compute bf16 logits and a
    float32 log-softmax: the same log-probs to float32 rounding, and gradients within bf16's
    precision of the autocast forward's."""
    model = tiny_llama()
    tokens, targets, mask, upstream = _batch(seed=3)
    policy = Policy(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = policy(tokens, targets, mask)
        ref = _reference(model, tokens, targets, mask)
    ours_grads, ref_grads = _grads(model, ours, upstream), _grads(model, ref, upstream)
    with torch.no_grad():
        exact = _reference(model, tokens, targets, mask)
    assert policy._log_probs._buffers.tensors  # the chunked path ran
    assert ours.dtype == torch.float32
    assert float((ours.detach() - exact).abs().max()) > 1e-3  # bf16 matmuls, not float32 ones
    torch.testing.assert_close(ours.detach(), ref.detach(), rtol=RTOL, atol=ATOL)
    # bf16 keeps 8 significant bits: both sides round the logits' gradient to bf16 for the
    # backward matmuls, ours summing the weight gradient per chunk in float32; through two layers
    # that is a few bf16 ulps of a gradient's largest entry (2^-5 of it allowed).
    assert ours_grads.keys() == ref_grads.keys()
    for name, grad in ref_grads.items():
        atol = 2**-5 * float(grad.abs().max())
        torch.testing.assert_close(ours_grads[name], grad, rtol=2**-5, atol=atol, msg=name)
