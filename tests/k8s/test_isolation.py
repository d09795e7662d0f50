"""One compromised job reaches no other Ray cluster of the release: a ServiceAccount, a Ray
token and a NetworkPolicy per cluster, the API token only in the autoscaler sidecar, a
documented egress policy; renders with existing token Secrets are byte-identical (GitOps); an
image can be pinned by digest."""

from __future__ import annotations

import pytest
import yaml

from tests.k8s.conftest import (
    ALL_ON,
    CHART,
    VALUE_SETS,
    helm,
    pod_specs,
    ray_cluster_specs,
    rayjob_specs,
    render,
    render_error,
)

UNIT = "lmforge.dev/ray-cluster"
OPERATOR = (
    {"kubernetes.io/metadata.name": "ray-system"},
    {"app.kubernetes.io/name": "kuberay-operator"},
)
SERVE_PORT = 8000
DIGEST = "sha256:" + "ab" * 32


def clusters(objects):
    """unit -> [(where, pod template)] of every Ray pod and job submitter."""
    found: dict[str, list] = {}
    for obj in objects:
        for where, cluster in ray_cluster_specs(obj):
            templates = [cluster["headGroupSpec"]["template"]]
            templates += [g["template"] for g in cluster.get("workerGroupSpecs") or []]
            for t in templates:
                found.setdefault(t["metadata"]["labels"][UNIT], []).append((where, t))
        for where, spec in rayjob_specs([obj]):
            t = spec["submitterPodTemplate"]
            found.setdefault(t["metadata"]["labels"][UNIT], []).append((f"{where} submitter", t))
    return found


