import os
import re
import subprocess
import sys

import pytest
from pydantic import Field

from lmforge import ConfigError
from lmforge.config import (
    NOT_HASHED,
    StrictModel,
    apply_overrides,
    config_hash,
    describe_fields,
    load_config,
)


class Optim(StrictModel):
    lr: float = Field(3e-4, description="peak learning rate")
    betas: list[float] = Field([0.9, 0.95], description="AdamW betas")
    warmup_steps: int = Field(100, description="linear warmup")


class Job(StrictModel):
    name: str = Field("run", description="run name")
    out: str = Field("runs", description="where", json_schema_extra=NOT_HASHED)
    optim: Optim = Field(default_factory=Optim, description="optimizer")
    compile: bool = Field(False, description="torch.compile")


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


def test_unknown_key_is_rejected_and_named_with_a_suggestion(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(Job, write(tmp_path, "optim:\n  lrr: 0.1\n"))
    assert "unknown key 'optim.lrr'" in str(e.value)
    assert "did you mean 'optim.lr'" in str(e.value)
    assert "\n" not in str(e.value)


def test_unknown_override_key_is_rejected_before_typing():
    with pytest.raises(ConfigError, match=r"unknown key 'optim\.lr_max'"):
        load_config(Job, None, ["optim.lr_max=1"])


def test_set_overrides_are_typed():
    cfg = load_config(
        Job,
        None,
        [
            "optim.lr=3e-4",
            "optim.warmup_steps=7",
            "compile=true",
            "optim.betas=[0.8, 0.9]",
            "name=007",
        ],
    )
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.optim.warmup_steps == 7 and isinstance(cfg.optim.warmup_steps, int)
    assert cfg.compile is True
    assert cfg.optim.betas == [0.8, 0.9]
    assert cfg.name == "007"  # a string field keeps the string, not the YAML int 7


def test_bad_override_value_names_key_and_expected_type():
    with pytest.raises(ConfigError) as e:
        load_config(Job, None, ["optim.warmup_steps=lots"])
    msg = str(e.value)
    assert "'optim.warmup_steps'" in msg and "expected int" in msg and "'lots'" in msg


def test_later_override_wins_and_file_values_are_kept(tmp_path):
    cfg = load_config(
        Job, write(tmp_path, "name: a\noptim: {lr: 0.1}\n"), ["optim.lr=0.2", "optim.lr=0.3"]
    )
    assert cfg.name == "a" and cfg.optim.lr == 0.3


@pytest.mark.parametrize("override", ["noequals", "=3", "a..b=1"])
def test_malformed_override(override):
    with pytest.raises(ConfigError, match="expected KEY.PATH=VALUE"):
        load_config(Job, None, [override])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(Job, str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match=r"c\.yaml:\d+:\d+: invalid YAML"):
        load_config(Job, write(tmp_path, "name: x\noptim: [1\n"))
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(Job, write(tmp_path, "- 1\n- 2\n"))


def test_hash_is_stable_and_changes_with_any_value():
    a, b = Job(), load_config(Job, None, [])
    assert config_hash(a) == config_hash(b)
    assert config_hash(a) == config_hash(Job.model_validate({"optim": {"betas": [0.9, 0.95]}}))
    # the same in a fresh interpreter (no dependence on hash seeds or object ids)
    code = "from tests.test_config import Job; from lmforge.config import config_hash; print(config_hash(Job()))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "123"},
    )
    assert out.stdout.strip() == config_hash(a)
    seen = {config_hash(a)}
    for override in [
        "name=other",
        "optim.lr=0.001",
        "optim.betas=[0.9, 0.99]",
        "optim.warmup_steps=101",
        "compile=true",
    ]:
        h = config_hash(load_config(Job, None, [override]))
        assert h not in seen, override
        seen.add(h)


def test_not_hashed_fields_do_not_change_the_hash():
    assert config_hash(Job()) == config_hash(Job(out="s3://bucket/elsewhere"))


def test_hash_does_not_depend_on_key_order(tmp_path):
    one = load_config(Job, write(tmp_path, "name: a\noptim: {lr: 0.1, warmup_steps: 3}\n"))
    (tmp_path / "d.yaml").write_text("optim: {warmup_steps: 3, lr: 0.1}\nname: a\n")
    two = load_config(Job, str(tmp_path / "d.yaml"))
    assert config_hash(one) == config_hash(two)


def test_apply_overrides_does_not_mutate_input():
    data = {"optim": {"lr": 0.1}}
    apply_overrides(Job, data, ["optim.lr=0.5"])
    assert data == {"optim": {"lr": 0.1}}


def test_describe_fields_covers_nested_fields_with_descriptions():
    docs = {d.key: d for d in describe_fields(Job)}
    assert docs["optim.lr"].description == "peak learning rate"
    assert docs["optim.lr"].type == "float" and docs["optim.lr"].default == "0.0003"
    assert {"name", "out", "optim", "optim.betas", "optim.warmup_steps", "compile"} <= set(docs)


