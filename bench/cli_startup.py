"""How fast does `lmforge --help` answer? Wall time of the console script against a bare
`python -c pass` measured in the same run (the interpreter's own start-up is the floor).

    .venv/bin/python bench/cli_startup.py [--runs 20]

Prints a table and writes bench/results/cli_startup.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def wall_times(cmd: list[str], runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    lmforge = str(Path(sys.executable).parent / "lmforge")
    cases = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "lmforge --help": [lmforge, "--help"],
        "lmforge --version": [lmforge, "--version"],
        "lmforge check --help": [lmforge, "check", "--help"],
    }
    results = {}
    for name, cmd in cases.items():
        wall_times(cmd, 2)  # warm the page cache
        t = wall_times(cmd, args.runs)
        results[name] = {"median_s": statistics.median(t), "max_s": max(t)}
    base = results["python -c pass"]["median_s"]
    print(f"{'command':<24} {'median':>9} {'max':>9} {'x python':>9}")
    for name, r in results.items():
        r["ratio_to_python"] = r["median_s"] / base
        print(
            f"{name:<24} {r['median_s'] * 1000:>7.1f}ms {r['max_s'] * 1000:>7.1f}ms {r['ratio_to_python']:>9.2f}"
        )
    out = Path(__file__).parent / "results" / "cli_startup.json"
    os.makedirs(out.parent, exist_ok=True)
    out.write_text(json.dumps({"runs": args.runs, "results": results}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
