"""Prometheus metrics of the reward server: requests, latency, batch sizes, tokens, queue depth, length
correlations, OpenRLHF fallbacks, faults.

Each server gets its own registry, so several apps in one process (tests) never collide.
"""

from __future__ import annotations

from typing import Callable

from steer_reward.errors import require_extra

__all__ = ["ServerMetrics"]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 180.0)
_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_TOKEN_BUCKETS = (64, 256, 1024, 4096, 16384, 32768, 65536, 131072)


class _CounterReading:
    """A counter kept by another object (the backend), read when scraped."""

    def __init__(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        self.name, self.documentation, self.read = name, documentation, read

    def collect(self):
        from prometheus_client.core import CounterMetricFamily

        yield CounterMetricFamily(self.name, self.documentation, value=float(self.read()))


class ServerMetrics:
    """Counters and histograms exposed at ``GET /metrics`` (Prometheus text format)."""

    def __init__(self, queue_depth: Callable[[], float]) -> None:
        prom = require_extra("prometheus_client", "server")
        self.registry = prom.CollectorRegistry()
        self._generate = prom.generate_latest
        self.content_type = prom.CONTENT_TYPE_LATEST
        self.requests = prom.Counter("steer_reward_requests", "HTTP requests by endpoint and status code",
                                     ["endpoint", "code"], registry=self.registry)
        self.latency = prom.Histogram("steer_reward_request_latency_seconds", "Request latency by endpoint",
                                      ["endpoint"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.samples = prom.Counter("steer_reward_samples_scored", "Samples scored", registry=self.registry)
        self.tokens = prom.Counter("steer_reward_tokens_scored", "Tokens read by the reward model",
                                   registry=self.registry)
        self.prompt_truncated = prom.Counter("steer_reward_prompt_tokens_truncated",
                                             "Prompt tokens dropped from the left to fit model.max_length",
                                             registry=self.registry)
        self.batch_samples = prom.Histogram("steer_reward_batch_samples", "Samples per model batch",
                                            buckets=_SIZE_BUCKETS, registry=self.registry)
        self.batch_requests = prom.Histogram("steer_reward_batch_requests", "Requests merged into one model batch",
                                             buckets=_SIZE_BUCKETS, registry=self.registry)
        self.batch_tokens = prom.Histogram("steer_reward_batch_tokens", "Tokens per model batch",
                                           buckets=_TOKEN_BUCKETS, registry=self.registry)
        self.batch_seconds = prom.Histogram("steer_reward_batch_seconds", "Model time per batch",
                                            buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.queue_depth = prom.Gauge("steer_reward_queue_depth", "Samples waiting or being scored",
                                      registry=self.registry)
        self.queue_depth.set_function(queue_depth)
        self.rejected = prom.Counter("steer_reward_backpressure_rejections", "Requests answered 503 (queue full)",
                                     registry=self.registry)
        self.reward_failures = prom.Counter(
            "steer_reward_reward_failures", "/get_reward samples answered with server.fallback_reward, by reason "
            "(query: unparseable; format: could not be formatted or encoded; non_finite: NaN/inf reward; forward: the "
            "model's forward failed for the sample alone)",
            ["reason"], registry=self.registry)
        self.completion_truncated = prom.Counter("steer_reward_completion_tokens_truncated",
                                                 "Completion tokens cut (model.overlong: truncate) because the "
                                                 "completion did not fit model.max_length next to the prompt "
                                                 "(whose last max_length // 4 tokens are always kept)",
                                                 registry=self.registry)
        self.out_of_memory = prom.Counter("steer_reward_out_of_memory", "Out-of-memory errors of the model; each "
                                          "halves the batch token budget", registry=self.registry)
        self.batch_token_budget = prom.Gauge("steer_reward_batch_token_budget", "Token budget batches are cut to "
                                             "now (server.max_batch_tokens, less after out-of-memory errors)",
                                             registry=self.registry)
        self.failed_requests = prom.Counter("steer_reward_isolated_failures", "Requests that failed alone after "
                                            "their batch was split to isolate them", registry=self.registry)
        self.isolation_calls = prom.Counter("steer_reward_isolation_calls", "Extra scorer calls made to isolate "
                                            "failing requests in a failed batch", registry=self.registry)
        self.read_timeouts = prom.Counter("steer_reward_read_timeouts", "Connections closed because their request "
                                          "headers did not arrive within server.read_timeout_s",
                                          registry=self.registry)
        self.stats_samples = prom.Gauge("steer_reward_running_stats_samples", "Samples in the running "
                                        "normalization statistics", registry=self.registry)

    def count_prompt_prefills(self, read: Callable[[], float]) -> None:
        """Expose ``read()``, the backend's running count of prompts run through the model, as
        ``steer_reward_prompt_prefills_total``: with prefix sharing and the prompt cache, the samples of one prompt
        cost one prefill, which is what prompt-affinity routing across replicas is measured by."""
        self.registry.register(_CounterReading("steer_reward_prompt_prefills",
                                               "Prompts run through the model (prompt-cache hits run none)", read))

    def observe_batch(self, stats) -> None:
        """Record one model batch (a ``BatchStats``); called on the worker thread."""
        self.batch_samples.observe(stats.samples)
        self.batch_requests.observe(stats.requests)
        self.batch_tokens.observe(stats.tokens)
        self.batch_seconds.observe(stats.seconds)
        self.samples.inc(stats.samples)
        self.tokens.inc(stats.tokens)
        if stats.failed_requests:
            self.failed_requests.inc(stats.failed_requests)
        if stats.retries:
            self.isolation_calls.inc(stats.retries)

    def observe_oom(self, tokens: int, budget: int) -> None:
        """An out-of-memory error on a batch of ``tokens`` shrank the budget to ``budget`` (worker thread)."""
        self.out_of_memory.inc()

    def watch_length(self, window) -> None:
        """Gauges ``steer_reward_length_spearman{series="reward"|<attribute>}``, read from a
        ``steer_reward.monitors.LengthCorrelationWindow`` when scraped."""
        prom = require_extra("prometheus_client", "server")
        gauge = prom.Gauge("steer_reward_length_spearman", "Spearman correlation of the reward and of each live "
                           f"attribute with completion length over the last {window.window} scored samples",
                           ["series"], registry=self.registry)
        for series in ["reward", *window.names]:
            gauge.labels(series).set_function(lambda series=series: window.correlations()[series])

    def render(self) -> bytes:
        return self._generate(self.registry)
