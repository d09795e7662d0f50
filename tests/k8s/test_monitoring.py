"""The chart's monitoring and improvement objects: the PrometheusRule (checked structurally: its
CRD is not in ../shared), the Grafana quality panels, the improvement RayCronJob (against the
KubeRay v1.7.0 CRD in test_chart) and the request log path the RayService and the job share."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import yaml

from tests.k8s.conftest import rayjob_entrypoint_config, render, render_error

# The prometheus-operator v1 PrometheusRule spec, the parts the chart uses; strict, so a typo
# (`expresion:`) fails here instead of being dropped by the API server.
DURATION = {
    "type": "string",
    "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$",
}
STRINGS = {"type": "object", "additionalProperties": {"type": "string"}}
RULE = {
    "type": "object",
    "additionalProperties": False,
    "required": ["expr"],
    "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
    "properties": {
        "alert": {"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_]*$"},
        "record": {"type": "string"},
        "expr": {"type": "string", "minLength": 1},
        "for": DURATION,
        "keep_firing_for": DURATION,
        "labels": STRINGS,
        "annotations": STRINGS,
    },
}
PROMETHEUS_RULE = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PrometheusRule"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["groups"],
            "properties": {
                "groups": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["name", "rules"],
                        "properties": {
                            "name": {"type": "string", "minLength": 1},
                            "interval": DURATION,
                            "rules": {"type": "array", "minItems": 1, "items": RULE},
                        },
                    },
                }
            },
        },
    },
}
ALERTS = "monitoring.alerts.enabled=true"
IMPROVE = "improve.enabled=true"


def exported_series() -> set[str]:
    """What Ray's metrics agent exports of the serving metrics (tests/serve/test_ray_metrics.py
    reads them off a live Ray's metrics port)."""
    from lmforge.serve.metrics import ray_series

    return ray_series()


def serving_series_used(text: str) -> set[str]:
    """Every serving series a query names (training's ray_lmforge_train_* come from training)."""
    return {n for n in re.findall(r"\b(?:ray_)?lmforge_[a-z_]+", text)
            if not n.startswith("ray_lmforge_train_")}  # fmt: skip


def balanced(expr: str) -> bool:
    text, depth = re.sub(r'"[^"]*"', '""', expr), []
    pairs = {")": "(", "]": "[", "}": "{"}
    for c in text:
        if c in "([{":
            depth.append(c)
        elif c in pairs and (not depth or depth.pop() != pairs[c]):
            return False
    return not depth and text.count('"') % 2 == 0


def rules(*sets: str) -> dict[str, dict]:
    (rule,) = [o for o in render(sets=(ALERTS, *sets)) if o["kind"] == "PrometheusRule"]
    jsonschema.validate(rule, PROMETHEUS_RULE)
    return {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}


def test_alerts_are_off_by_default():
    assert not [o for o in render() if o["kind"] == "PrometheusRule"]


def test_prometheus_rule_is_valid_and_uses_exported_metrics():
    by_name = rules()
    assert sorted(by_name) == ["LmforgeHighErrorRate", "LmforgeHighLatencyP99",
                               "LmforgeInputDrift", "LmforgeNegativeFeedback"]  # fmt: skip
    exported = exported_series()
    for name, rule in by_name.items():
        assert balanced(rule["expr"]), f"{name}: unbalanced brackets or quotes in {rule['expr']}"
        used = serving_series_used(rule["expr"])
        assert used and used <= exported, f"{name}: {used - exported} are not exported"
        assert {"summary", "description"} <= set(rule["annotations"]), name
        assert "docs/operations.md" in rule["annotations"]["description"], name
        assert rule["labels"] == {"severity": "warning"}
    assert 'ray_lmforge_requests_total{status=~"5.."}' in by_name["LmforgeHighErrorRate"]["expr"]
    assert "histogram_quantile(0.99" in by_name["LmforgeHighLatencyP99"]["expr"]
    assert 'rating="negative"' in by_name["LmforgeNegativeFeedback"]["expr"]


