"""The OpenAI-compatible server, driven as a real process with the official `openai` client: answers
equal the offline engine's, streams equal whole answers, and bad requests get OpenAI's error
object (never a 500) while the server keeps serving."""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from llama_model import ChatFormat, Message
from llama_serve import Engine, SamplingParams
from server_process import serve, tiny_checkpoint

MODEL = "tiny"
KEY = "sk-test-key"
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name three colours."},
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("server") / "tiny")


@pytest.fixture(scope="module")
def url(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("server-log") / "server.log"
    with serve(
        checkpoint, "--served-model-name", MODEL, "--api-key", KEY, "--max-n", "4", log=log
    ) as base:
        yield base


@pytest.fixture(scope="module")
def engine(checkpoint: Path) -> Engine:
    """The offline reference: the same checkpoint in the same dtype, no server."""
    return Engine.from_pretrained(checkpoint, dtype="float32")


@pytest.fixture(scope="module")
def client(url: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120) as client:
        yield client


def _offline_chat(engine: Engine, messages: list[dict[str, Any]], max_tokens: int) -> str:
    dialog = [Message.model_validate(m) for m in messages]
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    return engine.generate([dialog], params, use_tqdm=False)[0].outputs[0].text


def _events(response: httpx.Response) -> list[Any]:
    """The `data:` payloads of a server-sent event stream, `[DONE]` as the string."""
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            payload = line.removeprefix("data: ")
            events.append(payload if payload == "[DONE]" else json.loads(payload))
        else:
            assert line == "", f"unexpected line in the stream: {line!r}"
    return events


# ---------------------------------------------------------------------------- answers


def test_models_lists_the_served_model(client: openai.OpenAI) -> None:
    """/v1/models names the model under --served-model-name."""
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_chat_greedy_equals_offline_engine_and_usage_adds_up(
    client: openai.OpenAI, engine: Engine
) -> None:
    """A greedy chat completion is the offline engine's answer to the same dialog; usage counts
    the prompt's tokens (ChatFormat's encoding) and the generated ones."""
    reply = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, temperature=0, max_tokens=24
    )
    assert reply.choices[0].message.content == _offline_chat(engine, MESSAGES, 24)
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert engine.tokenizer is not None
    dialog = [Message.model_validate(m) for m in MESSAGES]
    prompt_tokens = len(ChatFormat(engine.tokenizer).encode_dialog(dialog).tokens)
    usage = reply.usage
    assert usage is not None
    assert usage.prompt_tokens == prompt_tokens
    assert 1 <= usage.completion_tokens <= 24
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_stream_equals_whole_answer(client: openai.OpenAI, url: str) -> None:
    """The concatenated stream is the non-streamed greedy answer: a role chunk first, exactly one
    finish_reason, the usage chunk (choices: []) when asked, then data: [DONE]."""
    whole = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, temperature=0, max_tokens=32
    )
    body = {"model": MODEL, "messages": MESSAGES, "temperature": 0, "max_tokens": 32,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = _events(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == []
    assert whole.usage is not None
    assert usage_chunk["usage"] == whole.usage.model_dump(exclude_none=True)
    choice_chunks = [c["choices"][0] for c in chunks[:-1]]
    finishes = [c["finish_reason"] for c in choice_chunks if c["finish_reason"] is not None]
    assert finishes == [whole.choices[0].finish_reason]
    assert choice_chunks[-1]["finish_reason"] is not None
    text = "".join(c["delta"].get("content") or "" for c in choice_chunks)
    assert text == whole.choices[0].message.content
    assert len(choice_chunks) > 3  # it really streamed, token group by token group


def test_openai_client_stream_equals_whole_answer(client: openai.OpenAI) -> None:
    """The same through the client's own stream parser, for a text completion."""
    whole = client.completions.create(model=MODEL, prompt="Once upon", temperature=0, max_tokens=20)
    stream = client.completions.create(
        model=MODEL, prompt="Once upon", temperature=0, max_tokens=20, stream=True
    )
    pieces = list(stream)
    assert "".join(p.choices[0].text for p in pieces) == whole.choices[0].text
    assert [p.choices[0].finish_reason for p in pieces if p.choices[0].finish_reason] == [
        whole.choices[0].finish_reason
    ]


def test_completion_of_text_and_token_ids_equals_offline_engine(
    client: openai.OpenAI, engine: Engine
) -> None:
    """A text prompt is encoded with <|begin_of_text|>, as the engine does; token-id prompts are
    used as given; several prompts get their choices in order."""
    params = SamplingParams(temperature=0, max_tokens=12)
    expected = [
        o.outputs[0].text for o in engine.generate(["Hello", [1, 2, 3]], params, use_tqdm=False)
    ]
    reply = client.completions.create(model=MODEL, prompt="Hello", temperature=0, max_tokens=12)
    assert reply.choices[0].text == expected[0]
    reply = client.completions.create(
        model=MODEL, prompt=[[5, 6, 7], [1, 2, 3]], temperature=0, max_tokens=12
    )
    assert [c.index for c in reply.choices] == [0, 1]
    assert reply.choices[1].text == expected[1]


def test_n_choices_with_seed_reproduce(client: openai.OpenAI) -> None:
    """n=3 gives three choices indexed 0..2; the same seed gives the same choices again."""

    def ask() -> list[str]:
        reply = client.chat.completions.create(
            model=MODEL, messages=MESSAGES, n=3, seed=7, temperature=1.0, max_tokens=16
        )
        assert sorted(c.index for c in reply.choices) == [0, 1, 2]
        return [c.message.content or "" for c in sorted(reply.choices, key=lambda c: c.index)]

    first = ask()
    assert ask() == first
    assert len(set(first)) > 1  # three samples of a random model, not one answer three times


def test_logprobs_are_consistent(client: openai.OpenAI) -> None:
    """Chat logprobs: one entry per generated token, top_logprobs sorted and as many as asked,
    the greedy token the most likely one, the bytes the token's text; the legacy completion
    logprobs of the same tokens agree."""
    reply = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, temperature=0, max_tokens=8, logprobs=True, top_logprobs=3
    )
    choice = reply.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content is not None
    entries = choice.logprobs.content
    assert reply.usage is not None and len(entries) == reply.usage.completion_tokens
    for entry in entries:
        top = entry.top_logprobs
        assert len(top) == 3
        assert [t.logprob for t in top] == sorted((t.logprob for t in top), reverse=True)
        assert entry.token == top[0].token and math.isclose(entry.logprob, top[0].logprob)
        assert entry.logprob <= 0.0
        assert bytes(entry.bytes or []).decode("utf-8", errors="replace") == entry.token
    text = bytes(b for e in entries for b in (e.bytes or [])).decode("utf-8", errors="replace")
    assert (choice.message.content or "") in text  # the text, plus a trailing <|eot_id|> if any


def test_completion_logprobs_shape(client: openai.OpenAI) -> None:
    """Legacy logprobs: tokens, token_logprobs, the 2 most likely tokens of each position, and
    text offsets that advance by each token's text."""
    reply = client.completions.create(
        model=MODEL, prompt="The sky is", temperature=0, max_tokens=6, logprobs=2,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    logprobs = reply.choices[0].logprobs
    assert logprobs is not None and logprobs.tokens is not None
    assert logprobs.top_logprobs is not None and logprobs.token_logprobs is not None
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 6
    assert all(len(top) == 2 for top in logprobs.top_logprobs)
    offsets = [sum(len(t) for t in logprobs.tokens[:i]) for i in range(6)]
    assert logprobs.text_offset == offsets
    for token, lp, top in zip(
        logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs, strict=True
    ):
        assert math.isclose(lp, max(top.values())) and top[token] == lp


def test_streamed_logprobs_equal_whole(url: str) -> None:
    """The logprobs of a stream's chunks, joined, are the whole answer's (chat and legacy,
    text offsets included, with a stop string holding text back)."""
    headers = {"Authorization": f"Bearer {KEY}"}
    chat = {"model": MODEL, "messages": MESSAGES, "temperature": 0, "max_tokens": 12,
            "logprobs": True, "top_logprobs": 2, "ignore_eos": True}  # fmt: skip
    whole = httpx.post(f"{url}/v1/chat/completions", json=chat, headers=headers).json()
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={**chat, "stream": True},
                      headers=headers) as r:  # fmt: skip
        chunks = [e for e in _events(r)[:-1] if e["choices"]]
    streamed = [
        x
        for c in chunks
        if c["choices"][0]["logprobs"]
        for x in c["choices"][0]["logprobs"]["content"]
    ]
    assert streamed == whole["choices"][0]["logprobs"]["content"]
    text = {"model": MODEL, "prompt": "The sky is", "temperature": 0, "max_tokens": 12,
            "logprobs": 2, "ignore_eos": True, "stop": ["zzqq"]}  # fmt: skip
    whole = httpx.post(f"{url}/v1/completions", json=text, headers=headers).json()
    with httpx.stream("POST", f"{url}/v1/completions", json={**text, "stream": True},
                      headers=headers) as r:  # fmt: skip
        chunks = [e["choices"][0]["logprobs"] for e in _events(r)[:-1]]
    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert [x for c in chunks for x in c[key]] == whole["choices"][0]["logprobs"][key], key


def test_stop_string_cuts_the_text(client: openai.OpenAI, engine: Engine) -> None:
    """A stop string spanning two tokens of the greedy answer ends it there, finish_reason
    "stop", in the whole answer and in the stream alike (the stream holds back what may be the
    start of a stop string)."""
    assert engine.tokenizer is not None
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    tokens = engine.generate(["Hello"], greedy)[0].outputs[0].token_ids
    pieces = [engine.tokenizer.decode([t]) for t in tokens]
    stop = pieces[4][-2:] + pieces[5][:2]  # across the boundary of tokens 4 and 5
    text = "".join(pieces)
    expected = text[: text.index(stop)]
    body: dict[str, Any] = {"model": MODEL, "prompt": "Hello", "temperature": 0,
                            "max_tokens": 24, "stop": [stop], "extra_body": {"ignore_eos": True}}  # fmt: skip
    cut = client.completions.create(**body)
    assert cut.choices[0].text == expected
    assert cut.choices[0].finish_reason == "stop"
    stream = client.completions.create(**body, stream=True)
    assert "".join(p.choices[0].text for p in stream) == expected


def test_vllm_extras_in_the_body(client: openai.OpenAI, engine: Engine) -> None:
    """stop_token_ids, as vLLM users pass them, end a choice at that token (counted in usage,
    left out of the text, as vLLM does); top_k = 1 at temperature 1 is greedy decoding."""
    assert engine.tokenizer is not None
    greedy = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    tokens = engine.generate(["Hello"], greedy)[0].outputs[0].token_ids
    reply = client.completions.create(
        model=MODEL, prompt="Hello", temperature=0, max_tokens=10,
        extra_body={"stop_token_ids": [tokens[3]], "ignore_eos": True},
    )  # fmt: skip
    end = tokens.index(tokens[3])
    assert reply.usage is not None and reply.usage.completion_tokens == end + 1
    assert reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].text == engine.tokenizer.decode(tokens[:end])
    sampled = client.completions.create(
        model=MODEL, prompt="Hello", temperature=1.0, seed=3, max_tokens=10,
        extra_body={"top_k": 1, "ignore_eos": True},
    )  # fmt: skip
    assert sampled.choices[0].text == engine.tokenizer.decode(tokens)


