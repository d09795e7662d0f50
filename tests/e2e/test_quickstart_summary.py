"""The quickstart summary's pretraining line: the run's own final val bpb (from its
metrics.jsonl) beside the previous recipe's documented figure, and the change between them."""

import json

from lmforge.project.quickstart import BASELINE_VAL_BPB, final_val_bpb, print_pretraining
from lmforge.stage import StageResult


def write_rows(run, rows):
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_the_pretraining_line_is_the_runs_last_val_bpb_against_the_baseline(tmp_path, capsys):
    train, finetune = tmp_path / "train", tmp_path / "finetune"
    write_rows(train, [{"step": 60, "loss": 5.0, "val_bpb": 2.5}, {"step": 90, "loss": 4.5},
                       {"step": 120, "loss": 4.0, "val_bpb": 2.2}])  # fmt: skip
    write_rows(finetune, [{"step": 30, "loss": 3.0, "val_bpb": 9.9}])
    results = [StageResult("data", str(tmp_path / "data"), "ok"),
               StageResult("train", str(train), "ok"), StageResult("finetune", str(finetune), "ok")]  # fmt: skip

    assert print_pretraining(results) == 2.2  # the last val_bpb of the train run, not finetune's
    change = 100 * (2.2 - BASELINE_VAL_BPB) / BASELINE_VAL_BPB
    assert capsys.readouterr().out.strip() == (
        f"pretraining: val bpb 2.200 (before: {BASELINE_VAL_BPB:.3f} with the previous recipe), "
        f"{change:+.1f}%"
    )


def test_no_line_without_a_val_bpb(tmp_path, capsys):
    write_rows(tmp_path / "train", [{"step": 1, "loss": 5.0}])
    assert final_val_bpb(str(tmp_path / "train")) is None
    assert print_pretraining([StageResult("train", str(tmp_path / "train"), "ok")]) is None
    assert capsys.readouterr().out == ""
