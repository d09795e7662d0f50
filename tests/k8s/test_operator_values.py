"""helm/kuberay-operator-values.yaml turns on, in the KubeRay operator, every kind and gated
feature that helm/lmforge and manifests/ use; manifests/kustomization.yaml lets `kubectl apply -k`
point every container at another image.

The operator's chart is not installed here, so its default values (../shared) are merged with
ours the way Helm merges values files: maps key by key, anything else (lists included) replaced.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO
from tests.k8s.conftest import ALL_ON, CI_VALUES, CRD_FILES, CRDS, MANIFESTS, manifest_docs, render

OUR_VALUES = REPO / "helm" / "kuberay-operator-values.yaml"
OPERATOR_DEFAULTS = CRDS / "kuberay-operator-values.yaml"
IMAGE = "ghcr.io/lmforge/lmforge"


def helm_merge(base: dict, override: dict) -> dict:
    """Helm's coalescing of a values file over the chart's values (null deletes a key)."""
    out = dict(base)
    for key, value in override.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = helm_merge(out[key], value)
        else:
            out[key] = value
    return out


def operator_values(*files: Path) -> dict:
    if not OPERATOR_DEFAULTS.exists():
        pytest.skip(f"{OPERATOR_DEFAULTS} is absent (the KubeRay v1.7.0 files in ../shared)")
    values = yaml.safe_load(OPERATOR_DEFAULTS.read_text())
    for f in files:
        values = helm_merge(values, yaml.safe_load(f.read_text()))
    return values


def required_gates(obj: dict) -> set[str]:
    """The KubeRay feature gates an object needs to be acted on. RayCluster, RayJob and
    RayService are always-on controllers in KubeRay v1.7; a kind not known here fails, so
    a new kind in the chart must be added (with its gate, if it has one)."""
    kind, spec = obj["kind"], obj.get("spec") or {}
    if not obj["apiVersion"].startswith("ray.io/"):
        return set()  # a core Kubernetes object
    assert kind in CRD_FILES, f"{kind}: a KubeRay kind this test does not know; add its gate"
    gates = {"RayCronJob"} if kind == "RayCronJob" else set()
    jobs = [spec] if kind == "RayJob" else [spec.get("jobTemplate") or {}]
    if any("deletionStrategy" in j for j in jobs):
        gates.add("RayJobDeletionPolicy")
    upgrade = (spec.get("upgradeStrategy") or {}).get("type") if kind == "RayService" else None
    if upgrade == "NewClusterWithIncrementalUpgrade":
        gates.add("RayServiceIncrementalUpgrade")
    return gates


def everything_rendered() -> list[dict]:
    objects = [o for f in MANIFESTS.glob("*.yaml") for o in manifest_docs(f)]
    objects += render(sets=ALL_ON)
    for values in CI_VALUES:
        objects += render(values)
    return [o for o in objects if o.get("kind") != "Kustomization"]


def disabled_gates(values: dict, objects: list[dict]) -> set[str]:
    gates = {g["name"]: g["enabled"] for g in values.get("featureGates") or []}
    needed = set().union(*(required_gates(o) for o in objects))
    return {g for g in needed if not gates.get(g)}


def test_the_operators_defaults_leave_the_improvement_raycronjob_unscheduled():
    """Why the values file exists: on a default install nothing runs `improve.enabled`."""
    assert disabled_gates(operator_values(), everything_rendered()) == {"RayCronJob"}


def test_our_operator_values_enable_every_kind_and_feature_the_chart_renders():
    objects = everything_rendered()
    kinds = {o["kind"] for o in objects if o["apiVersion"].startswith("ray.io/")}
    assert kinds == set(CRD_FILES)  # RayCluster, RayJob, RayService, RayCronJob
    values = operator_values(OUR_VALUES)
    assert disabled_gates(values, objects) == set()
    # The operator can create the Ray pods in the release's namespace, wherever it runs.
    assert values["rbacEnable"] is True and values["singleNamespaceInstall"] is False
    assert "watchNamespace" not in values


def test_our_operator_values_change_only_what_lmforge_needs():
    """Helm replaces the featureGates list as a whole: every default gate is still listed,
    with its default value, except the ones the chart needs."""
    defaults = {g["name"]: g["enabled"] for g in operator_values()["featureGates"]}
    ours = {g["name"]: g["enabled"] for g in operator_values(OUR_VALUES)["featureGates"]}
    assert ours.keys() == defaults.keys()
    assert {name for name in ours if ours[name] != defaults[name]} == {"RayCronJob"}
    assert set(yaml.safe_load(OUR_VALUES.read_text())) == {"featureGates"}


def test_the_docs_install_the_operator_with_our_values():
    """Every documented `helm install|upgrade kuberay-operator` passes -f our values file."""
    commands = []
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        text = doc.read_text()
        for m in re.finditer(r"helm (install|upgrade) kuberay-operator", text):
            line_start = text.rfind("\n", 0, m.start()) + 1
            if text.count("`", line_start, m.start()) % 2:  # inline code: up to its closing `
                end = text.index("`", m.end())
            else:  # a shell block: up to a line end without a `\` continuation
                end = m.end() + re.search(r"(?<!\\)\n|$", text[m.end() :]).start()
            commands.append((doc.name, " ".join(text[m.start() : end].split())))
    assert len(commands) >= 2  # the install step and the kind walk-through
    for name, line in commands:
        assert "-f helm/kuberay-operator-values.yaml" in line, f"{name}: {line.strip()}"


def kubectl() -> str:
    found = Path(sys.prefix) / "bin" / "kubectl"
    path = str(found) if found.exists() else shutil.which("kubectl")
    if path is None:
        pytest.skip("kubectl is not installed: run `python scripts/install_k8s_tools.py`")
    return path


def kustomize(directory: Path) -> list[dict]:
    out = subprocess.run(
        [kubectl(), "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def images(objects: list[dict]) -> list[str]:
    found: list[str] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("containers", "initContainers"):
                    found.extend(c["image"] for c in value)
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(objects)
    return found


def test_kustomization_lists_every_manifest_and_keeps_them_as_rendered():
    kustomization = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    files = sorted(p.name for p in MANIFESTS.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(kustomization["resources"]) == files
    assert kustomization["resources"][0] == "base.yaml"
    assert kustomization["images"] == [{"name": IMAGE, "newName": IMAGE}]
    built = kustomize(MANIFESTS)
    rendered = [d for f in files for d in manifest_docs(MANIFESTS / f)]
    assert len(built) == len(rendered)
    assert sorted(images(built)) == sorted(images(rendered))


def test_kubectl_apply_k_with_an_images_override_runs_our_image(tmp_path):
    """A user's kustomization over manifests/ moves every container to their registry, with
    the same <version>-cpu / -gpu tags; the stage label selects one stage's objects."""
    overlay = tmp_path / "my-lmforge"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        f"resources: [{os.path.relpath(MANIFESTS, overlay)}]\n"
        f"images: [{{name: {IMAGE}, newName: registry.example.com/team/lmforge}}]\n"
    )
    built = kustomize(overlay)
    before = images([d for f in MANIFESTS.glob("*.yaml") for d in manifest_docs(f)])
    after = images(built)
    assert len(after) == len(before) >= 20  # every RayJob, RayCronJob and RayService container
    assert all(i.startswith("registry.example.com/team/lmforge:0.1.0-") for i in after), after
    assert {i.rsplit(":", 1)[1] for i in after} == {i.rsplit(":", 1)[1] for i in before}
    # `kubectl apply -k manifests/ -l lmforge.dev/stage=pretrain`: its job config and its RayJob
    selected = [
        d["kind"]
        for d in built
        if (d["metadata"].get("labels") or {}).get("lmforge.dev/stage") == "pretrain"
    ]
    assert sorted(selected) == ["ConfigMap", "RayJob"]
