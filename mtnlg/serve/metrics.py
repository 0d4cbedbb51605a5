"""Prometheus metrics of one server (its own registry, so several servers
can live in one process, as they do in the tests)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401 - re-exported for the app

_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Metrics:
    def __init__(self, max_batch: int = 1):
        r = self.registry = CollectorRegistry()
        self.max_batch = max_batch
        self.running = Gauge("mtnlg_requests_running", "sequences holding a KV-cache slot", registry=r)
        self.waiting = Gauge("mtnlg_requests_waiting", "requests queued for a slot", registry=r)
        self.kv_usage = Gauge("mtnlg_kv_cache_usage_ratio", "fraction of KV-cache slots in use", registry=r)
        self.prompt_tokens = Counter("mtnlg_prompt_tokens", "prompt tokens run through the model", registry=r)
        self.generation_tokens = Counter("mtnlg_generation_tokens", "tokens generated", registry=r)
        self.steps = Counter("mtnlg_engine_steps", "batched forward steps", registry=r)
        self.finished_total = Counter("mtnlg_requests_finished", "requests finished, by reason", ["reason"], registry=r)
        self.rejected = Counter("mtnlg_requests_rejected", "requests refused before queueing, by reason",
                                ["reason"], registry=r)
        self.http = Counter("mtnlg_http_responses", "HTTP responses by route and status",
                            ["route", "status"], registry=r)
        self.ttft = Histogram("mtnlg_time_to_first_token_seconds", "arrival to first generated token",
                              buckets=_TTFT_BUCKETS, registry=r)
        self.latency = Histogram("mtnlg_request_latency_seconds", "arrival to finish", buckets=_LATENCY_BUCKETS,
                                 registry=r)

    # called from the engine thread (prometheus_client is thread-safe)
    def set_queue(self, running: int, waiting: int) -> None:
        self.running.set(running)
        self.waiting.set(waiting)
        self.kv_usage.set(running / self.max_batch)

    def step(self, generated: int, prompt: int) -> None:
        self.steps.inc()
        self.generation_tokens.inc(generated)
        self.prompt_tokens.inc(prompt)

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def request_done(self, reason: str, seconds: float) -> None:
        self.finished_total.labels(reason).inc()
        self.latency.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
