"""`lmforge data`: the data stage's command (`lmforge data prepare -c CONFIG [--set ...]`)."""

from __future__ import annotations

import argparse


def data_command(argv: list[str], prog: str) -> int:
    """`lmforge data prepare -c CONFIG [--set ...]`: run the data stage."""
    from lmforge.data.stage import STAGE
    from lmforge.stage import stage_main

    if argv[:1] == ["prepare"]:
        return stage_main("data", argv[1:], f"{prog} prepare")
    parser = argparse.ArgumentParser(prog=prog, description=STAGE.help)
    parser.add_argument(
        "action", choices=["prepare"], help="prepare: run the data stage (see `prepare --help`)"
    )
    parser.parse_args(argv or ["--help"])
    return 2
