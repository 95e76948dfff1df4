"""Tests for llama_serve.tools: OpenAI messages and tools to the Llama 3.1 dialog, and replies back.

Oracles: `llama_model.with_tool_prompt` (itself checked against Meta's Hugging Face chat template)
for the prompt, and Meta's reference `ChatFormat` in `llama_models` for how a tool call and a tool
result are written back into the dialog.
"""

from __future__ import annotations

import datetime
import itertools
import json
import re
from typing import Any

import pytest
from llama_models.datatypes import RawMessage, StopReason, ToolPromptFormat
from llama_models.datatypes import ToolCall as ReferenceToolCall
from llama_models.llama3.chat_format import ChatFormat as ReferenceChatFormat
from llama_models.llama3.tokenizer import Tokenizer as ReferenceTokenizer

from llama_model import ChatFormat, Message, Tokenizer, ToolCall, with_tool_prompt
from llama_serve.tools import (
    ChatDialog,
    may_become_tool_call,
    new_call_id,
    openai_messages_to_dialog,
    parse_tool_calls,
)

TODAY = datetime.date(2025, 3, 5)
WEATHER_FUNCTION: dict[str, Any] = {
    "name": "get_weather",
    "description": "Current weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}
TIME_FUNCTION: dict[str, Any] = {"name": "get_time", "parameters": {"type": "object"}}
WEATHER = {"type": "function", "function": WEATHER_FUNCTION}
TIME = {"type": "function", "function": TIME_FUNCTION}
SEARCH = {"type": "function", "function": {"name": "brave_search", "description": "web search"}}
CODE = {"type": "function", "function": {"name": "code_interpreter"}}
REQUEST = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What's the weather in Paris?"},
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    """The real Llama 3 tokenizer."""
    return Tokenizer.llama3()


@pytest.fixture(scope="module")
def reference_chat() -> Any:
    """Meta's reference chat format over Meta's reference tokenizer."""
    return ReferenceChatFormat(ReferenceTokenizer.get_instance())


def counting_ids() -> Any:
    """A deterministic call-id maker: call_0, call_1, ..."""
    counter = itertools.count()
    return lambda: f"call_{next(counter)}"


def dialog(
    messages: list[dict[str, Any]], tools: Any = None, tool_choice: Any = None
) -> list[Message]:
    """The dialog of openai_messages_to_dialog, with the fixed test date."""
    return openai_messages_to_dialog(messages, tools, tool_choice, today=TODAY).dialog


# --- messages --------------------------------------------------------------------------------


def test_plain_messages_map_role_for_role() -> None:
    """Without tools, system/user/assistant/tool messages become the same turns, tool as ipython."""
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi", "name": "ann"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "tool", "content": "42", "tool_call_id": "call_1"},
    ]
    assert dialog(messages) == [
        Message(role="system", content="Be brief."),
        Message(role="user", content="Hi"),
        Message(role="assistant", content="Hello!"),
        Message(role="ipython", content="42"),
    ]


def test_developer_role_is_a_system_message() -> None:
    """OpenAI's "developer" role is written as Llama's system role."""
    assert dialog([{"role": "developer", "content": "Be brief."}]) == [
        Message(role="system", content="Be brief.")
    ]


@pytest.mark.parametrize(
    ("tools", "choice", "offered"),
    [
        (None, None, False),
        ([], "auto", False),
        ([WEATHER], "none", False),
        ([WEATHER], None, True),
        ([SEARCH], "auto", True),
    ],
    ids=["no_tools", "empty_tools", "choice_none", "function", "builtin"],
)
def test_tools_offered_flag(tools: Any, choice: Any, offered: bool) -> None:
    """tools_offered says whether the prompt offers any tool (so the reply is parsed for calls)."""
    out = openai_messages_to_dialog(REQUEST, tools, choice, today=TODAY)
    assert isinstance(out, ChatDialog)
    assert out.tools_offered is offered


def test_text_parts_are_joined_with_newlines() -> None:
    """Content given as text parts is their texts joined with "\\n" (vLLM's convention)."""
    parts = [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]
    assert dialog([{"role": "user", "content": parts}]) == [
        Message(role="user", content="first\nsecond")
    ]