@pytest.mark.parametrize(("values", "sets"), VALUE_SETS)
def test_each_cluster_has_its_own_service_account_and_token(values, sets):
    objects = render(*values, sets=sets)
    accounts = {o["metadata"]["name"] for o in objects if o["kind"] == "ServiceAccount"}
    by_unit = clusters(objects)
    names = {
        unit: {t["spec"]["serviceAccountName"] for _, t in pods} for unit, pods in by_unit.items()
    }
    for unit, used in names.items():
        assert len(used) == 1 and used <= accounts, (unit, used)  # one, and the chart's
    assert len({n for used in names.values() for n in used}) == len(by_unit)  # none shared
    secrets = {}
    for obj in objects:
        for _where, cluster in ray_cluster_specs(obj):
            unit = cluster["headGroupSpec"]["template"]["metadata"]["labels"][UNIT]
            secrets.setdefault(cluster["authOptions"]["secretName"], set()).add(unit)
        for _where, spec in rayjob_specs([obj]):
            (c,) = spec["submitterPodTemplate"]["spec"]["containers"]
            ref = {e["name"]: e for e in c["env"]}["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
            unit = spec["submitterPodTemplate"]["metadata"]["labels"][UNIT]
            secrets.setdefault(ref["name"], set()).add(unit)
    shared = (
        any("existingSecret=" in s for s in sets)
        or "existing-cluster" in str(values)
        or ("manifests" in str(values))
    )
    if not shared:  # each token is one cluster's (its pods and its submitters)
        assert all(len(units) == 1 for units in secrets.values()), secrets
        made = {o["metadata"]["name"] for o in objects if o["kind"] == "Secret"}
        assert set(secrets) == made


@pytest.mark.parametrize(("values", "sets"), VALUE_SETS)
def test_only_the_autoscaler_sidecar_holds_an_api_token(values, sets):
    for obj in render(*values, sets=sets):
        for where, pod in pod_specs(obj):
            assert pod["automountServiceAccountToken"] is False, where
            for c in pod["containers"]:
                mounts = {m["name"] for m in c.get("volumeMounts", [])}
                assert "kube-api-access" not in mounts, f"{where} {c['name']}"
        for where, cluster in ray_cluster_specs(obj):
            head = cluster["headGroupSpec"]["template"]["spec"]
            volumes = {v["name"]: v for v in head["volumes"]}
            if cluster.get("enableInTreeAutoscaling"):
                sources = volumes["kube-api-access"]["projected"]["sources"]
                assert sources[0]["serviceAccountToken"]["path"] == "token", where
                mounts = cluster["autoscalerOptions"]["volumeMounts"]
                assert mounts[0]["mountPath"] == "/var/run/secrets/kubernetes.io/serviceaccount"
            else:
                assert "kube-api-access" not in volumes, where


# ---------------------------------------------------------------- who reaches whom


def _peer_matches(peer, ns_labels, labels):
    if "ipBlock" in peer:
        return False
    ns_sel = peer.get("namespaceSelector")
    if ns_sel is None:  # same namespace as the policy
        same = ns_labels.get("kubernetes.io/metadata.name") == "release-ns"
        if not same:
            return False
    elif not ns_sel.get("matchLabels", {}).items() <= ns_labels.items():
        return False
    pod_sel = peer.get("podSelector", {}).get("matchLabels", {})
    return pod_sel.items() <= labels.items()


def reachable(policies, dest_labels, port, src_ns, src_labels) -> bool:
    """Whether a TCP connection to `port` of a pod with `dest_labels` is let in (NetworkPolicy
    semantics: isolated once any policy selects it; allowed if any rule allows)."""
    selecting = [
        p
        for p in policies
        if "Ingress" in p["spec"]["policyTypes"]
        and p["spec"]["podSelector"]["matchLabels"].items() <= dest_labels.items()
    ]
    assert selecting, dest_labels
    for policy in selecting:
        for rule in policy["spec"].get("ingress", []):
            ports = [int(p["port"]) for p in rule.get("ports", [])]
            if ports and port not in ports:
                continue
            if "from" not in rule or any(
                _peer_matches(peer, src_ns, src_labels) for peer in rule["from"]
            ):
                return True
    return False


def test_the_serving_clusters_ray_ports_are_its_own():
    objects = render(
        sets=(*ALL_ON, "serve.allowedClients[0].namespaceSelector.matchLabels.team=edge")
    )
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    by_unit = clusters(objects)
    assert {"serve", "job-pretrain", "job-finetune", "job-improve"} <= set(by_unit)
    release = {"kubernetes.io/metadata.name": "release-ns"}
    serve_head = next(t for w, t in by_unit["serve"] if "head" in str(t["metadata"]["labels"]))
    serve = serve_head["metadata"]["labels"]
    job = by_unit["job-pretrain"][0][1]["metadata"]["labels"]
    other_job = by_unit["job-finetune"][0][1]["metadata"]["labels"]
    for port in (6379, 8265, 10001, 52365):
        assert not reachable(policies, serve, port, release, job), port  # another cluster's job
        assert reachable(policies, serve, port, release, serve), port  # its own pods
        assert not reachable(policies, job, port, release, other_job), port
    assert reachable(policies, serve, 8265, *OPERATOR)
    assert not reachable(policies, serve, 6379, *OPERATOR)
    # The Serve API: this release's pods and the ingress, nobody else.
    assert reachable(policies, serve, SERVE_PORT, release, job)
    assert reachable(policies, serve, SERVE_PORT, {"team": "edge"}, {"app": "ingress"})
    assert not reachable(policies, serve, SERVE_PORT, {"team": "other"}, {"app": "x"})
    assert not reachable(policies, serve, 8265, {"team": "edge"}, {"app": "ingress"})
    # A job's submitter reaches its own cluster's job API.
    submitter = next(t for w, t in by_unit["job-pretrain"] if "submitter" in w)["metadata"]
    assert reachable(policies, job, 8265, release, submitter["labels"])


def test_allowed_clients_reach_job_clusters_but_never_the_serving_one():
    objects = render(
        str(CHART / "ci" / "existing-cluster.yaml"),
        sets=(
            "serve.enabled=true",
            "serve.apiKeys.secretName=k",
            "serve.models.lmforge-chat.artifact=a",
        ),
    )
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    by_unit = clusters(objects)
    ci = ({"kubernetes.io/metadata.name": "ci"}, {"app": "pipeline-runner"})
    shared = by_unit["cluster"][0][1]["metadata"]["labels"]
    serve = by_unit["serve"][0][1]["metadata"]["labels"]
    assert reachable(policies, shared, 8265, *ci) and reachable(policies, shared, 10001, *ci)
    assert not reachable(policies, serve, 8265, *ci)


def test_egress_policy_default_and_switches():
    (policy, *_) = [o for o in render() if o["kind"] == "NetworkPolicy"]
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    egress = policy["spec"]["egress"]
    ports = [{(p["protocol"], p["port"]) for p in r.get("ports", [])} for r in egress]
    assert {("UDP", 53), ("TCP", 53)} in ports  # DNS
    assert {("TCP", 443)} in ports  # the Hub, object stores
    assert {"to": [{"namespaceSelector": {}}]} in egress  # in-cluster
    extra = {
        "to": [{"ipBlock": {"cidr": "10.0.0.0/8"}}],
        "ports": [{"protocol": "TCP", "port": 9000}],
    }
    tight = render(
        sets=(
            "networkPolicy.egress.https=false",
            "networkPolicy.egress.inCluster=false",
            "networkPolicy.egress.extraRules[0].to[0].ipBlock.cidr=10.0.0.0/8",
            "networkPolicy.egress.extraRules[0].ports[0].protocol=TCP",
            "networkPolicy.egress.extraRules[0].ports[0].port=9000",
        )
    )
    (policy,) = [o for o in tight if o["kind"] == "NetworkPolicy"]
    rules = policy["spec"]["egress"]
    assert len(rules) == 3 and rules[-1] == extra
    assert not [r for r in rules if {"port": 443, "protocol": "TCP"} in r.get("ports", [])]
    (open_,) = [
        o
        for o in render(sets=("networkPolicy.egress.restrict=false",))
        if o["kind"] == "NetworkPolicy"
    ]
    assert open_["spec"]["policyTypes"] == ["Ingress"] and "egress" not in open_["spec"]
    # an autoscaling head may reach the API server; nothing else gets port 6443
    scaled = render(sets=("ray.autoscaling=true",))
    (api,) = [o for o in scaled if o["metadata"]["name"].endswith("-autoscaler")]
    assert api["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "ray-head"
    assert {p["port"] for p in api["spec"]["egress"][0]["ports"]} == {443, 6443}


# ---------------------------------------------------------------- stable renders, digests


def _template(*sets: str) -> str:
    args = ["template", "lmforge", str(CHART)]
    for s in sets:
        args += ["--set", s]
    return helm(*args).stdout


def test_renders_with_existing_token_secrets_are_identical():
    named = ("ray.auth.existingSecret=team-ray-token",)
    first, second = _template(*named), _template(*named)
    assert first == second
    assert "kind: Secret" not in first and "secretName: team-ray-token" in first
    per_cluster = (*ALL_ON, "ray.auth.existingSecrets.serve=serve-token", *named)
    objects = [d for d in yaml.safe_load_all(_template(*per_cluster)) if d]
    assert _template(*per_cluster) == _template(*per_cluster)
    (service,) = [o for o in objects if o["kind"] == "RayService"]
    assert service["spec"]["rayClusterConfig"]["authOptions"]["secretName"] == "serve-token"
    jobs = [o for o in objects if o["kind"] == "RayJob"]
    assert {j["spec"]["rayClusterSpec"]["authOptions"]["secretName"] for j in jobs} == {
        "team-ray-token"
    }
    # Without one, only a first install generates it (lookup keeps it after): a plain render
    # differs in exactly the token.
    a, b = _template(), _template()
    differ = [(x, y) for x, y in zip(a.splitlines(), b.splitlines(), strict=True) if x != y]
    assert len(differ) == 1 and "auth_token:" in differ[0][0]


def test_an_image_can_be_pinned_by_digest():
    objects = render(sets=(f"image.digest={DIGEST}",))
    images = {c["image"] for o in objects for _, pod in pod_specs(o) for c in pod["containers"]}
    assert images == {f"ghcr.io/lmforge/lmforge:0.1.0-cpu@{DIGEST}"} or all(
        i.endswith(f"@{DIGEST}") for i in images
    )
    assert "image.digest" in render_error("image.digest=latest")


def test_the_image_build_can_pin_its_base_by_digest():
    from tests.conftest import REPO

    lines = (REPO / "Dockerfile").read_text().splitlines()
    (base,) = [ln for ln in lines if ln.startswith("FROM ")]
    # Docker expands ${VAR:+word} to word only when VAR is set: `tag@digest`, else the tag.
    assert base.endswith("${BASE_DIGEST:+@${BASE_DIGEST}}")
    assert lines.index("ARG BASE_DIGEST=") < lines.index(base)
