"""Security policy over every rendered object, for every values set the chart is checked with.

Pod Security "restricted" fields on every pod; nothing of the host; Ray token auth on every Ray
cluster and its job submitter; the dashboard never beyond ClusterIP; no API rights for Ray pods.
"""

from __future__ import annotations

import pytest

from tests.k8s.conftest import VALUE_SETS, pod_specs, ray_cluster_specs, render

WRITABLE_VOLUME_KINDS = {"emptyDir", "persistentVolumeClaim"}


def _objects(values, sets):
    objects = render(*values, sets=sets)
    assert objects
    return objects


def check_restricted(where: str, pod: dict) -> None:
    """Assert the Pod Security "restricted" profile plus a read-only root with writable volumes."""
    psc = pod.get("securityContext") or {}
    assert psc.get("runAsNonRoot") is True, where
    assert psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
    assert psc.get("runAsUser", 1000) != 0, where
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        assert not pod.get(flag), f"{where}: {flag}"
    volumes = {v["name"]: v for v in pod.get("volumes") or []}
    assert not [v for v in volumes.values() if "hostPath" in v], f"{where}: hostPath volume"
    for c in pod.get("initContainers", []) + pod["containers"]:
        cw = f"{where} container {c['name']}"
        sc = c.get("securityContext") or {}
        assert sc.get("allowPrivilegeEscalation") is False, cw
        assert sc.get("privileged") is not True, cw
        assert "ALL" in sc.get("capabilities", {}).get("drop", []), cw
        assert not sc.get("capabilities", {}).get("add"), cw
        assert sc.get("readOnlyRootFilesystem") is True, cw
        assert sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True, cw
        assert sc.get("runAsUser", 1000) != 0, cw
        assert not [p for p in c.get("ports", []) if "hostPort" in p], f"{cw}: hostPort"
        # With a read-only root, every writable path must be a volume: /tmp at least.
        mounts = {m["mountPath"]: m for m in c.get("volumeMounts", [])}
        assert "/tmp" in mounts, f"{cw}: no writable /tmp"
        for m in mounts.values():
            kinds = set(volumes[m["name"]]) - {"name"}
            assert m.get("readOnly") or kinds & WRITABLE_VOLUME_KINDS, f"{cw}: {m}"


@pytest.mark.parametrize(("values", "sets"), VALUE_SETS)
def test_every_pod_is_restricted(values, sets):
    checked = [
        check_restricted(where, pod) for o in _objects(values, sets) for where, pod in pod_specs(o)
    ]
    assert len(checked) >= 3  # a head, a worker group and a job submitter at least


