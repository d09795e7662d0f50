"""`lmforge monitor report`: the monitor report's command line (report.py renders it)."""

from __future__ import annotations

import argparse

from lmforge import LmforgeError
from lmforge.monitor.report import load_logs, write_report
from lmforge.monitor.stats import parse_since, summarize


def monitor_command(argv: list[str], prog: str) -> int:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Monitoring of served models. `report`: requests, error rate, latency, "
        "tokens, output lengths and user feedback per model version and per day, from the "
        "request log and feedback store the serving app writes (docs/operations.md).",
    )
    sub = parser.add_subparsers(dest="action", required=True, metavar="{report}")
    p = sub.add_parser(
        "report",
        help="write the monitor report",
        description="write the monitor report (to stdout as Markdown without --out)",
    )
    p.add_argument("--logs", required=True, help="the request-log path (local dir or URI)")
    p.add_argument(
        "--since",
        help="only rows this recent: 24h, 7d, 30m, 2w, or an ISO date/time (default: all)",
    )
    p.add_argument(
        "--out",
        help="report file: .md (plots as PNG next to it), .html (plots embedded) or .json",
    )
    args = parser.parse_args(argv)
    since = parse_since(args.since)
    requests, feedback = load_logs(args.logs, since)
    if not requests.num_rows and not feedback.num_rows:
        window = f" since {since.isoformat()}" if since else ""
        raise LmforgeError(
            f"no requests or feedback logged under {args.logs}{window}; is the serving app's "
            "request log enabled and pointed there (serving config request-log path)?"
        )
    summary = summarize(requests, feedback)
    write_report(summary, requests, args.logs, since, args.out)
    return 0
