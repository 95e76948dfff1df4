"""What a caller asks for (`SamplingParams`) and what it gets back (`RequestOutput`).

The names and meanings follow vLLM's (`vllm.SamplingParams`, `vllm.RequestOutput`), which our users
already know; only the subset this engine implements is here, and anything it does not implement
is refused by pydantic rather than ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from llama_model import format_validation_error

__all__ = ["CompletionOutput", "FinishReason", "RequestOutput", "SamplingParams"]

_SAMPLING_EPS = 1e-5  # vLLM's: a temperature below it is greedy decoding


class SamplingParams(BaseModel):
    """How to continue one prompt: vLLM's sampling parameters, validated on construction."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    n: int = Field(default=1, ge=1)
    """How many continuations (samples) of the prompt to return. The samples share the prompt's
    KV cache blocks: the prompt is prefilled once whatever n is (§4.2.2)."""

    max_tokens: int = Field(default=16, ge=1)
    """The most tokens to generate per sample (vLLM's default, 16)."""

    temperature: float = Field(default=1.0, ge=0.0, allow_inf_nan=False)
    """Softmax temperature; 0 (or below 1e-5) is greedy decoding (argmax), which ignores top_p,
    top_k and seed."""

    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    """Nucleus sampling (Holtzman et al. 2019): sample from the smallest set of most likely tokens
    whose probability reaches top_p; 1 keeps every token."""

    top_k: int = Field(default=-1, ge=-1)
    """Sample from the k most likely tokens only; -1 or 0 keeps every token (vLLM's convention)."""

    seed: int | None = None
    """Makes sampling reproducible whatever else is batched with it: sample i of a request with
    seed s draws from a generator seeded s + i, so it equals a single-sample request with seed
    s + i (as in vLLM), and K samples can be split across calls. None: a fresh random seed."""

    stop: list[str] = Field(default_factory=list)
    """Strings that end a sample when its text contains one; the text is cut before it."""

    stop_token_ids: list[int] = Field(default_factory=list)
    """Token ids that end a sample (the token is kept in `token_ids`, not in `text`), in addition
    to the model's end-of-sequence ids unless `ignore_eos`."""

    ignore_eos: bool = False
    """Do not stop on the model's end-of-sequence ids (from `generation_config.json`, else the
    tokenizer's `<|end_of_text|>`, `<|eom_id|>`, `<|eot_id|>`); `stop_token_ids` still stop."""

    logprobs: int | None = Field(default=None, ge=0)
    """Return, for every generated token, the log-probability of the chosen token and of the
    `logprobs` most likely tokens (log-softmax of the model's logits, before temperature, top_p
    and top_k, as vLLM reports them). None: no log-probabilities."""

    skip_special_tokens: bool = True
    """Leave special tokens (`<|eot_id|>`, ...) out of `text`."""

    def __init__(self, **fields: Any) -> None:
        """Validate `fields`; a bad one raises ValueError naming it, its value and the rule."""
        try:
            super().__init__(**fields)
        except ValidationError as error:
            message = format_validation_error(error, SamplingParams)
            raise ValueError(f"invalid SamplingParams:\n{message}") from None

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop_string(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    @field_validator("stop")
    @classmethod
    def _no_empty_stop_string(cls, value: list[str]) -> list[str]:
        if "" in value:
            raise ValueError("stop strings must not be empty (an empty string would match at once)")
        return value

    @field_validator("stop_token_ids")
    @classmethod
    def _non_negative_ids(cls, value: list[int]) -> list[int]:
        bad = [token for token in value if token < 0]
        if bad:
            raise ValueError(f"stop_token_ids must be token ids (>= 0), got {bad[0]}")
        return value

    @property
    def greedy(self) -> bool:
        """Whether this is greedy decoding: temperature 0, or one so small (below vLLM's
        `_SAMPLING_EPS`, 1e-5) that dividing the logits by it would overflow."""
        return self.temperature < _SAMPLING_EPS


FinishReason = str
"""Why a sample ended: "stop" (a stop token or string), "length" (max_tokens or the model's
context), "abort" (the caller aborted the request) or "error" (see `CompletionOutput.error`)."""


@dataclass
class CompletionOutput:
    """One sample of a request: vLLM's `CompletionOutput`."""

    index: int
    """Which of the request's n samples this is (0 .. n - 1)."""
    text: str
    """The generated text, without the stop string that ended it."""
    token_ids: list[int]
    """The generated tokens, the stop token included."""
    logprobs: list[dict[int, float]] | None = None
    """Per generated token: its log-probability and those of the `SamplingParams.logprobs` most
    likely tokens, token id -> log-probability. None unless asked for."""
    finish_reason: FinishReason | None = None
    """None while the sample is running; see `FinishReason`."""
    stop_reason: int | str | None = None
    """The stop token id or stop string that ended the sample, when finish_reason is "stop"."""
    error: str | None = None
    """What went wrong, when finish_reason is "error"."""

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """A request's prompt and its samples so far (all of them once `finished`)."""

    request_id: str
    prompt: str | None
    """The prompt's text, when it was given as text (None for token ids and chat messages)."""
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    num_cached_tokens: int = 0
    """Prompt tokens whose keys and values came from the prefix cache instead of a prefill."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Times in seconds since the request arrived: "first_token" and "finished"."""

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        """Tokens generated over all samples."""
        return sum(len(output.token_ids) for output in self.outputs)
