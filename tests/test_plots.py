"""Every run's figures (lmforge/plots.py): the data each one plots equals the file it comes
from, and each PNG is a valid image of the expected size."""

from __future__ import annotations

import json
import struct
import subprocess
import sys

import pytest

from lmforge import LmforgeError
from lmforge.plots import (
    funnel_steps,
    loss_series,
    parse_metrics,
    read_metrics,
    score_bars,
    write_data_funnel,
    write_loss_curve,
)

PNG = b"\x89PNG\r\n\x1a\n"


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk, after checking the signature."""
    assert data[:8] == PNG and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def metrics_lines(steps: int = 12, val_every: int = 4) -> list[dict]:
    rows = [{"time": 1.0, "step": 0, "val_loss": 6.5}]  # eval_at_start: no train loss
    for step in range(1, steps + 1):
        row = {"time": 1.0 + step, "step": step, "loss": 6.0 - 0.25 * step,
               "lr": 1e-3 * min(1.0, step / 4), "tokens": 512 * step}  # fmt: skip
        if step % val_every == 0:
            row |= {"val_loss": 6.1 - 0.25 * step, "val_bpb": 2.0}
        rows.append(row)
    return rows


def write_metrics(run, rows) -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_loss_series_is_the_metrics_file_step_by_step(tmp_path):
    rows = metrics_lines()
    write_metrics(tmp_path / "run", rows)
    series = loss_series(read_metrics(str(tmp_path / "run")))
    assert series["loss"] == [(r["step"], r["loss"]) for r in rows if "loss" in r]
    assert series["val_loss"] == [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    assert series["lr"] == [(r["step"], r["lr"]) for r in rows if "lr" in r]
    assert series["val_loss"][0] == (0, 6.5) and len(series["val_loss"]) == 4
    # on tokens seen, eval-only rows get their x from the tokens per step
    by_tokens = loss_series(read_metrics(str(tmp_path / "run")), x="tokens")
    assert by_tokens["val_loss"][1] == (4 * 512, rows[4]["val_loss"])


def test_a_resumed_run_keeps_the_later_line_of_a_step_logged_twice():
    first = [{"step": s, "loss": 10.0 + s} for s in (1, 2, 3)]  # crashed after step 3
    again = [{"step": s, "loss": 20.0 + s} for s in (3, 4)]  # resumed from a step-2 checkpoint
    text = "".join(json.dumps(r) + "\n" for r in [*first, *again])
    rows = parse_metrics(text, "m.jsonl")
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 11.0), (2, 12.0), (3, 23.0), (4, 24.0)]


def test_a_cut_last_line_is_ignored_and_a_bad_line_elsewhere_is_an_error():
    good = json.dumps({"step": 1, "loss": 2.0})
    assert parse_metrics(good + '\n{"step": 2, "lo', "m.jsonl") == [{"step": 1, "loss": 2.0}]
    with pytest.raises(LmforgeError, match=r"^m.jsonl:1: not a JSON line"):
        parse_metrics("oops\n" + good + "\n", "m.jsonl")
    with pytest.raises(LmforgeError, match=r"^m.jsonl:2: a metrics line needs an integer 'step'"):
        parse_metrics(good + '\n{"loss": 1.0}\n' + good + "\n", "m.jsonl")


def test_loss_png_is_a_valid_image_and_absent_before_any_loss(tmp_path):
    run = tmp_path / "tiny-abc"
    write_metrics(run, metrics_lines())
    assert write_loss_curve(str(run)) == str(run / "loss.png")
    assert png_size((run / "loss.png").read_bytes()) == (700, 400)
    empty = tmp_path / "empty"
    write_metrics(empty, [{"step": 1, "grad_norm": 1.0}])
    assert write_loss_curve(str(empty)) is None and not (empty / "loss.png").exists()
    assert write_loss_curve(str(tmp_path / "nothing-yet")) is None


def test_score_bars_are_the_report_values_and_stderrs():
    tasks = {
        "mc": {"acc": {"value": 0.5, "stderr": 0.1, "n": 4}, "acc_norm": {"value": 0.25, "n": 4}},
        "val": {"bits_per_byte": {"value": 2.5, "stderr": 0.01, "n": 9}},
        "qa": {
            "acc": {"value": 0.75, "stderr": float("nan"), "n": 4},
            "f1": {"value": None, "stderr": None, "n": 0},
        },  # fmt: skip
    }
    assert score_bars(tasks) == {
        "acc": [("mc", 0.5, 0.1), ("qa", 0.75, 0.0)],
        "acc_norm": [("mc", 0.25, 0.0)],
        "bits_per_byte": [("val", 2.5, 0.01)],
    }


def test_eval_report_has_the_score_chart(tmp_path):
    from lmforge.eval.report import write_report

    tasks = {"mc": {"acc": {"value": 0.5, "stderr": 0.1, "n": 4}},
             "val": {"bits_per_byte": {"value": 2.5, "stderr": 0.01, "n": 9}}}  # fmt: skip
    write_report(str(tmp_path), {"model": "m", "tasks": tasks})
    assert "![task scores](scores.png)" in (tmp_path / "report.md").read_text()
    width, height = png_size((tmp_path / "scores.png").read_bytes())
    assert width > height > 0
    write_report(str(tmp_path / "none"), {"model": "m", "tasks": {}})
    assert not (tmp_path / "none" / "scores.png").exists()


def test_data_funnel_follows_the_manifest_steps(tmp_path):
    manifest = {
        "documents_in": 100,
        "documents_out": 70,
        "steps": [
            {"step": "read", "docs_in": 100, "docs_out": 98, "dropped": {"unreadable": 2}},
            {"step": "length", "docs_in": 98, "docs_out": 90, "dropped": {"too_short": 8}},
            {"step": "dedup_exact", "docs_in": 90, "docs_out": 70, "dropped": {"dup": 20}},
        ],
    }
    assert funnel_steps(manifest) == [("read", 98), ("length", 90), ("dedup_exact", 70),
                                      ("packed", 70)]  # fmt: skip
    path = write_data_funnel(str(tmp_path), manifest)
    assert path == str(tmp_path / "funnel.png")
    png_size((tmp_path / "funnel.png").read_bytes())


def test_importing_the_module_does_not_import_matplotlib():
    code = "import sys, lmforge.plots; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
