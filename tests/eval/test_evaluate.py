"""The eval stage end to end, the CLI, and the compare gate."""

from __future__ import annotations

import json

import pytest

from lmforge import ConfigError
from lmforge.eval.compare import compare
from lmforge.model.artifact import resolve_artifact
from tests.eval.conftest import make_artifact, make_val_split


def report(tasks: dict) -> dict:
    return {
        "model": "m",
        "tasks": {
            t: {m: {"value": v, "stderr": None, "n": 10} for m, v in ms.items()}
            for t, ms in tasks.items()
        },
    }


def test_compare_gates_in_each_metrics_direction():
    base = report(
        {"val": {"bits_per_byte": 1.00, "perplexity": 20.0}, "mc": {"acc": 0.50, "acc_norm": 0.4}}
    )
    same = compare(base, base, 0.0)
    assert len(same) == 4 and not any(c.failed for c in same)
    worse = report(
        {"val": {"bits_per_byte": 1.03, "perplexity": 19.0}, "mc": {"acc": 0.49, "acc_norm": 0.5}}
    )
    checks = {(c.task, c.metric): c for c in compare(base, worse, 0.02)}
    assert checks[("val", "bits_per_byte")].failed  # higher is worse, by 0.03 > 0.02
    assert checks[("val", "bits_per_byte")].regression == pytest.approx(0.03)
    assert not checks[("val", "perplexity")].failed  # lower is better
    assert not checks[("mc", "acc")].failed  # worse by 0.01 <= 0.02
    assert checks[("mc", "acc_norm")].regression == pytest.approx(-0.1)
    relative = {(c.task, c.metric): c for c in compare(base, worse, 0.05, relative=True)}
    assert not relative[("val", "bits_per_byte")].failed  # 3% <= 5%
    assert relative[("mc", "acc")].regression == pytest.approx(0.02)
    # named gates only; a gated metric missing from the candidate fails
    missing = report({"val": {"bits_per_byte": 1.0}})
    only = compare(base, missing, 0.0, gates={("mc", "acc"): 0.1})
    assert [(c.task, c.metric, c.failed) for c in only] == [("mc", "acc", True)]


def test_compare_skips_metrics_only_one_report_has_and_says_so(tmp_path, cli):
    """A pretrained model's eval has task `val` (its packed val split); a fine-tune's has none
    (its data is chat examples): their common metrics are gated, the rest skipped, not FAILed."""
    from lmforge.eval.compare import one_sided

    trained = report({"val": {"loss": 2.0, "perplexity": 7.4, "bits_per_byte": 1.1,
                              "byte_perplexity": 2.1}, "mc": {"acc": 0.5}})  # fmt: skip
    tuned = report({"mc": {"acc": 0.55}, "chat": {"exact_match": 0.3}})
    checks = compare(trained, tuned, 0.0)
    assert [(c.task, c.metric, c.failed) for c in checks] == [("mc", "acc", False)]
    assert one_sided(trained, tuned) == [
        ("val", "loss", "baseline"), ("val", "perplexity", "baseline"),
        ("val", "bits_per_byte", "baseline"), ("val", "byte_perplexity", "baseline"),
        ("chat", "exact_match", "candidate"),
    ]  # fmt: skip
    (tmp_path / "train.json").write_text(json.dumps(trained))
    (tmp_path / "tuned.json").write_text(json.dumps(tuned))
    code, out, _ = cli("eval", "compare", tmp_path / "train.json", tmp_path / "tuned.json")
    assert code == 0 and "FAIL" not in out and "gate passed: 1 metric(s)" in out
    assert "skipped (only the baseline report has them): val/loss, val/perplexity, " in out
    assert "skipped (only the candidate report has them): chat/exact_match" in out
    # A metric named with --metric is required: its absence fails the gate.
    code, out, _ = cli("eval", "compare", tmp_path / "train.json", tmp_path / "tuned.json",
                       "--metric", "val/bits_per_byte", "--metric", "mc/acc")  # fmt: skip
    assert code == 1 and "gate FAILED: 1 of 2" in out and "missing" in out
    # `*` matches what is there: the val metrics are skipped, mc/acc is gated.
    code, out, _ = cli("eval", "compare", tmp_path / "train.json", tmp_path / "tuned.json",
                       "--metric", "*/bits_per_byte", "--metric", "*/acc")  # fmt: skip
    assert code == 0 and "skipped (only the baseline report has them): val/bits_per_byte" in out
    # Nothing in common: a usage error, not a pass.
    (tmp_path / "other.json").write_text(json.dumps(report({"chat": {"exact_match": 0.3}})))
    code, _, err = cli("eval", "compare", tmp_path / "train.json", tmp_path / "other.json")
    assert code == 2 and "no gated metric is in both reports" in err


