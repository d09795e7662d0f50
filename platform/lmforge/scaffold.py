"""`lmforge init DIR`: a ready model project — a pipeline plus one commented config per stage.

The configs are generated from the stages' config classes (every field, its default or the
preset's value, and its description as a comment), so a new field shows up here by itself.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import yaml
from pydantic import BaseModel

from lmforge import LmforgeError
from lmforge.config import _model_of, config_dict
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
        if _model_of(field.annotation) is not None and isinstance(value, BaseModel):
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


def init_project(directory: str, preset: str = "tiny", force: bool = False) -> list[str]:
    if preset not in PRESETS:
        raise LmforgeError(f"unknown preset '{preset}'; choose one of {', '.join(PRESETS)}")
    pipeline_path = os.path.join(directory, "pipeline.yaml")
    if os.path.exists(pipeline_path) and not force:
        raise LmforgeError(
            f"{pipeline_path} already exists; pass --force to overwrite the project's files"
        )
    os.makedirs(os.path.join(directory, "configs"), exist_ok=True)
    written = []
    steps: list[dict[str, Any]] = []
    for name in DEFAULT_PIPELINE:
        stage = get_stage(name)
        values = stage.scaffold(preset) if stage.scaffold else {}
        cfg = stage.config_cls.model_validate(
            {"name": os.path.basename(os.path.abspath(directory)) or name, **values}
        )
        path = os.path.join(directory, "configs", f"{name}.yaml")
        header = f"# lmforge {name} config ({preset} preset). `lmforge {name} --help` lists every field.\n"
        _write(path, header + commented_yaml(cfg))
        written.append(path)
        steps.append({"stage": name, "config": f"configs/{name}.yaml"})
    pipeline = {
        "name": os.path.basename(os.path.abspath(directory)),
        "runs_dir": "runs",
        "stages": steps,
    }
    text = (
        "# lmforge pipeline: `lmforge pipeline run pipeline.yaml` (from this directory) runs the\n"
        "# stages in order, passing each one's output to the next and skipping finished stages.\n"
        + yaml.safe_dump(json.loads(json.dumps(pipeline)), sort_keys=False)
    )
    _write(pipeline_path, text)
    written.append(pipeline_path)
    return written


def _write(path: str, text: str) -> None:
    from lmforge import storage

    storage.write_text(path, text)


def init_command(argv: list[str], prog: str) -> int:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Write a ready pipeline and one commented config per stage for a new model project.",
    )
    parser.add_argument("directory", help="project directory (created if missing)")
    parser.add_argument(
        "--preset", default="tiny", choices=PRESETS, help="model size preset (default: %(default)s)"
    )
    parser.add_argument(
        "--force", action="store_true", help="overwrite an existing project's files"
    )
    args = parser.parse_args(argv)
    for path in init_project(args.directory, args.preset, args.force):
        print(f"wrote {path}")
    print(f"next: cd {args.directory} && lmforge pipeline run pipeline.yaml")
    return 0
