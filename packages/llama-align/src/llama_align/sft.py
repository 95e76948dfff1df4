"""Supervised fine-tuning (§4.1.3 of "The Llama 3 Herd of Models"): the standard cross-entropy on
the target tokens, with the loss on prompt tokens masked out.

Dialogs are packed into rows of up to `seq_len` tokens, in order, a dialog never split (§3.2's
document masking through the attention seam: `llama_model.Documents`, so a dialog attends only to
itself and its positions start at 0, exactly as if it were alone). The tokens learned are those
`llama_model.ChatFormat` marks as assistant output: content, tool calls and the terminator
(`<|eot_id|>`/`<|eom_id|>`, so the model learns to stop), not headers, system, user or tool turns.
The loss is the mean over the learned tokens of the global batch (denominator ``"tokens"``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from llama_align.data import SftExample
from llama_align.objective import Batch, LossSums, Metrics
from llama_align.policy import shifted_targets
from llama_model import Documents

__all__ = ["PackedRow", "pack_dialogs", "SftObjective"]


@dataclass(frozen=True)
class PackedRow:
    """Dialogs laid end to end: tokens, what is learned, and which dialog each token is in."""

    tokens: tuple[int, ...]
    learn: tuple[bool, ...]
    document_ids: tuple[int, ...]


def pack_dialogs(examples: Sequence[SftExample], seq_len: int) -> list[PackedRow]:
    """Greedy, in order: a dialog goes into the current row if it fits, else starts the next
    one. Every dialog must fit in `seq_len` (`encode_sft(max_tokens=seq_len)` drops the others)."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    rows: list[PackedRow] = []
    tokens: list[int] = []
    learn: list[bool] = []
    documents: list[int] = []

    def flush() -> None:
        if tokens:
            rows.append(PackedRow(tuple(tokens), tuple(learn), tuple(documents)))
            tokens.clear()
            learn.clear()
            documents.clear()

    for index, example in enumerate(examples):
        dialog = example.dialog
        if len(dialog) > seq_len:
            raise ValueError(
                f"dialog {index} has {len(dialog)} tokens, more than seq_len {seq_len}; "
                "encode with max_tokens=seq_len to drop such dialogs (counted)"
            )
        if len(tokens) + len(dialog) > seq_len:
            flush()
        document = documents[-1] + 1 if documents else 0
        tokens.extend(dialog.tokens)
        learn.extend(dialog.assistant_mask)
        documents.extend([document] * len(dialog))
    flush()
    return rows


class SftObjective:
    """Cross-entropy on the learned tokens of packed rows (`Objective[PackedRow]`).

    The model is a `llama_align.Policy` (log-probabilities of the targets at the learned
    positions only). `kernel` picks the attention kernel of `Documents` ("auto": FlexAttention on
    CUDA, a dense mask elsewhere).
    """

    def __init__(self, *, kernel: str = "auto") -> None:
        self.kernel = kernel

    def collate(self, rows: Sequence[PackedRow]) -> Batch:
        length = max(len(r.tokens) for r in rows)
        batch = len(rows)
        tokens = torch.zeros(batch, length, dtype=torch.long)
        learn = torch.zeros(batch, length, dtype=torch.bool)
        documents = torch.zeros(batch, length, dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row.tokens)
            tokens[i, :n] = torch.tensor(row.tokens)
            learn[i, :n] = torch.tensor(row.learn)
            documents[i, :n] = torch.tensor(row.document_ids)
            documents[i, n:] = row.document_ids[-1] + 1  # padding: a document of its own
        targets, mask = shifted_targets(tokens, learn, documents)
        return {
            "tokens": tokens,
            "targets": targets,
            "mask": mask,
            "document_ids": documents,
            "num_tokens": sum(len(r.tokens) for r in rows),
        }

    def denominators(self, batch: Batch) -> Mapping[str, float]:
        return {"tokens": float(batch["mask"].sum())}

    def loss_sums(self, model: nn.Module, batch: Batch) -> tuple[LossSums, Metrics]:
        attention = Documents(batch["document_ids"], kernel=self.kernel)  # type: ignore[arg-type]
        logprobs = model(batch["tokens"], batch["targets"], batch["mask"], attention=attention)
        nll = -logprobs.sum()
        count = torch.tensor(float(logprobs.numel()))
        return {"tokens": nll}, {"nll": (nll.detach(), count)}
