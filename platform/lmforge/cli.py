"""The `lmforge` command. Subcommands import their module only when run, so `--help` is instant."""

from __future__ import annotations

import atexit
import importlib
import os
import sys
import threading
from typing import NamedTuple


class Command(NamedTuple):
    target: str  # "module:function(argv, prog) -> int", or "stage:<name>" for a stage command
    help: str


# One line of help and one lazily imported target per command: a package's commands live in
# its command.py, a stage's command is the stage runner's (`stage:<name>`).
COMMANDS: dict[str, Command] = {
    "quickstart": Command(
        "lmforge.project.command:quickstart_command",
        "run the built-in end-to-end pipeline on an embedded local Ray",
    ),
    "init": Command(
        "lmforge.project.command:init_command",
        "write a ready pipeline and one config per stage for a new model project",
    ),
    "pipeline": Command(
        "lmforge.project.command:pipeline_command",
        "run (or plan) a pipeline of stages, skipping finished ones",
    ),
    "check": Command(
        "stage:check",
        "check a Ray cluster and its storage before spending (nodes, CPUs, GPUs, probes)",
    ),
    "submit": Command(
        "lmforge.cluster.command:submit_command",
        "submit a stage to a Ray cluster as a Ray job and follow it",
    ),
    "cluster": Command(
        "lmforge.cluster.command:cluster_command",
        "start, inspect or stop a local Ray head (up / status / down)",
    ),
    "data": Command(
        "lmforge.data.command:data_command",
        "prepare training data: clean, dedup, tokenize, pack (`lmforge data prepare -c CONFIG`)",
    ),
    "train": Command(
        "stage:train",
        "pretrain a model with Ray Train + FSDP2 on the data stage's shards (resumes automatically)",
    ),
    "finetune": Command(
        "stage:finetune",
        "fine-tune a model artifact on chat data, full or LoRA (same loop; resumes automatically)",
    ),
    "improve": Command(
        "stage:improve",
        "fold served feedback into the model: fine-tune, gate against the served one, promote",
    ),
    "plan": Command(
        "lmforge.project.command:plan_command",
        "estimate a training config before running it: params, FLOPs, memory per GPU, wall time",
    ),
    "eval": Command(
        "lmforge.eval.command:eval_command",
        "evaluate a model (`lmforge eval -c CONFIG`); gate a candidate (`lmforge eval compare A B`)",
    ),
    "export": Command(
        "lmforge.model.command:export_command",
        "export a model artifact as a Hugging Face Llama folder (transformers, vLLM)",
    ),
    "import": Command(
        "lmforge.model.command:import_command",
        "import a Llama-family Hugging Face folder (safetensors) as a model artifact",
    ),
    "serve": Command(
        "lmforge.serve.command:serve_command",
        "serve models behind an OpenAI-compatible API on Ray Serve (`-c CONFIG` or `--model DIR`)",
    ),
    "models": Command(
        "lmforge.model.command:models_command",
        "list model versions and their lineage, evals and which one is served (`models list`)",
    ),
    "monitor": Command(
        "lmforge.monitor.command:monitor_command",
        "report on served traffic and feedback from the request log (`monitor report --logs`)",
    ),
    "runs": Command(
        "lmforge.comparison.command:runs_command",
        "compare runs: config diff, final metrics, overlaid loss curves (`runs compare A B`)",
    ),
    "ui": Command(
        "lmforge.tracking.command:ui_command",
        "open the MLflow UI on the runs' tracking store (every run's params, curves, artifacts)",
    ),
    "config": Command(
        "lmforge.config.command:config_command",
        "show a stage's resolved config, or write the config reference",
    ),
}


def usage() -> str:
    from lmforge import __version__

    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {cmd.help}" for name, cmd in COMMANDS.items())
    return (
        f"usage: lmforge [--version] [-v] <command> [args]\n\n"
        f"lmforge {__version__}: build a language model end to end on Ray.\n\n"
        f"commands:\n{rows}\n\n"
        "Run `lmforge <command> --help` for a command's options and config fields.\n"
        "Ray address: --address or RAY_ADDRESS; none means an embedded local Ray.\n"
        "-v, --verbose: Ray's own logs on the console too (else they stay in Ray's log files).\n"
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage(), end="")
        return 0
    if argv[0] in ("-V", "--version"):
        from lmforge import __version__

        print(f"lmforge {__version__}")
        return 0
    if argv[0] in ("-v", "--verbose"):
        from lmforge.console import set_verbose

        set_verbose()  # Ray's own logs on the console too
        return main(argv[1:])
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        print(
            f"lmforge: error: unknown command '{name}'{hint}; `lmforge --help` lists them",
            file=sys.stderr,
        )
        return 2
    return run_command(name, rest)


def run_command(name: str, argv: list[str]) -> int:
    from lmforge import LmforgeError

    target = COMMANDS[name].target
    prog = f"lmforge {name}"
    try:
        if target.startswith("stage:"):
            from lmforge.stage import stage_main

            return stage_main(target.split(":", 1)[1], argv, prog)
        module, _, func = target.partition(":")
        return getattr(importlib.import_module(module), func)(argv, prog)
    except LmforgeError as e:
        print(f"lmforge: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("lmforge: interrupted", file=sys.stderr)
        return 130


def console() -> None:
    """The `lmforge` command: `main`, then a normal exit without the interpreter's teardown.

    After a training run, Python's finalization (the C++ side of torch, MLflow's store, ...)
    took ~2 s of the command's wall time with nothing left to save (bench/train_startup.py).
    So, as at a normal exit, the non-daemon threads are joined and the atexit handlers run
    (Ray's shutdown, logging's flush); then the process ends with `os._exit`. Errors
    (SystemExit from argparse, exceptions) take the ordinary way out."""
    code = main()
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    console()
