"""Prometheus metrics of the API, names prefixed `lmforge_`.

Every metric is kept in a registry per app, which `GET /metrics` on the API port serves (the
only export of `lmforge serve --no-ray`). Under Ray (`ServeMetrics(ray=True)`, the Serve
router) each update is also recorded through `ray.util.metrics`, so Ray's per-node metrics
agent exports it on its metrics port, the port the chart's PodMonitor scrapes. Ray prefixes
application metrics with `ray_` and labels each series with the process (`WorkerId`, ...):
`lmforge_requests` is scraped there as `ray_lmforge_requests_total`, one series per router
replica. `ray_series()` lists the names the dashboard and alert rules may use.

Ray's agent forgets a gauge value its process has not recorded for two export intervals (about
20 s), so a thread records every Ray gauge's last value again each REFRESH_S: otherwise the
model info, set once at start, and the drift ratio of a quiet model would drop out of
Prometheus, and an alert's `for:` would restart. Ray's histograms' `_sum` is approximated
from bucket midpoints (its agent rebuilds observations from bucket counts); `_count` and the
buckets are exact.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

disable_created_metrics()  # no *_created series: they double the scrape for no use here

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
LENGTH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
RAY_PREFIX = "ray_"
REFRESH_S = 5.0


@dataclass(frozen=True)
class Spec:
    attr: str  # the ServeMetrics attribute
    kind: str  # counter, gauge or histogram
    name: str
    description: str
    labels: tuple[str, ...]
    buckets: tuple[float, ...] | None = None


SPECS = (
    Spec("requests", "counter", "lmforge_requests", "HTTP requests by route and status",
         ("route", "status")),
    Spec("latency", "histogram", "lmforge_request_latency_seconds",
         "end-to-end latency of generation requests", ("model", "route"), LATENCY_BUCKETS),
    Spec("ttft", "histogram", "lmforge_time_to_first_token_seconds",
         "time from request arrival to the first output of each choice", ("model",),
         LATENCY_BUCKETS),
    Spec("prompt_tokens", "counter", "lmforge_prompt_tokens", "prompt tokens received",
         ("model",)),
    Spec("generation_tokens", "counter", "lmforge_generation_tokens", "tokens generated",
         ("model",)),
    Spec("running", "gauge", "lmforge_requests_running", "choices generating now", ("model",)),
    Spec("waiting", "gauge", "lmforge_requests_waiting",
         "choices waiting for their first output", ("model",)),
    Spec("batch_size", "histogram", "lmforge_batch_size",
         "running batch size at each generated token (token-weighted)", ("model",),
         BATCH_BUCKETS),
    # Quality and drift (docs/serving.md "Monitoring"); alert rules use these names.
    Spec("completion_length", "histogram", "lmforge_completion_length_tokens",
         "tokens generated per choice, at its end", ("model",), LENGTH_BUCKETS),
    Spec("feedback", "counter", "lmforge_feedback",
         "feedback records by rating: positive (>0), negative (<0), neutral (0)",
         ("model", "model_version", "rating")),
    Spec("model_info", "gauge", "lmforge_model_info",
         "1 for each served model and the version it serves", ("model", "model_version")),
    Spec("prompt_bpb", "gauge", "lmforge_prompt_bits_per_byte",
         "the model's bits per byte on recent sampled prompts (rolling mean)", ("model",)),
    Spec("validation_bpb", "gauge", "lmforge_validation_bits_per_byte",
         "the model's bits per byte on its validation data (from the artifact's lineage)",
         ("model",)),
    Spec("drift_ratio", "gauge", "lmforge_drift_ratio",
         "rolling prompt bits per byte / validation bits per byte (about 1: no drift)",
         ("model",)),
)  # fmt: skip
SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_count", "_sum")}


def ray_series() -> set[str]:
    """The series names Prometheus gets from Ray's metrics port (with Ray's prefix)."""
    return {RAY_PREFIX + s.name + suffix for s in SPECS for suffix in SUFFIXES[s.kind]}


class Metric:
    """One labelled metric in the app's registry and, under Ray, in `ray.util.metrics`."""

    def __init__(self, spec: Spec, registry: CollectorRegistry, ray: bool) -> None:
        local = {"counter": Counter, "gauge": Gauge, "histogram": Histogram}[spec.kind]
        extra = {"buckets": spec.buckets} if spec.buckets else {}
        self.spec, self.children = spec, {}
        self.local = local(spec.name, spec.description, spec.labels, registry=registry, **extra)
        self.remote = _ray_metric(spec) if ray else None

    def labels(self, *values) -> MetricChild:
        """The series of these label values (the same object each time, as prometheus_client)."""
        key = tuple(str(v) for v in values)
        if key not in self.children:
            self.children[key] = MetricChild(self, key)
        return self.children[key]


