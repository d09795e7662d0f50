"""Every shipped config parses with its stage's config class, so none can rot; the generated
config reference is current; every jobs/ entry point belongs to a registered stage."""

from pathlib import Path

import pytest

from lmforge.config import load_config
from lmforge.config.command import reference_markdown
from lmforge.project.pipeline import plan
from lmforge.project.quickstart import quickstart_pipeline
from lmforge.stage import STAGES, get_stage
from tests.conftest import REPO

JOBS = {get_stage(name).job_script: get_stage(name) for name in STAGES}
CONFIGS = sorted((REPO / "jobs" / "configs").glob("*.yaml"))


def stage_of(config: Path):
    """jobs/configs/<job>[-flavour].yaml belongs to the stage whose entry is jobs/<job>.py."""
    matches = [s for script, s in JOBS.items() if config.stem.split("-")[0] == Path(script).stem]
    assert matches, f"{config.name}: no stage has the job {config.stem.split('-')[0]}.py"
    return matches[0]


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_shipped_config_is_valid(config):
    load_config(stage_of(config).config_cls, str(config))


@pytest.mark.parametrize(
    ("finetune", "pretrain"),
    [("finetune-tiny.yaml", "train-tiny.yaml"), ("finetune.yaml", "train-1b.yaml")],
)
def test_finetune_config_fits_its_pretrain_config(finetune, pretrain):
    """Each fine-tuning config starts from a `@train/<run>` and splits its batch evenly; the tiny
    one fine-tunes exactly what train-tiny.yaml trains, on the built-in chat data."""
    from lmforge.finetune.config import scaffold
    from lmforge.model.presets import PRESETS
    from lmforge.train.data import batch_plan

    configs = REPO / "jobs" / "configs"
    ft = load_config(get_stage("finetune").config_cls, str(configs / finetune))
    base = load_config(get_stage("train").config_cls, str(configs / pretrain))
    assert ft.base.startswith("@train/")
    assert ft.data.seq_len <= PRESETS[base.model.preset].max_seq_len
    plan = batch_plan(
        ft.train.global_batch_tokens,
        ft.train.micro_batch_size,
        ft.resources.num_workers,
        ft.data.seq_len,
    )
    assert plan.accum_steps == 2  # see the comments of both configs
    # LoRA for the big presets, full fine-tuning for small ones, as `lmforge init` scaffolds it
    assert ft.lora.enabled == scaffold(base.model.preset)["lora"]["enabled"]
    if finetune == "finetune-tiny.yaml":
        assert ft.base == f"@train/{base.name}" == "@train/tiny"
        assert ft.data.sources == ["builtin:stdlib-sft"] and ft.data.seq_len == 256
        assert ft.resources.gpus_per_worker == 0 and ft.train.max_steps <= 10
    else:
        assert ft.lora.enabled is True and ft.resources.gpus_per_worker == 1


# Entry points renamed to their stage's name, kept under the old name for RayJobs that use it.
FORMER_NAMES = {
    "jobs/prepare_data.py": "data",
    "jobs/pretrain.py": "train",
    "jobs/evaluate.py": "eval",
}


def test_every_job_entry_point_is_a_stage():
    scripts = {f"jobs/{p.name}" for p in (REPO / "jobs").glob("*.py") if not p.name.startswith("_")}
    assert scripts == set(JOBS) | set(FORMER_NAMES)
    # Each built-in stage's entry point is jobs/<stage>.py, as the README says.
    assert {script: stage.name for script, stage in JOBS.items()} == {
        f"jobs/{name}.py": name for name in STAGES
    }
    for script in scripts:
        stage = FORMER_NAMES.get(script) or JOBS[script].name
        assert f'job_main("{stage}")' in (REPO / script).read_text(), script


def test_quickstart_pipeline_resolves():
    _, steps = plan(quickstart_pipeline(), runs_dir="/tmp/never-written")
    assert steps[0].stage.name == "check"


def test_config_reference_is_current():
    current = (REPO / "docs" / "config-reference.md").read_text()
    assert current == reference_markdown(), "docs/config-reference.md is stale: run `make docs`"


def test_the_chart_runs_each_stage_by_its_own_name():
    """helm/lmforge names the entry points jobs/<stage>.py, the names the README gives."""
    import yaml

    values = yaml.safe_load((REPO / "helm" / "lmforge" / "values.yaml").read_text())
    jobs = {key: stage["job"] for key, stage in values["stages"].items()}
    assert jobs == {
        "check": "check",
        "prepareData": "data",
        "pretrain": "train",
        "finetune": "finetune",
        "evaluate": "eval",
    }
    assert values["improve"]["job"] == "improve"
    assert all((REPO / get_stage(job).job_script).exists() for job in [*jobs.values(), "improve"])
