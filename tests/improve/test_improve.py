"""The improvement loop on planted feedback, with real runs on a tiny model: it promotes a
candidate fine-tuned on good answers, and keeps the served model when the feedback is bad."""

from __future__ import annotations

import datetime as dt
import json
import random
from pathlib import Path

import pyarrow as pa
import pytest

from lmforge.builtin.sft import builtin_sft_examples
from lmforge.improve.config import ImproveConfig
from lmforge.improve.feedback import build_examples, ngram_filter
from lmforge.model import chat
from lmforge.model.artifact import read_version
from lmforge.serve.requestlog import FEEDBACK_SCHEMA, REQUEST_SCHEMA, LogWriter
from lmforge.stage import read_serving_pointer
from tests.train.conftest import pretrained_base


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def request_row(cid: str, messages: list[dict], completion: str, status: int = 200) -> dict:
    return {
        "completion_id": cid, "time": now(), "endpoint": "chat", "model": "lmforge",
        "model_version": "v-test", "messages_json": json.dumps(messages),
        "prompt": chat.render(messages, add_generation_prompt=True), "completion": completion,
        "finish_reason": "stop", "latency_s": 0.1, "prompt_tokens": 10,
        "completion_tokens": 5, "status": status, "replica": "r0",
    }  # fmt: skip


def feedback_row(
    cid: str, rating: float, correction: str | None = None, key: str = "ops", trusted=True
) -> dict:
    return {
        "feedback_id": f"fb-{cid}-{rating}", "completion_id": cid, "time": now(),
        "rating": rating, "correction": correction, "tags": [], "model": "lmforge",
        "model_version": "v-test", "replica": "r0", "key_id": key, "trusted": trusted,
    }  # fmt: skip


def plant(log: Path, requests: list[dict], feedback: list[dict]) -> None:
    for kind, rows in (("requests", requests), ("feedback", feedback)):
        writer = LogWriter(str(log), kind, replica="test")
        for row in rows:
            writer.add(row)
        writer.flush()


# ---------------------------------------------------------------- the data rules, no Ray


def test_feedback_becomes_examples_by_rating_and_correction_redacted_deduplicated():
    q = [{"role": "user", "content": f"What does f{i} do?"} for i in range(6)]
    requests = [
        request_row("c0", [q[0]], "Return zero."),
        request_row("c1", [q[1]], "Garbage."),
        request_row("c2", [q[2]], "Wrong."),
        request_row("c3", [q[3]], "Return three."),
        request_row("c4", [q[3]], "Return three."),  # the same exchange again
        request_row("c5", [q[5]], "Failed.", status=500),
    ]
    feedback = [
        feedback_row("c0", 1.0),  # kept as answered
        feedback_row("c1", -1.0),  # no correction: skipped
        feedback_row("c2", -1.0, "Mail alice@example.com or call +1 (555) 123-4567."),
        feedback_row("c3", 1.0),
        feedback_row("c4", 0.8),  # duplicate of c3
        feedback_row("c5", 1.0),  # the request failed
        feedback_row("c9", 1.0),  # not logged (sampling)
        feedback_row("c0", 0.2),  # later feedback on c0 wins: now below min_rating
    ]
    feedback[-1]["time"] = now() + dt.timedelta(seconds=5)
    built = build_examples(
        pa.Table.from_pylist(feedback, schema=FEEDBACK_SCHEMA),
        pa.Table.from_pylist(requests, schema=REQUEST_SCHEMA),
        min_rating=0.5,
        use_corrections=True,
    )
    assert [e["id"] for e in built.examples] == ["c2", "c3"]
    answer = built.examples[0]["messages"][-1]
    assert answer == {"role": "assistant", "content": "Mail <EMAIL> or call <PHONE>."}
    assert built.counts == {
        "feedback": 8, "completions_rated": 7, "skipped_low_rating": 2, "from_corrections": 1,
        "from_ratings": 1, "dropped_duplicate": 1, "skipped_failed_request": 1,
        "skipped_not_logged": 1, "examples": 2,
    }  # fmt: skip
    contaminated = ngram_filter(["the quick brown fox jumps over the lazy dog"], 5)
    assert contaminated("Yes: the quick brown fox jumps over it")
    assert not contaminated("the quick brown cat jumps over a lazy dog")


