"""The Llama 3.1 tool prompt: the system (and first user) message that offers tools to the model.

Llama 3.1 Instruct was trained to call tools when its system prompt says so (§4.3.5 of "The Llama 3
Herd of Models", arXiv 2407.21783). `with_tool_prompt` rewrites a dialog the way the chat template
of Meta's Hugging Face checkpoints does (`chat_template` in the `tokenizer_config.json` of
https://huggingface.co/meta-llama/Llama-3.1-8B-Instruct), so that this toolkit, transformers and
vLLM send the model the same tokens for the same request:

    <|start_header_id|>system<|end_header_id|>\\n\\n
    Environment: ipython\\n                         (any tool: turns on code_interpreter)
    Tools: brave_search, wolfram_alpha\\n\\n          (requested built-ins, code_interpreter left out)
    Cutting Knowledge Date: December 2023\\n
    Today Date: 26 Jul 2024\\n\\n
    {the caller's system message, stripped}<|eot_id|>
    <|start_header_id|>user<|end_header_id|>\\n\\n
    Given the following functions, ... Do not use variables.\\n\\n
    {each function as indented JSON}\\n\\n
    {the first user message, stripped}<|eot_id|>

Custom functions go in the first user message (the template's default, `tools_in_user_message`)
or, as an option, in the system message with the template's other instruction. Meta's own
sources word the same facts a little differently: `models/llama3_1/prompt_format.md` and
`models/llama3/prompt_templates/system_prompts.py` in https://github.com/meta-llama/llama-models
(`BuiltinToolGenerator`, `SystemDefaultGenerator`, `JsonCustomToolGenerator`) put no blank line
after `Tools:`, write the date as "21 September 2024", and introduce the functions with "Answer
the user's question by making use of the following functions if needed. ...". We follow the
Hugging Face template because it is what users of Meta's checkpoints get from transformers and
vLLM; the ways it differs are noted where each string is defined.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Mapping, Sequence
from typing import Any

from llama_model.chat import CODE_INTERPRETER, Message

__all__ = ["LLAMA31_BUILTIN_TOOLS", "with_tool_prompt"]

# The built-in tools Llama 3.1 Instruct was trained on (models/llama3_1/prompt_format.md: "The
# three built-in tools (brave_search, wolfram_alpha, and code interpreter) can be turned on using
# the system prompt"). `photogen`, which Meta's `BuiltinTool` also lists, is not among them.
LLAMA31_BUILTIN_TOOLS: tuple[str, ...] = ("brave_search", "wolfram_alpha", CODE_INTERPRETER)

# The strings below are the Hugging Face chat template's, character for character
# (meta-llama/Llama-3.1-8B-Instruct, tokenizer_config.json, "chat_template").
# `{{- "Environment: ipython\n" }}`, written when any tool is offered.
ENVIRONMENT_LINE = "Environment: ipython\n"
# `{{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ") + "\n\n"}}`.
# Meta's BuiltinToolGenerator writes a single "\n", and no line at all when only code_interpreter is
# requested; the template writes "Tools: \n\n" then, which we do not copy (see `_system_header`).
TOOLS_LINE = "Tools: {names}\n\n"
# `{{- "Cutting Knowledge Date: December 2023\n" }}`: the training data's cutoff (also Meta's
# SystemDefaultGenerator and the Llama 3.1 model card).
KNOWLEDGE_CUTOFF_LINE = "Cutting Knowledge Date: December 2023\n"
# `{{- "Today Date: " + date_string + "\n\n" }}`, date_string like "26 Jul 2024" (the template's
# default; Llama 3.2's template computes it with strftime_now("%d %b %Y")).
TODAY_LINE = "Today Date: {date}\n\n"
# The first user message's preamble (tools_in_user_message, the default). The missing space
# before "Do not use variables." is the template's.
FUNCTIONS_IN_USER_MESSAGE = (
    "Given the following functions, please respond with a JSON for a function call "
    "with its proper arguments that best answers the given prompt.\n\n"
    'Respond in the format {"name": function name, "parameters": dictionary of argument name '
    "and its value}."
    "Do not use variables.\n\n"
)
# The system message's preamble (tools_in_user_message=false), spaces exactly as the template's.
FUNCTIONS_IN_SYSTEM_MESSAGE = (
    "You have access to the following functions. To call a function, please respond with JSON "
    "for a function call."
    'Respond in the format {"name": function name, "parameters": dictionary of argument name '
    "and its value}."
    "Do not use variables.\n\n"
)
# %b in English whatever the process locale (strftime's %b follows LC_TIME).
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def _format_today(today: datetime.date) -> str:
    """The date as the template writes it: "%d %b %Y" in English, e.g. "05 Mar 2025"."""
    return f"{today.day:02d} {_MONTHS[today.month - 1]} {today.year}"


def _render_function(function: Mapping[str, Any]) -> str:
    """One function definition as the template writes it: `{"type": "function", "function": ...}`
    as `tojson(indent=4)` in transformers (json.dumps, indent 4, keys in the given order, non-ASCII
    kept), then a blank line."""
    return (
        json.dumps({"type": "function", "function": dict(function)}, indent=4, ensure_ascii=False)
        + "\n\n"
    )


def with_tool_prompt(
    messages: Sequence[Message],
    *,
    builtin_tools: Sequence[str] = (),
    functions: Sequence[Mapping[str, Any]] = (),
    today: datetime.date,
    tools_in_user_message: bool = True,
) -> list[Message]:
    """`messages` with the Llama 3.1 tool prompt: a new or rewritten system message first and, for
    custom functions, a rewritten first user message.

    `builtin_tools` are names from `LLAMA31_BUILTIN_TOOLS` (any of them turns on `Environment:
    ipython`, which is what enables `code_interpreter`). `functions` are OpenAI-style function
    definitions, `{"name", "description", "parameters": <JSON schema>}`, written as the model is
    shown them. With neither, `messages` come back unchanged. The system message (the first
    message, if its role is "system") and the first user message are stripped of surrounding
    whitespace, as the template does; the other messages are kept as they are.

    With `tools_in_user_message` (the default, the template's) the function list opens the first
    message after the system message, which must then be a user message; otherwise it goes in the
    system message.
    """
    builtins = _check_builtin_tools(builtin_tools)
    _check_functions(functions)
    if not builtins and not functions:
        return list(messages)

    rest = list(messages)
    system_text = ""
    if rest and rest[0].role == "system":
        system_text = rest.pop(0).content.strip()
    header = _system_header(builtins, today)
    function_list = "".join(_render_function(f) for f in functions)
    if functions and not tools_in_user_message:
        header += FUNCTIONS_IN_SYSTEM_MESSAGE + function_list
    system = Message(role="system", content=header + system_text)

    if functions and tools_in_user_message:
        if not rest or rest[0].role != "user":
            found = f"a message of role {rest[0].role!r}" if rest else "nothing"
            raise ValueError(
                "the tool prompt puts the functions in the first user message, which must follow "
                f"the system message; found {found} there. Start the dialog with a user message, "
                "or pass tools_in_user_message=False"
            )
        first = rest.pop(0)
        rest.insert(
            0,
            Message(
                role="user",
                content=FUNCTIONS_IN_USER_MESSAGE + function_list + first.content.strip(),
            ),
        )
    return [system, *rest]


def _system_header(builtins: Sequence[str], today: datetime.date) -> str:
    """Environment, Tools, Cutting Knowledge Date and Today Date lines (any tool is offered)."""
    named = [name for name in builtins if name != CODE_INTERPRETER]
    tools_line = TOOLS_LINE.format(names=", ".join(named)) if named else ""
    return (
        ENVIRONMENT_LINE
        + tools_line
        + KNOWLEDGE_CUTOFF_LINE
        + TODAY_LINE.format(date=_format_today(today))
    )


def _check_builtin_tools(builtin_tools: Sequence[str]) -> list[str]:
    """The requested built-ins in order without repeats; an unknown name raises ValueError."""
    if isinstance(builtin_tools, str):
        raise ValueError(
            f"builtin_tools must be a sequence of names, got the string {builtin_tools!r}; "
            f"write [{builtin_tools!r}]"
        )
    seen: list[str] = []
    for name in builtin_tools:
        if name not in LLAMA31_BUILTIN_TOOLS:
            raise ValueError(
                f"unknown built-in tool {name!r}: Llama 3.1's built-in tools are "
                f"{', '.join(LLAMA31_BUILTIN_TOOLS)}; offer any other tool as a function"
            )
        if name not in seen:
            seen.append(name)
    return seen


def _check_functions(functions: Sequence[Mapping[str, Any]]) -> None:
    """Each function has a non-empty string name, unique, not a built-in's, and is JSON."""
    names: set[str] = set()
    for i, function in enumerate(functions):
        if not isinstance(function, Mapping):
            raise ValueError(
                f"functions[{i}] must be a mapping such as {{'name': ..., 'parameters': ...}}, "
                f"got {type(function).__name__}"
            )
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError(f"functions[{i}] needs a non-empty string 'name', got {name!r}")
        if name in LLAMA31_BUILTIN_TOOLS:
            raise ValueError(
                f"functions[{i}] is named {name!r}, a built-in tool: pass it in builtin_tools"
            )
        if name in names:
            raise ValueError(f"functions[{i}]: the name {name!r} is used twice")
        names.add(name)
        try:
            json.dumps(dict(function))
        except (TypeError, ValueError) as err:
            raise ValueError(f"functions[{i}] ({name!r}) must be JSON-serialisable: {err}") from err
