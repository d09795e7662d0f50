"""`lmforge eval compare BASELINE CANDIDATE`: the promotion gate before serving.

Each side is a report.json or an eval output directory holding one. A gated metric regresses
when the candidate is worse than the baseline by more than the allowed amount, in the metric's
direction (accuracy-like metrics: lower is worse; loss-like metrics: higher is worse). The
amount is absolute, or with --relative a fraction of the baseline's value. A metric only one
report has (a task only one side ran, such as `val` of a fine-tune, whose data has no packed
val split) is skipped, and the output says so; a metric named with `--metric TASK/METRIC` that
the candidate lacks fails. Exit 0: no regression; 1: a regression; 2: usage error.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from typing import Any

from lmforge import LmforgeError, storage
from lmforge.eval.report import HIGHER_IS_BETTER, LOWER_IS_BETTER, fmt


def read_report(path: str) -> dict[str, Any]:
    file = storage.join(path, "report.json") if storage.is_dir(path) else path
    try:
        report = json.loads(storage.read_text(file))
    except FileNotFoundError:
        raise LmforgeError(f"no eval report at {file}") from None
    except ValueError as e:
        raise LmforgeError(f"{file}: not a JSON report ({e})") from None
    if not isinstance(report, dict) or not isinstance(report.get("tasks"), dict):
        raise LmforgeError(f"{file}: not an lmforge eval report (no 'tasks' mapping)")
    return report


@dataclass
class Check:
    task: str
    metric: str
    baseline: float
    candidate: float | None
    allowed: float
    regression: float | None  # how much worse the candidate is (negative: better)

    @property
    def failed(self) -> bool:
        return self.regression is None or self.regression > self.allowed + 1e-12


def parse_gates(specs: list[str], default: float) -> dict[tuple[str, str], float]:
    """`TASK/METRIC[=MAX]` -> threshold; `*` matches any task."""
    gates = {}
    for spec in specs:
        key, _, value = spec.partition("=")
        task, sep, metric = key.partition("/")
        if not sep or not task or not metric:
            raise LmforgeError(
                f"--metric {spec!r}: expected TASK/METRIC[=MAX], e.g. val/bits_per_byte=0.02"
            )
        try:
            gates[(task, metric)] = float(value) if value else default
        except ValueError:
            raise LmforgeError(f"--metric {spec!r}: {value!r} is not a number") from None
    return gates


def gated(task: str, metric: str, gates: dict[tuple[str, str], float] | None) -> bool:
    if gates:
        return (task, metric) in gates or ("*", metric) in gates
    return metric in HIGHER_IS_BETTER or metric in LOWER_IS_BETTER


def one_sided(
    baseline: dict[str, Any],
    candidate: dict[str, Any],
    gates: dict[tuple[str, str], float] | None = None,
) -> list[tuple[str, str, str]]:
    """(task, metric, the side that has it) of each gated metric only one report has; a metric
    named exactly in `gates` is not here: its absence from the candidate fails the gate."""
    sides = {"baseline": baseline["tasks"], "candidate": candidate["tasks"]}
    found = []
    for side, tasks in sides.items():
        other = sides["candidate" if side == "baseline" else "baseline"]
        for task, metrics in tasks.items():
            for metric in metrics:
                named = bool(gates) and (task, metric) in gates
                if gated(task, metric, gates) and metric not in other.get(task, {}) and not named:
                    found.append((task, metric, side))
    return found


def compare(
    baseline: dict[str, Any],
    candidate: dict[str, Any],
    max_regression: float,
    gates: dict[tuple[str, str], float] | None = None,
    relative: bool = False,
    sigmas: float = 0.0,
) -> list[Check]:
    """One Check per gated metric of the baseline: the named gates, else every metric with a
    known direction; metrics the candidate lacks are skipped (`one_sided`) unless named
    exactly in `gates`, then they fail. With `sigmas` > 0 the allowed amount grows by that many combined standard
    errors of the two values (sqrt(se_a^2 + se_b^2)), so sampling noise alone does not fail."""
    checks = []
    skipped = {(task, metric) for task, metric, _ in one_sided(baseline, candidate, gates)}
    for task, metrics in baseline["tasks"].items():
        for metric, m in metrics.items():
            if gates:
                allowed = gates.get((task, metric), gates.get(("*", metric)))
                if allowed is None:
                    continue
            elif metric in HIGHER_IS_BETTER or metric in LOWER_IS_BETTER:
                allowed = max_regression
            else:
                continue
            if (task, metric) in skipped:
                continue
            base = m["value"]
            other = candidate["tasks"].get(task, {}).get(metric, {})
            cand = other.get("value")
            regression = None
            if cand is not None and not math.isnan(cand):
                regression = base - cand if metric not in LOWER_IS_BETTER else cand - base
                noise = sigmas * math.hypot(m.get("stderr") or 0.0, other.get("stderr") or 0.0)
                if relative:
                    scale = abs(base) or math.inf
                    regression, noise = regression / scale, noise / scale
                allowed += noise
            checks.append(Check(task, metric, base, cand, allowed, regression))
    return checks


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