class MetricChild:
    def __init__(self, metric: Metric, values: tuple[str, ...]) -> None:
        self.kind, self.local = metric.spec.kind, metric.local.labels(*values)
        self.remote, self.tags = metric.remote, dict(zip(metric.spec.labels, values, strict=True))
        self.value = 0.0  # a gauge's value: Ray's gauges can only be set

    def inc(self, amount: float = 1.0) -> None:
        self.local.inc(amount)
        if self.remote is None or not amount:  # Ray's counters refuse an increment of 0
            return
        if self.kind == "gauge":
            self.value += amount
            self.remote.set(self.value, tags=self.tags)
        else:
            self.remote.inc(amount, tags=self.tags)

    def dec(self, amount: float = 1.0) -> None:
        self.local.dec(amount)
        if self.remote is not None:
            self.value -= amount
            self.remote.set(self.value, tags=self.tags)

    def set(self, value: float) -> None:
        self.local.set(value)
        self.value = value
        if self.remote is not None:
            self.remote.set(value, tags=self.tags)

    def observe(self, value: float) -> None:
        self.local.observe(value)
        if self.remote is not None:
            self.remote.observe(value, tags=self.tags)


def _ray_metric(spec: Spec):
    from ray.util import metrics

    if spec.kind == "histogram":
        return metrics.Histogram(
            spec.name, spec.description, boundaries=list(spec.buckets), tag_keys=spec.labels
        )
    cls = metrics.Counter if spec.kind == "counter" else metrics.Gauge
    return cls(spec.name, spec.description, tag_keys=spec.labels)


class ServeMetrics:
    """Every metric of SPECS as an attribute (`metrics.requests.labels(route, status).inc()`);
    `ray=True` also exports them through Ray's metrics agent."""

    def __init__(self, ray: bool = False) -> None:
        self.registry = CollectorRegistry()
        self.gauges: list[Metric] = []
        for spec in SPECS:
            setattr(self, spec.attr, Metric(spec, self.registry, ray))
            if spec.kind == "gauge":
                self.gauges.append(getattr(self, spec.attr))
        self.stopped = threading.Event()
        if ray:
            threading.Thread(target=self._refresh, name="ray-gauges", daemon=True).start()

    def _refresh(self) -> None:
        while not self.stopped.wait(REFRESH_S):
            self.refresh()

    def refresh(self) -> None:
        """Record each Ray gauge's last value again (module doc)."""
        for gauge in self.gauges:
            for child in list(gauge.children.values()):  # the event loop may add one meanwhile
                if child.remote is not None:
                    child.remote.set(child.value, tags=child.tags)

    def close(self) -> None:
        self.stopped.set()


class MetricsMiddleware:
    """Counts every HTTP response by route and status (pure ASGI, so streams are not buffered),
    401s included (it wraps the auth middleware). A client that left before the response ended
    is counted as 499 (nginx's "client closed request"), not as the server's error."""

    def __init__(self, app, metrics: ServeMetrics, routes: set[str]) -> None:
        self.app, self.metrics, self.routes = app, metrics, routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = {"code": None, "ended": False, "left": False}

        async def receive_disconnect():
            message = await receive()
            if message["type"] == "http.disconnect" and not state["ended"]:
                state["left"] = True
            return message

        async def send_status(message):
            if message["type"] == "http.response.start":
                state["code"] = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                state["ended"] = True
            await send(message)

        try:
            await self.app(scope, receive_disconnect, send_status)
        except (asyncio.CancelledError, OSError):
            state["left"] = not state["ended"]  # cancelled (Serve) or a broken connection
            raise
        finally:
            path = _route_path(scope)
            route = path if path in self.routes else "other"
            code = 499 if state["left"] else state["code"] or 500
            self.metrics.requests.labels(route, str(code)).inc()


def _route_path(scope) -> str:
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :] or "/"
    return path
