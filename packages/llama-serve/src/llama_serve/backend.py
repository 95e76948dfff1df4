"""What the OpenAI-compatible server needs from an engine: the `Backend` protocol, and
`NativeBackend`, this package's `AsyncEngine` behind it.

The server tokenizes and formats every prompt itself (`llama_model.ChatFormat`) and hands the
backend token ids, so the chat format, the tool prompt and the guards are the same whichever engine
generates (`llama_serve.vllm_backend.VllmBackend` is the other one).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from llama_model import Tokenizer
from llama_serve.async_engine import AsyncEngine
from llama_serve.engine import Engine
from llama_serve.params import RequestOutput, SamplingParams

__all__ = ["Backend", "BackendLoad", "NativeBackend"]


@dataclass(frozen=True)
class BackendLoad:
    """How busy a backend is now, for `/metrics`."""

    running: int
    """Sequences (samples) being generated."""
    waiting: int
    """Sequences queued, not yet scheduled."""
    kv_blocks_used: int
    """KV cache blocks held by requests."""
    kv_blocks_total: int
    """KV cache blocks the cache has."""


@runtime_checkable
class Backend(Protocol):
    """An engine the server drives. Outputs are this package's `RequestOutput`s."""

    tokenizer: Tokenizer
    """The Llama 3 tokenizer prompts are encoded with and the chat format uses."""
    max_model_len: int
    """The most tokens (prompt + generated) one sequence may hold."""
    eos_token_ids: frozenset[int]
    """Token ids that end a sample unless `ignore_eos`."""

    def generate(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """Stream the request's cumulative state after each step, the last with `finished` set.
        Closing the iterator early aborts the request and frees its KV blocks. Bad input raises
        ValueError from the first `__anext__`."""
        ...

    def load(self) -> BackendLoad:
        """Requests running and waiting, KV blocks in use."""
        ...

    async def close(self) -> None:
        """Abort what runs and release the engine."""
        ...


class NativeBackend:
    """This package's engine (`Engine` driven by `AsyncEngine`) as a `Backend`."""

    def __init__(self, engine: Engine) -> None:
        if engine.tokenizer is None:
            raise ValueError("the server needs an engine with a tokenizer (Llama 3's)")
        self.engine = engine
        self.tokenizer: Tokenizer = engine.tokenizer
        # The longest sequence the engine takes: its context, or what its KV cache holds if
        # that is less (a request without max_tokens gets what is left of this).
        capacity = engine.pool.num_usable * engine.config.block_size
        self.max_model_len: int = min(engine.max_model_len, capacity)
        self.eos_token_ids: frozenset[int] = engine.eos_token_ids
        self._async = AsyncEngine(engine)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str], **options: Any) -> NativeBackend:
        """`Engine.from_pretrained(path, **options)` as a backend."""
        return cls(Engine.from_pretrained(path, **options))

    def generate(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        return self._async.generate(prompt_token_ids, params, request_id=request_id)

    def load(self) -> BackendLoad:
        scheduler, pool = self.engine.scheduler, self.engine.pool
        return BackendLoad(
            running=len(scheduler.running),
            waiting=len(scheduler.waiting),
            kv_blocks_used=pool.num_usable - pool.num_free,
            kv_blocks_total=pool.num_usable,
        )

    async def close(self) -> None:
        await self._async.close()
