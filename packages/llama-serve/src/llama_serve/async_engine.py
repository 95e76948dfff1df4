"""`AsyncEngine`: an `Engine` driven from asyncio, each request streaming its outputs (for the
OpenAI-compatible server).

One background task owns the engine: between steps it admits the requests that arrived and
applies aborts, then runs `Engine.step` in a worker thread (the event loop keeps serving while the
model runs) and hands every advanced request's `RequestOutput` to that request's queue. The engine
is only touched by that task, so no lock is needed. A stream that is closed early (the client
went away, the task was cancelled) aborts its request, and its blocks are freed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass

from llama_serve.engine import Engine, Prompt
from llama_serve.params import RequestOutput, SamplingParams

__all__ = ["AsyncEngine"]


@dataclass
class _Pending:
    request_id: str
    prompt: Prompt
    params: SamplingParams
    queue: asyncio.Queue[RequestOutput | BaseException]


class AsyncEngine:
    """Stream generations of `engine` to concurrent asyncio callers."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._queues: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        self._arrivals: list[_Pending] = []
        self._aborts: list[str] = []
        self._wakeup: asyncio.Event | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._ids = itertools.count()

    async def generate(
        self, prompt: Prompt, params: SamplingParams | None = None, *, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Yield the request's state after every step that advanced it (cumulative: each output
        holds all tokens so far), the last one with `finished` set. Bad input raises ValueError or
        TypeError from the first `__anext__`, and the engine keeps serving."""
        request_id = request_id if request_id is not None else f"async-{next(self._ids)}"
        if request_id in self._queues:
            raise ValueError(f"request id {request_id!r} is already in use")
        queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._queues[request_id] = queue
        self._arrivals.append(_Pending(request_id, prompt, params or SamplingParams(), queue))
        self._wake()
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                self._aborts.append(request_id)
                self._wake()

    async def close(self) -> None:
        """Stop the background task (requests still running are aborted)."""
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
            self._loop_task = None
        for request_id in list(self._queues):
            self.engine.abort(request_id)
            self._queues.pop(request_id).put_nowait(RuntimeError("the engine was closed"))

    def _wake(self) -> None:
        if self._wakeup is None:
            self._wakeup = asyncio.Event()
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._run())
        self._wakeup.set()

    async def _run(self) -> None:
        assert self._wakeup is not None
        while True:
            self._admit()
            if not self.engine.has_unfinished_requests():
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            try:
                outputs = await asyncio.to_thread(self.engine.step)
            except Exception as error:  # fail what was running, keep serving new requests
                for request_id in list(self._queues):
                    if self.engine.abort(request_id):
                        self._queues[request_id].put_nowait(error)
                continue
            for output in outputs:
                queue = self._queues.get(output.request_id)
                if queue is not None:
                    queue.put_nowait(output)

    def _admit(self) -> None:
        """Apply aborts and admit arrivals: engine state changes only here, between steps."""
        aborts, self._aborts = self._aborts, []
        for request_id in aborts:
            self.engine.abort(request_id)
        arrivals, self._arrivals = self._arrivals, []
        for pending in arrivals:
            if pending.request_id not in self._queues:
                continue  # closed before it was admitted
            try:
                self.engine.add_request(
                    pending.prompt, pending.params, request_id=pending.request_id
                )
            except (ValueError, TypeError) as error:
                pending.queue.put_nowait(error)
