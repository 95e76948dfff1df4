"""The DPO mask of §4.1.4 of "The Llama 3 Herd of Models" (arXiv 2407.21783) inside TRL's
`DPOTrainer`: `PaperPreferenceCollator`, a `trl.DataCollatorForPreference` (TRL 1.16) whose
completion mask leaves out the formatting tokens of the Llama 3 chat format.

TRL scores every completion token (``completion_mask`` = 1 on the chosen/rejected ids), including
the terminators `<|eot_id|>`/`<|eom_id|>` and, in a response of several messages, the headers
between them. The paper masks "special formatting tokens including header and termination tokens"
out of both responses. This collator builds TRL's batch, then sets to 0 in ``completion_mask``:

- every header: `<|start_header_id|>`, the role's tokens, `<|end_header_id|>`, and the one token
  after it (the "\\n\\n"; a newline token merged with it, when TRL's tokenizer joins the content's
  leading line break to it, goes too);
- every terminator, `<|eot_id|>` and `<|eom_id|>`;
- the content of a message that is not the assistant's (a tool result inside a response).

What stays is `llama_model.EncodedDialog.dpo_mask` of the response (assistant tokens that are not
formatting), found from the token ids alone: the special ids come from
`llama_model.Tokenizer.llama3()` (or the tokenizer given). `<|python_tag|>` is the assistant's and
stays scored, as in `dpo_mask`.

Importing this module imports TRL (the optional extra ``llama-align[trl]``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import InitVar, dataclass, field
from typing import Any

import torch

from llama_model import Tokenizer

try:
    from trl.trainer.dpo_trainer import DataCollatorForPreference
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "llama_align.trl_collator needs TRL: install the extra, pip install 'llama-align[trl]'"
    ) from error

__all__ = ["PaperPreferenceCollator", "paper_scored_tokens"]


@dataclass(frozen=True)
class _FormatIds:
    """The Llama 3 chat format's special ids that the mask needs."""

    start_header: int
    end_header: int
    terminators: frozenset[int]
    assistant_role: tuple[int, ...]

    @classmethod
    def of(cls, tokenizer: Tokenizer) -> _FormatIds:
        return cls(
            start_header=tokenizer.start_header_id,
            end_header=tokenizer.end_header_id,
            terminators=frozenset((tokenizer.eot_id, tokenizer.eom_id)),
            assistant_role=tuple(tokenizer.encode("assistant", bos=False, eos=False)),
        )


def paper_scored_tokens(ids: Sequence[int], tokenizer: Tokenizer | None = None) -> list[bool]:
    """For each token of a Llama 3 chat sequence (from `<|begin_of_text|>` or any header on),
    whether the DPO loss of §4.1.4 scores it: True on assistant tokens that are not header or
    terminator tokens. Tokens before the first header belong to no message and are False."""
    return _scored(ids, _FormatIds.of(tokenizer if tokenizer is not None else Tokenizer.llama3()))


def _scored(ids: Sequence[int], format_ids: _FormatIds) -> list[bool]:
    scored: list[bool] = []
    assistant = False  # the role of the message being read
    in_header, after_header = False, False
    role: list[int] = []
    for token in ids:
        if token == format_ids.start_header:
            in_header, role = True, []
            scored.append(False)
        elif in_header:
            if token == format_ids.end_header:
                in_header, after_header = False, True
                assistant = tuple(role) == format_ids.assistant_role
            else:
                role.append(token)
            scored.append(False)
        elif after_header:  # the "\n\n" closing the header
            after_header = False
            scored.append(False)
        elif token in format_ids.terminators:
            scored.append(False)
        else:
            scored.append(assistant)
    return scored


@dataclass
class PaperPreferenceCollator(DataCollatorForPreference):
    """TRL's `DataCollatorForPreference` with the paper's DPO mask (module docstring): pass it as
    ``DPOTrainer(..., data_collator=PaperPreferenceCollator(pad_token_id=...))``.

    The rows, padding and truncation (`max_length`, `truncation_mode`) are TRL's; only
    ``completion_mask`` changes. `tokenizer` (init only) gives the special ids; by default
    `llama_model.Tokenizer.llama3()`'s.
    """

    tokenizer: InitVar[Tokenizer | None] = None
    _format_ids: _FormatIds = field(init=False, repr=False)

    def __post_init__(self, tokenizer: Tokenizer | None) -> None:
        self._format_ids = _FormatIds.of(tokenizer if tokenizer is not None else Tokenizer.llama3())

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        """TRL's batch, with ``completion_mask`` set to 0 on formatting and non-assistant tokens."""
        output = super().torch_call(examples)
        input_ids: torch.Tensor = output["input_ids"]
        completion_mask: torch.Tensor = output["completion_mask"]
        sequences = [
            list(example["prompt_ids"]) + list(example[key])
            for key in ("chosen_ids", "rejected_ids")  # TRL's rows: every chosen, then rejected
            for example in examples
        ]
        for row, ids in enumerate(sequences):
            keep = self._truncate(_scored(ids, self._format_ids))
            kept_ids = self._truncate(ids)
            if input_ids[row, : len(kept_ids)].tolist() != kept_ids:
                raise RuntimeError(
                    f"row {row} of TRL's DataCollatorForPreference batch is not prompt + response "
                    "as TRL 1.16 lays it out (chosen rows, then rejected, right-padded); this "
                    "collator needs updating for the installed TRL"
                )
            completion_mask[row, : len(keep)] *= torch.tensor(keep, dtype=completion_mask.dtype)
        return output

    def _truncate(self, values: list[Any]) -> list[Any]:
        """The part of a sequence TRL keeps (its `max_length`/`truncation_mode` rule)."""
        if self.max_length is None:
            return values
        if self.truncation_mode == "keep_end":
            return values[-self.max_length :]
        return values[: self.max_length]  # "keep_start"; TRL rejects other modes first
