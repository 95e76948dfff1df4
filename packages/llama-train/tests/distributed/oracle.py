"""The single-process oracle the trainer and every parallel layout are checked against.

Written with none of the trainer's machinery: the model's forward over packed documents and
`torch.nn.functional.cross_entropy` for the loss; `torch.optim.AdamW`, the schedule's learning rate
and `torch.nn.utils.clip_grad_norm_` for a plain training loop (Llama 2's AdamW settings, §2.2 of
Touvron et al. 2023: betas (0.9, 0.95), eps 1e-5, weight decay 0.1 on matrices, clipping at 1.0).
Importable as `oracle` from every test module and worker script (conftest puts this folder on
sys.path).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

from llama_model import Documents, Llama
from llama_train.data import IGNORE_INDEX, Batch
from llama_train.schedules import LrSchedule


def language_model_loss(model: Llama, batch: Batch) -> torch.Tensor:
    """Mean next-token cross-entropy over the batch's non-ignored targets (float32), documents
    packed with the causal same-document mask and positions restarting per document (§3.2)."""
    logits = model(batch.tokens, attention=Documents(batch.document_ids))  # [B, T, vocab]
    return F.cross_entropy(
        logits.float().flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE_INDEX
    )


def train_plain(
    model: Llama,
    batches: Iterable[Batch],
    *,
    schedule: LrSchedule,
    steps: int,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-5,
    weight_decay: float = 0.1,
    max_grad_norm: float = 1.0,
) -> list[float]:
    """Train `model` for `steps` optimizer steps on `batches`; returns the loss of each step."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0}],
        lr=schedule.peak_lr,
        betas=betas,
        eps=eps,
    )
    losses: list[float] = []
    for step, batch in zip(range(steps), batches, strict=False):
        for group in optimizer.param_groups:
            group["lr"] = schedule.lr(step)
        optimizer.zero_grad(set_to_none=True)
        loss = language_model_loss(model, batch)
        loss.backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        losses.append(loss.item())
    return losses