def test_thresholds_and_durations_come_from_values():
    by_name = rules(
        "monitoring.alerts.errorRate.threshold=0.02",
        "monitoring.alerts.errorRate.for=3m",
        "monitoring.alerts.latencyP99.thresholdSeconds=7.5",
        "monitoring.alerts.drift.threshold=1.25",
        "monitoring.alerts.drift.for=2h",
        "monitoring.alerts.negativeFeedback.threshold=0.4",
        "monitoring.alerts.negativeFeedback.minFeedback=50",
        "monitoring.alerts.window=10m",
        "monitoring.alerts.severity=page",
        "monitoring.alerts.labels.release=kube-prometheus",
    )
    error = by_name["LmforgeHighErrorRate"]
    assert error["expr"].endswith("> 0.02") and error["for"] == "3m" and "[10m]" in error["expr"]
    assert by_name["LmforgeHighLatencyP99"]["expr"].endswith("> 7.5")
    drift = by_name["LmforgeInputDrift"]
    assert drift["expr"].endswith("ray_lmforge_drift_ratio) > 1.25") and drift["for"] == "2h"
    feedback = by_name["LmforgeNegativeFeedback"]["expr"]
    assert "> 0.4)" in feedback and feedback.endswith(">= 50")
    assert {r["labels"]["severity"] for r in by_name.values()} == {"page"}
    (rule,) = [o for o in render(sets=(ALERTS, "monitoring.alerts.labels.release=kp"))
               if o["kind"] == "PrometheusRule"]  # fmt: skip
    assert rule["metadata"]["labels"]["release"] == "kp"


def test_a_bad_alert_value_fails_naming_it():
    assert "/monitoring/alerts/errorRate/threshold" in render_error(
        ALERTS, "monitoring.alerts.errorRate.threshold=5"
    )
    assert "/monitoring/alerts/drift/for" in render_error(ALERTS, "monitoring.alerts.drift.for=1x")


def test_structural_check_catches_a_typo():
    (rule,) = [o for o in render(sets=(ALERTS,)) if o["kind"] == "PrometheusRule"]
    rule["spec"]["groups"][0]["rules"][0]["expresion"] = "up"
    with pytest.raises(jsonschema.ValidationError, match="expresion"):
        jsonschema.validate(rule, PROMETHEUS_RULE)
    assert not balanced("sum(rate(x[5m])")


