"""The Llama 3.1 dialog format: messages, tool calls, token encoding with loss masks, HF template.

A dialog is `<|begin_of_text|>` followed by one block per message,

    <|start_header_id|>{role}<|end_header_id|>\\n\\n{content}{tool calls}<|eot_id|>

and, when the model is to answer, a trailing assistant header. This is Meta's reference
`ChatFormat.encode_dialog_prompt` (`llama_models/llama3/chat_format.py`) with the JSON tool-prompt
format of `llama_models/llama3/tool_utils.py`, reproduced token for token: role "tool" is written
as "ipython"; a reply whose first tool call is `code_interpreter` starts with `<|python_tag|>`; an
assistant turn that waits for a tool result ends with `<|eom_id|>` instead of `<|eot_id|>`.

`EncodedDialog` carries two masks beside the tokens, which post-training needs: the assistant
mask (which tokens SFT trains on) and the formatting mask (header and termination tokens, which
the DPO loss of §4.1.4 of the Llama 3 paper, arXiv 2407.21783, leaves out).

`ChatFormat.decode_assistant` parses a reply the way Meta's `decode_assistant_message_from_content`
(`llama_models/llama3/chat_format.py` with `ToolUtils` of `tool_utils.py`) does, with a few
deliberate differences listed at `_parse_tool_call` (chiefly: a JSON call may say `"arguments"`
instead of `"parameters"`, where Meta's parser raises `KeyError`).

`CHAT_TEMPLATE` is the same format as a Jinja2 chat template for Hugging Face's
`tokenizer_config.json`; `Message.to_hf_dict` writes messages in the form it reads.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from llama_model.tokenizer import Tokenizer

__all__ = ["BUILTIN_TOOLS", "CHAT_TEMPLATE", "ChatFormat", "EncodedDialog", "Message", "ToolCall"]

# Meta's built-in tools (`llama_models.datatypes.BuiltinTool`) and the argument each one needs.
# The three search-like tools are written `NAME.call(query="...")`; the code interpreter's code
# is written raw after `<|python_tag|>`.
BUILTIN_TOOLS: dict[str, str] = {
    "brave_search": "query",
    "wolfram_alpha": "query",
    "photogen": "query",
    "code_interpreter": "code",
}
CODE_INTERPRETER = "code_interpreter"

Role = Literal["system", "user", "assistant", "ipython"]
_ROLES: tuple[str, ...] = ("system", "user", "assistant", "ipython")

# A whole reply that is one built-in query call, e.g. `brave_search.call(query="weather")`.
_BUILTIN_CALL = re.compile(r'(brave_search|wolfram_alpha|photogen)\.call\(query="([^"]*)"\)')
# How such a call begins; a reply (leading whitespace aside) that neither begins so, nor with the
# "{" of a JSON call, nor with <|python_tag|>, cannot be a tool call.
_BUILTIN_CALL_STARTS = tuple(
    f"{name}.call(" for name in ("brave_search", "wolfram_alpha", "photogen")
)


class ToolCall(BaseModel):
    """One tool call in an assistant message: the tool's name and its keyword arguments."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    """The tool: a built-in (`brave_search`, `wolfram_alpha`, `photogen`, `code_interpreter`)
    or any custom function name."""
    arguments: dict[str, Any]
    """Keyword arguments; built-ins need `query` (or `code` for `code_interpreter`), custom
    functions need JSON-serialisable values."""

    @model_validator(mode="after")
    def _check_arguments(self) -> ToolCall:
        required = BUILTIN_TOOLS.get(self.name)
        if required is not None and required not in self.arguments:
            raise ValueError(
                f"tool call {self.name!r} needs the argument {required!r}; "
                f"got arguments {sorted(self.arguments)}"
            )
        if self.name == CODE_INTERPRETER and not isinstance(self.arguments["code"], str):
            raise ValueError(
                f"code_interpreter's 'code' must be a str, got {type(self.arguments['code']).__name__}"
            )
        if required is None:
            try:
                json.dumps(self.arguments)
            except (TypeError, ValueError) as err:
                raise ValueError(
                    f"arguments of tool call {self.name!r} must be JSON-serialisable: {err}"
                ) from err
        return self

    def render(self) -> str:
        """The call as the model writes it (Meta's `ToolUtils.encode_tool_call`, JSON format)."""
        if self.name == CODE_INTERPRETER:
            return str(self.arguments["code"])
        if self.name in BUILTIN_TOOLS:
            return f'{self.name}.call(query="{self.arguments["query"]}")'
        return json.dumps({"type": "function", "name": self.name, "parameters": self.arguments})


class Message(BaseModel):
    """One turn of a dialog. Role "tool" is accepted and stored as "ipython", as Meta writes it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    role: Role
    """Who speaks: "system", "user", "assistant", or "ipython" (a tool's result)."""
    content: str
    """The text of the turn."""
    tool_calls: tuple[ToolCall, ...] = ()
    """Tool calls the assistant makes, written after its content (assistant only)."""
    end_of_message: bool = False
    """Assistant only: end with `<|eom_id|>` (the model waits for a tool result) rather than
    `<|eot_id|>` (Meta's `StopReason.end_of_message`)."""

    @field_validator("role", mode="before")
    @classmethod
    def _tool_is_ipython(cls, role: object) -> object:
        return "ipython" if role == "tool" else role

    @model_validator(mode="after")
    def _assistant_only_fields(self) -> Message:
        if self.role != "assistant" and self.tool_calls:
            raise ValueError(
                f"only assistant messages may have tool_calls; this one is {self.role!r}"
            )
        if self.role != "assistant" and self.end_of_message:
            raise ValueError(
                f"only assistant messages may set end_of_message; this one is {self.role!r}"
            )
        return self

    def to_hf_dict(self) -> dict[str, Any]:
        """This message as a Hugging Face chat dict, the input `CHAT_TEMPLATE` reads.

        `{"role", "content"}`; role "ipython" is written "tool"; tool calls use the OpenAI form
        `{"type": "function", "function": {"name", "arguments": {...}}}`; an assistant message
        with `end_of_message` carries the extra key `"end_of_message": True`.
        """
        hf: dict[str, Any] = {
            "role": "tool" if self.role == "ipython" else self.role,
            "content": self.content,
        }
        if self.tool_calls:
            hf["tool_calls"] = [
                {"type": "function", "function": {"name": c.name, "arguments": dict(c.arguments)}}
                for c in self.tool_calls
            ]
        if self.end_of_message:
            hf["end_of_message"] = True
        return hf

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any]) -> Message:
        """Parse a Hugging Face/OpenAI chat dict (the inverse of `to_hf_dict`).

        Content `None` reads as ""; tool-call arguments may be a JSON string, as OpenAI sends them.
        """
        calls = []
        for call in hf.get("tool_calls") or ():
            function = call.get("function", call)
            arguments = function.get("arguments", {})
            if isinstance(arguments, str):
                arguments = json.loads(arguments)
            calls.append(ToolCall(name=function["name"], arguments=arguments))
        return cls(
            role=hf["role"],
            content=hf.get("content") or "",
            tool_calls=tuple(calls),
            end_of_message=bool(hf.get("end_of_message", False)),
        )


