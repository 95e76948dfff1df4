"""Tests for llama_model.chat against Meta's reference `ChatFormat` in `llama_models`."""

from __future__ import annotations

from typing import Any

import pytest
from llama_models.datatypes import RawMessage, StopReason, ToolPromptFormat
from llama_models.datatypes import ToolCall as ReferenceToolCall
from llama_models.llama3.chat_format import ChatFormat as ReferenceChatFormat
from llama_models.llama3.tool_utils import ToolUtils
from pydantic import ValidationError

from llama_model.chat import ChatFormat, EncodedDialog, Message, ToolCall
from llama_model.tokenizer import Tokenizer

SEARCH = ToolCall(name="brave_search", arguments={"query": "weather in Menlo Park"})
CODE = ToolCall(name="code_interpreter", arguments={"code": "import math\nprint(math.pi)\n"})
CUSTOM = ToolCall(
    name="get_weather",
    arguments={"city": "Zürich", "units": "metric", "days": 3, "tags": ["<a>", "b&c"]},
)

DIALOGS: dict[str, list[Message]] = {
    "single_user": [Message(role="user", content="Hello!")],
    "system_user": [
        Message(role="system", content="You are a helpful assistant."),
        Message(role="user", content="What is 2 + 2?"),
    ],
    "multi_turn": [
        Message(role="system", content="Be brief."),
        Message(role="user", content="Name a color."),
        Message(role="assistant", content="Blue."),
        Message(role="user", content="Another one?"),
        Message(role="assistant", content="Green."),
        Message(role="user", content="Thanks"),
    ],
    "search_tool_round_trip": [
        Message(role="system", content="Environment: ipython\nTools: brave_search"),
        Message(role="user", content="What's the weather?"),
        Message(role="assistant", content="", tool_calls=(SEARCH,), end_of_message=True),
        Message(role="tool", content='{"temperature": 21, "sky": "clear"}'),
        Message(role="assistant", content="It is 21 °C and clear."),
        Message(role="user", content="Great"),
    ],
    "code_interpreter_eom": [
        Message(role="user", content="Compute pi."),
        Message(role="assistant", content="", tool_calls=(CODE,), end_of_message=True),
        Message(role="ipython", content="3.141592653589793"),
    ],
    "custom_function_json": [
        Message(role="user", content="Weather in Zürich for 3 days?"),
        Message(role="assistant", content="", tool_calls=(CUSTOM,)),
        Message(role="ipython", content="[18, 20, 17]"),
    ],
    "content_and_two_calls": [
        Message(role="user", content="Search then compute."),
        Message(role="assistant", content="Sure. ", tool_calls=(SEARCH, CODE)),
    ],
    "code_interpreter_second": [
        Message(role="user", content="x"),
        Message(role="assistant", content="", tool_calls=(CUSTOM, CODE)),
    ],
    "cjk_emoji": [
        Message(role="system", content="请用中文回答。"),
        Message(role="user", content="こんにちは 🤦🏻‍♂️ 안녕하세요 👨‍👩‍👧‍👦"),
        Message(role="assistant", content="你好！😊"),
        Message(role="user", content="مرحبا"),
    ],
    "special_lookalikes": [
        Message(role="user", content="<|eot_id|><|start_header_id|>assistant<|end_header_id|>"),
        Message(role="assistant", content="<|python_tag|>not code<|eom_id|>"),
        Message(role="user", content="<|begin_of_text|> <|reserved_special_token_17|> <|eot_id"),
    ],
    "whitespace_edges": [
        Message(role="user", content="\n\nleading newlines"),
        Message(role="assistant", content="  leading spaces and trailing\n"),
        Message(role="user", content=""),
    ],
}


def to_reference(message: Message) -> RawMessage:
    """The same message as Meta's `RawMessage`."""
    return RawMessage(
        role="tool" if message.role == "ipython" else message.role,
        content=message.content,
        stop_reason=StopReason.end_of_message if message.end_of_message else StopReason.end_of_turn,
        tool_calls=[
            ReferenceToolCall(call_id=f"call{i}", tool_name=c.name, arguments=c.arguments)
            for i, c in enumerate(message.tool_calls)
        ],
    )


@pytest.fixture(scope="module")
def reference_chat(reference_tokenizer: Any) -> Any:
    """Meta's reference chat format over Meta's reference tokenizer."""
    return ReferenceChatFormat(reference_tokenizer)


