"""The OpenAI-compatible HTTP server: `build_app(backend, ServerConfig(...))` is a FastAPI app.

Routes: `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions`, `GET /health`,
`GET /metrics`. Bodies and answers are OpenAI's (`llama_serve.protocol`), so the official `openai`
client works unchanged; streams are server-sent events (a role chunk first, text deltas as tokens
are generated, one `finish_reason` per choice, an optional usage chunk, `data: [DONE]`).

The server owns everything above token ids, whichever backend generates: OpenAI messages and
tools become a Llama 3.1 dialog (`llama_serve.tools`, then `llama_model.ChatFormat`), replies are
parsed back into tool calls, and guard shields (§5.4.7 of the Llama 3 paper, `llama_serve.guard`)
check the last user message before generation and each reply after it. A reply that may still
become a tool call, or that an output shield must see whole, is held back until it is finished.

Bad input is answered with OpenAI's error object and a 4xx status, never a 500, and the server
keeps serving. A client that goes away (a closed stream, a dropped connection while waiting)
aborts its requests, which frees their KV cache blocks.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.types import Message as ASGIMessage

from llama_serve._serving import ServerConfig, Serving
from llama_serve.backend import Backend
from llama_serve.guard import Shield
from llama_serve.metrics import ServerMetrics
from llama_serve.protocol import ChatCompletionRequest, CompletionRequest, RequestError, error_body

__all__ = ["ServerConfig", "base_url", "bind", "build_app", "serve_in_background"]

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------- the app


def build_app(backend: Backend, config: ServerConfig, *, shields: Sequence[Shield] = ()) -> FastAPI:
    """The OpenAI-compatible app over `backend`, with `shields` around chat completions.

    The backend (and every shield with a `close` method) is closed when the app shuts down.
    """
    metrics = ServerMetrics(backend)
    server = Serving(backend, config, tuple(shields), metrics)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await backend.close()
        for shield in shields:  # a model-backed shield holds an engine of its own
            close = getattr(shield, "close", None)
            if close is not None:
                await close()

    app = FastAPI(title="llama-serve", lifespan=lifespan, docs_url=None, redoc_url=None)

    app.add_middleware(_CountRequests, metrics=metrics)

    @app.exception_handler(RequestError)
    async def request_error(_: Request, error: RequestError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        message = (
            f"no route {request.method} {request.url.path}"
            if error.status_code in (404, 405)
            else str(error.detail)
        )
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
        return JSONResponse(error_body(message, code=code), status_code=error.status_code)

    @app.exception_handler(Exception)
    async def server_error(_: Request, error: Exception) -> JSONResponse:
        logger.exception("request failed")
        body = error_body(f"internal error: {type(error).__name__}: {error}", type="server_error")
        return JSONResponse(body, status_code=500)

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics_route() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        server.authorize(request)
        return {
            "object": "list",
            "data": [
                {
                    "id": config.model_name,
                    "object": "model",
                    "created": server.created,
                    "owned_by": "llama3",
                    "max_model_len": backend.max_model_len,
                }
            ],
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        server.authorize(request)
        body = await server.parse(request, ChatCompletionRequest)
        return await server.chat(request, body)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        server.authorize(request)
        body = await server.parse(request, CompletionRequest)
        return await server.complete(request, body)

    return app


def bind(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A listening socket on `host`:`port` (0: a free port; read it with
    `sock.getsockname()[1]`), for `uvicorn.Server.run(sockets=[sock])`. Clients may connect at
    once: they wait in the backlog until the server accepts."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)  # uvicorn's default backlog
    return sock


def base_url(sock: socket.socket) -> str:
    """ "http://HOST:PORT" of a bound socket (an IPv6 host in brackets)."""
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


@contextlib.contextmanager
def serve_in_background(
    app: FastAPI, *, host: str = "127.0.0.1", port: int = 0, startup_timeout: float = 60.0
) -> Iterator[str]:
    """Run `app` with uvicorn in a background thread (a notebook, a test, a demo) and yield its
    base URL, e.g. "http://127.0.0.1:54321"; the server shuts down (closing the backend) on
    exit. `port` 0 picks a free port."""
    sock = bind(host, port)
    url = base_url(sock)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="llama-serve", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise RuntimeError(f"the server did not start at {url}")
        time.sleep(0.01)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join()
        sock.close()


_ROUTES = frozenset(
    {"/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions"}
)


class _CountRequests:
    """ASGI middleware counting answered requests by route and status."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_counted(message: ASGIMessage) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        finally:
            path = scope["path"] if scope["path"] in _ROUTES else "unmatched"
            self.metrics.requests.labels(route=path, status=str(status)).inc()
