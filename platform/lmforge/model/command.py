"""The model commands: `lmforge models` (versions, lineage, what is served), `lmforge export`
(an artifact as a Hugging Face folder) and `lmforge import` (a Hugging Face folder as an
artifact)."""

from __future__ import annotations

import argparse
import json

from lmforge.model.artifact import resolve_artifact
from lmforge.model.hf import export_hf, import_hf
from lmforge.model.registry import lineage, list_models, models_table


def models_command(argv: list[str], prog: str) -> int:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Model versions under a runs dir: `list` shows every artifact (version = a "
        "hash of its weights), its lineage, eval results and which one is served "
        "(<runs_dir>/serving/current.json); `show VERSION` prints one lineage as JSON.",
    )
    sub = parser.add_subparsers(dest="action", required=True, metavar="{list,show}")
    for name, help_text in (
        ("list", "a table of every model version"),
        ("show", "one version's lineage as JSON"),
    ):
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == "show":
            p.add_argument("version", help="version id (v-...; a unique prefix is enough)")
        p.add_argument(
            "--runs-dir", default="runs", help="root of all outputs, path or URI (default: runs)"
        )
        if name == "list":
            p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    models = list_models(args.runs_dir)
    if args.action == "show":
        print(json.dumps(lineage(models, args.version), indent=2, default=str))
    elif args.json:
        print(json.dumps(models, indent=2, default=str))
    elif not models:
        print(f"no model artifacts under {args.runs_dir} (train a model first)")
    else:
        print(models_table(models))
        if any(m["served"] for m in models):
            print("\n* = served (serving/current.json)")
    return 0


def export_command(argv: list[str], prog: str) -> int:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Export a model artifact for other tools. --format hf writes a LlamaForCausalLM folder (safetensors, config, tokenizer with chat template) that transformers and vLLM load.",
    )
    parser.add_argument(
        "artifact", help="model artifact dir, or a training run dir (uses its model/)"
    )
    parser.add_argument(
        "--format", choices=["hf"], default="hf", help="output format (default: %(default)s)"
    )
    parser.add_argument("--out", required=True, help="output directory (path or URI)")
    args = parser.parse_args(argv)
    for path in export_hf(resolve_artifact(args.artifact), args.out):
        print(f"wrote {path}")
    return 0


def import_command(argv: list[str], prog: str) -> int:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Import a Llama-family Hugging Face folder (safetensors + tokenizer.json) as an lmforge model artifact, for fine-tuning, evaluation and serving.",
    )
    parser.add_argument("hf_dir", help="Hugging Face model folder (path or URI)")
    parser.add_argument("--out", required=True, help="artifact directory to write")
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        help="cast the weights (default: keep)",
    )
    args = parser.parse_args(argv)
    cfg = import_hf(args.hf_dir, args.out, args.dtype)
    print(f"imported {cfg.n_layers} layers, dim {cfg.dim}, vocab {cfg.vocab_size} -> {args.out}")
    return 0