@pytest.mark.parametrize(("values", "sets"), VALUE_SETS)
def test_token_auth_on_every_ray_cluster(values, sets):
    objects = _objects(values, sets)
    secrets = {o["metadata"]["name"] for o in objects if o["kind"] == "Secret"}
    clusters = [c for o in objects for c in ray_cluster_specs(o)]
    assert clusters or any(
        o["spec"].get("clusterSelector") for o in objects if o["kind"] == "RayJob"
    )
    for where, cluster in clusters:
        auth = cluster.get("authOptions") or {}
        assert auth.get("mode") == "token", where
        assert auth.get("secretName"), where
        # Either this release creates the Secret, or the values name an existing one.
        assert auth["secretName"] in secrets or not secrets, where
        major, minor, _ = (int(x) for x in cluster["rayVersion"].split("."))
        assert (major, minor) >= (2, 52), f"{where}: token auth needs Ray >= 2.52"
    for obj in objects:
        if obj["kind"] != "RayJob":
            continue
        (submitter,) = obj["spec"]["submitterPodTemplate"]["spec"]["containers"]
        env = {e["name"]: e for e in submitter["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert ref["key"] == "auth_token"
        cluster_secrets = {c["authOptions"]["secretName"] for _, c in ray_cluster_specs(obj)}
        assert cluster_secrets <= {ref["name"]}, "the submitter must hold its cluster's token"


@pytest.mark.parametrize(("values", "sets"), VALUE_SETS)
def test_dashboard_is_not_exposed(values, sets):
    objects = _objects(values, sets)
    assert not [o for o in objects if o["kind"] in ("Ingress", "Route", "Gateway", "HTTPRoute")]
    for obj in objects:
        if obj["kind"] == "Service":
            assert obj["spec"].get("type", "ClusterIP") == "ClusterIP", obj["metadata"]["name"]
        for where, cluster in ray_cluster_specs(obj):
            head = cluster["headGroupSpec"]
            assert head.get("serviceType", "ClusterIP") == "ClusterIP", where
            assert not head.get("enableIngress"), where
            assert not (head.get("headService") or {}).get("spec", {}).get("type"), where
        if obj["kind"] == "RayService":  # the Serve HTTP port, too, stays inside the cluster
            assert obj["spec"]["serveService"]["spec"]["type"] == "ClusterIP"


@pytest.mark.parametrize(("values", "sets"), VALUE_SETS)
def test_no_api_rights_for_ray_pods(values, sets):
    objects = _objects(values, sets)
    rbac = [
        o
        for o in objects
        if o["kind"] in ("Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding")
    ]
    assert not rbac
    accounts = [o for o in objects if o["kind"] == "ServiceAccount"]
    assert accounts and all(sa["automountServiceAccountToken"] is False for sa in accounts)
    names = {sa["metadata"]["name"] for sa in accounts}
    for obj in objects:
        for where, pod in pod_specs(obj):
            assert pod["serviceAccountName"] in names, where
            # The autoscaler sidecar alone mounts a token (tests/k8s/test_isolation.py).
            assert pod["automountServiceAccountToken"] is False, where


@pytest.mark.parametrize(("values", "sets"), VALUE_SETS)
def test_network_policy_covers_every_pod(values, sets):
    objects = _objects(values, sets)
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    main = [p for p in policies if "Ingress" in p["spec"]["policyTypes"]]
    for obj in objects:
        for kind_where, pod_template in _pod_templates(obj):
            labels = pod_template["metadata"]["labels"]
            selecting = [
                p for p in main if p["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
            ]
            assert len(selecting) == 1, kind_where  # its own cluster's policy, and only that
    serve_ports = {
        int(p["port"])
        for o in objects
        if o["kind"] == "RayService"
        for p in o["spec"]["serveService"]["spec"]["ports"]
    }
    for policy in main:
        if (
            policy["spec"]["podSelector"]["matchLabels"].get("app.kubernetes.io/component")
            == "mlflow"
        ):
            continue  # the bundled tracking server's (tests/k8s/test_tracking_chart.py)
        # Ray's own ports are open only to the cluster's pods (the first rule, no port list);
        # clients get the dashboard and Ray client, the Serve port, metrics.
        selector = policy["spec"]["podSelector"]["matchLabels"]
        rules = policy["spec"]["ingress"]
        assert rules[0] == {"from": [{"podSelector": {"matchLabels": selector}}]}
        for rule in rules[1:]:
            assert {p["port"] for p in rule["ports"]} <= {8265, 10001, 8080} | serve_ports


def _pod_templates(obj):
    for where, cluster in ray_cluster_specs(obj):
        yield f"{where} head", cluster["headGroupSpec"]["template"]
        for g in cluster.get("workerGroupSpecs") or []:
            yield f"{where} {g['groupName']}", g["template"]
    if obj["kind"] == "RayJob":
        yield f"RayJob/{obj['metadata']['name']} submitter", obj["spec"]["submitterPodTemplate"]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (
            lambda pod: pod["volumes"].append({"name": "host", "hostPath": {"path": "/"}}),
            "hostPath",
        ),
        (lambda pod: pod["containers"][0]["securityContext"].update(runAsUser=0), "ray-head"),
        (lambda pod: pod.update(hostNetwork=True), "hostNetwork"),
        (
            lambda pod: pod["containers"][0]["ports"].append({"containerPort": 1, "hostPort": 1}),
            "hostPort",
        ),
        (
            lambda pod: pod["containers"][0]["securityContext"].pop("readOnlyRootFilesystem"),
            "ray-head",
        ),
    ],
    ids=["hostPath", "root", "hostNetwork", "hostPort", "writable-root"],
)
def test_policy_catches_a_violation(mutate, message):
    """The policy is live: each of these changes to the head pod fails it."""
    obj = next(o for o in render() if o["kind"] == "RayJob")
    head = obj["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    check_restricted("head", head)
    mutate(head)
    with pytest.raises(AssertionError, match=message):
        check_restricted("head", head)