@dataclass(frozen=True)
class EncodedDialog:
    """Token ids of (part of) a dialog with two per-token masks of the same length.

    `assistant_mask[i]` is True for tokens an assistant message produced: its content, its
    `<|python_tag|>`, its tool-call text and its terminator (`<|eot_id|>` or `<|eom_id|>`, so that
    SFT teaches the model to stop). The assistant header is prompt, so it is False there.

    `format_mask[i]` is True for formatting tokens: `<|begin_of_text|>`, every header token
    (`<|start_header_id|>`, the role, `<|end_header_id|>`, the "\\n\\n") and every terminator.
    """

    tokens: list[int]
    assistant_mask: list[bool] = field(repr=False)
    format_mask: list[bool] = field(repr=False)

    def __post_init__(self) -> None:
        lengths = (len(self.tokens), len(self.assistant_mask), len(self.format_mask))
        if len(set(lengths)) != 1:
            raise ValueError(
                f"tokens, assistant_mask and format_mask must have one length; got {lengths}"
            )

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def dpo_mask(self) -> list[bool]:
        """Tokens the DPO loss scores: assistant tokens that are not formatting (§4.1.4)."""
        return [a and not f for a, f in zip(self.assistant_mask, self.format_mask, strict=True)]

    @staticmethod
    def concat(parts: Sequence[EncodedDialog]) -> EncodedDialog:
        """Join encoded pieces end to end."""
        return EncodedDialog(
            tokens=[t for p in parts for t in p.tokens],
            assistant_mask=[m for p in parts for m in p.assistant_mask],
            format_mask=[m for p in parts for m in p.format_mask],
        )


