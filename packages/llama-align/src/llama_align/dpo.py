"""Direct Preference Optimization as §4.1.4 of "The Llama 3 Herd of Models" (arXiv 2407.21783)
states it, on the `Objective` contract of the training loop.

For a prompt x with a chosen response y_c and a rejected one y_r, with π the policy's and π_ref the
reference model's summed log-probabilities of a response's *scored* tokens (Rafailov et al. 2023,
arXiv 2305.18290, with the paper's two changes):

    loss = -log σ(β [(π(y_c) - π_ref(y_c)) - (π(y_r) - π_ref(y_r))])  + 0.2 · NLL(y_c)

- β = 0.1 (§4.1.4, with a learning rate of 1e-5).
- Masked formatting tokens (§4.1.4): the header tokens and the terminators (`<|eot_id|>`,
  `<|eom_id|>`) are left out of both responses' log-probabilities: tokens common to both
  responses give the contrastive loss a conflicting objective (the paper saw tail repetition and
  abrupt termination tokens without the mask). The scored tokens are
  `EncodedDialog.dpo_mask`: assistant tokens that are not formatting (`mask="paper"`, the
  default); a tool result inside a response is not the assistant's and is not scored either.
  `mask="completion"` scores every response token, which is TRL's completion mask.
- The NLL regularizer (§4.1.4) with coefficient 0.2 on the chosen responses, over the same scored
  tokens as the log-probabilities (as TRL's ``loss_type=["sigmoid", "sft"]`` does).

Normalisation, which is TRL 1.16's for ``DPOConfig(loss_type=["sigmoid", "sft"],
loss_weights=[1.0, 0.2])`` on one batch: the sigmoid term is the mean over pairs, and the NLL is
the sum of -log p over every scored token of the batch's chosen responses divided by the number of
those tokens (a token mean over the batch, not a mean of per-response means). Both are ratios of
sums, so they are exact in the loop's contract: ``loss_sums = {"pairs": Σ -log σ(βΔ), "tokens":
0.2 · Σ NLL}`` over ``denominators = {"pairs": n, "tokens": scored chosen tokens}``, counted over
the whole global batch, so the gradient does not depend on how the batch is split. (TRL itself,
under gradient accumulation or several processes, averages per-micro-batch ratios, which does
depend on the split; on one micro-batch the two are the same number.)

The reference π_ref is one of: a frozen model (an `nn.Module`, run under `no_grad`);
``"adapters-off"`` (the policy is a PEFT model and the reference is the same model under
`disable_adapter()`: LoRA DPO without a second copy of the weights); or ``"precomputed"`` (the
examples carry the reference log-probabilities: `reference_logprobs` computes them once and
`with_reference` attaches them, so the reference model need not be in memory while training).

Rows: each example gives two rows, prompt + chosen and prompt + rejected (chosen rows first),
right-padded, with causal attention: padding at the end is seen by no real token and is never
scored. The policy and a frozen reference are `llama_align.Policy` modules (log-probabilities of
the scored tokens only: the output projection never runs on the prompt).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol, cast, get_args

import torch
import torch.nn.functional as F
from torch import nn

from llama_align.data import PreferenceExample
from llama_align.objective import Batch, LossSums, Metrics, Objective
from llama_align.policy import shifted_targets, token_logprobs
from llama_model import Causal, EncodedDialog

__all__ = [
    "DPO_BETA",
    "DPO_NLL_WEIGHT",
    "DpoMask",
    "DpoReference",
    "DpoObjective",
    "PreferenceWithReference",
    "preference_accuracy",
    "reference_logprobs",
    "sequence_logprobs",
    "token_logprobs",
    "with_reference",
]

DPO_BETA = 0.1  # §4.1.4: the β of the DPO loss
DPO_NLL_WEIGHT = 0.2  # §4.1.4: scaling coefficient of the NLL term on the chosen sequences

DpoMask = Literal["paper", "completion"]
"""Which response tokens are scored: ``"paper"`` (§4.1.4, `EncodedDialog.dpo_mask`: assistant
tokens that are not header or terminator tokens) or ``"completion"`` (every response token,
TRL's completion mask)."""

DpoReference = nn.Module | Literal["adapters-off", "precomputed"]
"""The reference model: a frozen module, the PEFT policy with its adapters off, or log-probs
carried by the examples (`PreferenceWithReference`)."""

_MASKS: tuple[str, ...] = get_args(DpoMask)
_PAD_ID = 0  # right padding: any valid id; causal attention keeps it from every real token


# --------------------------------------------------------------------------------------------
# Log-probabilities


def sequence_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Per row, the summed float32 log-probability [B] of the tokens where `mask` is True.

    `logits` [B, T, V] are the model's outputs for `tokens` [B, T]; position t-1 predicts token t,
    so `mask` [B, T] (bool, over tokens) must be False at t = 0. Only the scored positions' logits
    are taken into float32 (a [N, V] copy for N scored tokens, not [B, T, V]).
    """
    if logits.dim() != 3 or tokens.shape != logits.shape[:2] or mask.shape != tokens.shape:
        raise ValueError(
            f"sequence_logprobs needs logits [B, T, V], tokens [B, T] and mask [B, T]; got "
            f"{tuple(logits.shape)}, {tuple(tokens.shape)} and {tuple(mask.shape)}"
        )
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
    if bool(mask[:, 0].any()):
        raise ValueError("mask is True at the first token, which no position predicts")
    scored = mask[:, 1:]  # [B, T-1]: positions whose next token is scored
    logps = token_logprobs(logits[:, :-1][scored], tokens[:, 1:][scored])  # [N]
    # Back to [B, T-1] (zeros elsewhere) and a row sum: pairwise summation, not a running total.
    per_token = torch.zeros(scored.shape, dtype=torch.float32, device=logits.device)
    return per_token.masked_scatter(scored, logps).sum(dim=1)


# --------------------------------------------------------------------------------------------
# Precomputed reference log-probabilities


@dataclass(frozen=True)
class PreferenceWithReference:
    """A preference example with its reference log-probabilities, computed once
    (`reference_logprobs`) under the mask named here."""

    example: PreferenceExample
    ref_chosen: float
    """π_ref(chosen): summed log-prob of the chosen response's scored tokens."""
    ref_rejected: float
    """π_ref(rejected)."""
    mask: DpoMask
    """The mask the two numbers were computed with; the objective checks it is its own."""


def reference_logprobs(
    model: nn.Module,
    examples: Sequence[PreferenceExample],
    *,
    mask: DpoMask = "paper",
    batch_size: int = 8,
) -> list[tuple[float, float]]:
    """(π_ref(chosen), π_ref(rejected)) of every example, with `model` as the reference, under
    `no_grad` and in batches of `batch_size` examples, on the model's device.

    For LoRA, call it inside ``with model.disable_adapter():`` to get the base model's numbers.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    objective = DpoObjective(model, mask=mask)
    out: list[tuple[float, float]] = []
    for batch in _batches(objective, examples, batch_size, _device(model)):
        with torch.no_grad():
            logps = _logps(model, batch).cpu()
        n = batch["pairs"]
        out.extend(zip(logps[:n].tolist(), logps[n:].tolist(), strict=True))
    return out


def with_reference(
    examples: Sequence[PreferenceExample],
    logprobs: Sequence[tuple[float, float]],
    *,
    mask: DpoMask = "paper",
) -> list[PreferenceWithReference]:
    """Attach precomputed reference log-probs (`reference_logprobs`, same `mask`) to examples."""
    if len(examples) != len(logprobs):
        raise ValueError(
            f"{len(examples)} examples but {len(logprobs)} reference log-prob pairs; compute them "
            "with reference_logprobs on the same examples"
        )
    _check_mask(mask)
    return [
        PreferenceWithReference(example, float(chosen), float(rejected), mask)
        for example, (chosen, rejected) in zip(examples, logprobs, strict=True)
    ]


# --------------------------------------------------------------------------------------------
# The objective


class DpoObjective:
    """The DPO loss of §4.1.4 (module docstring) as an `Objective` of preference examples.

    `collate` takes `PreferenceExample`s, or `PreferenceWithReference`s when `reference` is
    ``"precomputed"``. `denominators` are ``{"pairs": n, "tokens": scored chosen tokens}``.
    Metrics, as (sum, count): ``loss/sigmoid``, ``logps/chosen``, ``logps/rejected``,
    ``rewards/chosen`` and ``rewards/rejected`` (the implicit rewards β(π - π_ref)),
    ``rewards/margins``, ``rewards/accuracies`` (chosen reward > rejected reward), each counted
    per pair; ``loss/nll`` (the unweighted NLL per scored chosen token); and ``kl/reference``:
    Σ (π - π_ref) over both responses divided by their scored tokens, the mean per-token
    log-ratio to the reference on the preference data. On samples drawn from π that mean is the
    Monte-Carlo estimate of KL(π ‖ π_ref) per token; the responses here are the dataset's, not
    the policy's samples, so it is a drift indicator (0 at the start, and it can be negative).
    """

    def __init__(
        self,
        reference: DpoReference,
        *,
        beta: float = DPO_BETA,
        nll_weight: float = DPO_NLL_WEIGHT,
        mask: DpoMask = "paper",
    ) -> None:
        """`reference`: a frozen module, ``"adapters-off"`` or ``"precomputed"``
        (`DpoReference`); `beta` > 0; `nll_weight` ≥ 0 (0 disables the NLL term); `mask`:
        ``"paper"`` or ``"completion"``."""
        if not isinstance(reference, nn.Module) and reference not in (
            "adapters-off",
            "precomputed",
        ):
            raise ValueError(
                f"reference must be an nn.Module, 'adapters-off' or 'precomputed'; got {reference!r}"
            )
        if not beta > 0:
            raise ValueError(f"beta must be positive (the paper's is {DPO_BETA}), got {beta}")
        if not nll_weight >= 0:
            raise ValueError(
                f"nll_weight must be at least 0 (the paper's is {DPO_NLL_WEIGHT}), got {nll_weight}"
            )
        _check_mask(mask)
        self.reference = reference
        self.beta = beta
        self.nll_weight = nll_weight
        self.mask: DpoMask = mask

    def collate(self, examples: Sequence[PreferenceExample | PreferenceWithReference]) -> Batch:
        """Rows prompt+chosen (first n) and prompt+rejected (last n), right-padded: ``tokens``
        [2n, T] (int64), ``mask`` [2n, T] (bool, the scored tokens), ``pairs`` (n), and with a
        precomputed reference ``ref_logps`` [2n] (float32)."""
        if not examples:
            raise ValueError("collate needs at least one preference example; got none")
        plain = [self._plain(i, e) for i, e in enumerate(examples)]
        rows: list[tuple[list[int], list[bool]]] = []
        for side in ("chosen", "rejected"):
            for index, example in enumerate(plain):
                response: EncodedDialog = getattr(example, side)
                scored = response.dpo_mask if self.mask == "paper" else [True] * len(response)
                if not any(scored):
                    raise ValueError(
                        f"example {index}: the {side} response has no token the DPO loss scores "
                        f"(mask={self.mask!r}: {_MASK_WORDS[self.mask]}); drop it or fix the data"
                    )
                rows.append(
                    (
                        example.prompt.tokens + response.tokens,
                        [False] * len(example.prompt) + scored,
                    )
                )
        width = max(len(tokens) for tokens, _ in rows)
        tokens = torch.full((len(rows), width), _PAD_ID, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.bool)
        for row, (ids, scored) in enumerate(rows):
            tokens[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[row, : len(ids)] = torch.tensor(scored, dtype=torch.bool)
        batch: Batch = {"tokens": tokens, "mask": mask, "pairs": len(examples)}
        if self.reference == "precomputed":
            refs = cast(Sequence[PreferenceWithReference], examples)
            batch["ref_logps"] = torch.tensor(
                [e.ref_chosen for e in refs] + [e.ref_rejected for e in refs], dtype=torch.float32
            )
        return batch

    def denominators(self, batch: Batch) -> Mapping[str, float]:
        """``{"pairs": n, "tokens": scored tokens of the chosen responses}``."""
        n = int(batch["pairs"])
        return {"pairs": float(n), "tokens": float(batch["mask"][:n].sum())}

    def loss_sums(self, model: nn.Module, batch: Batch) -> tuple[LossSums, Metrics]:
        """``{"pairs": Σ -log σ(βΔ), "tokens": nll_weight · Σ NLL}`` and the metrics; the
        reference pass runs first, under `no_grad`, then the policy's `model(...)`."""
        tokens, mask, n = batch["tokens"], batch["mask"], int(batch["pairs"])
        with torch.no_grad():
            if self.reference == "precomputed":
                ref = batch["ref_logps"].to(device=tokens.device, dtype=torch.float32)
            elif self.reference == "adapters-off":
                peft_model = _peft_model(model)
                with peft_model.disable_adapter():
                    ref = _logps(model, batch)
            else:
                ref = _logps(self.reference, batch)
        policy = _logps(model, batch)  # [2n]
        chosen, rejected = policy[:n], policy[n:]
        chosen_ratio = chosen - ref[:n]  # [n]
        rejected_ratio = rejected - ref[n:]
        sigmoid_losses = -F.logsigmoid(self.beta * (chosen_ratio - rejected_ratio))  # [n]
        nll = -chosen.sum()
        sums: LossSums = {"pairs": sigmoid_losses.sum(), "tokens": self.nll_weight * nll}
        metrics = _metrics(
            beta=self.beta,
            sigmoid_losses=sigmoid_losses.detach(),
            nll=nll.detach(),
            chosen=chosen.detach(),
            rejected=rejected.detach(),
            chosen_ratio=chosen_ratio.detach(),
            rejected_ratio=rejected_ratio.detach(),
            chosen_tokens=mask[:n].sum(),
            all_tokens=mask.sum(),
        )
        return sums, metrics

    def _plain(
        self, index: int, example: PreferenceExample | PreferenceWithReference
    ) -> PreferenceExample:
        if self.reference == "precomputed":
            if not isinstance(example, PreferenceWithReference):
                raise TypeError(
                    f"example {index} is a {type(example).__name__} without reference log-probs, "
                    "but reference='precomputed'; attach them with with_reference(examples, "
                    "reference_logprobs(reference_model, examples))"
                )
            if example.mask != self.mask:
                raise ValueError(
                    f"example {index}: its reference log-probs were computed with "
                    f"mask={example.mask!r}, but this objective scores mask={self.mask!r}; "
                    "recompute them with the same mask"
                )
            return example.example
        if isinstance(example, PreferenceWithReference):
            raise TypeError(
                f"example {index} carries precomputed reference log-probs, but the reference is "
                f"{_describe(self.reference)}; pass reference='precomputed' to use them, or plain "
                "PreferenceExamples"
            )
        if not isinstance(example, PreferenceExample):
            raise TypeError(
                f"example {index} is a {type(example).__name__}; DPO needs PreferenceExamples "
                "(llama_align.encode_preference)"
            )
        return example


if TYPE_CHECKING:  # mypy proves that DpoObjective is an Objective of preference examples
    _IS_OBJECTIVE: Objective[PreferenceExample] = DpoObjective("precomputed")

_MASK_WORDS = {
    "paper": "assistant tokens that are not header or terminator tokens",
    "completion": "every response token",
}


def _check_mask(mask: str) -> None:
    if mask not in _MASKS:
        raise ValueError(f"mask must be one of {', '.join(map(repr, _MASKS))}; got {mask!r}")


def _describe(reference: DpoReference) -> str:
    return type(reference).__name__ if isinstance(reference, nn.Module) else repr(reference)


def _logps(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Summed log-probs [2n] of each row's scored tokens from a `llama_align.Policy` (causal
    attention): the output projection runs on the scored positions only."""
    tokens, mask = batch["tokens"], batch["mask"].to(batch["tokens"].device)
    targets, scored = shifted_targets(tokens, mask)  # position t-1 predicts scored token t
    logps = model(tokens, targets, scored, attention=Causal())  # [N]
    # Back to [2n, T] (zeros elsewhere) and a row sum: pairwise summation, as TRL sums.
    per_token = torch.zeros(scored.shape, dtype=torch.float32, device=tokens.device)
    return per_token.masked_scatter(scored, logps).sum(dim=1)


class _AdapterModel(Protocol):
    """What ``reference="adapters-off"`` needs of the policy: a PEFT model."""

    def disable_adapter(self) -> AbstractContextManager[object]: ...


def _peft_model(model: nn.Module) -> _AdapterModel:
    """The PEFT model inside `model` (itself, or under DistributedDataParallel's `.module`)."""
    inner: object = model
    while not hasattr(inner, "disable_adapter"):  # DDP's .module, then the Policy's .llama
        wrapped = getattr(inner, "module", None) or getattr(inner, "llama", None)
        if not isinstance(wrapped, nn.Module):
            break
        inner = wrapped
    if not hasattr(inner, "disable_adapter") or not isinstance(inner, nn.Module):
        raise TypeError(
            f"reference='adapters-off' needs a PEFT model (peft.get_peft_model) as the policy; "
            f"got a {type(model).__name__} without disable_adapter(). Pass a frozen reference "
            "model or reference='precomputed' instead"
        )
    return cast(_AdapterModel, inner)


def _metrics(
    *,
    beta: float,
    sigmoid_losses: torch.Tensor,
    nll: torch.Tensor,
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    chosen_ratio: torch.Tensor,
    rejected_ratio: torch.Tensor,
    chosen_tokens: torch.Tensor,
    all_tokens: torch.Tensor,
) -> Metrics:
    pairs = torch.tensor(float(chosen.numel()), device=chosen.device)
    chosen_rewards, rejected_rewards = beta * chosen_ratio, beta * rejected_ratio
    return {
        "loss/sigmoid": (sigmoid_losses.sum(), pairs),
        "loss/nll": (nll, chosen_tokens.float()),
        "logps/chosen": (chosen.sum(), pairs),
        "logps/rejected": (rejected.sum(), pairs),
        "rewards/chosen": (chosen_rewards.sum(), pairs),
        "rewards/rejected": (rejected_rewards.sum(), pairs),
        "rewards/margins": ((chosen_rewards - rejected_rewards).sum(), pairs),
        "rewards/accuracies": ((chosen_rewards > rejected_rewards).float().sum(), pairs),
        "kl/reference": ((chosen_ratio + rejected_ratio).sum(), all_tokens.float()),
    }


# --------------------------------------------------------------------------------------------
# Held-out evaluation


def preference_accuracy(
    model: nn.Module,
    reference: DpoReference,
    examples: Sequence[PreferenceExample | PreferenceWithReference],
    beta: float = DPO_BETA,
    *,
    mask: DpoMask = "paper",
    batch_size: int = 8,
) -> tuple[float, float]:
    """(accuracy, mean margin) of the implicit reward on held-out pairs, under `no_grad`.

    The implicit reward is β(π - π_ref) (§4.1.4, Rafailov et al.); accuracy is the fraction of
    pairs whose chosen reward is strictly above the rejected one (a tie counts as wrong, so a
    policy equal to its reference scores 0), and the margin is the mean of chosen minus rejected
    reward.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    objective = DpoObjective(reference, beta=beta, mask=mask)
    correct, margin, total = 0.0, 0.0, 0
    with torch.no_grad():
        for batch in _batches(objective, examples, batch_size, _device(model)):
            _, metrics = objective.loss_sums(model, batch)
            correct += float(metrics["rewards/accuracies"][0])
            margin += float(metrics["rewards/margins"][0])
            total += int(batch["pairs"])
    return correct / total, margin / total


def _batches(
    objective: DpoObjective,
    examples: Sequence[PreferenceExample | PreferenceWithReference],
    batch_size: int,
    device: torch.device,
) -> Iterator[Batch]:
    if not examples:
        raise ValueError("no preference examples given")
    for start in range(0, len(examples), batch_size):
        batch = objective.collate(examples[start : start + batch_size])
        yield {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")
