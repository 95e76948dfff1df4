"""Post-training data: JSONL rows in TRL's conversational conventions, validated row by row, and
their token encodings with the chat format's masks (§4.1-4.2 of "The Llama 3 Herd of Models").

Three kinds of rows, one JSON object per line:

- SFT (`SftRow`): ``{"messages": [...]}``, ending with an assistant message.
- Preferences (`PreferenceRow`): ``{"prompt": [...], "chosen": [...], "rejected": [...]}``, with an
  optional ``"edited"`` (§4.1.2: ranked edited > chosen > rejected), or a general ``{"prompt":
  [...], "responses": [{"messages": [...], "rank": 0}, ...]}`` (rank 0 is the best; equal ranks
  are ties, which make no pair).
- Prompts for rejection sampling (`PromptRow`): ``{"messages": [...]}``, not ending with an
  assistant message.

Messages are OpenAI / Hugging Face chat dicts (``{"role", "content", "tool_calls"}``), read with
`llama_model.Message.from_hf_dict`. `read_rows` validates every line: a bad one is counted under
its reason with ``file:line`` examples (`DataReport`), never silently dropped or silently kept, and
the report says how many rows were used.

Encoding goes through `llama_model.ChatFormat`, the one home of the chat format: a prompt is the
dialog up to and including the assistant header (`encode_prompt`), a response is the tokens that
follow it (`encode_response`), each with the assistant mask (what SFT learns) and the formatting
mask (what DPO leaves out, `EncodedDialog.dpo_mask`).
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from llama_model import ChatFormat, EncodedDialog, Message

__all__ = [
    "SftRow",
    "PreferenceRow",
    "RankedResponse",
    "PromptRow",
    "DataReport",
    "DataError",
    "read_rows",
    "write_rows",
    "encode_prompt",
    "encode_response",
    "SftExample",
    "RankedExample",
    "PreferenceExample",
    "encode_sft",
    "encode_ranked",
    "encode_preference",
]


def _messages(value: object) -> object:
    """Chat dicts -> `Message`s (a `Message` passes through)."""
    if not isinstance(value, list):
        return value  # pydantic reports "should be a valid list"
    return [Message.from_hf_dict(m) if isinstance(m, dict) else m for m in value]


class _Row(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SftRow(_Row):
    """A dialog to fine-tune on; the loss is on its assistant messages."""

    messages: list[Message] = Field(min_length=1)
    """The whole dialog, ending with the assistant message to learn."""

    _messages = field_validator("messages", mode="before")(_messages)

    @model_validator(mode="after")
    def _ends_with_assistant(self) -> SftRow:
        if self.messages[-1].role != "assistant":
            raise ValueError(
                f"the last message must be the assistant's (what SFT learns), got "
                f"{self.messages[-1].role!r}"
            )
        return self


class PromptRow(_Row):
    """A prompt to sample answers to (rejection sampling, §4.1.3)."""

    messages: list[Message] = Field(min_length=1)
    """The dialog so far; the model answers it."""

    _messages = field_validator("messages", mode="before")(_messages)

    @model_validator(mode="after")
    def _not_answered(self) -> PromptRow:
        if self.messages[-1].role == "assistant":
            raise ValueError("the last message is the assistant's: a prompt ends before the answer")
        return self


class RankedResponse(_Row):
    """One response of a general ranked preference row."""

    messages: list[Message] = Field(min_length=1)
    """The response: usually one assistant message."""
    rank: int = Field(ge=0)
    """0 is the best; a higher rank is worse; equal ranks are ties (no pair)."""

    _messages = field_validator("messages", mode="before")(_messages)


class PreferenceRow(_Row):
    """A prompt and ranked responses to it (§4.1.2): chosen/rejected (+ edited), or `responses`."""

    prompt: list[Message] = Field(min_length=1)
    """The dialog the responses answer."""
    chosen: list[Message] | None = None
    """The preferred response (TRL's convention)."""
    rejected: list[Message] | None = None
    """The dispreferred response."""
    edited: list[Message] | None = None
    """§4.1.2: an annotator's edit of the chosen response, ranked above it."""
    responses: list[RankedResponse] | None = None
    """The general form: any number of responses with ranks (instead of chosen/rejected)."""

    _messages = field_validator("prompt", "chosen", "rejected", "edited", mode="before")(_messages)

    @model_validator(mode="after")
    def _one_form(self) -> PreferenceRow:
        if self.prompt[-1].role == "assistant":
            raise ValueError("the prompt ends with an assistant message; it must end before one")
        pairwise = self.chosen is not None or self.rejected is not None
        if self.responses is not None:
            if pairwise or self.edited is not None:
                raise ValueError("give either chosen/rejected (and edited) or responses, not both")
            if len(self.responses) < 2:
                raise ValueError(f"responses needs at least 2 entries, got {len(self.responses)}")
            if len({r.rank for r in self.responses}) < 2:
                raise ValueError("every response has the same rank: no preference to learn")
        elif self.chosen is None or self.rejected is None:
            missing = "chosen" if self.chosen is None else "rejected"
            raise ValueError(f"{missing} is missing (or give responses with ranks)")
        for name, response in self._named():
            if not response:
                raise ValueError(f"{name} is empty")
            if response[0].role != "assistant":
                raise ValueError(
                    f"{name} must start with an assistant message, got {response[0].role!r}"
                )
        return self

    def _named(self) -> list[tuple[str, list[Message]]]:
        if self.responses is not None:
            return [(f"responses[{i}]", r.messages) for i, r in enumerate(self.responses)]
        named = [("chosen", self.chosen), ("rejected", self.rejected)]
        if self.edited is not None:
            named.insert(0, ("edited", self.edited))
        return [(n, r) for n, r in named if r is not None]

    def ranked(self) -> list[tuple[list[Message], int]]:
        """Every response with its rank (0 best): edited 0 > chosen 1 > rejected 2, or as given."""
        if self.responses is not None:
            return [(r.messages, r.rank) for r in self.responses]
        assert self.chosen is not None and self.rejected is not None
        ranked = [(self.chosen, 1), (self.rejected, 2)]
        if self.edited is not None:
            ranked.insert(0, (self.edited, 0))
        return ranked


Row = TypeVar("Row", SftRow, PreferenceRow, PromptRow)


class DataError(ValueError):
    """No usable row, or a file that cannot be read: the message says which and why."""


@dataclass
class DataReport:
    """What `read_rows` (and encoding) made of the input: rows used, rows dropped by reason."""

    used: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    """Up to 3 ``file:line: detail`` places per reason."""

    def drop(self, reason: str, where: str) -> None:
        """Count one dropped row under `reason`, keeping up to 3 examples of where."""
        self.dropped[reason] += 1
        if len(self.examples[reason]) < 3:
            self.examples[reason].append(where)

    def summary(self) -> str:
        """One line per reason, e.g. ``used 98 rows; dropped 2: invalid (2: a.jsonl:3: ...)``."""
        total = sum(self.dropped.values())
        lines = [f"used {self.used} rows; dropped {total}"]
        for reason, count in self.dropped.most_common():
            lines.append(f"  {reason}: {count} (e.g. {'; '.join(self.examples[reason])})")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        """Plain data for a stage's report file."""
        return {
            "used": self.used,
            "dropped": dict(self.dropped),
            "examples": {k: list(v) for k, v in self.examples.items()},
        }


def read_rows(
    paths: str | Path | Sequence[str | Path], row_type: type[Row], report: DataReport | None = None
) -> tuple[list[Row], DataReport]:
    """Every valid row of the JSONL files, in order, and the report of what was dropped and why.

    Blank lines are skipped. A line that is not JSON, not an object, or fails `row_type`'s checks
    is dropped under ``"not JSON"``, ``"not an object"`` or ``"invalid: <first error>"``. Raises
    `DataError` if a file is missing or no row is usable.
    """
    report = report if report is not None else DataReport()
    files = [Path(paths)] if isinstance(paths, str | Path) else [Path(p) for p in paths]
    if not files:
        raise DataError(f"no {row_type.__name__} files given")
    rows: list[Row] = []
    for path in files:
        if not path.is_file():
            raise DataError(f"{path}: no such file (expected JSONL of {row_type.__name__})")
        for number, line in _lines(path):
            where = f"{path}:{number}"
            try:
                data = json.loads(line)
            except json.JSONDecodeError as error:
                report.drop("not JSON", f"{where}: {error.msg}")
                continue
            if not isinstance(data, dict):
                report.drop("not an object", f"{where}: a {type(data).__name__}")
                continue
            try:
                rows.append(row_type.model_validate(data))
            except (ValidationError, ValueError, KeyError, TypeError) as error:
                reason, detail = _first_error(error)
                report.drop(f"invalid: {reason}", f"{where}: {detail}")
                continue
            report.used += 1
    if not rows:
        raise DataError(
            f"no usable {row_type.__name__} in {', '.join(map(str, files))}:\n{report.summary()}"
        )
    return rows, report


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                yield number, line


def _first_error(error: Exception) -> tuple[str, str]:
    """(a short reason to count under, the detail for the example)."""
    if isinstance(error, ValidationError):
        first = error.errors()[0]
        place = ".".join(str(part) for part in first["loc"]) or "row"
        message = first["msg"].removeprefix("Value error, ")
        return f"{place}: {message}" if len(message) < 80 else place, f"{place}: {message}"
    if isinstance(error, KeyError):
        return f"missing key {error}", f"missing key {error}"
    return type(error).__name__, str(error)


def write_rows(path: str | Path, rows: Sequence[BaseModel]) -> Path:
    """Write rows as JSONL (messages as chat dicts), atomically: the file appears whole or not."""
    from llama_model import atomic_write

    path = Path(path)
    with atomic_write(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(_plain(row), ensure_ascii=False) + "\n")
    return path


def _plain(value: Any) -> Any:
    if isinstance(value, Message):
        return value.to_hf_dict()
    if isinstance(value, BaseModel):
        return {
            name: _plain(getattr(value, name))
            for name in type(value).model_fields
            if getattr(value, name) is not None
        }
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


# --------------------------------------------------------------------------------------------
# Encoding


def encode_prompt(chat: ChatFormat, prompt: Sequence[Message]) -> EncodedDialog:
    """The prompt's tokens: `<|begin_of_text|>`, its messages, then the assistant header."""
    return chat.encode_dialog(prompt, add_generation_prompt=True)


def encode_response(
    chat: ChatFormat, prompt: Sequence[Message], response: Sequence[Message]
) -> EncodedDialog:
    """The tokens that follow `encode_prompt(prompt)` when `response` answers it: the first
    message's content and terminator (its header is the prompt's last tokens), then any further
    messages whole. Prompt + response equals the whole dialog's encoding."""
    if not response or response[0].role != "assistant":
        raise ValueError("a response starts with an assistant message")
    prompt_length = len(encode_prompt(chat, prompt))
    whole = chat.encode_dialog([*prompt, *response], add_generation_prompt=False)
    return EncodedDialog(
        whole.tokens[prompt_length:],
        whole.assistant_mask[prompt_length:],
        whole.format_mask[prompt_length:],
    )


@dataclass(frozen=True)
class SftExample:
    """One dialog's tokens; SFT learns the tokens where `dialog.assistant_mask` is True."""

    dialog: EncodedDialog


@dataclass(frozen=True)
class RankedExample:
    """A prompt and its responses with ranks (0 best), for the reward model (§4.1.2)."""

    prompt: EncodedDialog
    responses: tuple[EncodedDialog, ...]
    ranks: tuple[int, ...]


@dataclass(frozen=True)
class PreferenceExample:
    """A prompt with a chosen and a rejected response, for DPO (§4.1.4)."""

    prompt: EncodedDialog
    chosen: EncodedDialog
    rejected: EncodedDialog


def encode_sft(
    chat: ChatFormat, rows: Sequence[SftRow], max_tokens: int, report: DataReport | None = None
) -> list[SftExample]:
    """Encode SFT rows; a dialog longer than `max_tokens` is dropped under ``"too long"``."""
    out = []
    for index, row in enumerate(rows):
        dialog = chat.encode_dialog(row.messages, add_generation_prompt=False)
        if len(dialog) > max_tokens:
            _too_long(report, index, len(dialog), max_tokens)
            continue
        out.append(SftExample(dialog))
    return out


def encode_ranked(
    chat: ChatFormat,
    rows: Sequence[PreferenceRow],
    max_tokens: int,
    report: DataReport | None = None,
) -> list[RankedExample]:
    """Encode preference rows for the reward model: one example holds the prompt once and every
    response; an example longer than `max_tokens` in all is dropped under ``"too long"``."""
    out = []
    for index, row in enumerate(rows):
        ranked = row.ranked()
        prompt = encode_prompt(chat, row.prompt)
        responses = tuple(encode_response(chat, row.prompt, r) for r, _ in ranked)
        length = len(prompt) + sum(len(r) for r in responses)
        if length > max_tokens:
            _too_long(report, index, length, max_tokens)
            continue
        out.append(RankedExample(prompt, responses, tuple(rank for _, rank in ranked)))
    return out


def encode_preference(
    chat: ChatFormat,
    rows: Sequence[PreferenceRow],
    max_tokens: int,
    report: DataReport | None = None,
) -> list[PreferenceExample]:
    """Encode preference rows for DPO: every pair (better, worse) of a row's ranked responses
    becomes one example (chosen/rejected rows: one pair; with edited: three); a pair whose
    prompt + longer response exceeds `max_tokens` is dropped under ``"too long"``."""
    out = []
    for index, row in enumerate(rows):
        prompt = encode_prompt(chat, row.prompt)
        ranked = [(encode_response(chat, row.prompt, r), rank) for r, rank in row.ranked()]
        for better, better_rank in ranked:
            for worse, worse_rank in ranked:
                if better_rank >= worse_rank:
                    continue
                length = len(prompt) + max(len(better), len(worse))
                if length > max_tokens:
                    _too_long(report, index, length, max_tokens)
                    continue
                out.append(PreferenceExample(prompt, better, worse))
    return out


def _too_long(report: DataReport | None, index: int, length: int, limit: int) -> None:
    if report is not None:  # counted beside the rows read: an encoded example is dropped, not a row
        report.drop("too long", f"row {index}: {length} tokens > max_tokens {limit}")
