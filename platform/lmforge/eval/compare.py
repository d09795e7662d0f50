"""The promotion gate before serving (`lmforge eval compare BASELINE CANDIDATE`, in command.py).

Each side is a report.json or an eval output directory holding one. A gated metric regresses
when the candidate is worse than the baseline by more than the allowed amount, in the metric's
direction (accuracy-like metrics: lower is worse; loss-like metrics: higher is worse). The
amount is absolute, or with --relative a fraction of the baseline's value. A metric only one
report has (a task only one side ran, such as `val` of a fine-tune, whose data has no packed
val split) is skipped, and the output says so; a metric named with `--metric TASK/METRIC` that
the candidate lacks fails. Exit 0: no regression; 1: a regression; 2: usage error.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from lmforge import LmforgeError, storage
from lmforge.eval.report import HIGHER_IS_BETTER, LOWER_IS_BETTER


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
