"""Tool calls and guard shields through the server, with tiny models forced to answer given
prompts with given tokens: a tool-call round trip with the `openai` client, Llama Guard as input
and output shield (`--guard`), and a user's own shield plugged into `build_app`."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from llama_model import ChatFormat, Message, Tokenizer
from llama_serve import Engine, SamplingParams
from llama_serve.backend import NativeBackend
from llama_serve.guard import REFUSAL, RuleShield, Verdict, llama_guard_prompt
from llama_serve.server import ServerConfig, build_app, serve_in_background
from llama_serve.tools import openai_messages_to_dialog
from server_process import serve, tiny_checkpoint

Forced = Callable[[Any], Path]

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
CALL = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
ANSWER = "It is 21 C and sunny in Paris."


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.llama3()


def _prompt(tokenizer: Tokenizer, messages: list[dict[str, Any]]) -> list[int]:
    """The tokens the server sends the model for `messages` with TOOLS offered."""
    dialog, _ = openai_messages_to_dialog(messages, TOOLS, None)
    return ChatFormat(tokenizer).encode_dialog(dialog).tokens


def _text(tokenizer: Tokenizer, text: str, end: int) -> list[int]:
    return [*tokenizer.encode(text, bos=False, eos=False), end]


def test_tool_call_round_trip(
    forced_checkpoint: Forced, tokenizer: Tokenizer, tmp_path: Path
) -> None:
    """A model forced to call get_weather: the client gets OpenAI tool_calls (finish_reason
    "tool_calls", whole and streamed), sends the call and the tool's result back, and gets the
    model's answer."""
    call_id = "call_0"
    followup = [
        *QUESTION,
        {"role": "assistant", "content": None, "tool_calls": [{"id": call_id,
            "type": "function", "function": {"name": "get_weather",
            "arguments": json.dumps({"city": "Paris"})}}]},
        {"role": "tool", "tool_call_id": call_id, "content": "21 C, sunny"},
    ]  # fmt: skip
    checkpoint = forced_checkpoint(
        [
            (_prompt(tokenizer, QUESTION), _text(tokenizer, CALL, tokenizer.eom_id)),
            (_prompt(tokenizer, followup), _text(tokenizer, ANSWER, tokenizer.eot_id)),
        ]
    )
    with (
        serve(checkpoint, "--served-model-name", "forced", log=tmp_path / "log") as url,
        openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0) as client,
    ):
        reply = client.chat.completions.create(
            model="forced",
            messages=QUESTION,
            tools=TOOLS,
            temperature=0,  # type: ignore[arg-type]
        )
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content is None
        (call,) = choice.message.tool_calls or []
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name == "get_weather"
        assert json.loads(call.function.arguments) == {"city": "Paris"}

        stream = client.chat.completions.create(
            model="forced",
            messages=QUESTION,
            tools=TOOLS,
            temperature=0,
            stream=True,  # type: ignore[arg-type]
        )
        chunks = [c.choices[0] for c in stream]
        assert "".join(c.delta.content or "" for c in chunks) == ""  # the call is not text
        streamed = [t for c in chunks for t in c.delta.tool_calls or []]
        assert [(t.index, t.function and t.function.name) for t in streamed] == [(0, "get_weather")]
        assert [c.finish_reason for c in chunks if c.finish_reason] == ["tool_calls"]

        answer = client.chat.completions.create(
            model="forced",
            messages=followup,
            tools=TOOLS,
            temperature=0,  # type: ignore[arg-type]
        )
        assert answer.choices[0].message.content == ANSWER
        assert answer.choices[0].finish_reason == "stop"
        assert not answer.choices[0].message.tool_calls


def _guard_prompt(tokenizer: Tokenizer, messages: list[Message]) -> list[int]:
    text = llama_guard_prompt(messages)
    return ChatFormat(tokenizer).encode_dialog([Message(role="user", content=text)]).tokens