def test_only_trusted_keys_feed_the_loop_unless_told_and_excluded_keys_never():
    q = [{"role": "user", "content": f"What does g{i} do?"} for i in range(4)]
    requests = [request_row(f"c{i}", [q[i]], f"Return {i}.") for i in range(4)]
    feedback = [
        feedback_row("c0", 1.0, key="ops"),
        feedback_row("c1", 1.0, key="key-5f2a", trusted=False),
        feedback_row("c2", 1.0, key="spammer", trusted=True),
        feedback_row("c3", 1.0, key=None, trusted=None),  # a row logged before keys were
        feedback_row("c0", -1.0, "Return nothing.", key="key-5f2a", trusted=False),
    ]
    feedback[-1]["time"] = now() + dt.timedelta(seconds=5)
    tables = (
        pa.Table.from_pylist(feedback, schema=FEEDBACK_SCHEMA),
        pa.Table.from_pylist(requests, schema=REQUEST_SCHEMA),
    )
    built = build_examples(*tables, 0.5, True, exclude_keys={"spammer"})
    # The untrusted later correction of c0 does not override the trusted rating.
    assert [e["id"] for e in built.examples] == ["c0"]
    assert built.examples[0]["messages"][-1]["content"] == "Return 0."
    assert built.counts["skipped_untrusted_key"] == 3
    assert built.counts["skipped_excluded_key"] == 1
    everyone = build_examples(*tables, 0.5, True, trusted_only=False)
    assert [e["id"] for e in everyone.examples] == ["c0", "c1", "c2", "c3"]
    assert everyone.examples[0]["messages"][-1]["content"] == "Return nothing."


# ---------------------------------------------------------------- the loop, with Ray


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return pretrained_base(tmp_path_factory.mktemp("improve-base"))


def gate_task(tmp: Path) -> dict:
    """Perplexity of held-out chat exchanges (questions about held-out stdlib modules)."""
    rows = [{"text": chat.render(e["messages"])} for e in builtin_sft_examples("val")[:48]]
    path = tmp / "heldout-chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"name": "heldout-chat", "type": "perplexity", "file": str(path),
            "metrics": ["loss"]}  # fmt: skip


