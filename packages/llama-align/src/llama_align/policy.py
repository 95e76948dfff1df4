"""The language model as post-training sees it: log-probabilities of chosen target tokens.

SFT's loss is the negative log-probability of the assistant tokens; DPO's is built from summed
log-probabilities of the response tokens. Neither needs the logits of the prompt: with Llama 3's
128,256-token vocabulary, the output projection over every position costs more memory than the
rest of a small model's step. `Policy` runs the model's own pieces (`Llama.hidden_states`, then
the output projection on the selected positions only), never a copy of its forward, and is itself
an `nn.Module` so that data parallelism (DistributedDataParallel, which synchronises gradients
through a module's forward) wraps it.

Even the selected positions' logits are large ([N, 128,256] floats, plus their float32 copy and
gradient, fresh every step). On CPU, when the output projection is a plain weight, `Policy` takes
the log-probabilities through `llama_train.LinearLogProbs`, which works a chunk of rows at a time
in buffers it keeps between steps: for 1,024 scored positions on 2 cores, a training step of the
output layer runs 1.9-2.5x faster under bf16 autocast (1.1-1.6x in float32) in a sixth to a
quarter of the peak memory (`benchmarks/logprobs_cpu.py`). Elsewhere (CUDA: not measured yet), or
when the projection is anything but ``hidden @ weight.T`` (a LoRA-wrapped, sharded, offloaded or
hooked `output`), it calls `Llama.logits`.
"""

from __future__ import annotations

import torch
from torch import nn

from llama_model import AttentionBackend, Llama
from llama_train import LinearLogProbs

__all__ = ["Policy", "shifted_targets", "token_logprobs"]


class Policy(nn.Module):
    """``Policy(llama)(tokens, targets, mask, attention=...)`` -> log p(targets[mask]) [N].

    `llama` is a `Llama` or a PEFT-wrapped one (attributes pass through to the `Llama`). On CPU
    the output layer's working buffers are kept between calls (see the module docstring), so one
    `Policy` serves one thread.
    """

    def __init__(self, llama: nn.Module) -> None:
        super().__init__()
        self.llama = llama
        self._log_probs = LinearLogProbs()

    def base(self) -> Llama:
        """The `Llama` inside (through a PEFT wrapper if there is one)."""
        model: object = self.llama
        get_base_model = getattr(model, "get_base_model", None)  # a PEFT wrapper
        if callable(get_base_model):
            model = get_base_model()
        if not isinstance(model, Llama):
            raise TypeError(f"Policy wraps a Llama (or a PEFT-wrapped one), got {type(model)}")
        return model

    def forward(
        self,
        tokens: torch.Tensor,
        targets: torch.Tensor,
        mask: torch.Tensor,
        *,
        attention: AttentionBackend | None = None,
    ) -> torch.Tensor:
        """Log-probabilities [N] (float32) of `targets` [B, T] at the N positions where `mask`
        [B, T] is True, predicted from `tokens` [B, T] (row-major order of the positions)."""
        if targets.shape != tokens.shape or mask.shape != tokens.shape:
            raise ValueError(
                f"tokens {tuple(tokens.shape)}, targets {tuple(targets.shape)} and mask "
                f"{tuple(mask.shape)} must have one [batch, seq_len] shape"
            )
        llama = self.base()
        hidden = llama.hidden_states(tokens, attention=attention)  # [B, T, dim]
        weight = _plain_output_weight(llama)
        if weight is None or hidden.device.type != "cpu":
            return token_logprobs(llama.logits(hidden[mask]), targets[mask])  # [N]
        return self._log_probs(hidden[mask], weight, targets[mask]).float()  # [N]


def _plain_output_weight(llama: Llama) -> torch.Tensor | None:
    """The output projection's weight when `Llama.logits` is exactly ``hidden @ weight.T`` with
    it (an untouched `nn.Linear`, or the tied embedding table), else None: not for a wrapped or
    subclassed layer (PEFT's LoRA), one with hooks or a replaced `forward` (accelerate's
    offloading), or a weight that is a tensor subclass (a DTensor, a quantized tensor)."""
    output = llama.output
    if output is not None and (
        type(output) is not nn.Linear
        or output.bias is not None
        or "forward" in vars(output)
        or output._forward_hooks
        or output._forward_pre_hooks
        or output._backward_hooks
        or output._backward_pre_hooks
    ):
        return None
    weight = llama.output_weight()
    return weight if type(weight) in (torch.Tensor, nn.Parameter) else None


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) [N] in float32 from logits [N, V] and target ids [N].

    ``logit[target] - logsumexp(logits)``: a gather and a reduction, with no [N, V] log-softmax
    kept beside the logits.
    """
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(
            f"token_logprobs needs logits [N, V] and targets [N]; got {tuple(logits.shape)} and "
            f"{tuple(targets.shape)}"
        )
    logits = logits.float()
    picked = logits.gather(1, targets.unsqueeze(1)).squeeze(1)  # [N]
    return picked - torch.logsumexp(logits, dim=-1)


def shifted_targets(
    tokens: torch.Tensor, learn: torch.Tensor, document_ids: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token targets and where to score them, for rows of tokens [B, T] with a mask `learn`
    [B, T] of the tokens to be predicted: position t predicts token t + 1 when `learn[t + 1]`
    (and, with `document_ids`, when t + 1 is in the same document). Returns (targets, mask), both
    [B, T]; the last position never predicts."""
    targets = torch.zeros_like(tokens)
    targets[:, :-1] = tokens[:, 1:]
    mask = torch.zeros_like(learn, dtype=torch.bool)
    mask[:, :-1] = learn[:, 1:]
    if document_ids is not None:
        mask[:, :-1] &= document_ids[:, 1:] == document_ids[:, :-1]
    return targets, mask