def test_explicit_nulls_mean_defaults(url: str) -> None:
    """Fields sent as null (the openai client sends `"temperature": null` for temperature=None)
    take their defaults, as OpenAI reads them."""
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 3, "temperature": None,
            "top_p": None, "n": None, "stream": None, "logprobs": None, "seed": None,
            "presence_penalty": None, "stop": None}  # fmt: skip
    response = _post(url, "/v1/chat/completions", json.dumps(body))
    assert response.status_code == 200, response.text
    assert len(response.json()["choices"]) == 1


def test_async_client_concurrent_streams_equal_offline(url: str, engine: Engine) -> None:
    """64 concurrent streaming clients (AsyncOpenAI): the 56 that read to the end each get their
    offline greedy answer; the 8 that leave after two chunks leave no KV blocks in use."""
    prompts = [f"Count to {i}:" for i in range(64)]
    leaving = set(range(7, 64, 8))
    params = SamplingParams(temperature=0, max_tokens=12)
    expected = [o.outputs[0].text for o in engine.generate(prompts, params)]

    async def run() -> list[str | None]:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=300)

        async def one(i: int) -> str | None:
            max_tokens = 400 if i in leaving else 12
            stream = await client.completions.create(
                model=MODEL, prompt=prompts[i], temperature=0, max_tokens=max_tokens, stream=True,
                extra_body={"ignore_eos": i in leaving},
            )  # fmt: skip
            pieces = []
            async for piece in stream:
                pieces.append(piece.choices[0].text)
                if i in leaving and len(pieces) == 2:
                    await stream.close()  # the client goes away mid-stream
                    return None
            return "".join(pieces)

        try:
            return await asyncio.gather(*(one(i) for i in range(64)))
        finally:
            await client.close()

    answers = asyncio.run(run())
    assert [a for i, a in enumerate(answers) if i not in leaving] == [
        e for i, e in enumerate(expected) if i not in leaving
    ]
    deadline = time.monotonic() + 30
    while _metric(url, "llama_serve_kv_blocks_used") > 0:
        assert time.monotonic() < deadline, "clients that left still hold blocks"
        time.sleep(0.05)


