"""A stage run as the stage runner tracks it (no Ray): what its run folder holds reaches the
MLflow run (the data funnel, eval metrics with their standard errors, the model's version,
report and plots), a failed run is continued by its retry, a pipeline nests its stage runs."""

from __future__ import annotations

import json

import pytest
import yaml
from pydantic import Field

from lmforge import StageFailed, storage
from lmforge.project.pipeline import run_pipeline
from lmforge.stage import Stage, StageConfig, run_stage
from lmforge.tracking import flatten, param_text
from tests.tracking.readers import mlflow_run

MANIFEST = {
    "documents_in": 10,
    "documents_out": 6,
    "tokens_train": 900,
    "rejected": {"too_short": 3},
    "duplicates_exact": 1,
    "steps": [
        {"step": "read", "docs_in": 10, "docs_out": 10, "dropped": {}, "counts": {}},
        {
            "step": "length",
            "docs_in": 10,
            "docs_out": 7,
            "dropped": {"too_short": 3},
            "counts": {},
        },
        {"step": "pii", "docs_in": 7, "docs_out": 7, "dropped": {}, "counts": {"email": 2}},
        {
            "step": "dedup_exact",
            "docs_in": 7,
            "docs_out": 6,
            "dropped": {"duplicate_exact": 1},
            "counts": {},
        },
    ],
}
REPORT = {"tasks": {"qa": {"exact_match": {"value": 0.25, "stderr": 0.1, "n": 20}}}}
PNG = b"\x89PNG\r\n\x1a\n"


class OutputsConfig(StageConfig):
    fail: bool = Field(False, description="raise after writing the outputs")


def write_outputs(cfg, ctx):
    storage.write_json(storage.join(ctx.output, "manifest.json"), MANIFEST)
    storage.write_json(storage.join(ctx.output, "report.json"), REPORT)
    storage.write_text(storage.join(ctx.output, "report.md"), "| task |\n")
    storage.write_bytes(storage.join(ctx.output, "loss.png"), PNG)
    storage.write_json(
        storage.join(ctx.output, "model", "version.json"),
        {"version": "v-0123456789ab", "parent": None, "config_hash": "abc"},
    )
    if cfg.fail:
        raise StageFailed("asked to fail")
    return {"documents_out": 6, "note": "text is not a metric"}


STAGE = Stage("outputs", OutputsConfig, write_outputs, "writes outputs", uses_ray=False)


