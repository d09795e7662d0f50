import pytest

from lmforge import LmforgeError
from lmforge.config import load_config
from lmforge.pipeline import plan
from lmforge.scaffold import init_project
from lmforge.stage import DEFAULT_PIPELINE, get_stage


def test_init_writes_a_pipeline_that_plans_as_is(tmp_path):
    written = init_project(str(tmp_path / "proj"), preset="tiny")
    assert len(written) == len(DEFAULT_PIPELINE) + 1
    for name in DEFAULT_PIPELINE:
        path = tmp_path / "proj" / "configs" / f"{name}.yaml"
        text = path.read_text()
        stage = get_stage(name)
        assert "# " + stage.config_cls.model_fields["runs_dir"].description in text  # commented
        load_config(stage.config_cls, str(path))  # every written config is valid
    _, steps = plan(str(tmp_path / "proj" / "pipeline.yaml"))
    assert [s.id for s in steps] == DEFAULT_PIPELINE
    assert all(s.config.name == "proj" for s in steps)


def test_init_refuses_to_overwrite_without_force(tmp_path):
    init_project(str(tmp_path / "p"))
    with pytest.raises(LmforgeError, match="already exists"):
        init_project(str(tmp_path / "p"))
    init_project(str(tmp_path / "p"), force=True)


def test_init_cli(cli, tmp_path):
    code, out, _ = cli("init", tmp_path / "q", "--preset", "small")
    assert code == 0 and "pipeline.yaml" in out
