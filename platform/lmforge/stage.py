"""Stages: the unit of work that `lmforge <stage>`, `jobs/<stage>.py` and pipelines run.

A stage is a config class plus a `run(cfg, ctx)` function. Running one always goes through
`run_stage`: resolve the config, hash it, put the hash in the output path, skip the stage when
that output is already complete, check its inputs (`Stage.validate`, before anything is printed
or created and before Ray starts), print the config, write `resolved_config.yaml`, run, and
write the `_SUCCESS` marker last. So a rerun of a finished stage is a no-op and a RayJob retry is safe.

Stages are looked up by name in `STAGES` (imported lazily), or given as `module:attribute`
for stages that live outside lmforge.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import Field, field_validator

from lmforge import ConfigError, LmforgeError, storage
from lmforge.config import (
    NOT_HASHED,
    StrictModel,
    apply_overrides,
    build_config,
    config_dict,
    config_hash,
    config_yaml,
    fields_help,
    load_config,
)
from lmforge.tracking.config import TrackingConfig

# name -> "module:attribute" of its Stage: each stage lives in <package>/stage.py.
STAGES: dict[str, str] = {
    "check": "lmforge.check.stage:STAGE",
    "data": "lmforge.data.stage:STAGE",
    "train": "lmforge.train.stage:STAGE",
    "finetune": "lmforge.finetune.stage:STAGE",
    "improve": "lmforge.improve.stage:STAGE",
    "eval": "lmforge.eval.stage:STAGE",
}

# The stages of a model project's pipeline, in order: `lmforge init` writes one config each
# (and configs for `serve` and `improve`, which run after the pipeline, on its model).
DEFAULT_PIPELINE: list[str] = ["check", "data", "train", "finetune", "eval"]

RESOLVED_CONFIG = "resolved_config.yaml"
TIMINGS = "timings.jsonl"  # a run's phases with their wall-clock times (record_phase)
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class StageConfig(StrictModel):
    """Fields every stage config has."""

    name: str = Field(
        "default",
        description="Run name. The output goes to <runs_dir>/<stage>/<name>-<config hash>.",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
    )
    runs_dir: str = Field(
        "runs",
        description="Root of all outputs: a local path or a URI (s3://, gs://, file://). Not part of the config hash.",
        json_schema_extra=NOT_HASHED,
    )
    tracking: TrackingConfig = Field(
        default_factory=TrackingConfig,
        description="Experiment tracking of this run (docs/tracking.md). Not part of the config hash.",
        json_schema_extra=NOT_HASHED,
    )

    # Each stage redefines `name` with its own default, which drops the pattern above: this
    # check is inherited, so `--set name=a/b` cannot put an output outside <stage>/.
    @field_validator("name", check_fields=False)
    @classmethod
    def _safe_run_name(cls, value: str) -> str:
        if not RUN_NAME.fullmatch(value):
            raise ValueError(
                f"run name {value!r}: use letters, digits, '.', '_' and '-' "
                "(starting with a letter or digit)"
            )
        return value


@dataclass(frozen=True)
class StageContext:
    output: str  # this run's output directory (path or URI)
    address: str | None  # Ray address, None for RAY_ADDRESS or an embedded local Ray


@dataclass(frozen=True)
class Stage:
    name: str
    config_cls: type[StageConfig]
    run: Callable[[Any, StageContext], dict[str, Any] | None]
    help: str
    # Dotted config key that a pipeline fills with the previous stage's output directory.
    input_field: str | None = None
    # Whether `run` needs Ray, or a function of the config that says (in-process training: no)
    uses_ray: bool | Callable[[Any], bool] = True
    # False for stages whose value is the state of the world now (e.g. a cluster check).
    cacheable: bool = True
    # `lmforge init` calls this with the preset name for the config it writes.
    scaffold: Callable[[str], dict[str, Any]] | None = None
    # The RayJob entry point is jobs/<job>.py (default, and for every built-in stage: the name).
    job: str | None = None
    # Checks that need no cluster (inputs exist and are complete): `run_stage` calls it before
    # it prints the config, creates the output folder or starts Ray, so a missing input is one
    # line in a second, not a Ray start and an empty run folder. Raises a ConfigError.
    validate: Callable[[Any], None] | None = None

    @property
    def job_script(self) -> str:
        return f"jobs/{self.job or self.name}.py"


@dataclass
class StageResult:
    stage: str
    output: str
    status: str  # "ran" or "skipped"
    seconds: float = 0.0
    summary: dict[str, Any] = field(default_factory=dict)


def get_stage(name: str) -> Stage:
    """A registered stage by name, or any Stage object given as `module:attribute`."""
    target = STAGES.get(name, name if ":" in name else None)
    if target is None:
        raise ConfigError(
            f"unknown stage '{name}'; known stages: {', '.join(STAGES)} (or give module:attribute)"
        )
    module_name, _, attr = target.partition(":")
    try:
        stage = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"cannot load stage '{name}' from {target}: {e}") from None
    if not isinstance(stage, Stage):
        raise ConfigError(f"{target} is a {type(stage).__name__}, not an lmforge Stage")
    return stage


def output_dir(stage: Stage, cfg: StageConfig) -> str:
    return storage.join(cfg.runs_dir, stage.name, f"{cfg.name}-{config_hash(cfg)}")


def latest_pointer(runs_dir: str, stage_name: str, run_name: str) -> str:
    """The file that names the latest complete output of run `run_name` of a stage."""
    return storage.join(runs_dir, stage_name, f"{run_name}.latest")


def as_stored(runs_dir: str, path: str) -> str:
    """A path as a pointer file stores it: relative to `runs_dir` when it lies under it (so the
    pointer resolves from any working directory and after `runs_dir` moves), else absolute."""
    return storage.relative_to(runs_dir, path) or storage.absolute(path)


def write_latest_pointer(runs_dir: str, stage_name: str, run_name: str, output: str) -> None:
    """Point `@<stage>/<run name>` at `output` (stored `as_stored`)."""
    storage.write_text(
        latest_pointer(runs_dir, stage_name, run_name), as_stored(runs_dir, output) + "\n"
    )


def read_run_reference(runs_dir: str, reference: str, where: str) -> str:
    """The output path that `@<stage>/<run name>` names: that run's latest complete output
    under `runs_dir`, read from its pointer file. `where` names the setting in errors."""
    ref_stage, _, ref_name = reference.removeprefix("@").partition("/")
    if not ref_stage or not ref_name or "/" in ref_name:
        raise ConfigError(
            f"{where}: bad run reference {reference!r}; expected @<stage>/<run name>, e.g. @data/quickstart"
        )
    pointer = latest_pointer(runs_dir, ref_stage, ref_name)
    if not storage.exists(pointer):
        raise ConfigError(
            f"{where}: {reference} names no completed '{ref_stage}' run called '{ref_name}' "
            f"under {runs_dir} (no {pointer}); run that stage first, or give a path"
        )
    return storage.find_under(runs_dir, storage.read_text(pointer).strip())


# ---------------------------------------------------------------- the serving pointer
# `<runs_dir>/serving/current.json` = {"artifact": path, "version": id, "updated": iso time,
# ...} names the artifact that serving should run, as `@serving` (model/artifact.py resolves
# it); the improvement loop writes it when it promotes a model, and a rollback rewrites it
# (docs/operations.md). Like a run's `.latest` pointer it stores paths relative to runs_dir.

SERVING_POINTER = "serving/current.json"


def serving_pointer_path(runs_dir: str) -> str:
    return storage.join(runs_dir, *SERVING_POINTER.split("/"))


def read_serving_pointer(runs_dir: str) -> dict[str, Any] | None:
    """`<runs_dir>/serving/current.json` as a dict, or None when nothing was pointed at yet."""
    path = serving_pointer_path(runs_dir)
    if not storage.exists(path):
        return None
    try:
        pointer = storage.read_json(path)
    except ValueError as e:
        raise LmforgeError(f"{path}: not valid JSON ({e}); rewrite it") from None
    if not isinstance(pointer, dict) or not isinstance(pointer.get("artifact"), str):
        raise LmforgeError(f'{path}: expected {{"artifact": PATH, "version": ID, ...}}')
    pointer["artifact"] = storage.find_under(runs_dir, pointer["artifact"])
    previous = pointer.get("previous")
    if isinstance(previous, dict) and isinstance(previous.get("artifact"), str):
        previous["artifact"] = storage.find_under(runs_dir, previous["artifact"])
    return pointer


def store_serving_pointer(
    runs_dir: str, artifact: str, version: str, **extra: Any
) -> dict[str, Any]:
    """Write the serving pointer (atomic): `artifact`, whose weights' version is `version`;
    returns the pointer written. `lmforge.model.artifact.write_serving_pointer` checks the
    artifact and reads its version first: call that.

    `extra` (e.g. reason="promoted by improve", previous=...) is stored as is. The previous
    pointer, if any, is kept as `previous` so a rollback can name it.
    """
    old = read_serving_pointer(runs_dir)
    pointer: dict[str, Any] = {
        "artifact": as_stored(runs_dir, artifact),
        "version": version,
        "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if old is not None and "previous" not in extra:
        pointer["previous"] = {
            "artifact": as_stored(runs_dir, old["artifact"]),
            "version": old.get("version"),
        }
    pointer.update(extra)
    storage.write_json(serving_pointer_path(runs_dir), pointer)
    return read_serving_pointer(runs_dir) or pointer  # the paths as this process opens them


def served_artifact_path(runs_dir: str, where: str) -> str:
    """The artifact the serving pointer under `runs_dir` names; `where` names the reference in
    the error when nothing is served yet."""
    pointer = read_serving_pointer(runs_dir)
    if not pointer:
        raise ConfigError(
            f"{where}: nothing is served yet under {runs_dir} (no serving/current.json); "
            "run `lmforge improve` or give an artifact path"
        )
    return pointer["artifact"]


def resolve_input_reference(stage: Stage, cfg: StageConfig) -> StageConfig:
    """Replace an input of the form `@<stage>/<run name>` by that run's latest complete output.

    Output paths carry a config hash, so a job that runs after another (a RayJob per stage on
    Kubernetes, or a second `lmforge` command) cannot know its input's path in advance; it
    names the run instead. The reference is resolved before the config is hashed, so the hash
    (and the output path) still changes whenever the input does.
    """
    if not stage.input_field:
        return cfg
    value: Any = cfg
    for part in stage.input_field.split("."):
        value = getattr(value, part, None)
    if not isinstance(value, str) or not (value.startswith("@") or "/@" in value):
        return cfg
    runs_dir, _, ref = value.rpartition("@")  # `<runs_dir>/@stage/run` names another runs dir
    runs_dir = runs_dir.rstrip("/") or cfg.runs_dir
    if ref == "serving":  # the artifact serving runs now (hashed as its path, so not stale)
        path = served_artifact_path(runs_dir, value)
    else:
        path = read_run_reference(runs_dir, "@" + ref, where=stage.input_field)
    data = apply_overrides(type(cfg), config_dict(cfg), [f"{stage.input_field}={path}"])
    return build_config(type(cfg), data, source=f"{stage.input_field} ({value})")


def resolve_config(stage: Stage, path: str | None, overrides: list[str]) -> StageConfig:
    """The config a run of `stage` uses: the YAML file and overrides, then its input reference
    resolved. The run, `--print-config` and `lmforge config show` all go through this, so they
    show the same hash and output path."""
    return resolve_input_reference(stage, load_config(stage.config_cls, path, overrides))


def print_resolved(stage: Stage, cfg: StageConfig) -> None:
    """`--print-config` and `lmforge config show`: the config, its hash and output path."""
    print(config_yaml(cfg), end="")
    print(f"# config hash: {config_hash(cfg)}\n# output: {output_dir(stage, cfg)}")


def record_phase(run_dir: str, phase: str, who: str = "driver", t: float | None = None) -> None:
    """Append `{"phase", "who", "t"}` (wall clock: comparable across processes) to the run's
    timings.jsonl, where its start and end go (bench/train_startup.py). Local folders only."""
    if not storage.is_uri(run_dir):
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, TIMINGS), "a") as f:
            f.write(json.dumps({"phase": phase, "who": who, "t": t or time.time()}) + "\n")


def run_stage(
    stage: Stage,
    cfg: StageConfig,
    address: str | None = None,
    force: bool = False,
    quiet: bool = False,
) -> StageResult:
    """Run one stage end to end (see the module docstring); returns what happened."""
    called, out = time.time(), output_dir(stage, cfg)
    if stage.cacheable and not force and storage.is_complete(out):
        if not quiet:
            print(f"[{stage.name}] output is complete, skipping: {out}", flush=True)
        write_latest_pointer(cfg.runs_dir, stage.name, cfg.name, out)
        return StageResult(stage.name, out, "skipped")
    if stage.validate is not None:
        stage.validate(cfg)
    if not quiet:
        print(f"[{stage.name}] resolved config (hash {config_hash(cfg)}):", flush=True)
        print("  " + config_yaml(cfg).rstrip().replace("\n", "\n  "), flush=True)
        print(f"[{stage.name}] output: {out}", flush=True)
    storage.makedirs(out)
    retry = not storage.is_complete(out)  # an incomplete output: continue its tracked run
    storage.remove(storage.join(out, storage.SUCCESS))  # a forced rerun is incomplete until it ends
    storage.write_text(storage.join(out, RESOLVED_CONFIG), config_yaml(cfg))
    storage.remove(storage.join(out, TIMINGS))
    record_phase(out, "config", t=called)
    from lmforge.tracking.session import add_cluster_params, stage_run

    settings, hashed = cfg.tracking.settings(), config_hash(cfg)
    args = (settings, cfg.runs_dir, out, stage.name, cfg.name, config_dict(cfg), hashed, retry)
    if uses_ray := (stage.uses_ray(cfg) if callable(stage.uses_ray) else stage.uses_ray):
        from lmforge.cluster.local import connect_in_background

        ray_started = connect_in_background(address)
    with stage_run(*args, quiet=quiet, defer=not uses_ray) as tracker:
        record_phase(out, "tracking")
        if uses_ray:
            ray_started()
            record_phase(out, "ray")
            add_cluster_params(tracker)
        start = time.perf_counter()
        summary = stage.run(cfg, StageContext(output=out, address=address)) or {}
        seconds = time.perf_counter() - start
        tracker.summary = summary
        record_phase(out, "stage_run")
    storage.mark_success(
        out,
        {
            "stage": stage.name,
            "config_hash": config_hash(cfg),
            "seconds": round(seconds, 3),
            "summary": summary,
        },
    )
    write_latest_pointer(cfg.runs_dir, stage.name, cfg.name, out)
    record_phase(out, "done")
    if not quiet:
        print(f"[{stage.name}] done in {seconds:.1f}s: {out}", flush=True)
    return StageResult(stage.name, out, "ran", seconds, summary)


# ---------------------------------------------------------------- command line


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-c",
        "--config",
        metavar="CONFIG.yaml",
        help="YAML config (path or URI); defaults apply where omitted",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override one config value (repeatable), e.g. --set optim.lr=3e-4",
    )


def stage_parser(stage: Stage, prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=stage.help,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config fields (in the YAML file, or with --set KEY=VALUE):\n"
        + fields_help(stage.config_cls),
    )
    add_config_arguments(parser)
    parser.add_argument(
        "--address", help="Ray address (default: RAY_ADDRESS, else an embedded local Ray)"
    )
    parser.add_argument(
        "--force", action="store_true", help="run even if the output is already complete"
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config and output path, then exit",
    )
    return parser


def stage_main(name: str, argv: list[str] | None = None, prog: str | None = None) -> int:
    """`lmforge <stage>` and `python jobs/<stage>.py`: parse, validate, run."""
    stage = get_stage(name)
    args = stage_parser(stage, prog or f"lmforge {name}").parse_args(argv)
    cfg = resolve_config(stage, args.config, args.overrides)
    if args.print_config:
        print_resolved(stage, cfg)
        return 0
    refuse_outputs_that_would_vanish(stage, cfg)
    run_stage(stage, cfg, address=args.address, force=args.force)
    return 0


def refuse_outputs_that_would_vanish(stage: Stage, cfg: StageConfig) -> None:
    """`ray job submit --working-dir .` runs the job in Ray's unpacked copy of that directory
    (`.../runtime_resources/working_dir_files/_ray_pkg_<hash>`), deleted with the job's
    resources: a relative runs_dir there writes outputs nobody will find. `lmforge submit`
    refuses it before submitting; this catches a plain `ray job submit`."""
    if stage.cacheable and f"{os.sep}working_dir_files{os.sep}" in os.getcwd():
        refuse_relative_runs_dir(cfg.runs_dir)


def refuse_relative_runs_dir(runs_dir: str) -> None:
    """A Ray job runs in a temporary copy of the working dir: a relative runs_dir would write
    its outputs there, and they vanish with it."""
    if not storage.is_uri(runs_dir) and not os.path.isabs(os.path.expanduser(runs_dir)):
        raise ConfigError(
            f"runs_dir {runs_dir!r} is relative: a submitted job runs in a temporary copy of the "
            "working dir, so its outputs would vanish with it; give an absolute path on storage "
            "every Ray node sees, or a URI (e.g. --set runs_dir=/mnt/lmforge/runs)"
        )


def job_main(name: str) -> None:
    """Entry point of `jobs/<stage>.py`: user errors are one line on stderr, not a traceback."""
    try:
        code = stage_main(name, sys.argv[1:], prog=sys.argv[0])
    except LmforgeError as e:
        print(f"lmforge: error: {e}", file=sys.stderr)
        code = e.exit_code
    sys.exit(code)