@pytest.fixture(autouse=True)
def no_tracking_server(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def run_of(out) -> dict:
    info = json.loads((out / "tracking.json").read_text())
    return {"info": info, **mlflow_run(info["uri"], info["run_id"])}


def test_a_stage_run_logs_its_folder(tmp_path):
    cfg = OutputsConfig(runs_dir=str(tmp_path / "runs"))
    result = run_stage(STAGE, cfg, quiet=True)
    out = tmp_path / "runs" / "outputs" / result.output.rsplit("/", 1)[-1]
    got = run_of(out)
    assert got["status"] == "FINISHED" and got["info"]["experiment"] == "outputs"
    resolved = yaml.safe_load((out / "resolved_config.yaml").read_text())
    assert {k: got["params"][k] for k in flatten(resolved)} == {
        k: param_text(v) for k, v in flatten(resolved).items()
    }
    metrics = got["metrics"]
    assert metrics["data.docs_in"] == [(0, 10), (1, 10), (2, 7), (3, 7)]  # the funnel by step
    assert metrics["data.docs_out"] == [(0, 10), (1, 7), (2, 7), (3, 6)]
    assert metrics["data.length.dropped.too_short"] == [(1, 3)]
    assert metrics["data.pii.email"] == [(2, 2)]
    assert metrics["data.documents_out"] == [(0, 6)]
    assert metrics["data.rejected.too_short"] == [(0, 3)]
    assert metrics["eval.qa.exact_match"] == [(0, 0.25)]
    assert metrics["eval.qa.exact_match.stderr"] == [(0, 0.1)]
    assert metrics["summary.documents_out"] == [(0, 6)]
    assert got["tags"]["model.version"] == "v-0123456789ab"
    assert got["tags"]["output"] == str(out)
    assert got["artifacts"] >= {
        "resolved_config.yaml",
        "manifest.json",
        "report.json",
        "report.md",
        "plots/loss.png",
        "model/version.json",
    }


def test_a_failed_run_is_continued_by_its_retry(tmp_path):
    cfg = OutputsConfig(runs_dir=str(tmp_path / "runs"), fail=True)
    with pytest.raises(StageFailed):
        run_stage(STAGE, cfg, quiet=True)
    (out,) = (tmp_path / "runs" / "outputs").iterdir()
    failed = run_of(out)
    assert failed["status"] == "FAILED"
    # The retry (the same output, as after fixing the cause or a RayJob retry) continues it.
    info = json.loads((out / "tracking.json").read_text())
    stage = Stage("outputs", OutputsConfig, lambda c, ctx: {}, "", uses_ray=False)
    run_stage(stage, cfg, quiet=True)
    again = run_of(out)
    assert again["info"]["run_id"] == info["run_id"] and again["status"] == "FINISHED"
    # A forced rerun of a complete output is a new run.
    run_stage(stage, cfg, quiet=True, force=True)
    assert run_of(out)["info"]["run_id"] != info["run_id"]


def test_tracking_none_writes_no_store(tmp_path):
    cfg = OutputsConfig(runs_dir=str(tmp_path / "runs"), tracking={"backend": "none"})
    result = run_stage(STAGE, cfg, quiet=True)
    assert not (tmp_path / "runs" / "mlflow.db").exists()
    assert not storage.exists(storage.join(result.output, "tracking.json"))


def test_tracking_is_not_part_of_the_config_hash(tmp_path):
    from lmforge.config import config_hash

    a = OutputsConfig(runs_dir="r")
    b = OutputsConfig(runs_dir="r", tracking={"backend": "wandb", "experiment": "x"})
    assert config_hash(a) == config_hash(b)


def test_a_pipeline_nests_its_stage_runs_under_a_parent_run(tmp_path):
    (tmp_path / "write.yaml").write_text("value: 3\n")
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(
        f"name: my-model\nruns_dir: {tmp_path / 'runs'}\nstages:\n"
        "  - stage: tests.stages_for_tests:WRITE\n    config: write.yaml\n"
        "  - stage: tests.stages_for_tests:DOUBLE\n"
    )
    results = run_pipeline(str(pipeline))
    children = [run_of(tmp_path / "runs" / r.stage / r.output.rsplit("/", 1)[-1]) for r in results]
    parents = {c["tags"]["mlflow.parentRunId"] for c in children}
    assert len(parents) == 1
    assert {c["info"]["experiment"] for c in children} == {"my-model"}
    parent = mlflow_run(children[0]["info"]["uri"], parents.pop())
    assert parent["status"] == "FINISHED"
    steps = "tests.stages_for_tests:WRITE -> tests.stages_for_tests:DOUBLE"
    assert parent["params"]["steps"] == steps


def test_a_stage_that_runs_another_nests_its_run(tmp_path):
    """As improve runs its fine-tune and evals: the inner run is a child of the outer one."""
    inner_cfg = OutputsConfig(runs_dir=str(tmp_path / "runs"))
    inner: list = []

    def outer_run(cfg, ctx):
        inner.append(run_stage(STAGE, inner_cfg, quiet=True))
        return {}

    outer = Stage("improve", OutputsConfig, outer_run, "", uses_ray=False)
    result = run_stage(outer, OutputsConfig(runs_dir=str(tmp_path / "runs")), quiet=True)
    outer_run_of = run_of(tmp_path / "runs" / "improve" / result.output.rsplit("/", 1)[-1])
    (child,) = inner
    child_run = run_of(tmp_path / "runs" / "outputs" / child.output.rsplit("/", 1)[-1])
    assert child_run["tags"]["mlflow.parentRunId"] == outer_run_of["info"]["run_id"]
    assert child_run["info"]["experiment"] == "improve"
