"""`/metrics`: the server's counters, gauges and latency histograms in Prometheus' text format.

Names follow Prometheus conventions (`_total` counters, `_seconds` histograms) under the prefix
`llama_serve_`; each app has its own registry, so several servers (or tests) in one process do not
share counts. Gauges of the engine's load (requests running and waiting, KV blocks in use) are read
from the backend when scraped.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from llama_serve.backend import Backend

__all__ = ["ServerMetrics"]

# Latency buckets in seconds: first tokens of a CPU engine take up to seconds, decode steps
# milliseconds.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServerMetrics:
    """The server's metrics in their own registry."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "llama_serve_requests", "HTTP requests answered, by route and status.",
            ["route", "status"], registry=r,
        )  # fmt: skip
        self.prompt_tokens = Counter(
            "llama_serve_prompt_tokens", "Prompt tokens of generation requests.", registry=r
        )
        self.generation_tokens = Counter(
            "llama_serve_generation_tokens", "Tokens generated, over all choices.", registry=r
        )
        self.guard_violations = Counter(
            "llama_serve_guard_violations",
            "Chat completions a shield refused, by shield and stage (input or output).",
            ["shield", "stage"], registry=r,
        )  # fmt: skip
        self.running = Gauge(
            "llama_serve_sequences_running", "Sequences the engine is generating.", registry=r
        )
        self.waiting = Gauge(
            "llama_serve_sequences_waiting", "Sequences queued, not yet scheduled.", registry=r
        )
        self.kv_blocks_used = Gauge(
            "llama_serve_kv_blocks_used", "KV cache blocks held by sequences.", registry=r
        )
        self.kv_blocks_total = Gauge(
            "llama_serve_kv_blocks_total", "KV cache blocks of the engine.", registry=r
        )
        self.cancelled = Counter(
            "llama_serve_requests_cancelled",
            "Generation requests stopped before they finished (the client went away, or an error).",
            registry=r,
        )
        self.in_flight = Gauge(
            "llama_serve_requests_in_flight", "Generation requests being answered.", registry=r
        )
        self.time_to_first_token = Histogram(
            "llama_serve_time_to_first_token_seconds",
            "From a request's arrival to its first generated token.",
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.time_per_output_token = Histogram(
            "llama_serve_time_per_output_token_seconds",
            "Mean time between a request's tokens after its first (per choice).",
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.request_latency = Histogram(
            "llama_serve_request_latency_seconds",
            "From a generation request's arrival to its last token.",
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip

    def render(self) -> bytes:
        """The text exposition of every metric, the engine's load read now."""
        load = self.backend.load()
        self.running.set(load.running)
        self.waiting.set(load.waiting)
        self.kv_blocks_used.set(load.kv_blocks_used)
        self.kv_blocks_total.set(load.kv_blocks_total)
        return generate_latest(self.registry)