# ---------------------------------------------------------------------------- metrics


def _metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match[1])


def test_disconnected_stream_frees_its_blocks(url: str) -> None:
    """A client that goes away mid-stream cancels its request (counted as cancelled): its KV
    blocks are freed and nothing is left running."""
    cancelled = _metric(url, "llama_serve_requests_cancelled_total")
    body = {"model": MODEL, "prompt": "Tell a long story", "max_tokens": 400, "stream": True,
            "ignore_eos": True, "temperature": 0}  # fmt: skip
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=headers) as r:
        lines = r.iter_lines()
        received = 0
        for line in lines:
            received += line.startswith("data: ")
            if received == 3:
                break
        assert _metric(url, "llama_serve_kv_blocks_used") > 0
    deadline = time.monotonic() + 30
    while _metric(url, "llama_serve_kv_blocks_used") > 0:
        assert time.monotonic() < deadline, "the disconnected request still holds blocks"
        time.sleep(0.05)
    assert _metric(url, "llama_serve_sequences_running") == 0
    assert _metric(url, "llama_serve_requests_cancelled_total") == cancelled + 1


def test_metrics_count_requests_and_tokens(client: openai.OpenAI, url: str) -> None:
    """/metrics is Prometheus text with requests by route and status, tokens and latencies."""
    before = _metric(url, "llama_serve_generation_tokens_total")
    reply = client.completions.create(model=MODEL, prompt="Hi", temperature=0, max_tokens=5)
    assert reply.usage is not None
    after = _metric(url, "llama_serve_generation_tokens_total")
    assert after - before == reply.usage.completion_tokens
    text = httpx.get(f"{url}/metrics").text
    assert 'llama_serve_requests_total{route="/v1/completions",status="200"}' in text
    assert "llama_serve_time_to_first_token_seconds_count" in text
    assert "llama_serve_kv_blocks_total" in text


