"""`lmforge runs compare`: the command line (runs.py does the work)."""

from __future__ import annotations

import argparse
import json


def runs_command(argv: list[str], prog: str) -> int:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Inspect finished (or running) stage runs. `compare`: the config keys that "
        "differ, the final metrics side by side, and an overlay plot of the loss curves.",
    )
    sub = parser.add_subparsers(dest="action", required=True, metavar="{compare}")
    p = sub.add_parser(
        "compare",
        help="compare two or more runs: config diff, final metrics, loss curves",
        description="Compare stage runs: print the flattened resolved-config keys whose values "
        "differ and the final metrics side by side (train/finetune: the last logged value of "
        "each metrics.jsonl key; eval: report.json scores; data: manifest counts), and write "
        "their train (solid) and val (dashed) loss curves into one PNG.",
        epilog="example: lmforge runs compare @train/tiny runs/train/tiny-1a2b3c4d5e6f "
        "--out compare.png",
    )
    p.add_argument(
        "runs",
        nargs="+",
        metavar="RUN",
        help="a run's output folder (runs/train/tiny-1a2b3c4d5e6f) or @<stage>/<run name> "
        "(its latest complete run under --runs-dir)",
    )
    p.add_argument(
        "--runs-dir",
        default="runs",
        help="where @<stage>/<run name> references are looked up (default: %(default)s)",
    )
    p.add_argument(
        "--out",
        default="compare.png",
        help="the overlay plot of the loss curves (default: %(default)s in the current directory)",
    )
    p.add_argument(
        "--x",
        choices=("step", "tokens"),
        default="step",
        help="x axis of the plot: optimizer steps, or tokens seen (runs with different batch "
        "sizes line up) (default: %(default)s)",
    )
    p.add_argument("--json", action="store_true", help="also print the comparison as JSON")
    args = parser.parse_args(argv)
    if len(args.runs) < 2:
        parser.error("compare needs two or more runs")
    from lmforge.comparison.runs import compare_runs  # pyarrow, yaml: not for --help

    result = compare_runs(args.runs, args.runs_dir, args.out, args.x)
    if args.json:
        print(json.dumps(result, indent=2))
    return 0
