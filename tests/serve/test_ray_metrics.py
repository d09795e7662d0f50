"""The serving metrics reach Prometheus on a Ray cluster: through Ray's metrics agent, on the
metrics port the chart's PodMonitor scrapes (not the API port, which needs an API key)."""

from __future__ import annotations

import re
import time

import pytest

from lmforge.serve.config import ServeArgs
from lmforge.serve.metrics import ray_series
from tests.conftest import REPO, free_port

CHART = REPO / "helm" / "lmforge"


def scrape(port: int) -> list:
    """Every sample Ray's metrics agent exports on `port` now."""
    import httpx2
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx2.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def total(samples: list, name: str, **labels: str) -> float | None:
    """The sum over every process's series of `name` with these labels; None when absent."""
    found = [
        s.value
        for s in samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    return sum(found) if found else None


NAME = "tiny-metrics"  # no other test serves this name: its series are this test's alone


def this_apps(samples: list) -> list:
    """The samples of this test's app: its model's series, and every series of its router
    process (the one exporting its model info). Earlier tests' Serve apps ran on the same
    session's Ray, and their counters (requests by route) are still exported."""
    routers = {
        s.labels.get("WorkerId")
        for s in samples
        if s.name == "ray_lmforge_model_info" and s.labels.get("model") == NAME
    }
    return [
        s for s in samples if s.labels.get("model") == NAME or s.labels.get("WorkerId") in routers
    ]


def serving_series_queried() -> set[str]:
    """The serving series the Grafana dashboard and the alert rules query."""
    text = (CHART / "files" / "grafana-dashboard.json").read_text()
    text += (CHART / "templates" / "prometheusrule.yaml").read_text()
    names = set(re.findall(r"\b(?:ray_)?lmforge_[a-z_]+", text))
    return {n for n in names if not n.startswith("ray_lmforge_train_")}


class FakeRayMetric:
    made: dict = {}

    def __init__(self, spec):
        self.spec, self.calls = spec, []
        FakeRayMetric.made[spec.name] = self

    def inc(self, value, tags):
        assert value > 0  # as Ray's counters insist
        self.calls.append(("inc", value, tags))

    def set(self, value, tags):
        self.calls.append(("set", value, tags))

    def observe(self, value, tags):
        self.calls.append(("observe", value, tags))


def test_every_update_also_goes_to_ray_metrics_and_the_local_registry(monkeypatch):
    from lmforge.serve import metrics as M

    FakeRayMetric.made = {}
    monkeypatch.setattr(M, "_ray_metric", FakeRayMetric)
    m = M.ServeMetrics(ray=True)
    m.close()  # no timed refresh during the test: refresh() is called below
    assert len(FakeRayMetric.made) == len(M.SPECS) == 14
    m.requests.labels("/v1/completions", 200).inc()
    m.prompt_tokens.labels("tiny").inc(0)  # an empty prompt: nothing for Ray's counter
    waiting = m.waiting.labels("tiny")
    waiting.inc()
    waiting.inc()
    waiting.dec()
    m.latency.labels("tiny", "/v1/completions").observe(0.5)
    m.drift_ratio.labels("tiny").set(1.25)
    made = FakeRayMetric.made
    assert made["lmforge_requests"].calls == [
        ("inc", 1.0, {"route": "/v1/completions", "status": "200"})
    ]
    assert made["lmforge_prompt_tokens"].calls == []
    assert [c[1] for c in made["lmforge_requests_waiting"].calls] == [1.0, 2.0, 1.0]
    assert made["lmforge_request_latency_seconds"].calls == [
        ("observe", 0.5, {"model": "tiny", "route": "/v1/completions"})
    ]
    assert made["lmforge_drift_ratio"].calls == [("set", 1.25, {"model": "tiny"})]
    m.refresh()  # Ray forgets gauges not recorded for a while: their last values again
    assert made["lmforge_drift_ratio"].calls[-1] == ("set", 1.25, {"model": "tiny"})
    assert made["lmforge_requests_waiting"].calls[-1] == ("set", 1.0, {"model": "tiny"})
    assert len(made["lmforge_requests"].calls) == 1  # counters are cumulative in Ray
    assert m.waiting.labels("tiny") is waiting  # one object per series (streams.py relies on it)
    local = {s.name: s.value for f in m.registry.collect() for s in f.samples if s.labels}
    assert local["lmforge_requests_total"] == 1 and local["lmforge_requests_waiting"] == 1
    assert M.ServeMetrics().requests.remote is None  # --no-ray: the local registry only


@pytest.mark.ray
@pytest.mark.slow
def test_serving_metrics_are_on_rays_metrics_port_with_their_values(ray_local, artifact, tmp_path):
    import httpx2
    from ray import serve

    from lmforge.model.artifact import read_version
    from lmforge.serve.app import build_app

    keys = tmp_path / "keys"
    keys.write_text("sk-metrics\n")
    model = {
        "name": NAME,
        "artifact": artifact,
        "val_bpb": 2.0,
        "torch_threads": 1,
        "resources": {"num_cpus": 0.25},
        "autoscaling": {"min_replicas": 1, "max_replicas": 1},
    }
    args = ServeArgs(
        models=[model],
        api_key_env="LMFORGE_UNSET_ENV",
        api_key_file=str(keys),
        request_log={"path": str(tmp_path / "log")},
        drift={"sample_rate": 1.0},
    )
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(args), name="lmforge-metrics", route_prefix="/")
        headers = {"Authorization": "Bearer sk-metrics"}
        usage = []
        with httpx2.Client(base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=60) as c:
            for prompt in ("hello world", "the quick brown fox", "def add(a, b):"):
                body = {"model": NAME, "prompt": prompt, "max_tokens": 5, "temperature": 0}
                answer = c.post("/v1/completions", json=body)
                assert answer.status_code == 200, answer.text
                usage.append(answer.json()["usage"])
            missing = c.post("/v1/completions", json={**body, "model": "nope"})
            assert missing.status_code == 404
            rid = answer.json()["id"]
            rated = c.post("/v1/feedback", json={"completion_id": rid, "rating": -1})
            assert rated.status_code == 200, rated.text

        metrics_port = ray_local.nodes()[0]["MetricsExportPort"]
        want = {
            ("ray_lmforge_requests_total", ("route", "/v1/completions"), ("status", "200")): 3,
            ("ray_lmforge_requests_total", ("route", "/v1/completions"), ("status", "404")): 1,
            ("ray_lmforge_prompt_tokens_total", ("model", NAME)): sum(
                u["prompt_tokens"] for u in usage
            ),
            ("ray_lmforge_generation_tokens_total", ("model", NAME)): sum(
                u["completion_tokens"] for u in usage
            ),
            ("ray_lmforge_request_latency_seconds_count", ("route", "/v1/completions")): 3,
            # (the buckets: Ray's _sum is approximated from bucket midpoints)
            ("ray_lmforge_completion_length_tokens_bucket", ("model", NAME), ("le", "4.0")): sum(
                u["completion_tokens"] <= 4 for u in usage
            ),
            ("ray_lmforge_completion_length_tokens_bucket", ("model", NAME), ("le", "8.0")): 3,
            ("ray_lmforge_feedback_total", ("rating", "negative")): 1,
            ("ray_lmforge_model_info", ("model_version", read_version(artifact)["version"])): 1,
            ("ray_lmforge_validation_bits_per_byte", ("model", NAME)): 2.0,
            ("ray_lmforge_requests_running", ("model", NAME)): 0,
            ("ray_lmforge_requests_waiting", ("model", NAME)): 0,
        }
        # Ray's agent exports what the router recorded a few seconds later; drift scores come
        # back from the model replica off the request path. Gauges set once at start (model
        # info) must still be there long after: Ray forgets a gauge not recorded for ~20 s.
        time.sleep(30)
        deadline, got = time.monotonic() + 120, {}
        while True:
            samples = scrape(metrics_port)
            ours = this_apps(samples)
            got = {key: total(ours, key[0], **dict(key[1:])) for key in want}
            drift = total(ours, "ray_lmforge_drift_ratio", model=NAME)
            if (got == want and drift is not None) or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert got == want
        prompt_bpb = total(ours, "ray_lmforge_prompt_bits_per_byte", model=NAME)
        assert drift == pytest.approx(prompt_bpb / 2.0)
        exported = {s.name for s in samples}
        assert ray_series() <= exported, f"not exported: {ray_series() - exported}"
        queried = serving_series_queried()
        assert len(queried) >= 9 and queried <= exported, f"not exported: {queried - exported}"
    finally:
        serve.shutdown()