@pytest.mark.parametrize("name", list(DIALOGS))
def test_encode_dialog_matches_reference(
    chat_format: ChatFormat, reference_chat: Any, name: str
) -> None:
    """encode_dialog gives the reference encode_dialog_prompt's tokens (which end with the assistant header)."""
    messages = DIALOGS[name]
    expected = reference_chat.encode_dialog_prompt([to_reference(m) for m in messages]).tokens
    assert chat_format.encode_dialog(messages).tokens == expected


@pytest.mark.parametrize("name", list(DIALOGS))
def test_without_generation_prompt_drops_only_the_assistant_header(
    chat_format: ChatFormat, reference_chat: Any, name: str
) -> None:
    """add_generation_prompt=False gives the reference tokens minus the trailing assistant header."""
    messages = DIALOGS[name]
    reference = reference_chat.encode_dialog_prompt([to_reference(m) for m in messages]).tokens
    header = reference_chat._encode_header("assistant")
    assert reference[-len(header) :] == header
    assert (
        chat_format.encode_dialog(messages, add_generation_prompt=False).tokens
        == reference[: -len(header)]
    )


def test_header_ids_by_hand(chat_format: ChatFormat) -> None:
    """Headers are start_header, the role's one token, end_header, "\\n\\n" (271), at Meta's ids."""
    assert chat_format.encode_header("assistant") == [128006, 78191, 128007, 271]
    assert chat_format.encode_header("user") == [128006, 882, 128007, 271]
    assert chat_format.encode_header("tool") == chat_format.encode_header("ipython")


def test_masks_on_a_small_dialog(chat_format: ChatFormat, tokenizer: Tokenizer) -> None:
    """Masks on user "Hi" / assistant "Hello" are the hand-computed positions."""
    hi, hello = (
        tokenizer.encode("Hi", bos=False, eos=False),
        tokenizer.encode("Hello", bos=False, eos=False),
    )
    assert len(hi) == len(hello) == 1
    dialog = chat_format.encode_dialog(
        [Message(role="user", content="Hi"), Message(role="assistant", content="Hello")],
        add_generation_prompt=False,
    )
    # bos | s u e nn | Hi | eot | s a e nn | Hello | eot
    assert dialog.tokens == [
        128000,
        128006,
        882,
        128007,
        271,
        *hi,
        128009,
        128006,
        78191,
        128007,
        271,
        *hello,
        128009,
    ]
    t, f = True, False
    assert dialog.assistant_mask == [f, f, f, f, f, f, f, f, f, f, f, t, t]
    assert dialog.format_mask == [t, t, t, t, t, f, t, t, t, t, t, f, t]
    assert dialog.dpo_mask == [f, f, f, f, f, f, f, f, f, f, f, t, f]
    assert len(dialog) == 13


def test_masks_on_code_interpreter_reply(chat_format: ChatFormat, tokenizer: Tokenizer) -> None:
    """A python_tag reply: tag, code and eom are assistant tokens; only eom is formatting."""
    code = tokenizer.encode("print(1)", bos=False, eos=False)
    message = Message(
        role="assistant",
        content="",
        tool_calls=(ToolCall(name="code_interpreter", arguments={"code": "print(1)"}),),
        end_of_message=True,
    )
    encoded = chat_format.encode_message(message)
    n = len(code)
    assert encoded.tokens == [128006, 78191, 128007, 271, 128010, *code, 128008]
    assert encoded.assistant_mask == [False] * 4 + [True] * (n + 2)
    assert encoded.format_mask == [True] * 4 + [False] * (n + 1) + [True]
    assert encoded.dpo_mask == [False] * 4 + [True] * (n + 1) + [False]


def test_generation_prompt_is_formatting_not_assistant(chat_format: ChatFormat) -> None:
    """The trailing assistant header is formatting and not assistant-produced."""
    dialog = chat_format.encode_dialog([Message(role="user", content="Hi")])
    assert dialog.tokens[-4:] == [128006, 78191, 128007, 271]
    assert dialog.format_mask[-4:] == [True] * 4
    assert dialog.assistant_mask[-4:] == [False] * 4


