"""`lmforge init DIR`: a ready model project — a pipeline, one commented config per stage (and
for serving and the improvement loop), and the jobs/ entry points `lmforge submit` runs.

The configs are generated from the stages' config classes (every field, its default or the
preset's value, and its description as a comment), so a new field shows up here by itself.
"""

from __future__ import annotations

import json
import os
from typing import Any

import yaml
from pydantic import BaseModel

from lmforge import LmforgeError
from lmforge.config import config_dict
from lmforge.config.schema import model_of
from lmforge.stage import DEFAULT_PIPELINE, get_stage

PRESETS = ("tiny", "small", "1b", "8b")


def commented_yaml(cfg: BaseModel, indent: int = 0) -> str:
    """YAML of a config instance with each field's description as a comment above it."""
    lines: list[str] = []
    pad = "  " * indent
    values = config_dict(cfg)
    for name, field in type(cfg).model_fields.items():
        if field.description:
            lines.append(f"{pad}# {field.description}")
        value = getattr(cfg, name)
        if model_of(field.annotation) is not None and isinstance(value, BaseModel):
            lines.append(f"{pad}{name}:")
            lines.append(commented_yaml(value, indent + 1).rstrip("\n"))
            continue
        value = values[name]
        if isinstance(value, dict | list) and value:
            dumped = yaml.safe_dump({name: value}, sort_keys=False, width=100).rstrip("\n")
        else:  # a scalar (or empty list/dict) on one line, e.g. `name: proj`
            dumped = (
                f"{name}: "
                + yaml.safe_dump(value, default_flow_style=True).split("\n...")[0].strip()
            )
        lines.extend(pad + line for line in dumped.splitlines())
    return "\n".join(lines) + "\n"


# Where `lmforge serve -c configs/serve.yaml` logs requests and feedback, and `improve` reads them.
REQUEST_LOG = "runs/request-log"
# The pipeline's stage whose model is served and improved.
MODEL_STAGE = "finetune"


def init_project(directory: str, preset: str = "tiny", force: bool = False) -> list[str]:
    """Write pipeline.yaml, configs/<stage>.yaml for the pipeline's stages and for serve and
    improve, and jobs/<stage>.py (what `lmforge submit` runs); returns the paths written."""
    if preset not in PRESETS:
        raise LmforgeError(f"unknown preset '{preset}'; choose one of {', '.join(PRESETS)}")
    pipeline_path = os.path.join(directory, "pipeline.yaml")
    if os.path.exists(pipeline_path) and not force:
        raise LmforgeError(
            f"{pipeline_path} already exists; pass --force to overwrite the project's files"
        )
    project = os.path.basename(os.path.abspath(directory))
    written = []
    steps: list[dict[str, Any]] = []
    previous = None
    for name in DEFAULT_PIPELINE:
        stage = get_stage(name)
        values = stage.scaffold(preset) if stage.scaffold else {}
        if stage.input_field and previous:
            # A config run on its own (`lmforge train -c ...`, `lmforge submit`) reads the
            # previous stage's latest run of this project; the pipeline passes the path instead.
            values = _with(values, stage.input_field, f"@{previous}/{project}")
        written.append(_write_stage_config(directory, name, project, values, preset))
        steps.append({"stage": name, "config": f"configs/{name}.yaml"})
        previous = name
    improve = {"request_log": REQUEST_LOG, "current": f"@{MODEL_STAGE}/{project}"}
    written.append(_write_stage_config(directory, "improve", project, improve, preset))
    written.append(_write_serve_config(directory, project, f"runs/@{MODEL_STAGE}/{project}"))
    for name in [*DEFAULT_PIPELINE, "improve"]:
        written.append(_write_job(directory, name))
    pipeline = {"name": project, "runs_dir": "runs", "stages": steps}
    text = (
        "# lmforge pipeline: `lmforge pipeline run pipeline.yaml` (from this directory) runs the\n"
        "# stages in order, passing each one's output to the next and skipping finished stages.\n"
        "# Then `lmforge serve -c configs/serve.yaml` serves the model, and `lmforge improve -c\n"
        "# configs/improve.yaml` fine-tunes it on the feedback the server logged.\n"
        + yaml.safe_dump(json.loads(json.dumps(pipeline)), sort_keys=False)
    )
    _write(pipeline_path, text)
    written.append(pipeline_path)
    return written


def _with(values: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """A copy of `values` with the dotted key set (nested dicts created as needed)."""
    out = json.loads(json.dumps(values))
    node = out
    *parents, last = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    return out


def _write_stage_config(
    directory: str, name: str, project: str, values: dict[str, Any], preset: str
) -> str:
    cfg = get_stage(name).config_cls.model_validate({"name": project or name, **values})
    path = os.path.join(directory, "configs", f"{name}.yaml")
    header = (
        f"# lmforge {name} config ({preset} preset). `lmforge {name} --help` lists every field.\n"
    )
    _write(path, header + commented_yaml(cfg))
    return path


def _write_serve_config(directory: str, project: str, artifact: str) -> str:
    from lmforge.serve.config import ServeArgs

    args = ServeArgs.model_validate(
        {"models": [{"name": project, "artifact": artifact}], "request_log": {"path": REQUEST_LOG}}
    )
    path = os.path.join(directory, "configs", "serve.yaml")
    header = (
        "# lmforge serving config: `lmforge serve -c configs/serve.yaml` (from this directory)\n"
        "# serves the pipeline's model; docs/serving.md explains every field.\n"
    )
    _write(path, header + commented_yaml(args))
    return path


JOB = '''"""RayJob entry point of the `{name}` stage: python jobs/{name}.py -c configs/{name}.yaml

`lmforge submit {name} -c configs/{name}.yaml` ships this project to a Ray cluster and runs it
there (lmforge must be installed on the cluster, as it is in the lmforge image)."""

from lmforge.stage import job_main

if __name__ == "__main__":
    job_main("{name}")
'''


def _write_job(directory: str, name: str) -> str:
    path = os.path.join(directory, get_stage(name).job_script)
    _write(path, JOB.format(name=name))
    return path


def _write(path: str, text: str) -> None:
    from lmforge import storage

    storage.write_text(path, text)
