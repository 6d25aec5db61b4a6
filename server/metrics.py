"""Prometheus metrics, ``thawed_`` names, one registry per app (no globals: tests make many apps).

Request metrics follow vLLM's set (running / waiting, prompt and generation tokens, success by
finish reason, time to first token, inter-token latency, end-to-end latency). The decoded-weight
cache is read at scrape time by a collector: layer decode seconds by codec and device, cache
hits / misses / evictions, bytes used and budget, model load seconds.
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

__all__ = ["Metrics", "CONTENT_TYPE"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class _CacheCollector:
    def __init__(self, source: Callable[[], dict | None]) -> None:
        self._source = source

    def collect(self):
        info = self._source()
        if not info:
            return
        stats, device = info["stats"], info["device"]
        c = CounterMetricFamily("thawed_cache_hits", "decoded-weight cache hits")
        c.add_metric([], stats["hits"])
        yield c
        c = CounterMetricFamily("thawed_cache_misses", "decoded-weight cache misses (a decode)")
        c.add_metric([], stats["misses"])
        yield c
        c = CounterMetricFamily("thawed_cache_evictions", "decoded weights evicted to stay under the budget")
        c.add_metric([], stats["evictions"])
        yield c
        c = CounterMetricFamily("thawed_cache_prefetched", "weights decoded ahead by the prefetcher")
        c.add_metric([], stats["prefetched"])
        yield c
        g = GaugeMetricFamily("thawed_cache_bytes", "bytes of decoded weights held in the cache")
        g.add_metric([], stats["bytes_used"])
        yield g
        g = GaugeMetricFamily("thawed_cache_budget_bytes", "cache budget in bytes (absent: unbounded)")
        if stats.get("budget_bytes") is not None:
            g.add_metric([], stats["budget_bytes"])
        yield g
        g = GaugeMetricFamily("thawed_cache_entries", "decoded weights held in the cache")
        g.add_metric([], stats["entries"])
        yield g
        c = CounterMetricFamily("thawed_layer_decode_seconds", "seconds spent decoding weights",
                                labels=["codec", "device"])
        for codec, seconds in sorted(stats.get("decode_seconds", {}).items()):
            c.add_metric([codec, device], seconds)
        yield c


class Metrics:
    def __init__(self) -> None:
        disable_created_metrics()  # no `_created` series: they double every counter for no use here
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.running = Gauge("thawed_num_requests_running", "sequences being decoded", registry=r)
        self.waiting = Gauge("thawed_num_requests_waiting", "requests waiting for a slot", registry=r)
        self.prompt_tokens = Counter("thawed_prompt_tokens", "prompt tokens processed", registry=r)
        self.generation_tokens = Counter("thawed_generation_tokens", "tokens generated", registry=r)
        self.request_success = Counter("thawed_request_success", "finished sequences by finish reason",
                                       ["finish_reason"], registry=r)
        self.rejected = Counter("thawed_requests_rejected", "requests refused (queue full, loading)",
                                ["reason"], registry=r)
        self.cancelled = Counter("thawed_requests_cancelled", "sequences cancelled (client gone, stop)",
                                 registry=r)
        self.errors = Counter("thawed_request_errors", "sequences that failed in the model", registry=r)
        self.ttft = Histogram("thawed_time_to_first_token_seconds", "queue + prefill until the first token",
                              buckets=_LATENCY, registry=r)
        self.itl = Histogram("thawed_inter_token_latency_seconds", "time between consecutive tokens",
                             buckets=_LATENCY, registry=r)
        self.e2e = Histogram("thawed_e2e_request_latency_seconds", "submission to last token",
                             buckets=_LATENCY, registry=r)
        self.queue_time = Histogram("thawed_request_queue_time_seconds", "time waiting for a slot",
                                    buckets=_LATENCY, registry=r)
        self.batch_rows = Histogram("thawed_decode_batch_rows", "sequences decoded by one forward",
                                    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64), registry=r)
        self.load_seconds = Gauge("thawed_model_load_seconds", "seconds to open the checkpoint", registry=r)
        self.ready = Gauge("thawed_model_ready", "1 when the model is loaded and serving", registry=r)

    def watch_cache(self, source: Callable[[], dict | None]) -> None:
        self.registry.register(_CacheCollector(source))

    def render(self) -> bytes:
        return generate_latest(self.registry)