@pytest.mark.parametrize("call", [SEARCH, CODE, CUSTOM], ids=lambda c: c.name)
def test_tool_call_render_matches_reference(call: ToolCall) -> None:
    """ToolCall.render equals the reference's JSON-format encode_tool_call."""
    reference = ReferenceToolCall(call_id="c", tool_name=call.name, arguments=call.arguments)
    assert call.render() == ToolUtils.encode_tool_call(reference, ToolPromptFormat.json)


@pytest.mark.parametrize(
    "message",
    [
        Message(role="assistant", content="Plain answer."),
        Message(role="assistant", content="Wait for it", end_of_message=True),
        Message(role="assistant", content="", tool_calls=(CODE,), end_of_message=True),
        Message(role="assistant", content="", tool_calls=(SEARCH,), end_of_message=True),
        Message(role="assistant", content="", tool_calls=(CUSTOM,)),
    ],
    ids=["text", "text_eom", "code", "search", "custom"],
)
def test_decode_assistant_inverts_encode_message(chat_format: ChatFormat, message: Message) -> None:
    """decode_assistant of an encoded assistant message (after its header) gives the message back."""
    tokens = chat_format.encode_message(message).tokens[4:]
    assert chat_format.decode_assistant(tokens) == message


def test_decode_assistant_code_matches_reference(
    chat_format: ChatFormat, reference_chat: Any, tokenizer: Tokenizer
) -> None:
    """A python_tag reply decodes to the reference's code_interpreter call and stop reason."""
    tokens = [128010, *tokenizer.encode("x = 1\nprint(x)", bos=False, eos=False), 128008]
    reference = reference_chat.decode_assistant_message(tokens, StopReason.end_of_turn)
    ours = chat_format.decode_assistant(tokens)
    assert ours.end_of_message == (reference.stop_reason == StopReason.end_of_message)
    assert [(c.name, c.arguments) for c in ours.tool_calls] == [
        (c.tool_name.value, c.arguments) for c in reference.tool_calls
    ]


def test_decode_assistant_strips_eot_only_at_end(
    chat_format: ChatFormat, tokenizer: Tokenizer
) -> None:
    """A trailing eot is dropped; the text before it is the content."""
    tokens = [*tokenizer.encode("Done.", bos=False, eos=False), 128009]
    assert chat_format.decode_assistant(tokens) == Message(role="assistant", content="Done.")


def test_tool_role_is_stored_as_ipython() -> None:
    """Role "tool" is accepted and normalised to "ipython"."""
    assert Message(role="tool", content="42").role == "ipython"


def test_tool_calls_on_user_message_rejected() -> None:
    """A user message with tool_calls is rejected, naming the role."""
    with pytest.raises(
        ValidationError, match=r"only assistant messages may have tool_calls.*'user'"
    ):
        Message(role="user", content="x", tool_calls=(SEARCH,))


def test_end_of_message_on_system_message_rejected() -> None:
    """end_of_message on a non-assistant message is rejected, naming the role."""
    with pytest.raises(ValidationError, match=r"end_of_message.*'system'"):
        Message(role="system", content="x", end_of_message=True)


def test_unknown_message_field_rejected() -> None:
    """Messages forbid unknown fields."""
    with pytest.raises(ValidationError, match="stop_reason"):
        Message(role="user", content="x", stop_reason="end_of_turn")  # type: ignore[call-arg]


def test_unknown_role_rejected() -> None:
    """A role outside system/user/assistant/ipython/tool is rejected."""
    with pytest.raises(ValidationError, match="robot"):
        Message(role="robot", content="x")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "arguments", "missing"),
    [("brave_search", {"q": "x"}, "query"), ("code_interpreter", {"query": "x"}, "code")],
)
def test_builtin_tool_call_missing_argument_rejected(
    name: str, arguments: dict[str, Any], missing: str
) -> None:
    """A built-in tool call without its required argument is rejected, naming the argument."""
    with pytest.raises(ValidationError, match=f"{name}.*'{missing}'"):
        ToolCall(name=name, arguments=arguments)


def test_custom_tool_call_needs_json_arguments() -> None:
    """A custom call whose arguments json.dumps cannot write is rejected."""
    with pytest.raises(ValidationError, match="JSON-serialisable"):
        ToolCall(name="f", arguments={"x": object()})


def test_empty_dialog_rejected(chat_format: ChatFormat) -> None:
    """encode_dialog of no messages raises ValueError."""
    with pytest.raises(ValueError, match="at least one message"):
        chat_format.encode_dialog([])


