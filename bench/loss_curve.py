"""What drawing `loss.png` costs rank 0 at a checkpoint, against reading metrics.jsonl alone.

For metrics.jsonl files of 1k, 10k and 100k log lines (a long run at log_every=1, with a val
loss every 100 steps), the median wall time of `plots.read_metrics` (the baseline: parsing the
file) and of `plots.write_loss_curve` (parse + draw + write the PNG), and the first draw of a
fresh process (matplotlib's import included). The loop draws only at checkpoints and at the end,
so compare these with a checkpoint's save time, not a step's.

    .venv/bin/python bench/loss_curve.py [--repeats 5]

Prints a table; writes bench/results/loss_curve.json (and $OUT/loss_curve.json when OUT is set).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def write_metrics(run: Path, lines: int) -> None:
    run.mkdir(parents=True, exist_ok=True)
    with open(run / "metrics.jsonl", "w") as f:
        for step in range(1, lines + 1):
            row = {"time": 1.7e9 + step, "step": step, "loss": 2 + 8 * math.exp(-step / lines),
                   "lr": 3e-4 * min(1.0, step / 100), "grad_norm": 1.0, "tokens": step * 2**20,
                   "tokens_per_s": 1e5, "mfu": 0.4, "memory_gib": 60.0, "eta_s": 10.0}  # fmt: skip
            if step % 100 == 0:
                row |= {"val_loss": row["loss"] + 0.05, "val_bpb": 1.0}
            f.write(json.dumps(row) + "\n")


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def first_draw_seconds(run: Path) -> float:
    code = (
        "import time, sys; t = time.perf_counter(); from lmforge.plots import write_loss_curve; "
        f"write_loss_curve({str(run)!r}); print(time.perf_counter() - t)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    from lmforge.plots import read_metrics, write_loss_curve

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for lines in (1_000, 10_000, 100_000):
            run = Path(tmp) / f"run-{lines}"
            write_metrics(run, lines)
            parse = median_seconds(lambda run=run: read_metrics(str(run)), args.repeats)
            draw = median_seconds(lambda run=run: write_loss_curve(str(run)), args.repeats)
            rows.append({"lines": lines, "parse_s": parse, "parse_and_draw_s": draw,
                         "ratio": draw / parse, "first_draw_s": first_draw_seconds(run)})  # fmt: skip
    print(
        f"{'lines':>8}  {'parse ms':>9}  {'parse+draw ms':>14}  {'ratio':>6}  {'first draw ms':>14}"
    )
    for r in rows:
        print(f"{r['lines']:>8,}  {1e3 * r['parse_s']:>9.1f}  {1e3 * r['parse_and_draw_s']:>14.1f}"
              f"  {r['ratio']:>6.1f}  {1e3 * r['first_draw_s']:>14.1f}")  # fmt: skip
    result = json.dumps({"repeats": args.repeats, "rows": rows}, indent=2)
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "loss_curve.json").write_text(result)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "loss_curve.json").write_text(result)


if __name__ == "__main__":
    main()