def test_assistant_tool_calls_are_parsed_and_wait_for_a_result() -> None:
    """Assistant tool_calls with JSON-string arguments become ToolCalls ending in <|eom_id|>."""
    messages = [
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_9",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
    ]
    assert dialog(messages)[1] == Message(
        role="assistant",
        content="",
        tool_calls=(ToolCall(name="get_weather", arguments={"city": "Paris"}),),
        end_of_message=True,
    )


def test_empty_argument_string_means_no_arguments() -> None:
    """`"arguments": ""` (some clients send it for argument-less calls) reads as {}."""
    call = {"type": "function", "function": {"name": "get_time", "arguments": ""}}
    message = dialog([{"role": "assistant", "content": "", "tool_calls": [call]}])[0]
    assert message.tool_calls == (ToolCall(name="get_time", arguments={}),)


# --- the tools prompt ------------------------------------------------------------------------


def test_functions_are_offered_through_with_tool_prompt() -> None:
    """Custom functions give exactly with_tool_prompt's dialog (functions in the first user message)."""
    expected = with_tool_prompt(
        [
            Message(role="system", content=REQUEST[0]["content"]),
            Message(role="user", content=REQUEST[1]["content"]),
        ],
        functions=[WEATHER_FUNCTION, TIME_FUNCTION],
        today=TODAY,
    )
    assert dialog(REQUEST, [WEATHER, TIME]) == expected
    assert expected[0].content.startswith("Environment: ipython\nCutting Knowledge Date")
    assert '"name": "get_weather"' in expected[1].content


def test_tools_in_system_message_option() -> None:
    """tools_in_user_message=False puts the functions in the system message instead."""
    out = openai_messages_to_dialog(
        REQUEST, [WEATHER], today=TODAY, tools_in_user_message=False
    ).dialog
    assert '"name": "get_weather"' in out[0].content
    assert out[1] == Message(role="user", content="What's the weather in Paris?")


def test_builtin_named_functions_are_declared_the_builtin_way() -> None:
    """brave_search is listed on the Tools line, not as JSON; code_interpreter only turns on ipython."""
    out = dialog(REQUEST, [SEARCH, CODE, WEATHER])
    assert out == with_tool_prompt(
        [
            Message(role="system", content=REQUEST[0]["content"]),
            Message(role="user", content=REQUEST[1]["content"]),
        ],
        builtin_tools=["brave_search", "code_interpreter"],
        functions=[WEATHER_FUNCTION],
        today=TODAY,
    )
    assert out[0].content.startswith("Environment: ipython\nTools: brave_search\n\n")
    assert "brave_search" not in out[1].content


def test_only_builtins_leaves_user_message_alone() -> None:
    """With only built-ins offered, the user's message is not rewritten."""
    out = dialog(REQUEST, [SEARCH])
    assert out[1] == Message(role="user", content="What's the weather in Paris?")


def test_default_date_is_today() -> None:
    """Without `today`, the prompt carries today's date."""
    out = openai_messages_to_dialog(REQUEST, [SEARCH]).dialog
    assert f"Today Date: {datetime.date.today():%d} " in out[0].content


@pytest.mark.parametrize("choice", [None, "auto"])
def test_tool_choice_auto_offers_every_tool(choice: Any) -> None:
    """tool_choice None or "auto" offers all the tools."""
    assert dialog(REQUEST, [WEATHER, SEARCH], choice) == dialog(REQUEST, [WEATHER, SEARCH])
    assert "Tools: brave_search" in dialog(REQUEST, [WEATHER, SEARCH], choice)[0].content


def test_tool_choice_none_offers_nothing() -> None:
    """tool_choice "none" leaves the prompt without tools."""
    assert dialog(REQUEST, [WEATHER, SEARCH], "none") == dialog(REQUEST)


def test_tool_choice_named_offers_only_that_function() -> None:
    """A named function is the only one offered."""
    named = {"type": "function", "function": {"name": "get_time"}}
    assert dialog(REQUEST, [WEATHER, TIME, SEARCH], named) == dialog(REQUEST, [TIME])