def test_unknown_header_role_rejected(chat_format: ChatFormat) -> None:
    """encode_header of an unknown role raises ValueError naming it."""
    with pytest.raises(ValueError, match="'robot'"):
        chat_format.encode_header("robot")


def test_encoded_dialog_length_mismatch_rejected() -> None:
    """EncodedDialog with masks of another length than tokens is rejected."""
    with pytest.raises(ValueError, match=r"\(2, 1, 2\)"):
        EncodedDialog(tokens=[1, 2], assistant_mask=[True], format_mask=[False, False])


def test_hf_dict_round_trip() -> None:
    """to_hf_dict then from_hf_dict gives back every message of every dialog."""
    for name, messages in DIALOGS.items():
        for message in messages:
            assert Message.from_hf_dict(message.to_hf_dict()) == message, name


def test_hf_dict_form() -> None:
    """to_hf_dict writes OpenAI-style tool calls, role "tool" and the end_of_message key."""
    assistant = Message(role="assistant", content="", tool_calls=(SEARCH,), end_of_message=True)
    assert assistant.to_hf_dict() == {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "type": "function",
                "function": {
                    "name": "brave_search",
                    "arguments": {"query": "weather in Menlo Park"},
                },
            }
        ],
        "end_of_message": True,
    }
    assert Message(role="ipython", content="1").to_hf_dict() == {"role": "tool", "content": "1"}


def test_from_hf_dict_parses_json_string_arguments() -> None:
    """OpenAI's JSON-string tool arguments and None content are accepted."""
    message = Message.from_hf_dict(
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
            ],
        }
    )
    assert message == Message(
        role="assistant", content="", tool_calls=(ToolCall(name="f", arguments={"a": 1}),)
    )


# --- Parsing replies into tool calls (decode_assistant) ----------------------------------------

# Replies Meta's parser accepts: (text, starts with <|python_tag|>, terminator). The oracle is
# Meta's `ChatFormat.decode_assistant_message` (decode, then `decode_assistant_message_from_content`).
ORACLE_REPLIES: dict[str, tuple[str, bool, str]] = {
    "plain_eot": ("The capital of France is Paris.", False, "<|eot_id|>"),
    "plain_eom": ("Let me look that up.", False, "<|eom_id|>"),
    "json_name_parameters": (
        '{"name": "get_weather", "parameters": {"city": "Paris"}}',
        False,
        "<|eom_id|>",
    ),
    "json_type_function": (
        '{"type": "function", "name": "get_weather", "parameters": {"city": "Zürich", "days": 3}}',
        False,
        "<|eot_id|>",
    ),
    "json_nested_values": (
        '{"name": "plan", "parameters": {"stops": ["a", "b"], "opts": {"x": 1.5, "y": null}}}',
        False,
        "<|eom_id|>",
    ),
    "json_whitespace_around": (
        '\n  {"name": "get_weather", "parameters": {"city": "Paris"}}  \n',
        False,
        "<|eom_id|>",
    ),
    "python_tag_json_multiline": (
        '{\n    "type": "function",\n    "name": "trending_songs",\n    "parameters": {\n'
        '        "n": "10",\n        "genre": "all"\n    }\n}',
        True,
        "<|eom_id|>",
    ),
    "python_tag_code": (
        "def is_prime(n):\n    return n > 1 and all(n % i for i in range(2, n))\n\nprint(is_prime(7))",
        True,
        "<|eom_id|>",
    ),
    "python_tag_brave_search": (
        'brave_search.call(query="latest price of 1oz gold")',
        True,
        "<|eom_id|>",
    ),
    "python_tag_wolfram_alpha": (
        'wolfram_alpha.call(query="100th decimal of pi")',
        True,
        "<|eom_id|>",
    ),
    "bare_brave_search": ('brave_search.call(query="weather in Menlo Park")', False, "<|eom_id|>"),
    "builtin_in_json_form": (
        '{"name": "brave_search", "parameters": {"query": "Llama 3.1 release"}}',
        False,
        "<|eom_id|>",
    ),
    "builtin_in_json_form_other_key": (
        '{"name": "wolfram_alpha", "parameters": {"q": "2+2"}}',
        False,
        "<|eom_id|>",
    ),
    "json_object_not_a_call": ('{"temperature": 21, "sky": "clear"}', False, "<|eot_id|>"),
    "json_list_not_a_call": ("[1, 2, 3]", False, "<|eot_id|>"),
}