def test_compare_command_exit_codes(tmp_path, cli):
    base = report({"mc": {"acc": 0.6}})
    (tmp_path / "a.json").write_text(json.dumps(base))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "report.json").write_text(json.dumps(report({"mc": {"acc": 0.5}})))
    code, out, _ = cli(
        "eval", "compare", tmp_path / "a.json", tmp_path / "b", "--max-regression", "0.05"
    )
    assert code == 1 and "FAIL" in out and "gate FAILED: 1 of 1" in out
    code, out, _ = cli(
        "eval", "compare", tmp_path / "a.json", tmp_path / "b", "--max-regression", "0.2"
    )
    assert code == 0 and "gate passed" in out
    code, out, _ = cli(
        "eval", "compare", tmp_path / "a.json", tmp_path / "b", "--metric", "mc/acc=0.1"
    )
    assert code == 0
    code, _, err = cli("eval", "compare", tmp_path / "a.json", tmp_path / "nope.json")
    assert code == 2 and "no eval report" in err


def test_model_path_is_an_artifact_or_a_training_run(tmp_path, artifact):
    assert resolve_artifact(str(artifact)) == str(artifact)
    assert resolve_artifact(str(artifact.parent)) == str(artifact)  # <run>/model
    with pytest.raises(ConfigError, match="is not a model artifact"):
        resolve_artifact(str(tmp_path))


@pytest.mark.ray
@pytest.mark.slow
def test_eval_stage_end_to_end(tmp_path, ray_local, cli):
    run = tmp_path / "train" / "run"
    art = make_artifact(run / "model")
    data = make_val_split(tmp_path / "data", art)
    (art / "resolved_config.yaml").write_text(f"data:\n  path: {data}\n")
    early = make_artifact(tmp_path / "step_2" / "model", seed=1)
    (tmp_path / "mine.jsonl").write_text(
        '{"context": "1 + 1 =", "choices": ["2", "3"], "answer": 0}\n{"context": oops}\n'
    )
    (tmp_path / "eval.yaml").write_text(
        f"model: {run}\nruns_dir: {tmp_path / 'runs'}\nlimit: 3\nval_blocks: 2\n"
        f"checkpoints: [{early}]\n"
        "tasks:\n  - builtin:stdlib-module-mc\n  - builtin:bias-pairs\n"
        f"  - {{name: mine, type: multiple_choice, file: {tmp_path / 'mine.jsonl'}}}\n"
    )
    code, out, _ = cli("eval", "-c", tmp_path / "eval.yaml")
    assert code == 0
    [out_dir] = [p for p in (tmp_path / "runs" / "eval").iterdir() if p.is_dir()]
    rep = json.loads((out_dir / "report.json").read_text())
    assert list(rep["tasks"]) == ["val", "stdlib-module-mc", "bias-pairs", "mine"]
    assert rep["tasks"]["val"]["bits_per_byte"]["n"] == 2
    assert rep["tasks"]["stdlib-module-mc"]["acc"]["n"] == 3
    assert rep["tasks"]["mine"]["acc"]["n"] == 1
    assert rep["problems"]["mine"] == [
        f"{tmp_path / 'mine.jsonl'}:2: " + rep["problems"]["mine"][0].split(":2: ")[1]
    ]
    assert len(rep["problems"]["mine"]) == 1
    assert (
        "pct_stereotype" in rep["tasks"]["bias-pairs"]
        and len(rep["tasks"]["bias-pairs"]["pct_stereotype"]["ci"]) == 2
    )
    # the table is printed and written; per-item samples; the two models' plot
    assert "stdlib-module-mc" in out and "bits_per_byte" in out
    assert "| val | bits_per_byte |" in (out_dir / "report.md").read_text()
    assert len((out_dir / "samples" / "stdlib-module-mc.jsonl").read_text().splitlines()) == 3
    assert [c["step"] for c in rep["checkpoints"]] == [0, 2]
    assert (out_dir / "bits_per_byte_over_steps.png").read_bytes()[:4] == b"\x89PNG"
    # the task scores as a chart, linked from the report
    assert (out_dir / "scores.png").read_bytes()[:4] == b"\x89PNG"
    assert "![task scores](scores.png)" in (out_dir / "report.md").read_text()
    # the same report compares equal to itself through the gate
    code, _, _ = cli("eval", "compare", out_dir, out_dir / "report.json")
    assert code == 0