def test_dashboard_quality_panels():
    (dashboard,) = [o for o in render(sets=("monitoring.grafanaDashboard.enabled=true",))
                    if o["metadata"]["name"].endswith("grafana-dashboard")]  # fmt: skip
    panels = json.loads(dashboard["data"]["lmforge.json"])["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    by_title = {p["title"]: " ".join(t["expr"] for t in p.get("targets", [])) for p in panels}
    assert "ray_lmforge_model_info" in by_title["Model versions served"]
    assert "model_version" in by_title["Feedback per hour by version and rating"]
    assert (
        "ray_lmforge_completion_length_tokens_bucket"
        in by_title["Output length (completion tokens)"]
    )
    assert "ray_lmforge_drift_ratio" in by_title["Input drift (prompt / validation bits per byte)"]
    assert 'rating="negative"' in by_title["Negative feedback share by version"]
    exported = exported_series()
    for title, expr in by_title.items():
        assert balanced(expr), title
        used = serving_series_used(expr)
        assert used <= exported, f"{title}: {used - exported} are not exported"


# ---------------------------------------------------------------- the improvement RayCronJob


def cron(*sets: str) -> tuple[dict, list[dict]]:
    objects = render(sets=(IMPROVE, *sets))
    (job,) = [o for o in objects if o["kind"] == "RayCronJob"]
    return job, objects


def test_improve_is_off_by_default():
    assert not [o for o in render() if o["kind"] == "RayCronJob"]


def test_raycronjob_runs_the_improve_job_daily_with_its_mounted_config():
    job, objects = cron()
    assert job["metadata"]["name"] == "lmforge-improve"
    assert job["spec"]["schedule"] == "0 3 * * *" and job["spec"]["suspend"] is False
    assert "timeZone" not in job["spec"]
    script, config, text, overrides = rayjob_entrypoint_config(objects, job)
    assert (script, config, overrides) == ("jobs/improve.py", "job-configs/improve.yaml", [])
    assert yaml.safe_load(text) == {
        "name": "daily",
        "current": "@finetune/chat",  # the finetune RayJob's run, adopted on the first run
        "runs_dir": "/mnt/lmforge/runs",
        "request_log": "/mnt/lmforge/runs/request-log",
    }
    template = job["spec"]["jobTemplate"]
    assert template["shutdownAfterJobFinishes"] is True and "suspend" not in template
    head = template["rayClusterSpec"]["headGroupSpec"]["template"]
    assert head["metadata"]["labels"]["lmforge.dev/stage"] == "improve"


def test_raycronjob_values():
    job, objects = cron(
        "improve.schedule=@weekly", "improve.timeZone=Europe/Berlin", "improve.suspend=true",
        "improve.overrides={promote.min_gain=0.01}", "improve.requestLogKey=logs.path",
        "improve.config.name=nightly", "improve.image.flavor=gpu",
        "improve.cluster.workerGroups.gpu.enabled=true",
    )  # fmt: skip
    spec = job["spec"]
    assert (spec["schedule"], spec["timeZone"], spec["suspend"]) == (
        "@weekly",
        "Europe/Berlin",
        True,
    )
    _, _, text, overrides = rayjob_entrypoint_config(objects, job)
    assert overrides == ["promote.min_gain=0.01"]
    config = yaml.safe_load(text)
    assert (
        config["logs"] == {"path": "/mnt/lmforge/runs/request-log"} and config["name"] == "nightly"
    )
    groups = {g["groupName"] for g in spec["jobTemplate"]["rayClusterSpec"]["workerGroupSpecs"]}
    assert groups == {"cpu", "gpu"}
    # The config's own value wins over the chart's.
    job, objects = cron("improve.config.request_log=s3://elsewhere/log")
    _, _, text, _ = rayjob_entrypoint_config(objects, job)
    assert yaml.safe_load(text)["request_log"] == "s3://elsewhere/log"


def test_request_log_path_is_shared_with_the_rayservice():
    serve = ("serve.enabled=true", "serve.apiKeys.secretName=k",
             "serve.models.lmforge-chat.artifact=train/base-0123456789ab")  # fmt: skip
    for sets, want in [
        ((), "/mnt/lmforge/runs/request-log"),
        (("requestLog.path=/data/log",), "/data/log"),
        (("storage.type=objectStore", "storage.objectStore.uri=s3://b/p/"), "s3://b/p/request-log"),
    ]:
        job, objects = cron(*serve, *sets, "requestLog.sampleRate=0.25")
        (service,) = [o for o in objects if o["kind"] == "RayService"]
        args = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]["args"]
        assert args["request_log"] == {"path": want, "sample_rate": 0.25, "redact_pii": True}
        _, _, text, _ = rayjob_entrypoint_config(objects, job)
        assert yaml.safe_load(text)["request_log"] == want
        from lmforge.serve.config import ServeArgs

        assert ServeArgs.model_validate(args).request_log.path == want
    (service,) = [o for o in render(sets=(*serve, "requestLog.path=")) if o["kind"] == "RayService"]
    assert (
        "request_log"
        not in yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]["args"]
    )


def test_raycronjob_on_an_existing_cluster():
    job, objects = cron("rayCluster.enabled=true")
    template = job["spec"]["jobTemplate"]
    assert template["clusterSelector"] == {"ray.io/cluster": "lmforge"}
    assert "rayClusterSpec" not in template and template["shutdownAfterJobFinishes"] is False
    (cluster,) = [o for o in objects if o["kind"] == "RayCluster"]
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]
    (configs,) = [v for v in head["volumes"] if v["name"] == "job-configs"]
    paths = [i["path"] for s in configs["projected"]["sources"] for i in s["configMap"]["items"]]
    assert "improve.yaml" in paths


@pytest.mark.parametrize(
    ("sets", "named"),
    [
        (("improve.schedule=daily",), "improve.schedule"),
        (("improve.job=Improve",), "/improve/job"),
        (("requestLog.path=",), "requestLog.path"),
        (("improve.image.flavor=cpu", "improve.cluster.workerGroups.gpu.enabled=true"),
         "improve"),
    ],
)  # fmt: skip
def test_bad_improve_values_fail_naming_them(sets, named):
    assert named in render_error(IMPROVE, *sets)
