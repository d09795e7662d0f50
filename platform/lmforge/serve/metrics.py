"""Prometheus metrics of the API, names prefixed `lmforge_`, in a registry per app."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

disable_created_metrics()  # no *_created series: they double the scrape for no use here

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
LENGTH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


class ServeMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "lmforge_requests", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        self.latency = Histogram(
            "lmforge_request_latency_seconds",
            "end-to-end latency of generation requests",
            ["model", "route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "lmforge_time_to_first_token_seconds",
            "time from request arrival to the first output of each choice",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "lmforge_prompt_tokens", "prompt tokens received", ["model"], registry=r
        )
        self.generation_tokens = Counter(
            "lmforge_generation_tokens", "tokens generated", ["model"], registry=r
        )
        self.running = Gauge(
            "lmforge_requests_running", "choices generating now", ["model"], registry=r
        )
        self.waiting = Gauge(
            "lmforge_requests_waiting",
            "choices waiting for their first output",
            ["model"],
            registry=r,
        )
        self.batch_size = Histogram(
            "lmforge_batch_size",
            "running batch size at each generated token (token-weighted)",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        # Quality and drift (docs/serving.md "Monitoring"); alert rules use these names.
        self.completion_length = Histogram(
            "lmforge_completion_length_tokens",
            "tokens generated per choice, at its end",
            ["model"],
            buckets=LENGTH_BUCKETS,
            registry=r,
        )
        self.feedback = Counter(
            "lmforge_feedback",
            "feedback records by rating: positive (>0), negative (<0), neutral (0)",
            ["model", "model_version", "rating"],
            registry=r,
        )
        self.model_info = Gauge(
            "lmforge_model_info",
            "1 for each served model and the version it serves",
            ["model", "model_version"],
            registry=r,
        )
        self.prompt_bpb = Gauge(
            "lmforge_prompt_bits_per_byte",
            "the model's bits per byte on recent sampled prompts (rolling mean)",
            ["model"],
            registry=r,
        )
        self.validation_bpb = Gauge(
            "lmforge_validation_bits_per_byte",
            "the model's bits per byte on its validation data (from the artifact's lineage)",
            ["model"],
            registry=r,
        )
        self.drift_ratio = Gauge(
            "lmforge_drift_ratio",
            "rolling prompt bits per byte / validation bits per byte (about 1: no drift)",
            ["model"],
            registry=r,
        )


class MetricsMiddleware:
    """Counts every HTTP response by route and status (pure ASGI, so streams are not buffered)."""

    def __init__(self, app, metrics: ServeMetrics, routes: set[str]) -> None:
        self.app, self.metrics, self.routes = app, metrics, routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 500}

        async def send_status(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            path = _route_path(scope)
            route = path if path in self.routes else "other"
            self.metrics.requests.labels(route, str(status["code"])).inc()


def _route_path(scope) -> str:
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :] or "/"
    return path