def test_no_tools_and_no_choice_is_plain() -> None:
    """An empty tools list is the same as none."""
    assert dialog(REQUEST, []) == dialog(REQUEST)


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([{"role": "robot", "content": "x"}], r"messages\[0\]\.role is 'robot'"),
        ([{"content": "x"}], r"messages\[0\]\.role is None"),
        (["hello"], r"messages\[0\] must be an object"),
        (
            [{"role": "tool", "tool_call_id": "c"}],
            r"messages\[0\]\.content is missing.*tool's result",
        ),
        ([{"role": "user", "content": None}], r"messages\[0\]\.content is missing"),
        ([{"role": "assistant", "content": None}], r"messages\[0\]: an assistant message needs"),
        ([{"role": "user", "content": 5}], r"messages\[0\]\.content must be a string or a list"),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
            r"messages\[0\]\.content\[0\] has type 'image_url'",
        ),
        (
            [{"role": "user", "content": [{"type": "text", "text": 3}]}],
            r"messages\[0\]\.content\[0\]\.text must be a string",
        ),
        (
            [{"role": "user", "content": "x", "tool_calls": [{"function": {"name": "f"}}]}],
            r"messages\[0\]: only assistant messages may have tool_calls",
        ),
        ([], r"at least one message"),
    ],
    ids=[
        "unknown_role",
        "no_role",
        "not_an_object",
        "tool_without_content",
        "user_content_null",
        "assistant_empty",
        "content_not_text",
        "image_part",
        "text_part_not_string",
        "tool_calls_on_user",
        "no_messages",
    ],
)
def test_malformed_messages_rejected(messages: list[Any], match: str) -> None:
    """Malformed messages raise ValueError naming the offending field."""
    with pytest.raises(ValueError, match=match):
        dialog(messages)


def assistant_call(function: Any, **extra: Any) -> list[dict[str, Any]]:
    """A dialog of one assistant message making one call."""
    return [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"type": "function", "function": function, **extra}],
        }
    ]


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        (
            assistant_call({"name": "f", "arguments": "{city: Paris}"}),
            r"messages\[0\]\.tool_calls\[0\]\.function\.arguments is not valid JSON.*'\{city: Paris\}'",
        ),
        (
            assistant_call({"name": "f", "arguments": "[1, 2]"}),
            r"tool_calls\[0\]\.function\.arguments must be a JSON object, got list",
        ),
        (
            assistant_call({"arguments": "{}"}),
            r"tool_calls\[0\]\.function\.name must be a non-empty",
        ),
        (
            assistant_call({"name": "brave_search", "arguments": '{"q": "x"}'}),
            r"tool_calls\[0\]\.function: tool call 'brave_search' needs the argument 'query'",
        ),
        (assistant_call("f"), r"tool_calls\[0\]\.function must be an object"),
        (
            [{"role": "assistant", "content": None, "tool_calls": [{"type": "retrieval"}]}],
            r"tool_calls\[0\]\.type is 'retrieval'",
        ),
        (
            [{"role": "assistant", "content": None, "tool_calls": {"id": "x"}}],
            r"messages\[0\]\.tool_calls must be a list",
        ),
    ],
    ids=[
        "arguments_not_json",
        "arguments_not_object",
        "no_name",
        "builtin_missing_query",
        "function_not_object",
        "not_a_function_call",
        "tool_calls_not_list",
    ],
)
def test_malformed_tool_calls_rejected(messages: list[Any], match: str) -> None:
    """Malformed assistant tool_calls raise ValueError naming the field and the value."""
    with pytest.raises(ValueError, match=match):
        dialog(messages)


