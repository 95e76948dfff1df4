"""How the OpenAI-compatible server answers a request: admission (key, body, limits), chat and
text completions whole or streamed, tool calls, guard shields, logprobs, and cancellation.

`llama_serve.server.build_app` wires this to its routes; everything above token ids happens here,
whichever backend generates.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llama_model import ChatFormat, Message, format_validation_error
from llama_serve.backend import Backend
from llama_serve.guard import REFUSAL, Shield
from llama_serve.metrics import ServerMetrics
from llama_serve.params import CompletionOutput, RequestOutput, SamplingParams
from llama_serve.protocol import ChatCompletionRequest, CompletionRequest, RequestError, error_body
from llama_serve.tools import may_become_tool_call, openai_messages_to_dialog, parse_tool_calls

__all__ = ["ServerConfig", "Serving"]

logger = logging.getLogger(__name__)

_T = TypeVar("_T", bound=BaseModel)


class ServerConfig(BaseModel):
    """What the server is called and whom it answers."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model_name: str = Field(min_length=1)
    """The model's name in `/v1/models` and the `model` every request must name."""
    api_key: str | None = Field(default=None, min_length=1)
    """When set, `/v1/*` requests must send `Authorization: Bearer <api_key>` (compared in
    constant time); `/health` and `/metrics` stay open."""
    max_n: int = Field(default=16, ge=1)
    """The most choices (`n`) one request may ask for."""
    max_choices: int = Field(default=64, ge=1)
    """The most choices of one text-completion request: prompts x n."""
    max_body_bytes: int = Field(default=16 * 2**20, ge=1024)
    """The largest request body; a larger one is refused (413) before it is parsed."""


@dataclass
class _ChoiceState:
    """What a stream has sent of one choice."""

    text: str = ""
    tokens: int = 0
    finished: bool = False


@dataclass
class _Job:
    """One generation request: its prompts' token ids, parameters and bookkeeping."""

    id: str
    created: int
    prompts: list[list[int]]
    params: list[SamplingParams]  # one per prompt (max_tokens defaults to what each leaves)
    arrival: float = field(default_factory=time.perf_counter)
    dialog: list[Message] | None = None  # chat only: the conversation, without a tool prompt
    tools: bool = False  # chat only: the reply may be a tool call