def test_llama_guard_shields_input_and_output(
    forced_checkpoint: Forced, tokenizer: Tokenizer, tmp_path: Path
) -> None:
    """`--guard PATH`: a user message Llama Guard calls unsafe is refused without generating; a
    reply it calls unsafe is replaced by the refusal; both with finish_reason "content_filter"
    and counted in /metrics; what it calls safe is answered as the model answers."""
    model = tiny_checkpoint(tmp_path / "model")
    engine = Engine.from_pretrained(model, dtype="float32")
    params = SamplingParams(temperature=0, max_tokens=8)
    bad = [Message(role="user", content="How do I build a weapon?")]
    refused = [Message(role="user", content="Hi")]
    fine = [Message(role="user", content="Hello there")]
    replies = {
        "refused": engine.generate([refused], params)[0].outputs[0].text,
        "fine": engine.generate([fine], params)[0].outputs[0].text,
    }
    verdicts = [
        (bad, "unsafe\nS9"),
        (refused, "safe"),
        ([*refused, Message(role="assistant", content=replies["refused"])], "unsafe\nS1"),
        (fine, "safe"),
        ([*fine, Message(role="assistant", content=replies["fine"])], "safe"),
    ]
    guard = forced_checkpoint(
        [(_guard_prompt(tokenizer, m), _text(tokenizer, v, tokenizer.eot_id)) for m, v in verdicts]
    )
    with (
        serve(
            model, "--served-model-name", "m", "--guard", str(guard), log=tmp_path / "log"
        ) as url,
        openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0) as client,
    ):

        def ask(messages: list[Message], **options: Any) -> Any:
            return client.chat.completions.create(
                model="m", messages=[m.to_hf_dict() for m in messages], temperature=0,  # type: ignore[misc]
                max_tokens=8, **options,
            )  # fmt: skip

        for messages in (bad, refused):
            choice = ask(messages).choices[0]
            assert (choice.message.content, choice.finish_reason) == (REFUSAL, "content_filter")
        choice = ask(fine).choices[0]
        assert (choice.message.content, choice.finish_reason) != (REFUSAL, "content_filter")
        assert choice.message.content == replies["fine"]
        stream = ask(bad, stream=True)
        chunks = [c.choices[0] for c in stream if c.choices]
        assert "".join(c.delta.content or "" for c in chunks) == REFUSAL
        assert [c.finish_reason for c in chunks if c.finish_reason] == ["content_filter"]
        metrics = httpx.get(f"{url}/metrics").text
        counts = dict(
            re.findall(
                r'llama_serve_guard_violations_total\{shield="llama-guard",stage="(\w+)"\} (\S+)',
                metrics,
            )
        )
        assert counts == {"input": "2.0", "output": "1.0"}  # fmt: skip


class ReplyShield:
    """A user's own shield: refuses every reply to a conversation whose user asked for it."""

    name = "reply-shield"

    async def check(self, messages: Sequence[Message]) -> Verdict:
        asked = any("refuse the reply" in m.content for m in messages if m.role == "user")
        return Verdict(safe=not (asked and messages[-1].role == "assistant"),
                       categories=("S1",) if asked and messages[-1].role == "assistant" else ())  # fmt: skip


@pytest.fixture(scope="module")
def ruled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, NativeBackend]]:
    """The tiny model behind a user's own shields (rules, and one for replies), served in a
    background thread."""
    path = tiny_checkpoint(tmp_path_factory.mktemp("ruled") / "model")
    backend = NativeBackend.from_pretrained(path, dtype="float32")
    shields = [RuleShield({"S9": [r"\bbombs?\b"]}), ReplyShield()]
    app = build_app(backend, ServerConfig(model_name="m"), shields=shields)
    with serve_in_background(app) as url:
        yield url, backend


@pytest.fixture
def client(ruled: tuple[str, NativeBackend]) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{ruled[0]}/v1", api_key="none", max_retries=0) as client:
        yield client


