"""Tests for llama_model.tool_prompt against the chat template of Meta's Hugging Face checkpoints.

The oracle is the `chat_template` of meta-llama/Llama-3.1-8B-Instruct's `tokenizer_config.json`
(kept verbatim in tests/data/llama3_1_hf_chat_template.json, with its source), rendered by
transformers' `render_jinja_template` (what `apply_chat_template` runs, so what transformers and
vLLM users get) and tokenized by Meta's reference tokenizer with special-token strings parsed, as a
Hugging Face tokenizer does with a rendered template.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

import pytest
from transformers.utils.chat_template_utils import render_jinja_template

from llama_model.chat import ChatFormat, Message
from llama_model.tokenizer import Tokenizer
from llama_model.tool_prompt import LLAMA31_BUILTIN_TOOLS, with_tool_prompt

HF_TEMPLATE: str = json.loads(
    (Path(__file__).parent / "data" / "llama3_1_hf_chat_template.json").read_text("utf-8")
)["chat_template"]

WEATHER: dict[str, Any] = {
    "name": "get_weather",
    "description": "Current weather in a city, in °C.",
    "parameters": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "description": "City name, e.g. Zürich"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        },
        "required": ["city"],
    },
}
# Key order differs from WEATHER's on purpose: the JSON keeps the caller's order.
FLIGHTS: dict[str, Any] = {
    "parameters": {"type": "object", "properties": {"to": {"type": "string"}}},
    "name": "search_flights",
    "description": "Find flights <to> a city & back.",
}
NO_PARAMETERS: dict[str, Any] = {"name": "get_time"}

SYSTEM = Message(role="system", content="You are a helpful assistant.")
QUESTION = Message(role="user", content="What's the weather in Paris?")

# name -> (dialog, built-in tools, functions, tools_in_user_message)
CASES: dict[str, tuple[list[Message], list[str], list[dict[str, Any]], bool]] = {
    "functions_in_user_message": ([SYSTEM, QUESTION], [], [WEATHER, FLIGHTS], True),
    "functions_without_system": ([QUESTION], [], [WEATHER], True),
    "functions_in_system_message": ([SYSTEM, QUESTION], [], [WEATHER, FLIGHTS], False),
    "functions_in_system_without_system": ([QUESTION], [], [NO_PARAMETERS], False),
    "builtins_only": ([SYSTEM, QUESTION], ["brave_search", "wolfram_alpha"], [], True),
    "one_builtin_no_system": ([QUESTION], ["wolfram_alpha"], [], True),
    "builtins_and_functions": (
        [SYSTEM, QUESTION],
        ["brave_search", "wolfram_alpha", "code_interpreter"],
        [WEATHER],
        True,
    ),
    "builtins_and_functions_in_system": (
        [QUESTION],
        ["code_interpreter", "brave_search"],
        [WEATHER, NO_PARAMETERS],
        False,
    ),
    "multi_turn": (
        [
            SYSTEM,
            QUESTION,
            Message(role="assistant", content="Which Paris: France or Texas?"),
            Message(role="user", content="France."),
        ],
        ["brave_search"],
        [WEATHER],
        True,
    ),
    "whitespace_is_stripped": (
        [
            Message(role="system", content="  Be brief.\n\n"),
            Message(role="user", content="\n What time is it?  "),
        ],
        [],
        [NO_PARAMETERS],
        True,
    ),
}
TODAY = datetime.date(2025, 3, 5)


def render_hf_template(
    messages: list[Message],
    builtin_tools: list[str],
    functions: list[dict[str, Any]],
    tools_in_user_message: bool,
    *,
    date_string: str | None = "05 Mar 2025",
) -> str:
    """Meta's Hugging Face template over the dialog, with the functions passed the OpenAI way."""
    variables: dict[str, Any] = {"tools_in_user_message": tools_in_user_message}
    if builtin_tools:  # the template tests `builtin_tools is defined`
        variables["builtin_tools"] = builtin_tools
    if date_string is not None:
        variables["date_string"] = date_string
    rendered, _ = render_jinja_template(
        conversations=[[m.to_hf_dict() for m in messages]],
        tools=[{"type": "function", "function": f} for f in functions] or None,
        chat_template=HF_TEMPLATE,
        add_generation_prompt=True,
        bos_token="<|begin_of_text|>",
        **variables,
    )
    text: str = rendered[0]
    return text