def _segment(tokens: list[int], *, assistant: bool, formatting: bool) -> EncodedDialog:
    return EncodedDialog(tokens, [assistant] * len(tokens), [formatting] * len(tokens))


class ChatFormat:
    """Encodes dialogs to tokens (with masks) and decodes assistant replies, for one tokenizer."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        """Use `tokenizer`'s special tokens; it must be a Llama 3 `Tokenizer`."""
        self.tokenizer = tokenizer

    def encode_header(self, role: str) -> list[int]:
        """`<|start_header_id|>{role}<|end_header_id|>\\n\\n`; role "tool" is written "ipython"."""
        role = "ipython" if role == "tool" else role
        if role not in _ROLES:
            raise ValueError(
                f"unknown role {role!r}; expected one of {', '.join(_ROLES)} or 'tool'"
            )
        tok = self.tokenizer
        return [
            tok.start_header_id,
            *tok.encode(role, bos=False, eos=False),
            tok.end_header_id,
            *tok.encode("\n\n", bos=False, eos=False),
        ]

    def encode_message(self, message: Message) -> EncodedDialog:
        """One message: header, content, tool calls, terminator (no `<|begin_of_text|>`)."""
        tok = self.tokenizer
        is_assistant = message.role == "assistant"
        body: list[int] = []
        if message.tool_calls and message.tool_calls[0].name == CODE_INTERPRETER:
            # Meta's reference tags the reply only when the first call is code_interpreter.
            body.append(tok.python_tag_id)
        # Content and each call are encoded separately (special-token strings stay text).
        body.extend(tok.encode(message.content, bos=False, eos=False))
        for call in message.tool_calls:
            body.extend(tok.encode(call.render(), bos=False, eos=False))
        terminator = tok.eom_id if message.end_of_message else tok.eot_id
        return EncodedDialog.concat(
            [
                _segment(self.encode_header(message.role), assistant=False, formatting=True),
                _segment(body, assistant=is_assistant, formatting=False),
                _segment([terminator], assistant=is_assistant, formatting=True),
            ]
        )

    def encode_dialog(
        self, messages: Sequence[Message], *, add_generation_prompt: bool = True
    ) -> EncodedDialog:
        """`<|begin_of_text|>`, every message, then an assistant header if `add_generation_prompt`.

        With `add_generation_prompt=True` the tokens equal Meta's `encode_dialog_prompt`.
        """
        if not messages:
            raise ValueError("encode_dialog needs at least one message; got an empty list")
        parts = [_segment([self.tokenizer.bos_id], assistant=False, formatting=True)]
        parts.extend(self.encode_message(m) for m in messages)
        if add_generation_prompt:
            parts.append(
                _segment(self.encode_header("assistant"), assistant=False, formatting=True)
            )
        return EncodedDialog.concat(parts)

    def decode_assistant(self, tokens: Sequence[int]) -> Message:
        """Parse the tokens of an assistant reply (those after its header) back into a `Message`.

        A trailing `<|eom_id|>` sets `end_of_message` (the model waits for a tool result); a
        trailing `<|eot_id|>` or `<|end_of_text|>` is dropped. A reply that is one tool call
        (whitespace around it allowed) becomes that call with empty content:

        - a built-in query call, `brave_search.call(query="...")` (or `wolfram_alpha`, `photogen`);
        - a JSON function call, `{"name": ..., "parameters": {...}}`, with or without
          `"type": "function"`; `"arguments"` may stand for `"parameters"` and may be a JSON
          string holding the object.

        After a leading `<|python_tag|>` the same two forms are parsed, and any other text is
        `code_interpreter` code (kept verbatim). Any other reply is plain content.
        """
        tok = self.tokenizer
        ids = list(tokens)
        end_of_message = False
        if ids and ids[-1] == tok.eom_id:
            ids.pop()
            end_of_message = True
        elif ids and ids[-1] in (tok.eot_id, tok.eos_id):
            ids.pop()
        python_tag = bool(ids) and ids[0] == tok.python_tag_id
        text = tok.decode(ids[1:] if python_tag else ids)
        call = _parse_tool_call(text)
        if call is None and python_tag:
            call = ToolCall(name=CODE_INTERPRETER, arguments={"code": text})
        return Message(
            role="assistant",
            content="" if call is not None else text,
            tool_calls=(call,) if call is not None else (),
            end_of_message=end_of_message,
        )

    def may_be_tool_call(self, tokens: Sequence[int]) -> bool:
        """Whether an assistant reply that begins with `tokens` (still being generated) may
        still decode to a tool call with `decode_assistant`.

        True after a leading `<|python_tag|>`, and while the text, leading whitespace aside, is
        empty, begins with "{" (a JSON call) or is on its way to a built-in call
        (`brave_search.call(`...). A server streaming a reply holds its text back while this holds.
        """
        ids = list(tokens)
        if ids and ids[0] == self.tokenizer.python_tag_id:
            return True
        text = self.tokenizer.decode(ids).lstrip()
        if not text or text.startswith("{"):
            return True
        return any(
            start.startswith(text) or text.startswith(start) for start in _BUILTIN_CALL_STARTS
        )


