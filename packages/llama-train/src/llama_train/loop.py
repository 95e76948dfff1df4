"""A single-process pretraining loop: AdamW, the recipe's learning-rate schedule, clipping.

This is the plain loop the demo uses and the reference the distributed trainer will be checked
against. The optimizer settings are Llama 2's (Touvron et al. 2023, §2.2: AdamW with β1 = 0.9,
β2 = 0.95, ε = 1e-5, weight decay 0.1, gradient clipping at 1.0), which the Llama 3 paper does not
restate. Packed documents see positions that restart at each document and attend only within it
(§3.2).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from llama_model import Llama, document_positions
from llama_train.data import IGNORE_INDEX, Batch
from llama_train.schedules import LrSchedule, torch_lr_lambda

__all__ = ["StepMetrics", "language_model_loss", "train"]


@dataclass(frozen=True)
class StepMetrics:
    """What one optimizer step did."""

    step: int
    loss: float
    lr: float
    grad_norm: float
    tokens_per_s: float


def language_model_loss(model: Llama, batch: Batch) -> torch.Tensor:
    """Mean next-token cross-entropy over the batch's non-ignored targets (float32)."""
    logits = model(
        batch.tokens,
        positions=document_positions(batch.document_ids),
        document_ids=batch.document_ids,
    )  # [B, T, vocab]
    return F.cross_entropy(
        logits.float().flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE_INDEX
    )


def train(
    model: Llama,
    batches: Iterable[Batch],
    *,
    schedule: LrSchedule,
    steps: int,
    weight_decay: float = 0.1,
    max_grad_norm: float = 1.0,
    progress: bool = True,
    on_step: Callable[[StepMetrics], None] | None = None,
) -> list[StepMetrics]:
    """Train `model` for at most `steps` optimizer steps (fewer if `batches` runs out).

    Weight decay applies to matrices only (not norms), as is usual. A non-finite loss stops the
    run with an error naming the step rather than corrupting the weights.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=schedule.peak_lr,
        betas=(0.9, 0.95),
        eps=1e-5,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, torch_lr_lambda(schedule))
    model.train()
    history: list[StepMetrics] = []
    bar = tqdm(total=steps, unit="step", disable=not progress)
    with bar:
        for step, batch in enumerate(batches):
            if step == steps:
                break
            start = time.perf_counter()
            loss = language_model_loss(model, batch)
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"loss is {loss.item()} at step {step}; stopping")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            metrics = StepMetrics(
                step=step,
                loss=loss.item(),
                lr=lr,
                grad_norm=float(grad_norm),
                tokens_per_s=batch.tokens.numel() / (time.perf_counter() - start),
            )
            history.append(metrics)
            bar.set_postfix(loss=f"{metrics.loss:.3f}", lr=f"{lr:.2e}")
            bar.update()
            if on_step is not None:
                on_step(metrics)
    model.eval()
    return history
