"""OpenAI tool calling over the Llama 3.1 dialog format (§4.3.5 of arXiv 2407.21783).

Pure translations for the OpenAI-compatible server, in the terms of the OpenAI Chat Completions
API (https://platform.openai.com/docs/api-reference/chat):

- `openai_messages_to_dialog`: a request's `messages`, `tools` and `tool_choice` become the
  `llama_model.Message` dialog Llama 3.1 expects: roles system (or developer), user, assistant
  and tool (a tool result becomes an `ipython` turn), assistant `tool_calls` written the way
  Meta's reference writes them, and the tools offered through `llama_model.with_tool_prompt`
  (the prompt of Meta's Hugging Face chat template). Functions named like a Llama 3.1 built-in
  (`brave_search`, `wolfram_alpha`, `code_interpreter`) are offered the built-in way.
- `parse_tool_calls`: the model's reply (tokens or a decoded `Message`) becomes OpenAI
  `tool_calls` with JSON-string arguments; the finish reason is "tool_calls" exactly when
  there are some.
- `may_become_tool_call`: whether a reply still being generated may turn out to be a tool call
  (a streaming server holds its text back while it may).

The chat format itself (encoding, parsing the model's calls) lives in `llama_model.chat`; this
module only maps OpenAI's shapes onto it. Malformed input raises ValueError with a message that
names the field (`messages[2].tool_calls[0].function.arguments`), for the server to return as
HTTP 400.
"""

from __future__ import annotations

import datetime
import json
import secrets
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, NamedTuple

from pydantic import ValidationError

from llama_model import (
    LLAMA31_BUILTIN_TOOLS,
    ChatFormat,
    Message,
    Tokenizer,
    ToolCall,
    with_tool_prompt,
)

__all__ = [
    "ChatDialog",
    "may_become_tool_call",
    "new_call_id",
    "openai_messages_to_dialog",
    "parse_tool_calls",
]

# OpenAI's roles besides "assistant", and the Llama 3.1 role each is written as: "developer" is
# OpenAI's newer name for "system"; a tool's result is an "ipython" turn.
_LLAMA_ROLES: dict[str, Literal["system", "user", "ipython"]] = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "tool": "ipython",
}
_ROLES = ("system", "developer", "user", "assistant", "tool")


class ChatDialog(NamedTuple):
    """A chat request as Llama 3.1 reads it: `dialog, tools_offered = openai_messages_to_dialog(...)`."""

    dialog: list[Message]
    """The messages to encode, tool prompt included."""
    tools_offered: bool
    """Whether the prompt offers any tool, so that the reply should be parsed for tool calls."""


def openai_messages_to_dialog(
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
    tool_choice: str | Mapping[str, Any] | None = None,
    *,
    today: datetime.date | None = None,
    tools_in_user_message: bool = True,
) -> ChatDialog:
    """The Llama 3.1 dialog for an OpenAI chat request, with its tools in the prompt.

    `messages` are OpenAI chat messages: content a string or a list of `{"type": "text", "text":
    ...}` parts (joined with "\\n", as vLLM does); assistant messages may carry `tool_calls`
    (`function.arguments` a JSON string, as OpenAI sends it), and are then written ending with
    `<|eom_id|>`, the model's "waiting for a tool result"; `tool` messages become `ipython` turns
    (Llama 3.1 has no call ids, so `tool_call_id` is not written).

    `tool_choice`: None or "auto" offers every tool; "none" offers none (tool calls already in
    the history are still written); `{"type": "function", "function": {"name": N}}` offers only
    N, which the model may still decline to call. "required" is refused: forcing a call needs
    constrained decoding. `today` is the prompt's "Today Date" (default: today);
    `tools_in_user_message` places the functions as Meta's Hugging Face template does by default
    (in the first user message) or, if False, in the system message.
    """
    if isinstance(messages, (str, Mapping)) or not isinstance(messages, Sequence):
        raise ValueError(f"messages must be a list of messages, got {type(messages).__name__}")
    if not messages:
        raise ValueError("messages must hold at least one message; got an empty list")
    dialog = [_to_message(m, f"messages[{i}]") for i, m in enumerate(messages)]
    builtins, functions = _offered_tools(tools, tool_choice)
    if not builtins and not functions:
        return ChatDialog(dialog, tools_offered=False)
    prompted = with_tool_prompt(
        dialog,
        builtin_tools=builtins,
        functions=functions,
        today=today if today is not None else datetime.date.today(),
        tools_in_user_message=tools_in_user_message,
    )
    return ChatDialog(prompted, tools_offered=True)


