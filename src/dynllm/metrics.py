"""Prometheus metrics (``GET /metrics``, an admin route), one registry per app.

Three sources, each at the cost it can afford:

- Per request, one sink call (``observe_request``) with the request's
  ``RequestRecord`` once it is over: a counter and up to four histogram
  observations, nothing per chunk (token counts come from the record, which
  takes them from a non-streamed body or a stream's final usage chunk).
- Per lifecycle event (``on_event``, a subscriber of the app's ``EventHub``):
  loads, unloads and crashes by model and reason, and load durations.
- At scrape time (``_Gauges``): model state, requests in flight and waiting,
  VRAM used and budget, read from the scheduler and the admission gates.  So
  the request path updates no gauge at all.

A model name the config does not know (a client asking for a model that does
not exist) is counted as ``(unknown)``: client-chosen label values would let
anyone grow the registry without bound.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric

from dynllm.admission import queued as queued_for
from dynllm.events import CRASH_REASONS, LifecycleEvent, ModelState

if TYPE_CHECKING:
    from dynllm.admission import Admission
    from dynllm.requestlog import RequestRecord
    from dynllm.scheduler import Scheduler

CONTENT_TYPE = CONTENT_TYPE_LATEST
UNKNOWN_MODEL = "(unknown)"

# Seconds.  Requests run from milliseconds (an embedding) to minutes (a long
# generation); loads from a second (a small GGUF) to minutes (vLLM).
REQUEST_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
TTFB_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
LOAD_BUCKETS = (0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)


class _Gauges:
    """Read at scrape time from the live objects (a custom collector)."""

    def __init__(self, scheduler: Scheduler, admission: Admission) -> None:
        self.scheduler = scheduler
        self.admission = admission

    def describe(self) -> Iterator[Metric]:
        return self._families()

    def collect(self) -> Iterator[Metric]:
        return self._families(fill=True)

    def _families(self, fill: bool = False) -> Iterator[Metric]:
        state = GaugeMetricFamily(
            "dynllm_model_state",
            "1 for the state each model is in (unloaded, loading, loaded, unloading), else 0",
            labels=["model", "state"],
        )
        in_flight = GaugeMetricFamily(
            "dynllm_model_in_flight_requests",
            "Requests a model's backend is serving now",
            labels=["model"],
        )
        queued = GaugeMetricFamily(
            "dynllm_model_queued_requests",
            "Requests waiting for a model: for its load, for VRAM, or for a "
            "max_concurrent_requests slot",
            labels=["model"],
        )
        vram = GaugeMetricFamily(
            "dynllm_model_vram_mb",
            "VRAM a model holds now (its vram_mb while loading, loaded or unloading; else 0)",
            labels=["model"],
        )
        used = GaugeMetricFamily("dynllm_vram_used_mb", "VRAM booked by models (MB)")
        budget = GaugeMetricFamily("dynllm_vram_budget_mb", "total_vram_mb: the VRAM budget (MB)")
        if fill:
            scheduler = self.scheduler
            for name, slot in scheduler.slots.items():
                for s in ModelState:
                    state.add_metric([name, s.value], 1.0 if slot.state is s else 0.0)
                in_flight.add_metric([name], slot.in_flight)
                queued.add_metric([name], queued_for(scheduler, self.admission, slot))
                holds = slot.state is not ModelState.UNLOADED
                vram.add_metric([name], slot.spec.vram_mb if holds else 0)
            used.add_metric([], scheduler.used_vram_mb())
            budget.add_metric([], scheduler.config.total_vram_mb)
        yield from (state, in_flight, queued, vram, used, budget)


class Metrics:
    def __init__(self, scheduler: Scheduler, admission: Admission) -> None:
        self.scheduler = scheduler
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "dynllm_requests",
            "Forwarded requests by model, route and HTTP status (499: the client left)",
            ["model", "route", "status"],
            registry=r,
        )
        self.duration = Histogram(
            "dynllm_request_duration_seconds",
            "From the request's headers to the end of its response",
            ["model", "route"],
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.ttfb = Histogram(
            "dynllm_request_ttfb_seconds",
            "Time to the first byte of the answer (loading-progress comments do not count)",
            ["model", "route"],
            buckets=TTFB_BUCKETS,
            registry=r,
        )
        self.cold_start = Histogram(
            "dynllm_request_cold_start_seconds",
            "How long a request waited for its model's backend to load (cold requests only)",
            ["model"],
            buckets=LOAD_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "dynllm_tokens",
            "Tokens by model and kind (prompt, completion), where the backend reported usage",
            ["model", "kind"],
            registry=r,
        )
        self.loads = Counter(
            "dynllm_model_loads",
            "Loads begun, by model and reason (requested, preload, admin)",
            ["model", "reason"],
            registry=r,
        )
        self.load_duration = Histogram(
            "dynllm_model_load_duration_seconds",
            "From loading to loaded: stopping evicted models, starting, readiness",
            ["model"],
            buckets=LOAD_BUCKETS,
            registry=r,
        )
        self.unloads = Counter(
            "dynllm_model_unloads",
            "Models taken down on purpose (loaded ones, or loads cancelled), by model and "
            "reason (idle, evicted, admin, reload, shutdown)",
            ["model", "reason"],
            registry=r,
        )
        self.crashes = Counter(
            "dynllm_model_crashes",
            "Backends that died on their own (crashed) or never became ready (load_failed)",
            ["model", "reason"],
            registry=r,
        )
        r.register(_Gauges(scheduler, admission))
        ProcessCollector(registry=r)
        # The labelled children, resolved once: a dict lookup per request
        # instead of a label resolution (a lock and a tuple) per metric.
        self._children: dict[tuple[str, str, int], tuple[Counter, Histogram, Histogram]] = {}
        self._per_model: dict[str, tuple[Histogram, Counter, Counter]] = {}

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def _model(self, name: str) -> str:
        return name if name in self.scheduler.slots else UNKNOWN_MODEL

    def observe_request(self, record: RequestRecord) -> None:
        """The request sink: called once per finished request."""
        model = self._model(record.model)
        key = (model, record.route, record.status)
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = (
                self.requests.labels(model, record.route, str(record.status)),
                self.duration.labels(model, record.route),
                self.ttfb.labels(model, record.route),
            )
        count, duration, ttfb = children
        count.inc()
        duration.observe(record.duration_ms / 1000)
        if record.ttfb_ms is not None:
            ttfb.observe(record.ttfb_ms / 1000)
        if record.cold or record.prompt_tokens or record.completion_tokens:
            per_model = self._per_model.get(model)
            if per_model is None:
                per_model = self._per_model[model] = (
                    self.cold_start.labels(model),
                    self.tokens.labels(model, "prompt"),
                    self.tokens.labels(model, "completion"),
                )
            cold_start, prompt, completion = per_model
            if record.cold:
                cold_start.observe(record.load_ms / 1000)
            if record.prompt_tokens:
                prompt.inc(record.prompt_tokens)
            if record.completion_tokens:
                completion.inc(record.completion_tokens)

    def on_event(self, event: LifecycleEvent) -> None:
        """The lifecycle subscriber."""
        old, new, reason = event.from_state, event.to_state, event.reason
        if old is new:
            return
        if new is ModelState.LOADING:
            self.loads.labels(event.model, reason.value).inc()
        elif new is ModelState.READY:
            if event.duration_s is not None:
                self.load_duration.labels(event.model).observe(event.duration_s)
        elif new is ModelState.UNLOADING:
            self.unloads.labels(event.model, reason.value).inc()
        elif reason in CRASH_REASONS:  # -> unloaded
            self.crashes.labels(event.model, reason.value).inc()
        elif old is ModelState.LOADING:  # a load cancelled (admin, reload, shutdown)
            self.unloads.labels(event.model, reason.value).inc()