@pytest.mark.parametrize(
    ("tools", "choice", "match"),
    [
        ([WEATHER], "required", r"'required' is not supported.*constrained decoding"),
        (None, "required", r"'required' is not supported"),
        ([WEATHER], {"type": "function", "function": {"name": "nope"}}, r"'nope'.*'get_weather'"),
        (None, {"type": "function", "function": {"name": "nope"}}, r"'nope'.*\(no tools\)"),
        ([WEATHER], {"type": "function"}, r"tool_choice must be 'none', 'auto' or"),
        ([WEATHER], "always", r"tool_choice must be .*'always'"),
        ([{"type": "retrieval"}], None, r"tools\[0\]\.type is 'retrieval'"),
        ([{"type": "function"}], None, r"tools\[0\]\.function must be an object"),
        (
            [{"type": "function", "function": {"description": "x"}}],
            None,
            r"tools\[0\]\.function\.name",
        ),
        ([WEATHER, WEATHER], None, r"tools\[1\]\.function\.name 'get_weather' is declared twice"),
        (
            [{"type": "function", "function": {"name": "f", "parameters": "x"}}],
            None,
            r"tools\[0\]\.function\.parameters must be a JSON schema object, got str",
        ),
        (WEATHER, None, r"tools must be a list, got dict"),
    ],
    ids=[
        "required",
        "required_without_tools",
        "named_unknown",
        "named_without_tools",
        "named_malformed",
        "unknown_choice",
        "tool_not_function",
        "tool_without_function",
        "function_without_name",
        "duplicate_function",
        "parameters_not_schema",
        "tools_not_list",
    ],
)
def test_malformed_tools_rejected(tools: Any, choice: Any, match: str) -> None:
    """Bad tools or tool_choice raise ValueError naming the field."""
    with pytest.raises(ValueError, match=match):
        dialog(REQUEST, tools, choice)


def test_functions_need_a_leading_user_message() -> None:
    """Functions go in the first user message, so a request that does not start with one is refused."""
    with pytest.raises(ValueError, match=r"first user message.*tools_in_user_message=False"):
        dialog([{"role": "system", "content": "x"}], [WEATHER])


# --- parsing replies -------------------------------------------------------------------------


def reply(
    tokenizer: Tokenizer, text: str, *, python_tag: bool = False, end: str = "<|eom_id|>"
) -> list[int]:
    """The tokens of a model reply: optional <|python_tag|>, the text, a terminator."""
    head = [tokenizer.python_tag_id] if python_tag else []
    tail = [tokenizer.token_id(end)] if end else []
    return [*head, *tokenizer.encode(text, bos=False, eos=False), *tail]


def test_parse_json_call_from_tokens(tokenizer: Tokenizer) -> None:
    """A JSON call becomes one OpenAI tool call with JSON-string arguments."""
    tokens = reply(tokenizer, '{"name": "get_weather", "parameters": {"city": "Paris"}}')
    assert parse_tool_calls(tokenizer, tokens, call_id=counting_ids()) == [
        {
            "id": "call_0",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
        }
    ]


@pytest.mark.parametrize(
    ("text", "python_tag", "name", "arguments"),
    [
        (
            '{"name": "get_weather", "arguments": {"city": "Zürich"}}',
            False,
            "get_weather",
            {"city": "Zürich"},
        ),
        ('brave_search.call(query="gold price")', True, "brave_search", {"query": "gold price"}),
        ('wolfram_alpha.call(query="2+2")', False, "wolfram_alpha", {"query": "2+2"}),
        ("print(1 + 1)", True, "code_interpreter", {"code": "print(1 + 1)"}),
    ],
    ids=["arguments_key", "brave_search", "wolfram_alpha", "code_interpreter"],
)
def test_parse_each_call_form(
    tokenizer: Tokenizer, text: str, python_tag: bool, name: str, arguments: dict[str, Any]
) -> None:
    """JSON ("arguments" too), built-in and python_tag code replies come out as named calls."""
    (call,) = parse_tool_calls(tokenizer, reply(tokenizer, text, python_tag=python_tag))
    assert call["function"]["name"] == name
    assert json.loads(call["function"]["arguments"]) == arguments


@pytest.mark.parametrize(
    "text", ["It is sunny.", '{"temperature": 21}', 'I would call brave_search.call(query="x")']
)
def test_parse_text_reply_has_no_calls(tokenizer: Tokenizer, text: str) -> None:
    """Text, JSON that is not a call, and a call inside prose give no tool calls."""
    assert parse_tool_calls(tokenizer, reply(tokenizer, text, end="<|eot_id|>")) == []


def test_parse_decoded_message(tokenizer: Tokenizer) -> None:
    """A decoded Message is taken as it is; each call gets its own id."""
    message = Message(
        role="assistant",
        content="",
        tool_calls=(
            ToolCall(name="get_time", arguments={}),
            ToolCall(name="get_weather", arguments={"city": "Oslo"}),
        ),
    )
    calls = parse_tool_calls(tokenizer, message, call_id=counting_ids())
    assert [(c["id"], c["function"]["arguments"]) for c in calls] == [
        ("call_0", "{}"),
        ("call_1", '{"city": "Oslo"}'),
    ]