def new_call_id() -> str:
    """A fresh OpenAI-style tool call id, "call_" and 24 random hex digits."""
    return f"call_{secrets.token_hex(12)}"


def parse_tool_calls(
    tokenizer: Tokenizer,
    reply: Sequence[int] | Message,
    *,
    call_id: Callable[[], str] = new_call_id,
) -> list[dict[str, Any]]:
    """The OpenAI `tool_calls` of a model reply; empty when the reply is text.

    `reply` is the token ids the model generated after the assistant header (decoded with
    `ChatFormat.decode_assistant`, which recognises the JSON, built-in and `<|python_tag|>`
    forms), or an already decoded assistant `Message`. Each call is `{"id", "type": "function",
    "function": {"name", "arguments"}}` with `arguments` a JSON string; built-ins keep their names
    and argument (`brave_search` with `{"query": ...}`, `code_interpreter` with `{"code": ...}`).
    A non-empty result means OpenAI's finish reason "tool_calls" and `"content": null`.
    `call_id` makes each call's id (pass a deterministic one in tests). Only call this for a
    request that offered tools; otherwise the text is the answer.
    """
    if isinstance(reply, Message):
        message = reply
        if message.role != "assistant":
            raise ValueError(
                f"parse_tool_calls needs an assistant message; this one's role is {message.role!r}"
            )
    else:
        message = ChatFormat(tokenizer).decode_assistant(reply)
    return [
        {
            "id": call_id(),
            "type": "function",
            "function": {
                "name": call.name,
                "arguments": json.dumps(call.arguments, ensure_ascii=False),
            },
        }
        for call in message.tool_calls
    ]


def may_become_tool_call(tokenizer: Tokenizer, token_ids: Sequence[int]) -> bool:
    """Whether a reply that begins with `token_ids` (still being generated) may yet parse as a
    tool call (`ChatFormat.may_be_tool_call`); while it may, a stream shows none of its text."""
    return ChatFormat(tokenizer).may_be_tool_call(token_ids)


def _to_message(raw: Any, where: str) -> Message:
    """One OpenAI chat message as a `Message`; `where` names it in errors ("messages[3]")."""
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where} must be an object with a 'role', got {type(raw).__name__}")
    role = raw.get("role")
    if role not in _ROLES:
        raise ValueError(f"{where}.role is {role!r}; expected one of {', '.join(_ROLES)}")
    if role == "assistant":
        calls = _tool_calls(raw.get("tool_calls"), f"{where}.tool_calls")
        content = raw.get("content")
        if content is None and not calls:
            raise ValueError(f"{where}: an assistant message needs content or tool_calls")
        text = "" if content is None else _text(content, f"{where}.content")
        # A reply that called a tool ended with <|eom_id|>: the model waited for the result.
        return Message(role="assistant", content=text, tool_calls=calls, end_of_message=bool(calls))
    if raw.get("tool_calls"):
        raise ValueError(f"{where}: only assistant messages may have tool_calls, not {role!r}")
    if "content" not in raw or raw["content"] is None:
        what = "the tool's result" if role == "tool" else "its text"
        raise ValueError(f"{where}.content is missing: a {role} message needs {what}")
    return Message(role=_LLAMA_ROLES[role], content=_text(raw["content"], f"{where}.content"))