def reply_tokens(
    tokenizer: Tokenizer, text: str, *, python_tag: bool = False, end: str = ""
) -> list[int]:
    """The tokens a model would emit for `text`: optional <|python_tag|>, the text, a terminator."""
    head = [tokenizer.python_tag_id] if python_tag else []
    tail = [tokenizer.token_id(end)] if end else []
    return [*head, *tokenizer.encode(text, bos=False, eos=False), *tail]


def view(message: Message) -> tuple[str, list[tuple[str, dict[str, Any]]], bool]:
    """Content, (name, arguments) of each call, and whether the model waits for a tool result."""
    return (
        message.content,
        [(c.name, dict(c.arguments)) for c in message.tool_calls],
        message.end_of_message,
    )


def reference_view(reference: RawMessage) -> tuple[str, list[tuple[str, dict[str, Any]]], bool]:
    """The same view of Meta's decoded `RawMessage` (tool names as plain strings)."""
    return (
        reference.content,
        [
            (getattr(c.tool_name, "value", c.tool_name), dict(c.arguments))
            for c in reference.tool_calls
        ],
        reference.stop_reason == StopReason.end_of_message,
    )


@pytest.mark.parametrize("name", list(ORACLE_REPLIES))
def test_decode_assistant_matches_reference_parser(
    chat_format: ChatFormat, reference_chat: Any, tokenizer: Tokenizer, name: str
) -> None:
    """Where Meta's parser accepts a reply, decode_assistant gives its content, calls and stop reason."""
    text, python_tag, end = ORACLE_REPLIES[name]
    tokens = reply_tokens(tokenizer, text, python_tag=python_tag, end=end)
    reference = reference_chat.decode_assistant_message(tokens, StopReason.end_of_turn)
    assert view(chat_format.decode_assistant(tokens)) == reference_view(reference)


def test_reference_parser_raises_on_arguments(reference_chat: Any, tokenizer: Tokenizer) -> None:
    """Meta's parser raises KeyError on `"arguments"` (the case ours must handle)."""
    tokens = reply_tokens(tokenizer, '{"name": "get_weather", "arguments": {"city": "Paris"}}')
    with pytest.raises(KeyError, match="parameters"):
        reference_chat.decode_assistant_message(tokens, StopReason.end_of_turn)


WEATHER = ToolCall(name="get_weather", arguments={"city": "Paris"})


@pytest.mark.parametrize(
    ("text", "python_tag"),
    [
        ('{"name": "get_weather", "arguments": {"city": "Paris"}}', False),
        ('{"type": "function", "name": "get_weather", "arguments": {"city": "Paris"}}', False),
        ('{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}', False),
        ('{"name": "get_weather", "arguments": {"city": "Paris"}}', True),
        ('  {"name": "get_weather", "parameters": {"city": "Paris"}}\n', True),
    ],
    ids=["dict", "with_type", "json_string", "python_tag", "python_tag_whitespace"],
)
def test_decode_assistant_reads_arguments(
    chat_format: ChatFormat, tokenizer: Tokenizer, text: str, python_tag: bool
) -> None:
    """`"arguments"` (an object or a JSON string of one) stands for `"parameters"`, tagged or not."""
    tokens = reply_tokens(tokenizer, text, python_tag=python_tag, end="<|eom_id|>")
    assert chat_format.decode_assistant(tokens) == Message(
        role="assistant", content="", tool_calls=(WEATHER,), end_of_message=True
    )