def improve_config(base: Path, runs: Path, log: Path, task: dict) -> ImproveConfig:
    return ImproveConfig.model_validate({
        "name": "loop", "runs_dir": str(runs), "request_log": str(log), "current": str(base),
        "feedback": {"min_examples": 8, "val_fraction": 0.0},
        "finetune": {
            "optim": {"lr": 3e-3, "warmup_steps": 2},
            "train": {"global_batch_tokens": 1024, "micro_batch_size": 4, "max_steps": 12,
                      "log_every": 4, "eval_every": 0, "precision": "fp32", "peak_tflops": 0.1},
            "seq_len": 128,
            "resources": {"num_workers": 1},
        },
        "gate": {"tasks": [task], "limit": 48},
    })  # fmt: skip


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_improve_promotes_a_better_candidate_and_refuses_a_worse_one(ray_local, base, tmp_path):
    from lmforge.stage import get_stage, run_stage

    runs, log = tmp_path / "runs", tmp_path / "log"
    task = gate_task(tmp_path)
    cfg = improve_config(base, runs, log, task)
    stage = get_stage("improve")
    # Run 1: good answers (the built-in SFT train split as if users rated them up), one of them
    # an exact gate item (dropped as contamination).
    good = builtin_sft_examples("train")[:160]
    requests = [request_row(f"g{i}", e["messages"][:-1], e["messages"][-1]["content"])
                for i, e in enumerate(good)]  # fmt: skip
    leak = json.loads(Path(task["file"]).read_text().splitlines()[0])["text"]
    requests.append(request_row("leak", [{"role": "user", "content": leak}], "Sure."))
    plant(log, requests, [feedback_row(r["completion_id"], 1.0) for r in requests])
    first = run_stage(stage, cfg).summary
    assert first["action"] == "promote", first
    data = first["data"]
    assert data["from_ratings"] + data["dropped_contaminated"] == 161 and data["examples"] >= 100
    trained = Path(first["run_dir"], "sft", "train.jsonl").read_text()
    assert '"id": "leak"' not in trained and trained.count("\n") == data["examples"]
    checks = first["gate"]["checks"]
    assert checks and all(c["candidate"] < c["current"] for c in checks)  # loss fell
    pointer = read_serving_pointer(str(runs))
    assert pointer["artifact"] == first["candidate"]["artifact"]
    assert pointer["previous"]["artifact"] == str(base)  # adopted first, then promoted
    lineage = read_version(first["candidate"]["artifact"])
    assert lineage["parent"] == read_version(str(base))["version"] and lineage["eval_report"]
    serve = (runs / "serving" / "serve.yaml").read_text()
    assert first["candidate"]["artifact"] in serve
    # Run 2: only feedback after run 1 counts; this time the "corrections" are noise.
    rng = random.Random(0)
    words = ["".join(rng.choice("qxzjkvw") for _ in range(rng.randint(2, 5))) for _ in range(300)]
    noise = [" ".join(rng.choice(words) for _ in range(8)) for _ in range(120)]
    bad = [request_row(f"b{i}", [{"role": "user", "content": f"Tell me {i}."}], "ok")
           for i in range(120)]  # fmt: skip
    plant(
        log,
        bad,
        [feedback_row(r["completion_id"], -1.0, n) for r, n in zip(bad, noise, strict=True)],
    )
    second = run_stage(stage, cfg).summary
    assert second["data"]["feedback"] == 120  # not the 161 of run 1 again
    assert second["current"]["version"] == first["candidate"]["version"]
    assert second["action"] == "keep" and not second["gate"]["passed"], second
    assert read_serving_pointer(str(runs))["artifact"] == first["candidate"]["artifact"]
    # Run 3: nothing new: a recorded skip.
    third = run_stage(stage, cfg).summary
    assert third["action"] == "skip" and third["data"]["feedback"] == 0
    decisions = (Path(runs) / "improve").glob("loop-*/decisions.jsonl")
    lines = next(decisions).read_text().splitlines()
    assert [json.loads(ln)["action"] for ln in lines] == ["promote", "keep", "skip"]


def test_the_served_model_is_current_until_a_pointer_exists(tmp_path):
    from lmforge import ConfigError
    from lmforge.improve.stage import served_artifact
    from lmforge.model import Llama, model_config
    from lmforge.model.artifact import save_artifact, write_serving_pointer

    runs = tmp_path / "runs"
    for name in ("a", "b"):
        save_artifact(str(runs / "finetune" / f"chat-{name}" / "model"),
                      Llama(model_config("debug")).state_dict(), model_config("debug"))  # fmt: skip
    (runs / "finetune" / "chat.latest").write_text(str(runs / "finetune" / "chat-a") + "\n")
    cfg = ImproveConfig(runs_dir=str(runs), request_log="x", current="@finetune/chat")
    assert served_artifact(cfg) == (str(runs / "finetune" / "chat-a" / "model"), True)
    write_serving_pointer(str(runs), str(runs / "finetune" / "chat-b" / "model"))
    assert served_artifact(cfg) == (str(runs / "finetune" / "chat-b" / "model"), False)
    with pytest.raises(ConfigError, match="no model is served yet"):
        served_artifact(ImproveConfig(runs_dir=str(tmp_path / "empty"), request_log="x"))
