"""Render manifests/ (plain YAML for `kubectl apply`) from the Helm chart: `make manifests`.

`helm template` with helm/lmforge/ci/manifests.yaml, split into one file per stage
(`rayjob.<stage>.yaml`: the stage's config ConfigMap and its RayJob), `raycronjob.improve.yaml`
(the improvement loop's config and its RayCronJob), `rayservice.yaml` (the serving RayService)
and `base.yaml` (what they share: the storage claim), plus
`kustomization.yaml` (all of them, and an `images:` entry for `kubectl apply -k`). A RayJob file's
header says which earlier run its config reads (`@<stage>/<run name>`, e.g. finetune's
`base: "@train/base"`), i.e. when to apply it. Helm's bookkeeping labels
and `# Source:` lines are dropped; the templates' comments stay. tests/k8s fails when the files
differ from a fresh render, so edit the chart and re-render, never the files.

    python scripts/render_manifests.py [--check]
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "helm" / "lmforge"
VALUES = CHART / "ci" / "manifests.yaml"
OUT = REPO / "manifests"
RELEASE = "lmforge"
# Lines that only make sense for a Helm release.
HELM_ONLY = re.compile(
    r"^\s*(helm\.sh/chart|app\.kubernetes\.io/managed-by): .*\n|^# Source: .*\n", re.M
)

HEADER = """\
# {title}
# Rendered from the Helm chart helm/lmforge by `make manifests` (values: helm/lmforge/ci/manifests.yaml).
# Do not edit: change the chart or its values and re-render (tests/k8s checks these files match).
# Needs the KubeRay operator v1.7 and, once per namespace, the Ray token Secret:
#   kubectl create secret generic lmforge-ray-auth --from-literal=auth_token="$(openssl rand -hex 32)"
#   kubectl apply -f manifests/base.yaml
{usage}"""


def helm_binary() -> str:
    local = Path(sys.prefix) / "bin" / "helm"
    found = str(local) if local.exists() else shutil.which("helm")
    if not found:
        raise SystemExit(
            "helm not found: run `python scripts/install_k8s_tools.py` (or `make dev`)"
        )
    return found


def helm_template(values: Path = VALUES) -> str:
    cmd = [helm_binary(), "template", RELEASE, str(CHART), "-f", str(values)]
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def render(values: Path = VALUES) -> dict[str, str]:
    """File name -> text of every file manifests/ should hold."""
    groups: dict[str, list[str]] = {}
    docs = []
    for chunk in helm_template(values).split("\n---\n"):
        chunk = HELM_ONLY.sub("", chunk.removeprefix("---\n")).strip("\n")
        doc = yaml.safe_load(chunk)
        if doc:
            docs.append((chunk, doc))
    # A stage scheduled by a RayCronJob goes to raycronjob.<stage>.yaml, with its config.
    scheduled = {
        (d["metadata"].get("labels") or {}).get("lmforge.dev/stage")
        for _, d in docs
        if d["kind"] == "RayCronJob"
    }
    for chunk, doc in docs:
        labels = doc["metadata"].get("labels") or {}
        # A cluster's own ServiceAccount and NetworkPolicy go with the job or service it runs.
        cluster = labels.get("lmforge.dev/ray-cluster", "")
        stage = labels.get("lmforge.dev/stage")
        if not stage and cluster.startswith("job-"):
            stage = cluster.removeprefix("job-")
        if stage:
            name = f"{'raycronjob' if stage in scheduled else 'rayjob'}.{stage}.yaml"
        elif labels.get("app.kubernetes.io/component") == "serve" or cluster == "serve":
            name = "rayservice.yaml"
        else:
            name = "base.yaml"
        groups.setdefault(name, []).append(chunk + "\n")
    files = {}
    for name, chunks in sorted(groups.items()):
        if name == "base.yaml":
            title = "What every lmforge stage shares: storage."
            usage = ""
        elif name == "rayservice.yaml":
            title = "Serving: the RayService (Ray Serve, OpenAI-compatible API on port 8000)."
            usage = (
                "# and the API keys Secret (one key per line):\n"
                '#   kubectl create secret generic lmforge-api-keys --from-literal=api-keys="$(openssl rand -hex 24)"\n'
                f"#   kubectl apply -f manifests/{name}\n"
                "#   kubectl get rayservice lmforge-serve -w; kubectl port-forward svc/lmforge-serve 8000\n"
            )
        elif name.startswith("raycronjob."):
            stage = name.split(".")[1]
            title = f"The {stage} job on a schedule: its job config (ConfigMap), its cluster's ServiceAccount and NetworkPolicy, and its RayCronJob."
            usage = (
                f"#   kubectl apply -f manifests/{name}\n"
                f"#   kubectl get raycronjob lmforge-{stage}; kubectl get rayjobs -w  (one per run)\n"
            )
        else:
            stage = name.split(".")[1]
            title = f"The {stage} stage: its job config (ConfigMap), its cluster's ServiceAccount and NetworkPolicy, and its RayJob."
            usage = "".join(
                f"# when the run {ref} has SUCCEEDED (`{key}` reads its latest output):\n"
                for key, ref in run_references(chunks)
            ) + (
                f"#   kubectl apply -f manifests/{name}\n"
                f"#   kubectl get rayjob lmforge-{stage} -w; kubectl logs -f job/lmforge-{stage}\n"
            )
        files[name] = HEADER.format(title=title, usage=usage) + "---\n" + "---\n".join(chunks)
    files[KUSTOMIZATION] = kustomization(files, image_names(docs))
    return files


KUSTOMIZATION = "kustomization.yaml"
# Apply order: what the others use, the stages as a pipeline runs them, then serving and the loop.
ORDER = (
    "base",
    "rayjob.check",
    "rayjob.prepare-data",
    "rayjob.pretrain",
    "rayjob.finetune",
    "rayjob.evaluate",
    "rayservice",
    "raycronjob.improve",
)


def image_names(docs: list[tuple[str, dict]]) -> list[str]:
    """The image names (without tag) of every container the manifests run."""
    names: set[str] = set()

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("containers", "initContainers") and isinstance(value, list):
                    names.update(c["image"].rsplit(":", 1)[0] for c in value if "image" in c)
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    for _, doc in docs:
        walk(doc)
    return sorted(names)


def kustomization(files: dict[str, str], images: list[str]) -> str:
    """manifests/kustomization.yaml: every file as a resource, and an `images:` entry per image
    so that `kubectl apply -k` (or an overlay naming this directory) can point them elsewhere."""

    def rank(name: str) -> tuple[int, str]:
        stem = name.removesuffix(".yaml")
        return (ORDER.index(stem) if stem in ORDER else len(ORDER), name)

    doc = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": sorted(files, key=rank),
        "images": [{"name": name, "newName": name} for name in images],
    }
    return KUSTOMIZE_HEADER + yaml.safe_dump(doc, sort_keys=False)


KUSTOMIZE_HEADER = """\
# kustomize's view of manifests/ (`kubectl apply -k manifests/`): every file, and the image.
# Rendered by `make manifests` with the other files; docs/kubernetes.md, "4. Run the pipeline".
# Your image: set `newName` below (the tags stay <version>-cpu / -gpu). To keep manifests/
# as rendered, put the same `images:` into a kustomization.yaml of your own that has
# `resources: [<path>/manifests]`, and apply that directory instead.
# One stage at a time: kubectl apply -k manifests/ -l lmforge.dev/stage=<stage>
"""


def run_references(chunks: list[str]) -> list[tuple[str, str]]:
    """(dotted key, `@<stage>/<run name>`) of every run reference in the job configs among
    `chunks` (a stage's input, e.g. finetune's `base: "@train/base"`), in config order."""
    found: list[tuple[str, str]] = []

    def walk(node: object, path: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{path}.{key}" if path else str(key))
        elif isinstance(node, str) and node.startswith("@") and "/" in node:
            found.append((path, node))

    for chunk in chunks:
        doc = yaml.safe_load(chunk)
        if doc.get("kind") == "ConfigMap":
            walk(yaml.safe_load(doc["data"]["config.yaml"]), "")
    return found


def stale_or_missing(files: dict[str, str], out: Path = OUT) -> list[str]:
    """Names that differ between `files` and what is in `out` (missing, different, or extra)."""
    on_disk = {p.name for p in out.glob("*.yaml")}
    differ = [
        n for n, text in files.items() if not (out / n).exists() or (out / n).read_text() != text
    ]
    return sorted(differ + sorted(on_disk - files.keys()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if manifests/ is out of date; write nothing"
    )
    args = parser.parse_args()
    files = render()
    differ = stale_or_missing(files)
    if args.check:
        if differ:
            print(f"manifests/ is out of date ({', '.join(differ)}): run `make manifests`")
            return 1
        print("manifests/ is up to date")
        return 0
    OUT.mkdir(exist_ok=True)
    for name in differ:
        if name in files:
            (OUT / name).write_text(files[name])
        else:
            (OUT / name).unlink()
    print(f"manifests/: {len(files)} files, {len(differ)} rewritten or removed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
