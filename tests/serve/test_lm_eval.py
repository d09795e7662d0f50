"""lm-evaluation-harness (local-completions, tokenizer_backend=remote) against the live API,
with API keys on as a deployment has them, scores a local multiple-choice task exactly as
`lmforge eval` does: same count of correct items."""

from __future__ import annotations

import json
import re

import pytest
from tokenizers import Tokenizer

from lmforge.model.artifact import load_model
from lmforge.serve.config import ServeArgs
from lmforge.serve.openai import local_app
from tests.conftest import REPO
from tests.serve.conftest import live_server

lm_eval = pytest.importorskip("lm_eval")

ITEMS = [
    ("The capital of France is", ["Paris", "Rome", "the dog"], 0),
    ("The capital of Italy is", ["Paris", "Rome", "a fox"], 1),
    ("the quick brown fox jumps over the", ["lazy dog", "capital", "world"], 0),
    ("def add(a, b):\n    return", ["a + b", "Paris", "hello"], 0),
    ("hello", ["world", "fox", "return"], 0),
    ("this is a tiny corpus for a tiny", ["tokenizer", "capital", "dog"], 0),
    ("Rome is the capital of", ["Italy", "France", "b"], 0),
    ("the lazy", ["dog", "fox", "world"], 1),
    ("jumps over", ["the lazy dog", "Paris", "a + b"], 0),
    ("Paris is the", ["capital", "dog", "corpus"], 2),
]

TASK_YAML = """\
task: lmforge_serve_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {file}
test_split: test
output_type: multiple_choice
# <|eos|> is a special token of the tokenizer: the context starts with it, as lmforge eval's do.
doc_to_text: "<|eos|>{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
target_delimiter: " "
metric_list:
  - metric: acc
"""


@pytest.mark.slow
def test_lm_eval_over_the_api_equals_lmforge_eval(artifact, tmp_path, monkeypatch):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from lmforge.eval.stage import evaluate_in_process
    from lmforge.eval.tasks import TaskSpec

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    items = tmp_path / "items.jsonl"
    items.write_text(
        "".join(json.dumps({"context": c, "choices": ch, "answer": a}) + "\n" for c, ch, a in ITEMS)
    )
    spec = TaskSpec(name="mc", type="multiple_choice", file=str(items), metrics=["acc"])
    model, tok = load_model(artifact), Tokenizer.from_file(f"{artifact}/tokenizer.json")
    ours = round(evaluate_in_process(model, tok, [spec])["mc"]["acc"] * len(ITEMS))

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "lmforge_serve_mc.yaml").write_text(TASK_YAML.format(file=items))
    model_cfg = {"name": "tiny", "artifact": artifact, "max_batch_size": 4}
    monkeypatch.setenv("LMFORGE_TEST_LM_EVAL_KEYS", "sk-eval")
    app = local_app(ServeArgs(models=[model_cfg], api_key_env="LMFORGE_TEST_LM_EVAL_KEYS"))
    # As docs/serving.md says: completions send OPENAI_API_KEY, the remote tokenizer auth_token.
    monkeypatch.setenv("OPENAI_API_KEY", "sk-eval")
    with live_server(app) as url:
        out = simple_evaluate(
            model="local-completions",
            model_args=f"model=tiny,base_url={url}/v1/completions,tokenizer_backend=remote,"
            "num_concurrent=2,max_retries=1,auth_token=sk-eval",
            tasks=["lmforge_serve_mc"],
            task_manager=TaskManager(include_path=str(tasks)),
            log_samples=True,
        )
    samples = out["samples"]["lmforge_serve_mc"]
    theirs = sum(int(s["acc"]) for s in samples)
    assert len(samples) == len(ITEMS)
    assert theirs == ours
    assert 0 < ours < len(ITEMS)  # a mix of right and wrong: the equality says something


def test_the_documented_lm_eval_command_sends_the_key_to_the_tokenizer_too():
    """lm-eval's remote tokenizer sends only `auth_token`, never OPENAI_API_KEY: without it,
    `GET /tokenizer_info` answers 401 and lm-eval gives up."""
    doc = (REPO / "docs" / "serving.md").read_text()
    section = doc.split("## With lm-evaluation-harness", 1)[1].split("\n## ", 1)[0]
    (model_args,) = re.findall(r"--model_args (\S+)", section)
    assert "tokenizer_backend=remote" in model_args
    assert (
        'auth_token="$OPENAI_API_KEY"' in model_args or "auth_token=$OPENAI_API_KEY" in model_args
    )
    assert "export OPENAI_API_KEY=" in section