def test_evaluate_in_process_for_a_training_loop(scorer):
    from lmforge.eval.runner import score_local
    from lmforge.eval.scoring import build_requests, task_metrics
    from lmforge.eval.stage import evaluate_in_process
    from lmforge.eval.tasks import load_items, resolve_task

    out = evaluate_in_process(
        scorer.model, scorer.tokenizer, ["builtin:bias-pairs", "builtin:stdlib-module-mc"], limit=4
    )
    assert set(out) == {"bias-pairs", "stdlib-module-mc"}
    assert set(out["stdlib-module-mc"]) == {"acc", "acc_norm"}
    spec = resolve_task("builtin:bias-pairs").model_copy(update={"limit": 4})
    items = load_items(spec)
    reqs = build_requests(spec, items, scorer.tokenizer, scorer.max_length, {})
    metrics, _ = task_metrics(spec, items, reqs, score_local(scorer, reqs, 16))
    assert out["bias-pairs"]["likelihood_diff"] == metrics["likelihood_diff"].value


def test_compare_allows_sampling_noise_in_standard_errors():
    base = report({"mc": {"acc": 0.60}})
    cand = report({"mc": {"acc": 0.55}})
    for r in (base, cand):
        r["tasks"]["mc"]["acc"]["stderr"] = 0.03
    [strict] = compare(base, cand, 0.0)
    assert strict.failed
    # 2 sigmas of sqrt(0.03^2 + 0.03^2) = 0.0849 > 0.05: within noise
    [noisy] = compare(base, cand, 0.0, sigmas=2)
    assert not noisy.failed and noisy.allowed == pytest.approx(2 * 0.03 * 2**0.5)


def test_val_data_auto_follows_a_fine_tune_to_its_base_in_a_moved_runs_dir(tmp_path):
    """data.path and base were stored as the runs' working directory saw them; the val task
    used to vanish (no message) from any other directory, and always for a fine-tuned model."""
    from lmforge.eval.stage import trained_on

    runs = tmp_path / "mnt" / "runs"  # was ./runs/qs where the pipeline ran
    (runs / "data" / "d-1").mkdir(parents=True)
    for run, text in (
        ("train/t-1", "data: {path: runs/qs/data/d-1}\n"),
        ("finetune/f-1", "base: /old/mount/runs/qs/train/t-1/model\ndata: {seq_len: 64}\n"),
    ):
        (runs / run / "model").mkdir(parents=True)
        (runs / run / "model" / "resolved_config.yaml").write_text(text)
    want = str(runs / "data" / "d-1")
    assert trained_on(str(runs / "train" / "t-1" / "model")) == want
    assert trained_on(str(runs / "finetune" / "f-1" / "model")) == want
