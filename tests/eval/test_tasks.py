"""Task files, prompts, and scoring a task end to end with a stand-in scorer."""

from __future__ import annotations

import json

import pytest

from lmforge import ConfigError
from lmforge.eval.runner import score_local
from lmforge.eval.scoring import build_requests, task_metrics
from lmforge.eval.tasks import TaskSpec, load_items, render_prompt, resolve_task

GEN = {"max_new_tokens": 8, "temperature": 0.0, "top_k": None, "seed": 0}


class PrefersFirstChoice:
    """Stands in for a model that always gives choice 0 the highest likelihood."""

    def score(self, requests):
        return [
            {
                "loglikelihood": 0.0 if r["slot"] == 0 else -1.0 - r["slot"],
                "greedy": False,
                "tokens": 1,
            }
            for r in requests
        ]


def write_jsonl(path, rows) -> str:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_malformed_lines_are_reported_with_line_numbers_and_skipped(tmp_path):
    good = {"context": "2 + 2 =", "choices": ["4", "5"], "answer": 0}
    file = write_jsonl(
        tmp_path / "mc.jsonl",
        [
            good,
            "{not json",
            {"context": "x", "choices": ["a", "b"]},
            {"context": "x", "choices": ["a", "b"], "answer": 2},
            "",
            {**good, "answer": 1},
            "[1, 2]",
            {"context": "x", "choices": "ab", "answer": 0},
        ],
    )
    items = load_items(TaskSpec(name="mc", type="multiple_choice", file=file))
    assert items.lines == [1, 6]
    assert [p.split(": ", 1)[0] for p in items.problems] == [f"{file}:{n}" for n in (2, 3, 4, 7, 8)]
    assert "missing field 'answer'" in items.problems[1]
    assert "out of range" in items.problems[2]


def test_template_fields_missing_from_an_item_are_reported(tmp_path):
    file = write_jsonl(
        tmp_path / "g.jsonl",
        [
            {"prompt": "p", "question": "Why?", "references": ["because"]},
            {"prompt": "p", "references": "x"},
        ],
    )
    spec = TaskSpec(name="g", type="generation", file=file, prompt="Q: {question}\nA:")
    items = load_items(spec)
    assert items.lines == [1]
    assert items.problems == [f"{file}:2: prompt template: KeyError: 'question'"]


def test_a_model_preferring_choice_0_scores_the_share_of_answer_0_items(tmp_path):
    answers = [0, 2, 0, 1, 3, 0, 2, 1]
    rows = [
        {"context": f"question {i}", "choices": ["a", "bb", "ccc", "dddd"], "answer": a}
        for i, a in enumerate(answers)
    ]
    spec = TaskSpec(
        name="mc", type="multiple_choice", file=write_jsonl(tmp_path / "mc.jsonl", rows)
    )
    items = load_items(spec)
    reqs = build_requests(spec, items, _tokenizer(), 64, GEN)
    assert len(reqs) == 4 * len(rows)
    metrics, samples = task_metrics(spec, items, reqs, score_local(PrefersFirstChoice(), reqs, 5))
    assert metrics["acc"].value == answers.count(0) / len(answers)  # exactly 3/8
    assert metrics["acc_norm"].value == answers.count(0) / len(answers)
    assert metrics["acc"].n == 8
    assert [s["prediction"] for s in samples] == [0] * 8


def test_classification_accuracy_and_macro_f1(tmp_path):
    labels = ["positive", "negative", "positive", "neutral"]
    rows = [{"context": f"review {i}", "label": lab} for i, lab in enumerate(labels)]
    spec = TaskSpec(
        name="cls", type="classification", file=write_jsonl(tmp_path / "c.jsonl", rows),
        labels=["positive", "negative", "neutral"], prompt="{context}\nSentiment:",
    )  # fmt: skip
    items = load_items(spec)
    reqs = build_requests(spec, items, _tokenizer(), 64, GEN)
    metrics, _ = task_metrics(spec, items, reqs, score_local(PrefersFirstChoice(), reqs, 3))
    assert metrics["acc"].value == 0.5
    # always "positive": F1 positive = 2*2/(2*2+2+0) = 2/3; negative and neutral 0
    assert metrics["macro_f1"].value == pytest.approx((2 / 3) / 3)


def test_yaml_task_with_few_shot_prompts(tmp_path):
    rows = [{"q": f"q{i}", "context": "", "choices": [f"a{i}", "x"], "answer": 0} for i in range(6)]
    write_jsonl(tmp_path / "items.jsonl", rows)
    (tmp_path / "task.yaml").write_text(
        'name: fewshot\ntype: multiple_choice\nfile: items.jsonl\nprompt: "Q: {q}\\nA:"\n'
        "few_shot: 2\nmetrics: [acc]\n"
    )
    spec = resolve_task(str(tmp_path / "task.yaml"))
    assert spec.file == str(tmp_path / "items.jsonl")
    items = load_items(spec)
    prompt = render_prompt(spec, items, 3)
    shots = prompt.split("\n\n")
    assert len(shots) == 3 and shots[-1] == "Q: q3\nA:"
    for shot in shots[:2]:  # solved examples from other items, never the item itself
        q = shot.split("\n")[0].removeprefix("Q: ")
        assert q != "q3" and shot == f"Q: {q}\nA: a{q[1:]}"
    assert render_prompt(spec, items, 3) == prompt  # seeded
    with pytest.raises(Exception, match="do not apply"):
        TaskSpec(name="bad", type="generation", file="x", metrics=["acc"])
    with pytest.raises(ConfigError, match="unknown built-in task"):
        resolve_task("builtin:nope")


def test_bias_pairs_share_and_interval(tmp_path):
    rows = [{"sent_more": f"m{i}", "sent_less": f"l{i}", "bias_type": "t"} for i in range(5)]
    spec = TaskSpec(name="bias", type="bias_pairs", file=write_jsonl(tmp_path / "b.jsonl", rows))
    items = load_items(spec)
    reqs = build_requests(spec, items, _tokenizer(), 64, GEN)
    # the stereotyping sentence (slot 0) is preferred in every pair
    metrics, _ = task_metrics(spec, items, reqs, score_local(PrefersFirstChoice(), reqs, 4))
    share = metrics["pct_stereotype"]
    assert share.value == 1.0 and share.n == 5
    assert share.ci[1] == 1.0 and 0.5 < share.ci[0] < 0.6


def _tokenizer():
    from tests.eval.conftest import make_tokenizer

    return make_tokenizer()


def test_the_shipped_example_task_loads():
    from importlib import resources

    path = resources.files("lmforge") / "resources" / "eval" / "examples" / "capitals.yaml"
    spec = resolve_task(str(path))
    items = load_items(spec)
    assert (spec.type, len(items.rows), items.problems) == ("multiple_choice", 6, [])
    assert render_prompt(spec, items, 0).endswith("Question: The capital of France is?\nAnswer:")


def test_perplexity_documents_from_data_stage_sources(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_bytes(b"first line\n\xff\xfe bad\nthird line\n")
    spec = TaskSpec(
        name="ppl",
        type="perplexity",
        sources=[{"path": str(tmp_path / "docs"), "txt_mode": "line"}],
    )
    items = load_items(spec)
    assert [r["text"] for r in items.rows] == ["first line", "third line"]
    assert items.lines == [1, 3]
    assert len(items.problems) == 1 and items.problems[0].endswith("a.txt:2: invalid_utf8")