def test_own_shields_plug_in(client: openai.OpenAI) -> None:
    """Shields of the user's refuse what they match, input (rules) and output (a reply), and
    let the rest through; a refused reply's logprobs are not sent (they would spell it)."""
    ask = client.chat.completions.create
    choice = ask(model="m", messages=[{"role": "user", "content": "A BOMB recipe"}]).choices[0]
    assert (choice.message.content, choice.finish_reason) == (REFUSAL, "content_filter")
    choice = ask(
        model="m", messages=[{"role": "user", "content": "A bread recipe"}], max_tokens=4
    ).choices[0]
    assert choice.finish_reason in ("stop", "length") and choice.message.content != REFUSAL
    refuse = [{"role": "user", "content": "Please refuse the reply."}]
    for stream in (False, True):
        reply = ask(model="m", messages=refuse, max_tokens=4, logprobs=True, stream=stream)  # type: ignore[call-overload]
        choices = [c.choices[0] for c in reply] if stream else [reply.choices[0]]
        text = "".join((c.delta.content if stream else c.message.content) or "" for c in choices)
        assert text == REFUSAL
        assert [c.finish_reason for c in choices if c.finish_reason] == ["content_filter"]
        assert all(c.logprobs is None for c in choices)


def test_shields_judge_the_last_user_message_of_a_tool_turn(client: openai.OpenAI) -> None:
    """A conversation ending with a tool's result is judged by its last user message: refused
    when that matches a rule, answered otherwise (not a 500)."""

    def turn(question: str) -> list[dict[str, Any]]:
        return [
            {"role": "user", "content": question},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1",
                "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        ]  # fmt: skip

    ask = client.chat.completions.create
    refused = ask(model="m", messages=turn("bomb weather?"), tools=TOOLS, max_tokens=4)  # type: ignore[arg-type]
    assert refused.choices[0].finish_reason == "content_filter"
    answered = ask(model="m", messages=turn("Weather?"), tools=TOOLS, max_tokens=4)  # type: ignore[arg-type]
    assert answered.choices[0].finish_reason != "content_filter"


def _wait_until_free(backend: NativeBackend) -> None:
    pool, deadline = backend.engine.pool, time.monotonic() + 30
    while pool.num_free != pool.num_usable or backend.engine.has_unfinished_requests():
        assert time.monotonic() < deadline, "the abandoned request still holds blocks"
        time.sleep(0.01)


LONG = {"model": "m", "messages": [{"role": "user", "content": "Tell a story"}],
        "max_tokens": 480, "ignore_eos": True}  # fmt: skip


def test_held_back_stream_aborts_when_client_leaves(ruled: tuple[str, NativeBackend]) -> None:
    """With an output shield the stream is held until the reply is whole; a client that leaves
    meanwhile cancels its request: it stops long before its 480 tokens and frees its blocks."""
    url, backend = ruled
    stats, pool = backend.engine.stats, backend.engine.pool
    decoded = stats["decode_tokens"]
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={**LONG, "stream": True}) as r:
        lines = r.iter_lines()  # kept: a dropped iterator would close the connection
        assert next(lines).startswith("data: ")  # the role chunk; the text is held back
        deadline = time.monotonic() + 30
        while pool.num_free == pool.num_usable:  # wait until the request holds blocks
            assert time.monotonic() < deadline
            time.sleep(0.01)
    _wait_until_free(backend)
    assert stats["decode_tokens"] - decoded < 400  # aborted, not run to its end


def test_non_streaming_client_that_leaves_cancels(ruled: tuple[str, NativeBackend]) -> None:
    """A client that gives up on a whole (non-streamed) answer cancels the request too."""
    url, backend = ruled
    stats = backend.engine.stats
    decoded = stats["decode_tokens"]
    with (
        httpx.Client(timeout=httpx.Timeout(5.0, read=0.2)) as http,
        pytest.raises(httpx.ReadTimeout),
    ):
        http.post(f"{url}/v1/chat/completions", json=LONG)
    _wait_until_free(backend)
    assert 0 < stats["decode_tokens"] - decoded < 400
