"""Prometheus metrics of the gateway, built once per server and injected.

Names follow the Prometheus conventions and those of the serving systems ops
already scrape (vLLM's ``vllm:*``, TGI's ``tgi_*``): one prefix ``romegw_``,
base units in the names (``_seconds``, ``_bytes``, ``_total``), low-cardinality
labels only (the RPC method and status code; never a prompt or a token).

    info = engine.info()
    metrics = Metrics(model_id=info.model_id, dtype=info.dtype, device=info.device,
                      load_seconds=info.load_seconds)   # its own registry
    metrics.bind(engine)                    # gauges read from the engine at scrape time
    start_http_server(port, registry=metrics.registry)
"""

from __future__ import annotations

import os
import time

import psutil
import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from rome_engine import __version__
from rome_engine.protocol import EngineClient

_LATENCY = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TOKEN = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2.5, 5)
_SLOW = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800)


class _ProcessCollector:
    """Resident memory of this process, and CUDA memory when there is a GPU (read at scrape time)."""

    def __init__(self) -> None:
        self._proc = psutil.Process(os.getpid())

    def collect(self):
        rss = GaugeMetricFamily("romegw_process_resident_memory_bytes", "Resident memory of the server process.")
        rss.add_metric([], float(self._proc.memory_info().rss))
        yield rss
        if torch.cuda.is_available():
            alloc = GaugeMetricFamily(
                "romegw_gpu_memory_allocated_bytes", "GPU memory held by tensors.", labels=["device"]
            )
            reserved = GaugeMetricFamily(
                "romegw_gpu_memory_reserved_bytes", "GPU memory reserved by the caching allocator.", labels=["device"]
            )
            peak = GaugeMetricFamily(
                "romegw_gpu_memory_peak_allocated_bytes", "Most GPU memory tensors held since the start.",
                labels=["device"],
            )
            for i in range(torch.cuda.device_count()):
                alloc.add_metric([str(i)], float(torch.cuda.memory_allocated(i)))
                reserved.add_metric([str(i)], float(torch.cuda.memory_reserved(i)))
                peak.add_metric([str(i)], float(torch.cuda.max_memory_allocated(i)))
            yield alloc
            yield reserved
            yield peak


class _VersionCacheCollector:
    """The cached matrices of pinned versions (``rome_engine.versions``): hits, misses, bytes."""

    def __init__(self, engine: EngineClient) -> None:
        self.engine = engine

    def collect(self):
        versions = self.engine.versions
        if versions is None:
            return
        stats = versions.stats
        hits = CounterMetricFamily("romegw_version_cache_hits", "Passes whose pinned version was cached.")
        hits.add_metric([], float(stats.hits))
        misses = CounterMetricFamily("romegw_version_cache_misses", "Pinned versions' matrices built (not cached).")
        misses.add_metric([], float(stats.misses))
        size = GaugeMetricFamily("romegw_version_cache_bytes", "Bytes of pinned versions' matrices cached (bounded).")
        size.add_metric([], float(stats.bytes))
        yield from (hits, misses, size)


class _EditCapacityCollector:
    """Per edited matrix, the input dimensions the projected mode may still write along."""

    def __init__(self, engine: EngineClient) -> None:
        self.engine = engine

    def collect(self):
        free = GaugeMetricFamily(
            "romegw_edit_free_dims",
            "Input dimensions a projected edit may still write along, per matrix (d - preserved - active "
            "edit keys); at 0 projected edits there are refused. Known once this process computed one.",
            labels=["param"],
        )
        for param, n in sorted(self.engine.edit_free_dims().items()):
            free.add_metric([param], float(n))
        yield free


