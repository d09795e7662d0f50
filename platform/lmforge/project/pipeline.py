"""Pipelines: run stages in order, pass each stage's output to the next, skip finished ones.

A pipeline is YAML:

    name: my-model
    runs_dir: runs                # every stage's runs_dir (a local path or URI)
    stages:
      - stage: data               # a registered stage, or module:attribute
        config: configs/data.yaml # relative to this file
        set: {tokenizer.vocab_size: 8192}
      - stage: train
        config: configs/train.yaml
        # inputs: {data.path: data}   default: the stage's input field <- the previous stage

Every stage's config is resolved (and so validated, and its output path known from its hash)
before the first stage runs. A stage whose output is complete is skipped; a changed config
gives a new hash, a new output path and a rerun — and, through the input paths, a rerun of
every stage after it.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from pydantic import Field, model_validator

from lmforge import ConfigError, LmforgeError, StageFailed
from lmforge.config import StrictModel, apply_overrides, build_config, read_yaml
from lmforge.stage import (
    Stage,
    StageConfig,
    StageResult,
    get_stage,
    output_dir,
    resolve_input_reference,
    run_stage,
)


class PipelineStep(StrictModel):
    stage: str = Field(
        description="Stage name (e.g. data, train) or module:attribute of a custom Stage."
    )
    id: str | None = Field(
        None,
        description="Name of this step in the pipeline (default: the stage name); `inputs` refer to it.",
    )
    config: str | None = Field(
        None, description="Stage config YAML, relative to the pipeline file; omitted: defaults."
    )
    set: dict[str, Any] | list[str] = Field(
        default_factory=dict,
        description="Overrides, as a mapping of dotted keys or a list of KEY=VALUE.",
    )
    inputs: dict[str, str] | None = Field(
        None,
        description="Dotted config key -> id of an earlier step whose output it receives. Default: the stage's input field <- the previous step.",
    )

    @property
    def step_id(self) -> str:
        return self.id or self.stage


class PipelineConfig(StrictModel):
    name: str = Field("pipeline", description="Pipeline name, shown in progress and the summary.")
    runs_dir: str | None = Field(
        None, description="Sets runs_dir of every stage (a local path or URI)."
    )
    stages: list[PipelineStep] = Field(min_length=1, description="The steps, run in order.")

    @model_validator(mode="after")
    def _unique_ids(self) -> PipelineConfig:
        ids = [s.step_id for s in self.stages]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(
                f"step ids must be unique, repeated: {', '.join(dupes)} (give each an `id`)"
            )
        return self


@dataclass
class PlannedStep:
    id: str
    stage: Stage
    config: StageConfig
    output: str


def plan(
    pipeline_file: str, extra_overrides: list[str] | None = None, runs_dir: str | None = None
) -> tuple[PipelineConfig, list[PlannedStep]]:
    """Resolve every step's config and output path; nothing runs yet."""
    spec = build_config(PipelineConfig, read_yaml(pipeline_file), source=pipeline_file)
    base = (
        os.path.dirname(pipeline_file)
        if "://" not in pipeline_file
        else pipeline_file.rsplit("/", 1)[0]
    )
    planned: list[PlannedStep] = []
    outputs: dict[str, str] = {}
    for i, step in enumerate(spec.stages):
        stage = get_stage(step.stage)
        source = step.config and (
            step.config
            if "://" in step.config or os.path.isabs(step.config)
            else os.path.join(base, step.config)
        )
        data = read_yaml(source) if source else {}
        overrides = (
            [f"{k}={_yaml_value(v)}" for k, v in step.set.items()]
            if isinstance(step.set, dict)
            else list(step.set)
        )
        if runs_dir or spec.runs_dir:
            overrides.append(f"runs_dir={runs_dir or spec.runs_dir}")
        inputs = (
            step.inputs
            if step.inputs is not None
            else ({stage.input_field: planned[-1].id} if stage.input_field and i > 0 else {})
        )
        for key, src in inputs.items():
            if src not in outputs:
                raise ConfigError(
                    f"{pipeline_file}: step '{step.step_id}' takes input from '{src}', which is not an earlier step"
                )
            overrides.append(f"{key}={outputs[src]}")
        overrides += [
            o.split(":", 1)[1] for o in extra_overrides or [] if o.split(":", 1)[0] == step.step_id
        ]
        where = f"{pipeline_file} step '{step.step_id}'"
        try:
            data = apply_overrides(stage.config_cls, data, overrides)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        cfg = build_config(stage.config_cls, data, source=where)
        try:  # an `@stage/name` input is resolved as `lmforge <stage>` resolves it
            cfg = resolve_input_reference(stage, cfg)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        out = output_dir(stage, cfg)
        outputs[step.step_id] = out
        planned.append(PlannedStep(step.step_id, stage, cfg, out))
    return spec, planned


def _yaml_value(value: Any) -> str:
    import json

    return value if isinstance(value, str) else json.dumps(value)


def run_pipeline(
    pipeline_file: str,
    extra_overrides: list[str] | None = None,
    runs_dir: str | None = None,
    address: str | None = None,
    force: bool = False,
) -> list[StageResult]:
    spec, steps = plan(pipeline_file, extra_overrides, runs_dir)
    print(
        f"pipeline '{spec.name}': {len(steps)} step(s): {' -> '.join(s.id for s in steps)}",
        flush=True,
    )
    results: list[StageResult] = []
    with pipeline_run(spec.name, steps):
        for n, step in enumerate(steps, 1):
            print(f"\n=== [{n}/{len(steps)}] {step.id} ({step.stage.name}) ===", flush=True)
            start = time.perf_counter()
            try:
                result = run_stage(step.stage, step.config, address=address, force=force)
            except LmforgeError as e:
                _print_summary(spec.name, results)
                raise StageFailed(
                    f"pipeline '{spec.name}' stopped at step '{step.id}' ({step.stage.name}): {e}"
                ) from None
            except Exception as e:
                _print_summary(spec.name, results)
                raise StageFailed(
                    f"pipeline '{spec.name}' stopped at step '{step.id}' ({step.stage.name}): {type(e).__name__}: {e}"
                ) from e
            result.seconds = result.seconds or time.perf_counter() - start
            results.append(result)
    _print_summary(spec.name, results)
    return results


def pipeline_run(name: str, steps: list[PlannedStep]):
    """The pipeline's parent run in the experiment tracker (the first step's `tracking:`); the
    stage runs nest under it."""
    from lmforge import tracking

    first = steps[0].config if steps else None
    if first is None:
        return tracking.parent_run(tracking.Settings(backend="none"), "", name, {})
    params = {"pipeline": name, "steps": " -> ".join(s.id for s in steps)}
    return tracking.parent_run(first.tracking.settings(), first.runs_dir, name, params)


def _print_summary(name: str, results: list[StageResult]) -> None:
    if not results:
        return
    width = max(len(r.stage) for r in results)
    print(f"\npipeline '{name}' summary:")
    for r in results:
        print(f"  {r.stage:<{width}}  {r.status:<7}  {r.seconds:7.1f}s  {r.output}")
