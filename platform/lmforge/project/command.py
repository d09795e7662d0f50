"""The project commands: `lmforge init` (a new model project), `lmforge pipeline run|plan`,
`lmforge quickstart` (the built-in pipeline, then serve and ask) and `lmforge plan` (what a
training config will cost)."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict
from typing import TYPE_CHECKING

from lmforge import ConfigError, storage
from lmforge.config import load_config
from lmforge.project.pipeline import plan, run_pipeline
from lmforge.project.quickstart import (
    newest_artifact,
    print_before_after,
    print_curves,
    print_pretraining,
    quickstart_pipeline,
    serve_and_ask,
)
from lmforge.project.scaffold import PRESETS, init_project
from lmforge.stage import add_config_arguments, get_stage, resolve_input_reference

if TYPE_CHECKING:
    from lmforge.train.config import TrainConfig


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
    print(
        "then: lmforge serve -c configs/serve.yaml; on a Ray cluster: lmforge submit <stage> -c configs/<stage>.yaml"
    )
    return 0


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="STEP:KEY=VALUE",
        help="override a value of one step's config, e.g. --set train:optim.lr=3e-4 (repeatable)",
    )
    parser.add_argument(
        "--address", help="Ray address (default: RAY_ADDRESS, else an embedded local Ray)"
    )
    parser.add_argument(
        "--force", action="store_true", help="rerun every step even if its output is complete"
    )


def pipeline_command(argv: list[str], prog: str) -> int:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Run a pipeline: its stages in order, skipping those whose output is complete.",
    )
    sub = parser.add_subparsers(dest="action", required=True)
    p_run = sub.add_parser("run", help="run a pipeline YAML")
    p_run.add_argument("pipeline", help="pipeline YAML (path or URI)")
    p_run.add_argument("--runs-dir", help="override the pipeline's runs_dir")
    add_run_arguments(p_run)
    p_plan = sub.add_parser(
        "plan", help="resolve every step and print its output path and state, run nothing"
    )
    p_plan.add_argument("pipeline")
    p_plan.add_argument("--runs-dir")
    p_plan.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="STEP:KEY=VALUE"
    )
    args = parser.parse_args(argv)
    for o in args.overrides:
        if ":" not in o.split("=", 1)[0]:
            raise ConfigError(
                f"bad override {o!r}: pipeline overrides name the step, e.g. --set train:optim.lr=3e-4"
            )
    if args.action == "plan":
        from lmforge import storage

        _, steps = plan(args.pipeline, args.overrides, args.runs_dir)
        for s in steps:
            state = "complete" if storage.is_complete(s.output) else "to run"
            print(f"{s.id:<12} {state:<9} {s.output}")
        return 0
    run_pipeline(args.pipeline, args.overrides, args.runs_dir, args.address, args.force)
    return 0


def quickstart_command(argv: list[str], prog: str) -> int:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Run the built-in end-to-end pipeline on an embedded local Ray (no downloads): "
        "every stage that lmforge has, on the built-in corpus, with a tiny model; then serve the "
        "model and ask it one completion and one chat question through the openai client.",
    )
    parser.add_argument(
        "--workdir",
        default="runs/quickstart",
        help="where every output goes (default: %(default)s)",
    )
    add_run_arguments(parser)
    parser.add_argument(
        "--no-serve", action="store_true", help="stop after the pipeline, without serving the model"
    )
    parser.add_argument(
        "--keep-serving", action="store_true", help="leave the model served until Ctrl-C"
    )
    parser.add_argument(
        "--port",
        type=int,
        default=8000,
        help="HTTP port to serve on (default %(default)s, or a free one)",
    )
    args = parser.parse_args(argv)
    results = run_pipeline(
        quickstart_pipeline(), args.overrides, args.workdir, args.address, args.force
    )
    print_pretraining(results)  # the pretraining's val bpb against the previous recipe's
    for r in results:
        if r.stage == "finetune":
            print_before_after(r.output)
    artifact = newest_artifact(results)
    if artifact and not args.no_serve:
        serve_and_ask(artifact, args.port, args.keep_serving, args.address)
    print("\nquickstart outputs:")
    for r in results:
        print(f"  {r.stage:<10} {r.output}")
    print_curves(results)  # loss.png of the train and finetune runs
    print(f"every run's params, curves and artifacts: lmforge ui --runs-dir {args.workdir}")
    return 0


def plan_command(argv: list[str], prog: str) -> int:
    # the model and training configs import torch: only this command needs them
    from lmforge.model.presets import PRESETS as PRESETS_OF_MODEL
    from lmforge.project.plan import format_plan, make_plan, read_manifest
    from lmforge.train.config import TrainConfig

    parser = argparse.ArgumentParser(
        prog=prog,
        description="Estimate a training or fine-tuning config before running it: parameters, "
        "FLOPs, compute-optimal tokens, memory per device under FSDP2, wall time and GPU-hours "
        "at plan.assumed_mfu. Hardware: resources.* (GPU type: resources.accelerator_type, "
        "else plan.gpu_type). A fine-tuning config (one with `base`) is planned on its base "
        "model's architecture (LoRA: only the adapters have gradients and optimizer state).",
    )
    add_config_arguments(parser)
    parser.add_argument(
        "--seq-len",
        type=int,
        help="tokens per sequence (default: the data's at data.path, else --data-config's)",
    )
    parser.add_argument(
        "--data-config",
        metavar="DATA.yaml",
        help="the data stage's config, for seq_len and vocabulary size before the data exists "
        "(default: data.yaml beside CONFIG, as `lmforge init` writes them, if there is one)",
    )
    parser.add_argument(
        "--base-preset",
        choices=sorted(PRESETS_OF_MODEL),
        help="a fine-tuning config: the base model's preset, when `base` is not there yet "
        "(default: the base artifact's own architecture)",
    )
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument(
        "--suggest",
        action="store_true",
        help="also enumerate the parallel layouts (tp, pp, cp, micro-batch, checkpointing) that "
        "fit the GPUs and print the fastest by estimated step time, with the runners-up",
    )
    parser.add_argument(
        "--gpus", type=int, help="plan for this many GPUs (one per worker) instead of resources.*"
    )
    parser.add_argument(
        "--gpus-per-node", type=int, default=8, help="GPUs per node, for --suggest (default 8)"
    )
    args = parser.parse_args(argv)
    if args.gpus:
        args.overrides += [f"resources.num_workers={args.gpus}", "resources.gpus_per_worker=1"]
    if _is_finetune_config(args.config):
        estimate = make_plan(*_finetune_plan_inputs(args))
        print(json.dumps(asdict(estimate), indent=2) if args.json else format_plan(estimate))
        return 0
    cfg = _with_data_reference(load_config(TrainConfig, args.config, args.overrides))
    seq_len, vocab, source = args.seq_len, None, "--seq-len"
    data_config = args.data_config or _sibling_data_config(args.config)
    if data_config and not (seq_len or read_manifest(cfg.data.path)):
        from lmforge.data.config import DataConfig

        data = load_config(DataConfig, data_config)
        vocab = None if data.tokenizer.path else data.tokenizer.vocab_size
        seq_len, source = data.seq_len, data_config
    estimate = make_plan(cfg, seq_len=seq_len, vocab_size=vocab, seq_len_source=source)
    print(json.dumps(asdict(estimate), indent=2) if args.json else format_plan(estimate))
    if args.suggest:
        _print_suggestion(cfg, estimate, vocab or read_manifest(cfg.data.path).get("vocab_size"),
                          args.gpus_per_node)  # fmt: skip
    return 0


def _print_suggestion(cfg, estimate, vocab: int | None, gpus_per_node: int) -> None:
    from lmforge.project.suggest import Hardware, format_suggestion, suggest_layouts

    if not estimate.device_memory_gib:
        raise ConfigError(
            "--suggest plans GPU layouts: give --gpus N (or resources.gpus_per_worker) and a GPU "
            "the memory table knows (resources.accelerator_type) or plan.gpu_memory_gib"
        )
    hw = Hardware(
        gpus=estimate.devices,
        memory_gib=estimate.device_memory_gib,
        peak_tflops=estimate.peak_tflops_per_device,
        mfu=estimate.assumed_mfu,
        gpus_per_node=min(gpus_per_node, estimate.devices),
    )
    arch = cfg.model.to_llama(vocab_size=vocab, seq_len=estimate.seq_len)
    ranked = suggest_layouts(
        arch,
        estimate.seq_len,
        cfg.train.global_batch_tokens,
        hw,
        grad_reduce=cfg.parallel.grad_reduce,
    )
    print()
    print(format_suggestion(ranked, hw))


def _is_finetune_config(config: str | None) -> bool:
    """A fine-tuning config names its base model; a training config does not."""
    if not config or not storage.exists(config):
        return False  # load_config says what is wrong with it, in one line
    import yaml

    try:
        data = yaml.safe_load(storage.read_text(config))
    except yaml.YAMLError:
        return False
    return isinstance(data, dict) and "base" in data


def _finetune_plan_inputs(args) -> tuple:
    """(config, seq_len, None, source, architecture) of a fine-tuning config's plan."""
    from lmforge.finetune.config import FinetuneConfig
    from lmforge.model.artifact import load_model_config, resolve_artifact
    from lmforge.model.presets import model_config

    cfg = load_config(FinetuneConfig, args.config, args.overrides)
    if args.base_preset:
        arch = model_config(args.base_preset)
    else:
        try:
            cfg = resolve_input_reference(get_stage("finetune"), cfg)
            arch = load_model_config(resolve_artifact(cfg.base))
        except (ConfigError, FileNotFoundError, OSError) as e:
            raise ConfigError(
                f"base: {e}; give --base-preset PRESET to plan before the base model exists"
            ) from None
    seq_len = args.seq_len or cfg.data.seq_len
    source = "--seq-len" if args.seq_len else "the config's data.seq_len"
    if not seq_len:
        seq_len, source = arch.max_seq_len, "the base model's max_seq_len"
    return cfg, seq_len, None, source, arch


def _with_data_reference(cfg: TrainConfig) -> TrainConfig:
    """`data.path: "@data/name"` resolved as `lmforge train` resolves it; none yet is no data."""
    try:
        return resolve_input_reference(get_stage("train"), cfg)
    except ConfigError:
        return cfg.model_copy(update={"data": cfg.data.model_copy(update={"path": None})})


def _sibling_data_config(config: str | None) -> str | None:
    if not config or storage.is_uri(config):
        return None
    path = os.path.join(os.path.dirname(config), "data.yaml")
    return (
        path if os.path.abspath(path) != os.path.abspath(config) and os.path.exists(path) else None
    )
