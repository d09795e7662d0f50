"""manifests/ is what `make manifests` renders, and every config a manifest names exists and validates."""

from __future__ import annotations

import importlib.util

import pytest

from tests.conftest import REPO
from tests.k8s.conftest import (
    MANIFESTS,
    helm_path,
    manifest_docs,
    rayjob_entrypoint_config,
    stage_for_job,
)

RAYJOB_FILES = sorted([*MANIFESTS.glob("rayjob.*.yaml"), *MANIFESTS.glob("raycronjob.*.yaml")])


def _renderer():
    spec = importlib.util.spec_from_file_location(
        "render_manifests", REPO / "scripts" / "render_manifests.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_manifests_match_a_fresh_render():
    if helm_path() is None:
        pytest.skip("helm is not installed: run `python scripts/install_k8s_tools.py`")
    renderer = _renderer()
    files = renderer.render()
    differ = renderer.stale_or_missing(files, MANIFESTS)
    assert not differ, f"manifests/ is out of date ({', '.join(differ)}): run `make manifests`"
    assert {
        "base.yaml",
        "rayjob.check.yaml",
        "rayjob.prepare-data.yaml",
        "rayjob.pretrain.yaml",
        "rayjob.finetune.yaml",
        "rayjob.evaluate.yaml",
        "rayservice.yaml",
        "raycronjob.improve.yaml",
    } <= set(files)


def test_every_manifest_says_what_it_is():
    for path in MANIFESTS.glob("*.yaml"):
        head = path.read_text().splitlines()[:6]
        assert head[0].startswith("# "), path.name
        assert any("make manifests" in line for line in head), path.name


@pytest.mark.parametrize("path", RAYJOB_FILES, ids=[p.stem for p in RAYJOB_FILES])
def test_rayjob_config_exists_and_validates(path, tmp_path):
    from lmforge.config import load_config

    docs = manifest_docs(path)
    (job,) = [d for d in docs if d["kind"] in ("RayJob", "RayCronJob")]
    script, config, text, overrides = rayjob_entrypoint_config(docs, job)
    assert config.startswith("job-configs/")
    if not (REPO / script).exists():
        pytest.skip(f"{script} does not exist yet (its stage is being written)")
    stage = stage_for_job(script)
    if stage is None:
        pytest.skip(f"no registered stage has {script} as its job yet")
    local = tmp_path / "config.yaml"
    local.write_text(text)
    cfg = load_config(stage.config_cls, str(local), overrides)  # raises, naming the key, if invalid
    assert cfg.runs_dir == "/mnt/lmforge/runs"  # the storage the chart mounts on every Ray pod


def test_improve_raycronjob_reads_the_request_log_the_rayservice_writes():
    import yaml

    docs = manifest_docs(MANIFESTS / "raycronjob.improve.yaml")
    (cron,) = [d for d in docs if d["kind"] == "RayCronJob"]
    script, config, text, _ = rayjob_entrypoint_config(docs, cron)
    assert (script, config) == ("jobs/improve.py", "job-configs/improve.yaml")
    (service,) = [
        d for d in manifest_docs(MANIFESTS / "rayservice.yaml") if d["kind"] == "RayService"
    ]
    args = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert yaml.safe_load(text)["request_log"] == args["request_log"]["path"]
    assert args["request_log"]["path"] == "/mnt/lmforge/runs/request-log"


def test_rayjobs_chain_through_run_references():
    """Each stage's input names the run of the RayJob before it (`@<stage>/<run name>`), so the
    manifests applied in order chain data -> pretrain -> finetune, and the header says so."""
    import yaml

    configs = {}
    for path in MANIFESTS.glob("rayjob.*.yaml"):
        docs = manifest_docs(path)
        (job,) = [d for d in docs if d["kind"] == "RayJob"]
        script, _, text, _ = rayjob_entrypoint_config(docs, job)
        configs[script] = yaml.safe_load(text)
    data, pretrain = configs["jobs/data.py"], configs["jobs/train.py"]
    finetune = configs["jobs/finetune.py"]
    assert pretrain["data"]["path"] == f"@data/{data['name']}" == "@data/corpus"
    assert finetune["base"] == f"@train/{pretrain['name']}" == "@train/base"
    assert configs["jobs/eval.py"]["model"] == "@train/base"
    header = (MANIFESTS / "rayjob.finetune.yaml").read_text().split("\n---\n")[0].splitlines()
    assert header[-3:] == [
        "# when the run @train/base has SUCCEEDED (`base` reads its latest output):",
        "#   kubectl apply -f manifests/rayjob.finetune.yaml",
        "#   kubectl get rayjob lmforge-finetune -w; kubectl logs -f job/lmforge-finetune",
    ]
    check = (MANIFESTS / "rayjob.check.yaml").read_text().split("\n---\n")[0]
    assert "SUCCEEDED" not in check  # it reads no earlier run
