"""The OpenAI API's request bodies, as the server accepts them, and its error shape.

Fields and limits follow OpenAI's API reference for `/v1/chat/completions` and `/v1/completions`
(which the official `openai` client sends), plus the extras vLLM users pass in the body
(`top_k`, `stop_token_ids`, `ignore_eos`, `skip_special_tokens`). A field OpenAI defines but this
server does not implement (penalties, logit bias, `best_of`, `echo`, `suffix`, JSON response
formats) is refused with a 400 naming it unless it holds its no-op value; an unknown field is
refused too, so a typo never silently changes nothing.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "MAX_COMPLETION_LOGPROBS",
    "MAX_TOP_LOGPROBS",
    "ChatCompletionRequest",
    "CompletionRequest",
    "RequestError",
    "StreamOptions",
    "error_body",
]

MAX_TOP_LOGPROBS = 20
"""OpenAI's limit on `top_logprobs` of a chat completion."""
MAX_COMPLETION_LOGPROBS = 5
"""OpenAI's limit on `logprobs` of a (legacy) text completion."""


class RequestError(Exception):
    """A request the server refuses: becomes `{"error": {...}}` with `status`."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.type = (
            message,
            status,
            param,
            code,
            type,
        )

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(
    message: str,
    *,
    type: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    """OpenAI's error object: `{"error": {"message", "type", "param", "code"}}`."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class StreamOptions(BaseModel):
    """`stream_options`: what a stream carries besides the choices."""

    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False
    """Send a last chunk with `usage` and `choices: []` before `data: [DONE]`."""
    include_obfuscation: bool | None = None
    """OpenAI pads stream chunks against side channels when true; accepted, not done here."""

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        return _drop_nulls(data)


def _drop_nulls(data: Any) -> Any:
    """An explicit null means "the default", as OpenAI reads it (the `openai` client sends
    `"temperature": null` when a caller passes `temperature=None`)."""
    if isinstance(data, dict):
        return {key: value for key, value in data.items() if value is not None}
    return data


class _Request(BaseModel):
    """The fields chat and text completions share."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        return _drop_nulls(data)

    model: str
    """The served model's name (`GET /v1/models`)."""
    max_tokens: int | None = Field(default=None, ge=1)
    """The most tokens to generate per choice; default: what the context leaves after the
    prompt."""
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    """Sampling temperature (OpenAI's range 0-2); 0 is greedy."""
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    """Nucleus sampling: keep the most likely tokens whose probability reaches top_p."""
    n: int = Field(default=1, ge=1)
    """Choices to generate for the prompt (they share its KV cache)."""
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 2**16)
    """Makes sampling reproducible (choice i draws with seed + i)."""
    stop: str | list[str] | None = None
    """Up to 4 strings that end a choice; the text is cut before them."""
    stream: bool = False
    """Send server-sent events as tokens are generated."""
    stream_options: StreamOptions | None = None
    """Options of a stream (only with `stream: true`)."""
    user: str | None = None
    """An end-user id (accepted, not used)."""
    presence_penalty: float = 0.0
    """Not implemented: only 0 is accepted."""
    frequency_penalty: float = 0.0
    """Not implemented: only 0 is accepted."""
    logit_bias: dict[str, float] | None = None
    """Not implemented: only an empty map is accepted."""
    # vLLM's extras, which its users pass in the body (`extra_body` of the openai client).
    top_k: int = Field(default=-1, ge=-1)
    """Sample from the k most likely tokens only; -1 or 0 keeps every token (vLLM extra)."""
    stop_token_ids: list[int] = Field(default_factory=list, max_length=64)
    """Token ids that end a choice, besides the model's end-of-turn ids (vLLM extra)."""
    ignore_eos: bool = False
    """Keep generating past the model's end-of-turn ids (vLLM extra)."""
    skip_special_tokens: bool = True
    """Leave special tokens out of the text (vLLM extra)."""

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> list[str] | None:
        stops = [value] if isinstance(value, str) else value
        if stops is not None and len(stops) > 4:
            raise ValueError(f"at most 4 stop sequences are allowed, got {len(stops)}")
        if stops is not None and "" in stops:
            raise ValueError("stop sequences must not be empty")
        return stops

    @model_validator(mode="after")
    def _check_unsupported(self) -> _Request:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) != 0.0:
                raise ValueError(f"{name} is not supported by this server; leave it at 0")
        if self.logit_bias:
            raise ValueError("logit_bias is not supported by this server; leave it out")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        return self

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionRequest(_Request):
    """`POST /v1/chat/completions`."""

    messages: list[dict[str, Any]] = Field(min_length=1)
    """The conversation: OpenAI chat messages (roles system, developer, user, assistant,
    tool)."""
    max_completion_tokens: int | None = Field(default=None, ge=1)
    """OpenAI's newer name for max_tokens (the two must agree when both are given)."""
    logprobs: bool = False
    """Return the log-probability of each generated token."""
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    """With `logprobs`: also the `top_logprobs` most likely tokens at each position (0-20)."""
    tools: list[dict[str, Any]] | None = None
    """Functions the model may call: `{"type": "function", "function": {"name", "description",
    "parameters"}}` (Llama 3.1's JSON tool format; brave_search and wolfram_alpha are its
    built-ins)."""
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    """"auto" (default with tools), "none", or one named function."""
    parallel_tool_calls: bool | None = None
    """Accepted; Llama 3.1 makes one tool call per turn."""
    response_format: dict[str, Any] | None = None
    """Only `{"type": "text"}` is supported."""

    @model_validator(mode="after")
    def _check_chat(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if (
            self.max_tokens is not None
            and self.max_completion_tokens is not None
            and self.max_tokens != self.max_completion_tokens
        ):
            raise ValueError(
                f"max_tokens ({self.max_tokens}) and max_completion_tokens "
                f"({self.max_completion_tokens}) disagree; give one of them"
            )
        if self.response_format not in (None, {"type": "text"}):
            raise ValueError(
                f'response_format {self.response_format} is not supported; only {{"type": "text"}}'
            )
        return self

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Request):
    """`POST /v1/completions` (OpenAI's legacy text completions)."""

    prompt: str | list[str] | list[int] | list[list[int]]
    """The text to continue: a string, token ids, or a list of either (one set of choices per
    prompt)."""
    max_tokens: int | None = Field(default=16, ge=1)
    """The most tokens to generate per choice (OpenAI's default for completions: 16)."""
    logprobs: int | None = Field(default=None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    """Return the log-probabilities of the `logprobs` most likely tokens at each position
    (0-5)."""
    echo: bool = False
    """Not implemented: only false is accepted."""
    best_of: int | None = None
    """Not implemented: only 1 (or n) is accepted."""
    suffix: str | None = None
    """Not implemented."""

    @model_validator(mode="after")
    def _check_completion(self) -> CompletionRequest:
        if self.echo:
            raise ValueError("echo is not supported by this server")
        if self.best_of not in (None, 1, self.n):
            raise ValueError("best_of is not supported by this server; leave it out")
        if self.suffix:
            raise ValueError("suffix is not supported by this server")
        prompts = self.prompts
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("prompt must not be empty")
        return self

    @property
    def prompts(self) -> list[str | list[int]]:
        """The prompts, one per set of choices."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if prompt and all(isinstance(p, int) for p in prompt):
            return [list(prompt)]  # type: ignore[arg-type]
        return list(prompt)  # type: ignore[arg-type]