def _parse_tool_call(text: str) -> ToolCall | None:
    """A tool call if `text` (stripped) is exactly one built-in or JSON function call, else None.

    Where Meta's `decode_assistant_message_from_content` accepts a reply that is one call, this
    gives the same call. It differs on purpose where Meta's parser fails or guesses:

    - `"arguments"` is read where `"parameters"` is missing (Meta raises `KeyError`), also as a
      JSON string holding an object, the way OpenAI writes arguments;
    - a JSON object is a call only when `"name"` is a non-empty string, `"type"` is absent or
      `"function"`, and the arguments are an object; otherwise the reply stays content (Meta
      raises `KeyError` on `{"name": "Bob", "age": 3}`);
    - a built-in call must be the whole reply (Meta's regex finds one anywhere in the text and
      drops the text around it);
    - the `<function=NAME>{...}</function>` form and Llama 3.2's Python-list form, which the
      Llama 3.1 tool prompt does not ask for, are not parsed.

    As in Meta's parser, a JSON call naming a built-in without its argument (`query`, or `code`
    for `code_interpreter`) passes the first argument's value as that argument.
    """
    stripped = text.strip()
    builtin = _BUILTIN_CALL.fullmatch(stripped)
    if builtin:
        return ToolCall(name=builtin[1], arguments={"query": builtin[2]})
    try:
        parsed = json.loads(stripped)
    except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
        return None
    if not isinstance(parsed, dict):
        return None
    name = parsed.get("name")
    if not isinstance(name, str) or not name or parsed.get("type", "function") != "function":
        return None
    if "parameters" in parsed:
        arguments = parsed["parameters"]
    elif "arguments" in parsed:
        arguments = parsed["arguments"]
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except (ValueError, RecursionError):
                return None
    else:
        return None
    if not isinstance(arguments, dict):
        return None
    required = BUILTIN_TOOLS.get(name)
    if required is not None and required not in arguments and arguments:
        # Meta's decode_assistant_message_from_content: a built-in called in the custom-tool
        # format gets its first argument's value as its query.
        arguments = {required: next(iter(arguments.values()))}
    try:
        return ToolCall(name=name, arguments=arguments)
    except ValidationError:
        return None