class Serving:
    """Answers the server's requests over one backend."""

    def __init__(
        self,
        backend: Backend,
        config: ServerConfig,
        shields: tuple[Shield, ...],
        metrics: ServerMetrics,
    ) -> None:
        self.backend, self.config, self.shields, self.metrics = backend, config, shields, metrics
        self.tokenizer = backend.tokenizer
        self.chat_format = ChatFormat(backend.tokenizer)
        self.created = int(time.time())
        self._key = config.api_key.encode() if config.api_key else None

    # ------------------------------------------------------------------------ admission

    def authorize(self, request: Request) -> None:
        if self._key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise RequestError(
                "missing API key: send the header 'Authorization: Bearer <key>'",
                status=401,
                code="invalid_api_key",
            )
        if not hmac.compare_digest(given.strip().encode(), self._key):
            raise RequestError("incorrect API key", status=401, code="invalid_api_key")

    async def parse(self, request: Request, model: type[_T]) -> _T:
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise RequestError(f"the body has {declared} bytes; the limit is {limit}", status=413)
        raw = await request.body()
        if len(raw) > limit:
            raise RequestError(f"the body has {len(raw)} bytes; the limit is {limit}", status=413)
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError) as error:  # RecursionError: absurdly deep nesting
            raise RequestError(f"the body is not valid JSON: {error}") from None
        if not isinstance(data, dict):
            raise RequestError(f"the body must be a JSON object, got {type(data).__name__}")
        try:
            body = model.model_validate(data)
        except ValidationError as error:
            first = error.errors(include_url=False)[0]
            param = ".".join(str(part) for part in first["loc"]) or None
            message = format_validation_error(error, model)
            raise RequestError(f"invalid request:\n{message}", param=param) from None
        if getattr(body, "model", None) != self.config.model_name:
            raise RequestError(
                f"the model {getattr(body, 'model', None)!r} does not exist; this server serves "
                f"{self.config.model_name!r}",
                status=404,
                param="model",
                code="model_not_found",
            )
        return body

    def _params(
        self, body: ChatCompletionRequest | CompletionRequest, prompt_len: int
    ) -> SamplingParams:
        if body.n > self.config.max_n:
            raise RequestError(
                f"n = {body.n} is more than this server allows ({self.config.max_n})", param="n"
            )
        if (
            isinstance(body, CompletionRequest)
            and len(body.prompts) * body.n > self.config.max_choices
        ):
            raise RequestError(
                f"{len(body.prompts)} prompts x n = {body.n} is more choices than this server "
                f"allows in one request ({self.config.max_choices})",
                param="prompt",
            )
        limit = self.backend.max_model_len
        requested = (
            body.max_new_tokens if isinstance(body, ChatCompletionRequest) else body.max_tokens
        )
        if prompt_len >= limit:
            raise RequestError(
                f"this model's maximum context length is {limit} tokens, but the prompt has "
                f"{prompt_len} tokens; shorten it",
                param="messages" if isinstance(body, ChatCompletionRequest) else "prompt",
                code="context_length_exceeded",
            )
        max_tokens = requested if requested is not None else limit - prompt_len
        if prompt_len + max_tokens > limit:
            raise RequestError(
                f"this model's maximum context length is {limit} tokens, but {prompt_len + max_tokens}"
                f" were requested ({prompt_len} in the prompt, {max_tokens} in the completion); "
                "shorten the prompt or lower max_tokens",
                param="max_tokens",
                code="context_length_exceeded",
            )
        logprobs = body.num_logprobs if isinstance(body, ChatCompletionRequest) else body.logprobs
        try:
            return SamplingParams(
                n=body.n,
                max_tokens=max_tokens,
                temperature=body.temperature,
                top_p=body.top_p,
                top_k=body.top_k,
                seed=body.seed,
                stop=body.stop or [],
                stop_token_ids=body.stop_token_ids,
                ignore_eos=body.ignore_eos,
                logprobs=logprobs,
                skip_special_tokens=body.skip_special_tokens,
            )
        except ValueError as error:
            raise RequestError(str(error)) from None

    def _check_tokens(self, tokens: list[int], param: str) -> None:
        vocab = self.tokenizer.vocab_size
        bad = [t for t in tokens if not 0 <= t < vocab]
        if bad:
            raise RequestError(
                f"token id {bad[0]} is outside the vocabulary [0, {vocab})", param=param
            )

    # ------------------------------------------------------------------------------ chat

    async def chat(self, request: Request, body: ChatCompletionRequest) -> Response:
        try:
            dialog, tools = openai_messages_to_dialog(body.messages, body.tools, body.tool_choice)
            plain = openai_messages_to_dialog(body.messages, None, None).dialog if tools else dialog
        except ValueError as error:
            raise RequestError(str(error), param="messages") from None
        # A long conversation is tokenized off the event loop, which keeps serving meanwhile.
        tokens = (await asyncio.to_thread(self.chat_format.encode_dialog, dialog)).tokens
        self._check_tokens(body.stop_token_ids, "stop_token_ids")
        job = _Job(
            id=f"chatcmpl-{uuid.uuid4().hex}",
            created=int(time.time()),
            prompts=[tokens],
            params=[self._params(body, len(tokens))],
            dialog=plain,
            tools=tools,
        )
        if await self._input_refused(plain):
            return self._refusal_response(job, body)
        if body.stream:
            return self._stream(self._chat_events(job, body))
        outputs = await self._until_disconnect(request, self._collect(job))
        if outputs is None:
            return Response(status_code=499)  # nobody is listening
        choices = []
        for output in outputs[0].outputs:
            message, finish_reason = await self._reply(job, output)
            logprobs = None
            if body.logprobs and finish_reason != "content_filter":  # never leak a refused reply
                logprobs = self._chat_logprobs(output, 0, body.top_logprobs or 0)
            choices.append(
                {
                    "index": output.index,
                    "message": message,
                    "logprobs": logprobs,
                    "finish_reason": finish_reason,
                }
            )
        return self._answer(job, "chat.completion", choices, _usage(outputs))

    async def _input_refused(self, dialog: list[Message]) -> bool:
        """Whether a shield refuses the conversation's last user message (judged with what came
        before it; with no user message there is nothing of the user's to judge)."""
        users = [i for i, message in enumerate(dialog) if message.role == "user"]
        if not self.shields or not users:
            return False
        return await self._refused(dialog[: users[-1] + 1], "input")

    async def _refused(self, conversation: list[Message], stage: str) -> bool:
        for shield in self.shields:
            try:
                verdict = await shield.check(conversation)
            except ValueError as error:  # e.g. longer than the guard model's context
                raise RequestError(f"the {shield.name} shield cannot judge this: {error}") from None
            if not verdict.safe:
                self.metrics.guard_violations.labels(shield=shield.name, stage=stage).inc()
                return True
        return False

    def _refusal_response(self, job: _Job, body: ChatCompletionRequest) -> Response:
        """The answer to a conversation an input shield refused: no generation."""
        usage = {"prompt_tokens": len(job.prompts[0]), "completion_tokens": 0}
        usage["total_tokens"] = usage["prompt_tokens"]
        if body.stream:

            async def events() -> AsyncIterator[dict[str, Any]]:
                for index in range(body.n):
                    yield self._chunk(job, index, {"role": "assistant", "content": ""})
                    yield self._chunk(job, index, {"content": REFUSAL}, finish="content_filter")
                if body.include_usage:
                    yield self._usage_chunk(job, usage)

            return self._stream(events())
        choices = [
            {
                "index": index,
                "message": {"role": "assistant", "content": REFUSAL},
                "logprobs": None,
                "finish_reason": "content_filter",
            }
            for index in range(body.n)
        ]
        return self._answer(job, "chat.completion", choices, usage)

    def _answer(
        self, job: _Job, kind: str, choices: list[dict[str, Any]], usage: dict[str, int]
    ) -> JSONResponse:
        """A whole (non-streamed) answer: OpenAI's `chat.completion` or `text_completion`."""
        return JSONResponse(
            {
                "id": job.id,
                "object": kind,
                "created": job.created,
                "model": self.config.model_name,
                "choices": choices,
                "usage": usage,
            }
        )

    async def _reply(self, job: _Job, output: CompletionOutput) -> tuple[dict[str, Any], str]:
        """A finished choice as an OpenAI message and its finish reason; the output shields
        judge the reply as the model wrote it, tool calls included."""
        finish = _finish_reason(output)
        reply = (
            self.chat_format.decode_assistant(output.token_ids)
            if job.tools
            else Message(role="assistant", content=output.text)
        )
        assert job.dialog is not None
        if self.shields and await self._refused([*job.dialog, reply], "output"):
            return {"role": "assistant", "content": REFUSAL}, "content_filter"
        calls = parse_tool_calls(self.tokenizer, reply) if reply.tool_calls else []
        if calls:
            return {"role": "assistant", "content": None, "tool_calls": calls}, "tool_calls"
        return {"role": "assistant", "content": output.text}, finish

    async def _chat_events(
        self, job: _Job, body: ChatCompletionRequest
    ) -> AsyncIterator[dict[str, Any]]:
        states = [_ChoiceState() for _ in range(body.n)]
        for index in range(body.n):
            yield self._chunk(job, index, {"role": "assistant", "content": ""})
        hold = _hold_chars(job.params[0])
        last: list[RequestOutput] = []
        async for outputs in self._generate(job):
            last = outputs
            for output in outputs[0].outputs:
                state = states[output.index]
                if state.finished:
                    continue
                logprobs = (
                    self._chat_logprobs(output, state.tokens, body.top_logprobs or 0)
                    if body.logprobs
                    else None
                )
                if output.finished:
                    state.finished = True
                    message, finish = await self._reply(job, output)
                    if finish == "content_filter":
                        logprobs = None  # never leak a refused reply
                    if message.get("tool_calls"):
                        delta: dict[str, Any] = {
                            "tool_calls": [
                                {"index": i, **call} for i, call in enumerate(message["tool_calls"])
                            ]
                        }
                    elif finish == "content_filter":
                        delta = {"content": REFUSAL}
                    else:
                        delta = {"content": _rest(output.text, state.text)}
                    yield self._chunk(job, output.index, delta, finish=finish, logprobs=logprobs)
                    continue
                if self.shields or (
                    job.tools and may_become_tool_call(self.tokenizer, output.token_ids)
                ):
                    continue  # shown whole once finished
                text = _stable(output.text, hold)
                if len(text) > len(state.text) and text.startswith(state.text):
                    yield self._chunk(
                        job, output.index, {"content": text[len(state.text) :]}, logprobs=logprobs
                    )
                    state.text = text
                    state.tokens = len(output.token_ids)
        if body.include_usage:
            yield self._usage_chunk(job, _usage(last))

    def _chat_logprobs(self, output: CompletionOutput, start: int, k: int) -> dict[str, Any]:
        """OpenAI's chat `logprobs` of the output's tokens from `start` on, with the `k` most
        likely tokens of each position."""
        assert output.logprobs is not None
        content = []
        for token, ranked in zip(output.token_ids[start:], output.logprobs[start:], strict=True):
            top = _top(ranked, k)
            content.append(
                {
                    **self._token_entry(token, ranked[token]),
                    "top_logprobs": [self._token_entry(t, lp) for t, lp in top],
                }
            )
        return {"content": content}

    def _piece(self, token: int) -> str:
        return self.tokenizer.token_bytes(token).decode("utf-8", errors="replace")

    def _token_entry(self, token: int, logprob: float) -> dict[str, Any]:
        piece = self.tokenizer.token_bytes(token)
        return {
            "token": piece.decode("utf-8", errors="replace"),
            "logprob": logprob,
            "bytes": list(piece),
        }

    # ----------------------------------------------------------------- text completions

    async def complete(self, request: Request, body: CompletionRequest) -> Response:
        prompts: list[list[int]] = []
        for prompt in body.prompts:
            if isinstance(prompt, str):  # off the event loop: a prompt may be long
                prompts.append(
                    await asyncio.to_thread(self.tokenizer.encode, prompt, bos=True, eos=False)
                )
            else:
                self._check_tokens(prompt, "prompt")
                prompts.append(list(prompt))
        self._check_tokens(body.stop_token_ids, "stop_token_ids")
        job = _Job(
            id=f"cmpl-{uuid.uuid4().hex}",
            created=int(time.time()),
            prompts=prompts,
            params=[self._params(body, len(p)) for p in prompts],
        )
        if body.stream:
            return self._stream(self._completion_events(job, body))
        outputs = await self._until_disconnect(request, self._collect(job))
        if outputs is None:
            return Response(status_code=499)
        choices = [
            {
                "index": prompt_index * body.n + output.index,
                "text": output.text,
                "logprobs": self._completion_logprobs(output, 0, body.logprobs)
                if body.logprobs is not None
                else None,
                "finish_reason": _finish_reason(output),
            }
            for prompt_index, result in enumerate(outputs)
            for output in result.outputs
        ]
        return self._answer(job, "text_completion", choices, _usage(outputs))

    async def _completion_events(
        self, job: _Job, body: CompletionRequest
    ) -> AsyncIterator[dict[str, Any]]:
        n = body.n
        states = [_ChoiceState() for _ in range(len(job.prompts) * n)]
        hold = _hold_chars(job.params[0])
        last: list[RequestOutput] = []
        async for outputs in self._generate(job):
            last = outputs
            for prompt_index, result in enumerate(outputs):
                for output in result.outputs:
                    index = prompt_index * n + output.index
                    state = states[index]
                    if state.finished:
                        continue
                    text = output.text if output.finished else _stable(output.text, hold)
                    if not output.finished and not (
                        len(text) > len(state.text) and text.startswith(state.text)
                    ):
                        continue
                    logprobs = (
                        self._completion_logprobs(output, state.tokens, body.logprobs)
                        if body.logprobs is not None
                        else None
                    )
                    yield {
                        "id": job.id,
                        "object": "text_completion",
                        "created": job.created,
                        "model": self.config.model_name,
                        "choices": [
                            {
                                "index": index,
                                "text": _rest(text, state.text),
                                "logprobs": logprobs,
                                "finish_reason": _finish_reason(output)
                                if output.finished
                                else None,
                            }
                        ],
                    }
                    state.text, state.tokens = text, len(output.token_ids)
                    state.finished = output.finished
        if body.include_usage:
            yield self._usage_chunk(job, _usage(last), object="text_completion")

    def _completion_logprobs(self, output: CompletionOutput, start: int, k: int) -> dict[str, Any]:
        """OpenAI's legacy `logprobs` object for the output's tokens from `start` on, with the
        `k` most likely tokens of each position."""
        assert output.logprobs is not None
        tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
        # Offsets count the tokens' own text (each decoded alone), from the first token on.
        offset = sum(len(self._piece(t)) for t in output.token_ids[:start])
        for token, ranked in zip(output.token_ids[start:], output.logprobs[start:], strict=True):
            piece = self._piece(token)
            tokens.append(piece)
            token_logprobs.append(ranked[token])
            top = _top(ranked, k)
            top_logprobs.append({self._piece(t): lp for t, lp in top})
            offsets.append(offset)
            offset += len(piece)
        return {
            "tokens": tokens,
            "token_logprobs": token_logprobs,
            "top_logprobs": top_logprobs,
            "text_offset": offsets,
        }

    # ------------------------------------------------------------------------ generation

    async def _generate(self, job: _Job) -> AsyncIterator[list[RequestOutput]]:
        """The latest output of every prompt of `job`, after each step that advanced one; the
        requests are aborted when the caller stops early."""
        prompt_count = len(job.prompts)
        latest: list[RequestOutput | None] = [None] * prompt_count
        queue: asyncio.Queue[tuple[int, RequestOutput] | BaseException | None] = asyncio.Queue()

        async def pump(index: int, tokens: list[int]) -> None:
            stream = self.backend.generate(tokens, job.params[index], f"{job.id}-{index}")
            try:
                async for output in stream:
                    queue.put_nowait((index, output))
                queue.put_nowait(None)
            except Exception as error:
                queue.put_nowait(error)
            finally:
                await stream.aclose()  # type: ignore[attr-defined]

        self.metrics.in_flight.inc()
        self.metrics.prompt_tokens.inc(sum(len(p) for p in job.prompts))
        tasks = [
            asyncio.ensure_future(pump(index, tokens)) for index, tokens in enumerate(job.prompts)
        ]
        done = 0
        first_token: float | None = None
        try:
            while done < prompt_count:
                item = await queue.get()
                if item is None:
                    done += 1
                    continue
                if isinstance(item, BaseException):
                    if isinstance(item, ValueError):
                        raise RequestError(str(item))
                    raise item
                index, output = item
                latest[index] = output
                if first_token is None and output.num_output_tokens:
                    first_token = time.perf_counter()
                    self.metrics.time_to_first_token.observe(first_token - job.arrival)
                if all(o is not None for o in latest):
                    yield [o for o in latest if o is not None]
        finally:
            for task in tasks:
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*tasks, return_exceptions=True)
            self.metrics.in_flight.dec()
            if not all(o is not None and o.finished for o in latest):
                self.metrics.cancelled.inc()  # the client went away, or generation failed
            self._observe(job, latest, first_token)

    def _observe(
        self, job: _Job, latest: list[RequestOutput | None], first_token: float | None
    ) -> None:
        end = time.perf_counter()
        generated = sum(o.num_output_tokens for o in latest if o is not None)
        self.metrics.generation_tokens.inc(generated)
        self.metrics.request_latency.observe(end - job.arrival)
        if first_token is not None:
            for result in latest:
                for output in result.outputs if result is not None else ():
                    if len(output.token_ids) > 1:
                        self.metrics.time_per_output_token.observe(
                            (end - first_token) / (len(output.token_ids) - 1)
                        )

    async def _collect(self, job: _Job) -> list[RequestOutput]:
        last: list[RequestOutput] = []
        async for outputs in self._generate(job):
            last = outputs
        return last

    async def _until_disconnect(
        self, request: Request, work: Awaitable[list[RequestOutput]]
    ) -> list[RequestOutput] | None:
        """`work`'s result, or None (and `work` cancelled) if the client went away first."""
        task = asyncio.ensure_future(work)

        async def disconnected() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        watcher = asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pending in (task, watcher):
                if not pending.done():
                    pending.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(task, watcher, return_exceptions=True)
        if task.cancelled():
            return None
        return task.result()

    # ---------------------------------------------------------------------------- stream

    def _stream(self, events: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
        async def body() -> AsyncIterator[str]:
            try:
                async for event in events:
                    yield f"data: {_json(event)}\n\n"
            except RequestError as error:
                yield f"data: {_json(error.body())}\n\n"
            except Exception as error:  # the stream has started: report in band, then end
                logger.exception("stream failed")
                yield f"data: {_json(error_body(str(error), type='server_error'))}\n\n"
            finally:
                await events.aclose()  # type: ignore[attr-defined]
            yield "data: [DONE]\n\n"

        # Under uvicorn (ASGI spec 2.3) Starlette cancels `body` when the client disconnects;
        # the cancellation closes `events`, which aborts the requests.
        return StreamingResponse(body(), media_type="text/event-stream")

    def _chunk(
        self,
        job: _Job,
        index: int,
        delta: dict[str, Any],
        *,
        finish: str | None = None,
        logprobs: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        return {
            "id": job.id,
            "object": "chat.completion.chunk",
            "created": job.created,
            "model": self.config.model_name,
            "choices": [
                {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            ],
        }

    def _usage_chunk(
        self, job: _Job, usage: dict[str, int], *, object: str = "chat.completion.chunk"
    ) -> dict[str, Any]:
        return {
            "id": job.id,
            "object": object,
            "created": job.created,
            "model": self.config.model_name,
            "choices": [],
            "usage": usage,
        }


# ----------------------------------------------------------------------------- helpers


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _usage(outputs: Sequence[RequestOutput]) -> dict[str, int]:
    """OpenAI's usage: every prompt's tokens once, every choice's generated tokens."""
    prompt = sum(o.num_prompt_tokens for o in outputs)
    completion = sum(o.num_output_tokens for o in outputs)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _finish_reason(output: CompletionOutput) -> str:
    if output.finish_reason == "error":
        raise RuntimeError(f"generation failed: {output.error}")
    return "length" if output.finish_reason == "length" else "stop"


def _top(ranked: dict[int, float], k: int) -> list[tuple[int, float]]:
    """The `k` most likely tokens of a position, best first (the engine reports them and, when
    it is not among them, the chosen token)."""
    return sorted(ranked.items(), key=lambda item: -item[1])[:k]


def _hold_chars(params: SamplingParams) -> int:
    """Characters a running choice keeps back: a stop string may still begin in them."""
    return max((len(stop) - 1 for stop in params.stop), default=0)


def _stable(text: str, hold: int) -> str:
    """The part of a running choice's text that later tokens cannot change."""
    text = text.rstrip("\ufffd")  # an incomplete UTF-8 character, completed by the next token
    return text[: len(text) - hold] if hold else text


def _rest(text: str, sent: str) -> str:
    """What remains of `text` after what a stream has sent."""
    if not text.startswith(sent):  # cannot happen with _stable; never resend what was sent
        logger.warning("a stream's sent text is not a prefix of the final text")
        return ""
    return text[len(sent) :]
