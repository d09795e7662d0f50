"""`lmforge eval`: run the eval stage (`-c CONFIG`) or gate a candidate against a baseline
(`compare BASELINE CANDIDATE --max-regression X`, exit 1 on a regression)."""

from __future__ import annotations

import argparse

from lmforge import LmforgeError
from lmforge.eval.compare import compare, one_sided, parse_gates, read_report
from lmforge.eval.report import fmt


def eval_command(argv: list[str], prog: str) -> int:
    """`lmforge eval -c CONFIG` runs the stage; `lmforge eval compare A B` is the gate."""
    if argv and argv[0] == "compare":
        return compare_command(argv[1:], f"{prog} compare")
    from lmforge.stage import stage_main

    return stage_main("eval", argv, prog)


def compare_command(argv: list[str], prog: str) -> int:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Fail (exit 1) when CANDIDATE is worse than BASELINE beyond the allowed "
        "regression on any gated metric. Each side: report.json or an eval output directory.",
    )
    parser.add_argument("baseline")
    parser.add_argument("candidate")
    parser.add_argument(
        "--max-regression",
        type=float,
        default=0.0,
        metavar="X",
        help="allowed worsening of each gated metric (absolute; with --relative a fraction "
        "of the baseline). Default: %(default)s",
    )
    parser.add_argument(
        "--relative", action="store_true", help="thresholds are fractions of the baseline value"
    )
    parser.add_argument(
        "--sigmas",
        type=float,
        default=0.0,
        metavar="K",
        help="also allow K combined standard errors of the two values (noise), e.g. 2",
    )
    parser.add_argument(
        "--metric",
        action="append",
        default=[],
        metavar="TASK/METRIC[=MAX]",
        help="gate only these metrics (repeatable; TASK may be *); default: every metric "
        "with a known direction (acc, acc_norm, f1, exact_match, macro_f1, loss, perplexity, "
        "bits_per_byte, byte_perplexity, word_perplexity)",
    )
    args = parser.parse_args(argv)
    if args.max_regression < 0 or args.sigmas < 0:
        raise LmforgeError("--max-regression and --sigmas must be >= 0")
    base, cand = read_report(args.baseline), read_report(args.candidate)
    checks = compare(
        base,
        cand,
        args.max_regression,
        parse_gates(args.metric, args.max_regression),
        args.relative,
        args.sigmas,
    )
    skipped = one_sided(base, cand, parse_gates(args.metric, args.max_regression))
    for side in ("baseline", "candidate"):
        names = [f"{task}/{metric}" for task, metric, s in skipped if s == side]
        if names:
            print(f"skipped (only the {side} report has them): {', '.join(names)}")
    if not checks:
        raise LmforgeError(
            "no gated metric is in both reports (check --metric, and that both evals ran the "
            "same tasks)"
        )
    if skipped:
        print()
    unit = " (relative)" if args.relative else ""
    rows = [("task", "metric", "baseline", "candidate", f"worse by{unit}", "allowed", "")]
    for c in checks:
        worse = "missing" if c.regression is None else fmt(c.regression)
        rows.append(
            (
                c.task,
                c.metric,
                fmt(c.baseline),
                fmt(c.candidate),
                worse,
                fmt(c.allowed),
                "FAIL" if c.failed else "ok",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
    failed = [c for c in checks if c.failed]
    if failed:
        print(
            f"\ngate FAILED: {len(failed)} of {len(checks)} gated metric(s) regressed beyond "
            "the allowed amount",
            flush=True,
        )
        return 1
    print(f"\ngate passed: {len(checks)} metric(s) within the allowed regression")
    return 0