# ----------------------------------------------------------------------------- errors


def _post(url: str, path: str, content: str | bytes, key: str | None = KEY) -> httpx.Response:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    return httpx.post(f"{url}{path}", content=content, headers=headers, timeout=60)


def _chat(**fields: Any) -> str:
    return json.dumps({"model": MODEL, "messages": MESSAGES, **fields})


BAD_REQUESTS = [
    # (id, path, body, key, status, words the message must contain)
    ("malformed json", "/v1/chat/completions", '{"model": "tiny", "messages": [', KEY, 400, "not valid JSON"),
    ("not an object", "/v1/chat/completions", "[1, 2]", KEY, 400, "JSON object"),
    ("wrong type", "/v1/chat/completions", _chat(max_tokens="many"), KEY, 400, "max_tokens"),
    ("unknown field", "/v1/chat/completions", _chat(max_tokenz=3), KEY, 400, "max_tokenz"),
    ("unknown model", "/v1/chat/completions", json.dumps({"model": "gpt-9", "messages": MESSAGES}), KEY, 404, "gpt-9"),
    ("negative max_tokens", "/v1/chat/completions", _chat(max_tokens=-1), KEY, 400, "max_tokens"),
    ("huge max_tokens", "/v1/chat/completions", _chat(max_tokens=10**6), KEY, 400, "512"),
    ("n too large", "/v1/chat/completions", _chat(n=5), KEY, 400, "n = 5"),
    ("top_logprobs over the limit", "/v1/chat/completions", _chat(logprobs=True, top_logprobs=21), KEY, 400, "top_logprobs"),
    ("prompt longer than the context", "/v1/completions", json.dumps({"model": MODEL, "prompt": "word " * 600}), KEY, 400, "512"),
    ("bad role", "/v1/chat/completions", json.dumps({"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}), KEY, 400, "robot"),
    ("token id out of range", "/v1/completions", json.dumps({"model": MODEL, "prompt": [1, 999999]}), KEY, 400, "999999"),
    ("missing key", "/v1/chat/completions", _chat(), None, 401, "API key"),
    ("wrong key", "/v1/chat/completions", _chat(), "sk-wrong", 401, "API key"),
    ("unknown route", "/v1/embeddings", _chat(), KEY, 404, "/v1/embeddings"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("path", "body", "key", "status", "words"),
    [case[1:] for case in BAD_REQUESTS],
    ids=[case[0] for case in BAD_REQUESTS],
)
def test_bad_request_gets_openai_error_then_server_still_serves(
    url: str, path: str, body: str, key: str | None, status: int, words: str
) -> None:
    """Each bad request is answered with its 4xx status and OpenAI's error object naming the
    problem; a good request right after it succeeds."""
    response = _post(url, path, body, key)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert words in error["message"], error["message"]
    good = _post(url, "/v1/chat/completions", _chat(max_tokens=2, temperature=0))
    assert good.status_code == 200, good.text


def test_openai_client_raises_its_own_error_types(client: openai.OpenAI) -> None:
    """The client maps our errors to its exception classes (400, 401, 404)."""
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=0)
    with pytest.raises(openai.NotFoundError, match="gpt-9"):
        client.chat.completions.create(model="gpt-9", messages=MESSAGES)
    with (
        openai.OpenAI(base_url=client.base_url, api_key="nope", max_retries=0) as bad,
        pytest.raises(openai.AuthenticationError),
    ):
        bad.models.list()


def test_health_needs_no_key(url: str) -> None:
    """/health answers 200 without a key (for load balancers)."""
    assert httpx.get(f"{url}/health").status_code == 200