# ---------------------------------------------------------------- errors inside unions


def _error(cls, data) -> str:
    from lmforge.config import build_config

    with pytest.raises(ConfigError) as e:
        build_config(cls, data, source="c.yaml")
    assert "\n" not in str(e.value)
    return str(e.value)


def test_an_eval_task_with_a_wrong_key_names_the_task_and_the_key():
    from lmforge.eval.config import EvalConfig

    task = {"name": "t", "type": "generation", "path": "x.jsonl"}
    assert (
        _error(EvalConfig, {"tasks": ["builtin:bias-pairs", task]})
        == "c.yaml: tasks[1]: unknown key 'path' (did you mean 'file'?)"
    )
    bad_limit = {"name": "t", "type": "generation", "file": "x.jsonl", "limit": 0}
    msg = _error(EvalConfig, {"tasks": [bad_limit]})
    assert msg.startswith("c.yaml: 'tasks[0].limit': Input should be greater than or equal to 1")
    assert ".str" not in msg and "more problem" not in msg
    assert _error(EvalConfig, {"tasks": [5]}) == (
        "c.yaml: 'tasks[0]': not a valid value (got 5); expected str | mapping"
    )


def test_a_data_step_with_a_wrong_key_or_name_says_which_step():
    from lmforge.data.config import DataConfig

    steps = [{"step": "normalize"}, {"step": "length", "min_word": 3}]
    assert _error(DataConfig, {"steps": steps}) == (
        "c.yaml: steps[1]: unknown key 'min_word' (did you mean 'min_words'?)"
    )
    assert _error(DataConfig, {"steps": [{"step": "lenght"}]}).startswith(
        "c.yaml: steps[0]: unknown step 'lenght' (did you mean 'length'?); one of: normalize, length"
    )
    assert _error(DataConfig, {"steps": [{"min_words": 3}]}).startswith(
        "c.yaml: steps[0]: missing key 'step'; one of: normalize, length"
    )
    assert _error(DataConfig, {"sources": [{"pth": "x"}]}).startswith(
        "c.yaml: sources[0]: unknown key 'pth' (did you mean 'path'?)"
    )


# ---------------------------------------------------------------- help and reference text

REPRS = re.compile(
    r"FieldInfo|Annotated\[|Union\[|Optional\[|Literal\[|\blmforge\.[a-z_]+\.|name=None"
)


def test_field_types_and_defaults_read_as_yaml():
    from lmforge.config import fields_help
    from lmforge.data.config import DataConfig

    docs = {d.key: d for d in describe_fields(DataConfig)}
    assert docs["steps"].type.startswith("list of steps (normalize | length | quality |")
    assert (
        docs["steps"].default == "[{step: normalize}, {step: length}, {step: quality}, {step: pii}]"
    )
    assert docs["sources"].default == "[{path: 'builtin:python-docs'}]"
    assert docs["sources[].format"].type.startswith("auto | txt | jsonl")
    assert docs["sources[].name"].type == "str | null"
    assert docs["dedup.ngram_unit"].default == "word"
    assert "sources[].path (str, required)" in fields_help(DataConfig)


def test_no_python_reprs_in_any_help_or_the_reference(cli, capsys):
    from lmforge.config.command import reference_markdown
    from lmforge.stage import STAGES

    texts = {"reference": reference_markdown()}
    for name in [*STAGES, "serve"]:
        argv = ["data", "prepare", "--help"] if name == "data" else [name, "--help"]
        with pytest.raises(SystemExit):
            cli(*argv)
        texts[name] = capsys.readouterr().out
    for name, text in texts.items():
        assert "config fields" in text or name == "reference"
        assert not REPRS.search(text), (name, REPRS.search(text).group())


def test_more_config_mistakes_are_one_line(tmp_path):
    from lmforge.eval.config import EvalConfig
    from lmforge.train.config import TrainConfig

    (tmp_path / "bin.yaml").write_bytes(b"name: \xff\xfe\n")
    with pytest.raises(ConfigError, match=r"bin\.yaml: not UTF-8 text"):
        load_config(Job, str(tmp_path / "bin.yaml"))
    with pytest.raises(ConfigError, match="is a directory; give a YAML config file"):
        load_config(Job, str(tmp_path))
    # every stage's run name stays one path component, though each redefines `name`
    for cls in (TrainConfig, EvalConfig):
        with pytest.raises(ConfigError, match=r"'name': run name '\.\./x': use letters"):
            load_config(cls, None, ["name=../x"])
    with pytest.raises(ConfigError, match=r"--set tasks\.0\.file: 'tasks' is a list"):
        load_config(EvalConfig, None, ["tasks.0.file=x.jsonl"])
    with pytest.raises(ConfigError) as e:
        load_config(TrainConfig, None, ["optim=3"])
    assert str(e.value) == "config: 'optim': Input should be a mapping of keys to values (got 3)"
