"""Every shipped config parses with its stage's config class, so none can rot; the generated
config reference is current; every jobs/ entry point belongs to a registered stage."""

from pathlib import Path

import pytest

from lmforge.config import load_config
from lmforge.config_command import reference_markdown
from lmforge.pipeline import plan
from lmforge.quickstart import quickstart_pipeline
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


def test_every_job_entry_point_is_a_stage():
    scripts = {f"jobs/{p.name}" for p in (REPO / "jobs").glob("*.py") if not p.name.startswith("_")}
    assert scripts == set(JOBS)


def test_quickstart_pipeline_resolves():
    _, steps = plan(quickstart_pipeline(), runs_dir="/tmp/never-written")
    assert steps[0].stage.name == "check"


def test_config_reference_is_current():
    current = (REPO / "docs" / "config-reference.md").read_text()
    assert current == reference_markdown(), "docs/config-reference.md is stale: run `make docs`"