# The Llama 3.1 format as a Hugging Face chat template (for `tokenizer_config.json`). It reads
# `Message.to_hf_dict` dicts: role "tool" is written "ipython"; `tool_calls` may be in the OpenAI
# form ({"type": "function", "function": {...}}) or bare ({"name", "arguments"}), with arguments
# a mapping; the key "end_of_message": true ends an assistant turn with <|eom_id|>. Assistant text
# and terminators sit in a {% generation %} block, so transformers'
# `return_assistant_tokens_mask=True` marks the same tokens as `EncodedDialog.assistant_mask`.
# Custom calls use transformers' `tojson` filter (json.dumps without key sorting) with
# ensure_ascii=True, which matches `json.dumps` defaults exactly.
#
# Limitation of any string template: transformers tokenizes the rendered text as a whole, and
# parses special-token strings in it, whereas `ChatFormat` encodes the header, the content and
# each tool call separately and keeps special-token strings as text. So the ids can differ from
# `ChatFormat.encode_dialog` when content contains special-token strings (e.g. "<|eot_id|>"), when
# content begins with whitespace holding a line break (it merges with the header's "\n\n"), or
# where content and tool-call text (or two tool calls) meet and the pre-tokenizer joins them
# (e.g. content ending in a letter before `brave_search...`, or `}{` between two JSON calls).
# For ordinary content the ids are identical (tested in tests/test_hf_tokenizer.py).
CHAT_TEMPLATE = """\
{{- bos_token -}}
{%- for message in messages -%}
    {%- set role = 'ipython' if message['role'] == 'tool' else message['role'] -%}
    {{- '<|start_header_id|>' ~ role ~ '<|end_header_id|>\\n\\n' -}}
    {%- if message['content'] is defined and message['content'] is not none
        and message['content'] is not string -%}
        {{- raise_exception('message content must be a string, got: ' ~ message['content']) -}}
    {%- endif -%}
    {%- if role == 'assistant' -%}
        {%- set tool_calls = message['tool_calls'] if message['tool_calls'] else [] -%}
        {%- generation -%}
        {%- if tool_calls -%}
            {%- set first = tool_calls[0]['function'] if tool_calls[0]['function'] is defined
                else tool_calls[0] -%}
            {%- if first['name'] == 'code_interpreter' -%}
                {{- '<|python_tag|>' -}}
            {%- endif -%}
        {%- endif -%}
        {%- if message['content'] is string -%}
            {{- message['content'] -}}
        {%- endif -%}
        {%- for tool_call in tool_calls -%}
            {%- set call = tool_call['function'] if tool_call['function'] is defined
                else tool_call -%}
            {%- set args = call['arguments'] -%}
            {%- if args is not mapping -%}
                {{- raise_exception('tool call arguments must be a mapping, got: ' ~ args) -}}
            {%- endif -%}
            {%- if call['name'] == 'code_interpreter' -%}
                {%- if args['code'] is not defined -%}
                    {{- raise_exception('code_interpreter call needs a "code" argument') -}}
                {%- endif -%}
                {{- args['code'] -}}
            {%- elif call['name'] in ['brave_search', 'wolfram_alpha', 'photogen'] -%}
                {%- if args['query'] is not defined -%}
                    {{- raise_exception(call['name'] ~ ' call needs a "query" argument') -}}
                {%- endif -%}
                {{- call['name'] ~ '.call(query="' ~ args['query'] ~ '")' -}}
            {%- else -%}
                {{- {'type': 'function', 'name': call['name'], 'parameters': args}
                    | tojson(ensure_ascii=True) -}}
            {%- endif -%}
        {%- endfor -%}
        {%- if message['end_of_message'] is defined and message['end_of_message'] -%}
            {{- '<|eom_id|>' -}}
        {%- else -%}
            {{- '<|eot_id|>' -}}
        {%- endif -%}
        {%- endgeneration -%}
    {%- else -%}
        {%- if message['content'] is string -%}
            {{- message['content'] -}}
        {%- endif -%}
        {{- '<|eot_id|>' -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
{%- endif -%}
"""