def test_parse_non_assistant_message_rejected(tokenizer: Tokenizer) -> None:
    """Only assistant messages are replies."""
    with pytest.raises(ValueError, match="role is 'user'"):
        parse_tool_calls(tokenizer, Message(role="user", content="x"))


def test_new_call_id_form() -> None:
    """Call ids look like OpenAI's ("call_" and 24 hex digits) and differ each time."""
    first, second = new_call_id(), new_call_id()
    assert re.fullmatch(r"call_[0-9a-f]{24}", first)
    assert first != second


@pytest.mark.parametrize(
    ("text", "python_tag", "may"),
    [
        ("", False, True),
        ("  \n", False, True),
        ('{"na', False, True),
        (' {"name": "get_weather", "parameters": {"ci', False, True),
        ("brave_se", False, True),
        ('wolfram_alpha.call(query="2', False, True),
        ("anything at all", True, True),
        ("The", False, False),
        ("Sure! {", False, False),
        ("brave_searching", False, False),
    ],
    ids=[
        "nothing_yet",
        "whitespace",
        "json_start",
        "json_half",
        "builtin_name_half",
        "builtin_call_half",
        "python_tag",
        "word",
        "text_before_json",
        "other_word",
    ],
)
def test_may_become_tool_call(tokenizer: Tokenizer, text: str, python_tag: bool, may: bool) -> None:
    """A partial reply may become a call until its text rules out every call form."""
    tokens = reply(tokenizer, text, python_tag=python_tag, end="")
    assert may_become_tool_call(tokenizer, tokens) is may


def test_may_become_tool_call_agrees_with_the_parser(tokenizer: Tokenizer) -> None:
    """Every prefix of a reply that parses as a call is reported as possibly a call."""
    for text in ['{"name": "f", "parameters": {}}', 'wolfram_alpha.call(query="2+2")']:
        tokens = reply(tokenizer, text, end="<|eom_id|>")
        assert parse_tool_calls(tokenizer, tokens)
        assert all(may_become_tool_call(tokenizer, tokens[:n]) for n in range(len(tokens)))


# --- the whole round trip ----------------------------------------------------------------------


def test_round_trip(tokenizer: Tokenizer, reference_chat: Any) -> None:
    """Request with tools -> prompt -> model's JSON call -> OpenAI tool_calls -> tool result -> next
    prompt: the call is re-encoded as Meta's reference writes it, the result as an ipython turn."""
    chat_format = ChatFormat(tokenizer)
    first_dialog, offered = openai_messages_to_dialog(REQUEST, [WEATHER], today=TODAY)
    assert offered
    first = chat_format.encode_dialog(first_dialog).tokens

    answer = reply(tokenizer, '{"name": "get_weather", "parameters": {"city": "Paris"}}')
    calls = parse_tool_calls(tokenizer, answer, call_id=counting_ids())

    follow_up = [
        *REQUEST,
        {"role": "assistant", "content": None, "tool_calls": calls},
        {"role": "tool", "tool_call_id": calls[0]["id"], "content": '{"temperature": 18}'},
    ]
    second = chat_format.encode_dialog(dialog(follow_up, [WEATHER])).tokens

    # The earlier prompt is a prefix (its generation header opens the assistant turn) ...
    assert second[: len(first)] == first
    # ... followed by exactly what Meta's reference writes for the call and the result.
    call = ReferenceToolCall(call_id="call_0", tool_name="get_weather", arguments={"city": "Paris"})
    assistant = RawMessage(
        role="assistant", content="", stop_reason=StopReason.end_of_message, tool_calls=[call]
    )
    result = RawMessage(role="tool", content='{"temperature": 18}')
    tail = [
        *reference_chat.encode_message(assistant, ToolPromptFormat.json)[0][4:],
        *reference_chat.encode_message(result, ToolPromptFormat.json)[0],
        *reference_chat._encode_header("assistant"),
    ]
    assert second[len(first) :] == tail
    assert tokenizer.decode(second[len(first) :]) == (
        '{"type": "function", "name": "get_weather", "parameters": {"city": "Paris"}}<|eom_id|>'
        '<|start_header_id|>ipython<|end_header_id|>\n\n{"temperature": 18}<|eot_id|>'
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