class Metrics:
    def __init__(self, *, model_id: str, dtype: str, device: str, load_seconds: float) -> None:
        r = self.registry = CollectorRegistry()
        self.rpc_requests = Counter(
            "romegw_rpc_requests_total", "RPCs handled, by method and status code.", ["method", "code"], registry=r
        )
        self.rpc_duration = Histogram(
            "romegw_rpc_duration_seconds", "RPC latency, by method.", ["method"], buckets=_LATENCY, registry=r
        )
        self.time_to_first_token = Histogram(
            "romegw_time_to_first_token_seconds",
            "From a Generate request to its first token.",
            buckets=_LATENCY,
            registry=r,
        )
        self.inter_token_latency = Histogram(
            "romegw_inter_token_latency_seconds", "Between consecutive tokens of a stream.", buckets=_TOKEN, registry=r
        )
        self.e2e_latency = Histogram(
            "romegw_e2e_request_latency_seconds", "Whole Generate streams.", buckets=_SLOW, registry=r
        )
        self.prompt_tokens = Counter("romegw_prompt_tokens_total", "Prompt tokens processed.", registry=r)
        self.generation_tokens = Counter("romegw_generation_tokens_total", "Tokens generated.", registry=r)
        self.active_streams = Gauge("romegw_active_streams", "Generate streams running now.", registry=r)
        self.batch_size = Histogram(
            "romegw_batch_size",
            "Streams decoded together per forward pass.",
            buckets=(1, 2, 4, 8, 12, 16, 24, 32, 48, 64),
            registry=r,
        )
        self.waiting_for_version = Gauge(
            "romegw_requests_waiting_for_version", "Requests waiting until the server knows their min_edit_version.",
            registry=r,
        )  # fmt: skip
        self.streams_by_version = Gauge(
            "romegw_streams_by_version",
            "Requests running (streams, scores, traces), on the head or pinned to another version.",
            ["version"],
            registry=r,
        )
        self.edit_live = Histogram(
            "romegw_edit_live_seconds", "From an edit stored to live (new requests on it).", buckets=_LATENCY,
            registry=r,
        )  # fmt: skip
        self.edits_applied = Counter("romegw_edits_applied_total", "Edit layers applied (incl. imported).", registry=r)
        self.edits_reverted = Counter("romegw_edits_reverted_total", "Reverts made.", registry=r)
        self.edit_compute = Histogram(
            "romegw_edit_compute_seconds", "Time to compute one ROME edit.", buckets=_SLOW, registry=r
        )
        self.head_version = Gauge("romegw_edit_head_version", "The edit version being served.", registry=r)
        self.active_layers = Gauge("romegw_edit_active_layers", "Active edit layers.", registry=r)
        self.store_up = Gauge(
            "romegw_edit_store_up", "1 while the edit store answers (a shared database may be down), else 0.",
            registry=r,
        )  # fmt: skip
        self.replication_lag = Gauge(
            "romegw_edit_replication_lag_versions",
            "Versions of the shared edit history (other replicas' commits) this server does not serve yet.",
            registry=r,
        )
        self.covariance = Counter(
            "romegw_covariance_stats_total", "Covariance statistics used by edits, by source.", ["source"], registry=r
        )
        self.trace_seconds = Histogram("romegw_trace_seconds", "Time of one causal trace.", buckets=_SLOW, registry=r)
        self.trace_forward_passes = Counter(
            "romegw_trace_forward_passes_total", "Forward passes run by causal traces.", registry=r
        )
        self.model_load_seconds = Gauge("romegw_model_load_seconds", "Time to load the model.", registry=r)
        self.model_load_seconds.set(load_seconds)
        self.build_info = Info("romegw_build", "What is served.", registry=r)
        self.build_info.info({"model_id": model_id, "dtype": dtype, "device": device, "version": __version__})
        r.register(_ProcessCollector())

    def bind(self, engine: EngineClient) -> None:
        """Gauges read from the engine at scrape time (always current, nothing to keep in step)."""
        self.active_streams.set_function(lambda: engine.active_streams)
        self.waiting_for_version.set_function(lambda: engine.waiting_for_version)

        def on(version_kind: str) -> float:
            head = engine.edit_version
            return sum(n for v, n in engine.versions_in_use().items() if (v == head) == (version_kind == "head"))

        self.streams_by_version.labels("head").set_function(lambda: on("head"))
        self.streams_by_version.labels("pinned").set_function(lambda: on("pinned"))
        engine.on_live = self.edit_live.observe
        self.registry.register(_VersionCacheCollector(engine))
        self.registry.register(_EditCapacityCollector(engine))
        self.head_version.set_function(lambda: engine.edit_version)
        self.active_layers.set_function(lambda: engine.active_layers)
        self.store_up.set_function(lambda: float(engine.edit_store_up))
        self.replication_lag.set_function(lambda: engine.history_lag)
        if engine.scheduler is not None:
            engine.scheduler.on_step = self.batch_size.observe

    def observe_rpc(self, method: str, code: str, seconds: float) -> None:
        self.rpc_requests.labels(method, code).inc()
        self.rpc_duration.labels(method).observe(seconds)


class StreamTimer:
    """Token timing of one Generate stream, reported to ``Metrics`` as it goes."""

    def __init__(self, metrics: Metrics | None) -> None:
        self.metrics = metrics
        self.start = self.last = time.perf_counter()
        self.first = True

    def token(self, n: int = 1) -> None:
        if self.metrics is None or n == 0:
            return
        now = time.perf_counter()
        if self.first:
            self.metrics.time_to_first_token.observe(now - self.start)
            self.first = False
        else:
            self.metrics.inter_token_latency.observe(now - self.last)
        self.last = now
        self.metrics.generation_tokens.inc(n)

    def done(self, prompt_tokens: int) -> None:
        if self.metrics is not None:
            self.metrics.prompt_tokens.inc(prompt_tokens)
            self.metrics.e2e_latency.observe(time.perf_counter() - self.start)