@pytest.mark.parametrize(
    "text",
    [
        '{"name": "Bob", "age": 3}',
        '{"type": "object", "name": "get_weather", "parameters": {}}',
        '{"name": "", "parameters": {}}',
        '{"name": 5, "parameters": {}}',
        '{"name": "get_weather", "parameters": [1]}',
        '{"name": "get_weather", "arguments": "city=Paris"}',
        '{"name": "get_weather", "arguments": "[1, 2]"}',
        '{"name": "brave_search", "parameters": {}}',
        '{"name": "code_interpreter", "parameters": {"code": 5}}',
        'Searching: brave_search.call(query="x")',
        'brave_search.call(query="x") and more',
        "[" * 100_000,
    ],
    ids=[
        "no_parameters",
        "other_type",
        "empty_name",
        "non_string_name",
        "parameters_not_object",
        "arguments_not_json",
        "arguments_json_not_object",
        "builtin_without_argument",
        "code_not_string",
        "text_before_builtin",
        "text_after_builtin",
        "deep_nesting",
    ],
)
def test_decode_assistant_keeps_non_calls_as_content(
    chat_format: ChatFormat, tokenizer: Tokenizer, text: str
) -> None:
    """Text that is not exactly one well-formed call stays content, and nothing raises."""
    tokens = reply_tokens(tokenizer, text, end="<|eot_id|>")
    assert chat_format.decode_assistant(tokens) == Message(role="assistant", content=text)


def test_decode_assistant_python_tag_text_is_code(
    chat_format: ChatFormat, tokenizer: Tokenizer
) -> None:
    """After <|python_tag|>, text that is not exactly one call is code_interpreter code, verbatim."""
    code = '# brave_search.call(query="x") is only mentioned here\nprint(1)\n'
    tokens = reply_tokens(tokenizer, code, python_tag=True, end="<|eom_id|>")
    call = ToolCall(name="code_interpreter", arguments={"code": code})
    assert chat_format.decode_assistant(tokens) == Message(
        role="assistant", content="", tool_calls=(call,), end_of_message=True
    )


def test_decode_assistant_json_code_interpreter_call(
    chat_format: ChatFormat, tokenizer: Tokenizer
) -> None:
    """A JSON call to code_interpreter keeps its `code` argument (Meta's parser renames it `query`)."""
    text = '{"name": "code_interpreter", "parameters": {"code": "print(1)"}}'
    tokens = reply_tokens(tokenizer, text, python_tag=True, end="<|eom_id|>")
    call = ToolCall(name="code_interpreter", arguments={"code": "print(1)"})
    assert chat_format.decode_assistant(tokens).tool_calls == (call,)


@pytest.mark.parametrize(
    ("end", "waits"),
    [("<|eom_id|>", True), ("<|eot_id|>", False), ("<|end_of_text|>", False), ("", False)],
    ids=["eom", "eot", "end_of_text", "none"],
)
def test_decode_assistant_eom_means_waiting_for_a_tool(
    chat_format: ChatFormat, tokenizer: Tokenizer, end: str, waits: bool
) -> None:
    """Only a trailing <|eom_id|> sets end_of_message; the call parses whatever the terminator."""
    tokens = reply_tokens(
        tokenizer, '{"name": "get_weather", "parameters": {"city": "Paris"}}', end=end
    )
    assert chat_format.decode_assistant(tokens) == Message(
        role="assistant", content="", tool_calls=(WEATHER,), end_of_message=waits
    )


def test_decode_assistant_builtin_with_python_tag_reencodes_as_meta(
    chat_format: ChatFormat, reference_chat: Any, tokenizer: Tokenizer
) -> None:
    """A tagged brave_search reply decodes to the call, which re-encodes as Meta's reference writes it."""
    tokens = reply_tokens(
        tokenizer, 'brave_search.call(query="gold price")', python_tag=True, end="<|eom_id|>"
    )
    message = chat_format.decode_assistant(tokens)
    assert message.tool_calls == (ToolCall(name="brave_search", arguments={"query": "gold price"}),)
    expected = reference_chat.encode_message(to_reference(message), ToolPromptFormat.json)[0]
    assert chat_format.encode_message(message).tokens == expected


@pytest.mark.parametrize("name", list(ORACLE_REPLIES))
def test_may_be_tool_call_agrees_with_decode_assistant(
    chat_format: ChatFormat, tokenizer: Tokenizer, name: str
) -> None:
    """Every prefix of a reply that decodes to a call may be a call; a whole text reply may not."""
    text, python_tag, end = ORACLE_REPLIES[name]
    tokens = reply_tokens(tokenizer, text, python_tag=python_tag, end=end)
    if chat_format.decode_assistant(tokens).tool_calls:
        assert all(chat_format.may_be_tool_call(tokens[:n]) for n in range(len(tokens) + 1))
    elif not text.lstrip().startswith("{"):  # JSON that is not a call is only known at its end
        assert not chat_format.may_be_tool_call(tokens)