def ours(
    chat_format: ChatFormat,
    messages: list[Message],
    builtin_tools: list[str],
    functions: list[dict[str, Any]],
    tools_in_user_message: bool,
    today: datetime.date = TODAY,
) -> list[int]:
    """Our tokens for the same request: with_tool_prompt, then encode_dialog."""
    dialog = with_tool_prompt(
        messages,
        builtin_tools=builtin_tools,
        functions=functions,
        today=today,
        tools_in_user_message=tools_in_user_message,
    )
    return chat_format.encode_dialog(dialog).tokens


@pytest.mark.parametrize("name", list(CASES))
def test_text_matches_hf_template(chat_format: ChatFormat, tokenizer: Tokenizer, name: str) -> None:
    """The dialog with tools decodes to exactly the text Meta's Hugging Face template renders."""
    case = CASES[name]
    assert tokenizer.decode(ours(chat_format, *case)) == render_hf_template(*case)


@pytest.mark.parametrize("name", list(CASES))
def test_tokens_match_hf_template(
    chat_format: ChatFormat, reference_tokenizer: Any, name: str
) -> None:
    """The dialog with tools encodes to the ids of the rendered template, special tokens parsed."""
    case = CASES[name]
    expected = reference_tokenizer.encode(
        render_hf_template(*case), bos=False, eos=False, allowed_special="all"
    )
    assert ours(chat_format, *case) == expected


def test_date_matches_template_default(chat_format: ChatFormat, tokenizer: Tokenizer) -> None:
    """today=2024-07-26 writes the template's default date string ("26 Jul 2024")."""
    case = CASES["functions_in_user_message"]
    tokens = ours(chat_format, *case, today=datetime.date(2024, 7, 26))
    assert tokenizer.decode(tokens) == render_hf_template(*case, date_string=None)


def test_prompt_text_by_hand() -> None:
    """The system and user messages for one built-in and one function, written out by hand."""
    dialog = with_tool_prompt(
        [Message(role="user", content="Time?")],
        builtin_tools=["brave_search"],
        functions=[{"name": "now", "parameters": {}}],
        today=datetime.date(2024, 12, 1),
    )
    assert dialog == [
        Message(
            role="system",
            content="Environment: ipython\nTools: brave_search\n\n"
            "Cutting Knowledge Date: December 2023\nToday Date: 01 Dec 2024\n\n",
        ),
        Message(
            role="user",
            content="Given the following functions, please respond with a JSON for a function "
            "call with its proper arguments that best answers the given prompt.\n\n"
            'Respond in the format {"name": function name, "parameters": dictionary of argument '
            "name and its value}.Do not use variables.\n\n"
            '{\n    "type": "function",\n    "function": {\n        "name": "now",\n'
            '        "parameters": {}\n    }\n}\n\nTime?',
        ),
    ]


def test_code_interpreter_alone_is_environment_only() -> None:
    """Only code_interpreter: "Environment: ipython" and no Tools line (Meta's BuiltinToolGenerator);
    the HF template would write an empty "Tools: " line, which we do not copy."""
    dialog = with_tool_prompt([QUESTION], builtin_tools=["code_interpreter"], today=TODAY)
    assert dialog == [
        Message(
            role="system",
            content="Environment: ipython\n"
            "Cutting Knowledge Date: December 2023\nToday Date: 05 Mar 2025\n\n",
        ),
        QUESTION,
    ]
    hf_text = render_hf_template([QUESTION], ["code_interpreter"], [], True)
    assert "Environment: ipython\nTools: \n\nCutting Knowledge Date" in hf_text


