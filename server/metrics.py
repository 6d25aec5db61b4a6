"""Prometheus metrics, ``thawed_`` names, one registry per app (no globals: tests make many apps).

Every ``thawed_`` series carries a ``model_name`` label (the served model name, as vLLM's do). The
process collector (``process_resident_memory_bytes``, CPU seconds, open fds), the GC collector
(``python_gc_*``) and ``python_info`` are registered beside them, without the label, as vLLM has
them. The decoded-weight cache is read at scrape time by a collector.

thawed name (counters get ``_total``)        vLLM name
-------------------------------------------  -----------------------------------------------
thawed_num_requests_running                  vllm:num_requests_running
thawed_num_requests_waiting                  vllm:num_requests_waiting
thawed_prompt_tokens                         vllm:prompt_tokens
thawed_generation_tokens                     vllm:generation_tokens
thawed_request_success{finish_reason}        vllm:request_success
thawed_request_prompt_tokens (histogram)     vllm:request_prompt_tokens
thawed_request_generation_tokens (histogram) vllm:request_generation_tokens
thawed_time_to_first_token_seconds           vllm:time_to_first_token_seconds
thawed_inter_token_latency_seconds           vllm:inter_token_latency_seconds (was time_per_output_token)
thawed_e2e_request_latency_seconds           vllm:e2e_request_latency_seconds
thawed_request_queue_time_seconds            vllm:request_queue_time_seconds
thawed_request_prefill_time_seconds          vllm:request_prefill_time_seconds
thawed_request_decode_time_seconds           vllm:request_decode_time_seconds
thawed_requests_rejected, _cancelled,        (none: thawed's own)
thawed_request_errors, thawed_decode_batch_rows, thawed_model_load_seconds, thawed_model_ready,
thawed_cache_*, thawed_layer_decode_seconds{codec,device}
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import (GC_COLLECTOR, CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics,
                               generate_latest)
from prometheus_client import GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

__all__ = ["Metrics", "CONTENT_TYPE"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_TOKENS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)
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


class _WithModelName:
    """Collects a registry's metrics with a ``model_name`` label added to every sample."""

    def __init__(self, inner: CollectorRegistry, model_name: str) -> None:
        self._inner = inner
        self._name = model_name

    def collect(self):
        for family in self._inner.collect():
            family.samples = [s._replace(labels={**s.labels, "model_name": self._name}) for s in family.samples]
            yield family


class Metrics:
    def __init__(self, model_name: str = "thawed") -> None:
        disable_created_metrics()  # no `_created` series: they double every counter for no use here
        self.registry = CollectorRegistry(auto_describe=True)  # what /metrics renders
        r = self._own = CollectorRegistry(auto_describe=True)  # thawed_* series, labelled by the wrapper
        self.registry.register(_WithModelName(r, model_name))
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        if GC_COLLECTOR is not None:
            GCCollector(registry=self.registry)
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
        self.request_prompt_tokens = Histogram("thawed_request_prompt_tokens", "prompt tokens per sequence",
                                               buckets=_TOKENS, registry=r)
        self.request_generation_tokens = Histogram("thawed_request_generation_tokens",
                                                   "tokens generated per finished sequence", buckets=_TOKENS,
                                                   registry=r)
        self.prefill_time = Histogram("thawed_request_prefill_time_seconds", "admission to the first token (prefill)",
                                      buckets=_LATENCY, registry=r)
        self.decode_time = Histogram("thawed_request_decode_time_seconds", "first token to the last (decode)",
                                     buckets=_LATENCY, registry=r)
        self.load_seconds = Gauge("thawed_model_load_seconds", "seconds to open the checkpoint", registry=r)
        self.ready = Gauge("thawed_model_ready", "1 when the model is loaded and serving", registry=r)

    def watch_cache(self, source: Callable[[], dict | None]) -> None:
        self._own.register(_CacheCollector(source))

    def render(self) -> bytes:
        return generate_latest(self.registry)
