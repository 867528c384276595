"""The server's /metrics, in Prometheus' text format (prometheus_client, one registry per app).

Read at scrape time from the engine: queue length, running requests, KV cache slots in use and in all, tokens
generated and prefilled (counters), generated tokens per second over the last 10 s. Observed as requests end:
requests by finish reason, time waiting for a slot, time to first token and time per output token (histograms,
so p50/p95 come from `histogram_quantile`), and requests refused with 429.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .inference.engine import Engine, Timing

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
PER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class EngineCollector:
    """The engine's state, read when Prometheus scrapes."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def collect(self):
        engine = self.engine
        gauges = [("argonne_queue_length", "Requests waiting to be admitted", engine.queue_length),
                  ("argonne_running_requests", "Sequences admitted (prefilling or decoding)", engine.active),
                  ("argonne_kv_cache_slots", "Sequences decoded together at most (batch rows)", engine.slots),
                  ("argonne_kv_cache_slot_tokens", "Tokens (prompt and completion) one sequence may hold",
                   engine.max_len),
                  ("argonne_kv_cache_blocks", "KV cache blocks in all", engine.blocks.num_blocks),
                  ("argonne_kv_cache_blocks_free", "KV cache blocks not held by a sequence", engine.blocks.free_count),
                  ("argonne_generation_tokens_per_second", "Tokens generated per second over the last 10 s",
                   engine.tokens_per_second())]
        for name, help_text, value in gauges:
            yield GaugeMetricFamily(name, help_text, value=value)
        yield CounterMetricFamily("argonne_generation_tokens", "Tokens generated", value=engine.generated_tokens)
        yield CounterMetricFamily("argonne_prompt_tokens", "Prompt tokens prefilled", value=engine.prompt_tokens)
        yield CounterMetricFamily("argonne_prefix_cache_hit_tokens", "Prompt tokens taken from the prefix cache",
                                  value=engine.blocks.hits * engine.settings.block_size)


class ServerMetrics:
    def __init__(self, engine: Engine):
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(engine))
        self.requests = Counter("argonne_requests", "Requests (choices) ended, by finish reason", ["finish_reason"],
                                registry=self.registry)
        self.rejected = Counter("argonne_rejected_requests", "Requests refused with 429 (queue full)",
                                registry=self.registry)
        self.queued = Histogram("argonne_queue_seconds", "Time from arrival to a KV cache slot",
                                buckets=LATENCY_BUCKETS, registry=self.registry)
        self.first_token = Histogram("argonne_time_to_first_token_seconds", "Time from arrival to the first token",
                                     buckets=LATENCY_BUCKETS, registry=self.registry)
        self.per_token = Histogram("argonne_time_per_output_token_seconds",
                                   "Mean time between a request's tokens after the first",
                                   buckets=PER_TOKEN_BUCKETS, registry=self.registry)
        self.content_type = CONTENT_TYPE_LATEST

    def observe(self, timing: Timing) -> None:
        self.requests.labels(timing.finish_reason).inc()
        self.queued.observe(timing.queued)
        if timing.time_to_first_token is not None:
            self.first_token.observe(timing.time_to_first_token)
        if timing.time_per_output_token is not None:
            self.per_token.observe(timing.time_per_output_token)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