def test_hf_template_quotes_string_tool_results(chat_format: ChatFormat) -> None:
    """Known difference: the HF template writes a string tool result JSON-quoted (a string is
    `iterable` in Jinja); Meta's reference ChatFormat, and ours, write it as it is."""
    messages = [QUESTION, Message(role="ipython", content="21 C")]
    hf_text = render_hf_template(messages, [], [], True)
    assert '<|start_header_id|>ipython<|end_header_id|>\n\n"21 C"<|eot_id|>' in hf_text
    ours_text = chat_format.tokenizer.decode(chat_format.encode_dialog(messages).tokens)
    assert "<|start_header_id|>ipython<|end_header_id|>\n\n21 C<|eot_id|>" in ours_text


def test_no_tools_leaves_dialog_unchanged() -> None:
    """Without built-ins or functions the messages come back as they are (no date header)."""
    messages = [SYSTEM, QUESTION]
    assert with_tool_prompt(messages, today=TODAY) == messages


def test_builtin_tools_are_deduplicated_in_order() -> None:
    """Repeated built-ins are written once, in the order first given."""
    dialog = with_tool_prompt(
        [QUESTION], builtin_tools=["wolfram_alpha", "brave_search", "wolfram_alpha"], today=TODAY
    )
    assert dialog[0].content.startswith(
        "Environment: ipython\nTools: wolfram_alpha, brave_search\n\n"
    )


def test_builtin_names_are_llama31s_three() -> None:
    """The built-ins offered are the three of Meta's Llama 3.1 prompt format doc."""
    assert LLAMA31_BUILTIN_TOOLS == ("brave_search", "wolfram_alpha", "code_interpreter")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"builtin_tools": ["photogen"]}, r"unknown built-in tool 'photogen'.*as a function"),
        ({"builtin_tools": "brave_search"}, r"sequence of names.*\['brave_search'\]"),
        ({"functions": [{"description": "x"}]}, r"functions\[0\] needs a non-empty string 'name'"),
        ({"functions": [{"name": ""}]}, r"functions\[0\] needs a non-empty string 'name'"),
        ({"functions": ["get_weather"]}, r"functions\[0\] must be a mapping.*str"),
        ({"functions": [{"name": "brave_search"}]}, r"'brave_search', a built-in.*builtin_tools"),
        ({"functions": [WEATHER, {"name": "get_weather"}]}, r"functions\[1\].*used twice"),
        ({"functions": [{"name": "f", "x": object()}]}, r"functions\[0\] \('f'\).*JSON"),
    ],
    ids=[
        "unknown_builtin",
        "builtins_as_string",
        "missing_name",
        "empty_name",
        "function_not_mapping",
        "function_named_as_builtin",
        "duplicate_name",
        "not_json",
    ],
)
def test_bad_tools_rejected(kwargs: dict[str, Any], match: str) -> None:
    """Malformed tool declarations raise ValueError naming the offending entry."""
    with pytest.raises(ValueError, match=match):
        with_tool_prompt([QUESTION], today=TODAY, **kwargs)


@pytest.mark.parametrize(
    ("messages", "found"),
    [
        ([SYSTEM], "nothing"),
        ([], "nothing"),
        ([SYSTEM, Message(role="assistant", content="Hi")], "a message of role 'assistant'"),
    ],
    ids=["system_only", "empty", "assistant_first"],
)
def test_functions_in_user_message_need_a_first_user_message(
    messages: list[Message], found: str
) -> None:
    """With the functions in the first user message, a dialog that does not start with one is rejected."""
    with pytest.raises(ValueError, match=f"found {found}.*tools_in_user_message=False"):
        with_tool_prompt(messages, functions=[WEATHER], today=TODAY)


def test_functions_in_system_message_need_no_user_message() -> None:
    """With tools_in_user_message=False a dialog of only a system message is fine."""
    dialog = with_tool_prompt(
        [SYSTEM], functions=[NO_PARAMETERS], today=TODAY, tools_in_user_message=False
    )
    assert len(dialog) == 1
    assert dialog[0].content.endswith(
        '"name": "get_time"\n    }\n}\n\nYou are a helpful assistant.'
    )