def _text(content: Any, where: str) -> str:
    """A message's content as one string: a string, or text parts joined with "\\n"."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValueError(
            f"{where} must be a string or a list of text parts, got {type(content).__name__}"
        )
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, Mapping) or part.get("type") != "text":
            kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
            raise ValueError(
                f"{where}[{j}] has type {kind!r}; only text parts "
                '({"type": "text", "text": ...}) are supported'
            )
        text = part.get("text")
        if not isinstance(text, str):
            raise ValueError(f"{where}[{j}].text must be a string, got {type(text).__name__}")
        texts.append(text)
    return "\n".join(texts)


def _tool_calls(raw: Any, where: str) -> tuple[ToolCall, ...]:
    """An assistant message's OpenAI `tool_calls` as `ToolCall`s."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ValueError(f"{where} must be a list, got {type(raw).__name__}")
    calls = []
    for k, call in enumerate(raw):
        here = f"{where}[{k}]"
        if not isinstance(call, Mapping):
            raise ValueError(f"{here} must be an object, got {type(call).__name__}")
        if call.get("type", "function") != "function":
            raise ValueError(f"{here}.type is {call.get('type')!r}; only 'function' is supported")
        function = call.get("function")
        if not isinstance(function, Mapping):
            raise ValueError(f"{here}.function must be an object with 'name' and 'arguments'")
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError(f"{here}.function.name must be a non-empty string, got {name!r}")
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except (ValueError, RecursionError) as err:
                raise ValueError(
                    f"{here}.function.arguments is not valid JSON ({err}): {arguments!r}"
                ) from err
        if not isinstance(arguments, dict):
            raise ValueError(
                f"{here}.function.arguments must be a JSON object, got {type(arguments).__name__}"
            )
        try:
            calls.append(ToolCall(name=name, arguments=arguments))
        except ValidationError as err:
            reason = str(err.errors()[0]["msg"]).removeprefix("Value error, ")
            raise ValueError(f"{here}.function: {reason}") from err
    return tuple(calls)


def _offered_tools(
    tools: Sequence[Mapping[str, Any]] | None, tool_choice: str | Mapping[str, Any] | None
) -> tuple[list[str], list[dict[str, Any]]]:
    """The built-in names and the function definitions to put in the prompt."""
    declared = _functions(tools)
    if tool_choice is None or tool_choice == "auto":
        chosen = declared
    elif tool_choice == "none":
        chosen = []
    elif tool_choice == "required":
        raise ValueError(
            "tool_choice 'required' is not supported: forcing a tool call needs constrained "
            "decoding, which this server does not do; use 'auto' (the model decides) or name "
            "one function, which is then the only one offered"
        )
    elif isinstance(tool_choice, Mapping):
        function = tool_choice.get("function")
        name = function.get("name") if isinstance(function, Mapping) else None
        if tool_choice.get("type") != "function" or not isinstance(name, str):
            raise ValueError(
                "tool_choice must be 'none', 'auto' or "
                '{"type": "function", "function": {"name": ...}}; got ' + json.dumps(tool_choice)
            )
        chosen = [f for f in declared if f["name"] == name]
        if not chosen:
            offered = ", ".join(repr(f["name"]) for f in declared) or "no tools"
            raise ValueError(
                f"tool_choice names the function {name!r}, which is not among the request's "
                f"tools ({offered})"
            )
    else:
        raise ValueError(
            f"tool_choice must be 'none', 'auto' or a named function, got {tool_choice!r}"
        )
    builtins = [f["name"] for f in chosen if f["name"] in LLAMA31_BUILTIN_TOOLS]
    functions = [f for f in chosen if f["name"] not in LLAMA31_BUILTIN_TOOLS]
    return builtins, functions


def _functions(tools: Sequence[Mapping[str, Any]] | None) -> list[dict[str, Any]]:
    """The function definitions of an OpenAI `tools` list, checked."""
    if tools is None:
        return []
    if isinstance(tools, (str, Mapping)) or not isinstance(tools, Sequence):
        raise ValueError(f"tools must be a list, got {type(tools).__name__}")
    functions: list[dict[str, Any]] = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, Mapping):
            raise ValueError(f"tools[{i}] must be an object, got {type(tool).__name__}")
        if tool.get("type") != "function":
            raise ValueError(
                f"tools[{i}].type is {tool.get('type')!r}; only 'function' is supported"
            )
        function = tool.get("function")
        if not isinstance(function, Mapping):
            raise ValueError(f"tools[{i}].function must be an object with a 'name'")
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError(f"tools[{i}].function.name must be a non-empty string, got {name!r}")
        if any(f["name"] == name for f in functions):
            raise ValueError(f"tools[{i}].function.name {name!r} is declared twice")
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, Mapping):
            raise ValueError(
                f"tools[{i}].function.parameters must be a JSON schema object, "
                f"got {type(parameters).__name__}"
            )
        functions.append(dict(function))
    return functions
