"""Feedback -> SFT examples: read with Ray Data, join to the logged requests, keep what users
rated well or corrected, redact, deduplicate, and drop anything that overlaps the gate's tasks.

A feedback row (serve/requestlog.py FEEDBACK_SCHEMA) names a completion; the request log row of
that completion holds what was asked (`messages_json` for chat, `prompt` for completions) and
what the model answered. An example is the conversation up to the answer, with as answer:

- the user's correction, when there is one (`use_corrections`), whatever the rating;
- else the model's own completion, when the rating is at least `min_rating`.

Feedback on a completion that was not logged (request sampling) is counted and skipped, as are
negative ratings without a correction. Only feedback sent with a trusted API key is used by
default (the serving config's `trusted_keys`; each row carries `key_id` and `trusted`), and
never that of an excluded key. The latest feedback on a completion wins.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from lmforge import storage

FEEDBACK, REQUESTS = "feedback", "requests"


def read_with_ray(root: str, kind: str, since: dt.datetime | None, until: dt.datetime) -> pa.Table:
    """Rows of one kind with since <= time < until, read by Ray Data (one task per file)."""
    import ray.data

    from lmforge.serve.logreader import conform, log_files
    from lmforge.serve.requestlog import SCHEMAS, TIME

    schema = SCHEMAS[kind]
    files = log_files(root, kind, since)
    if not files:
        return schema.empty_table()
    paths = [storage.local_path(f) if storage.is_local(f) else f for f in files]
    fs, _ = storage.resolve(files[0])
    ds = ray.data.read_parquet(paths, filesystem=None if storage.is_local(files[0]) else fs)
    lo = since or dt.datetime(1970, 1, 1, tzinfo=dt.UTC)

    def window(batch: pa.Table) -> pa.Table:
        import pyarrow.compute as pc

        times = batch["time"].cast(TIME)
        keep = pc.and_(
            pc.greater_equal(times, pa.scalar(lo, type=TIME)),
            pc.less(times, pa.scalar(until, type=TIME)),
        )
        return conform(batch.filter(keep), schema)

    ds = ds.map_batches(window, batch_format="pyarrow", batch_size=None)
    tables = [t for t in ds.iter_batches(batch_format="pyarrow", batch_size=None) if t.num_rows]
    return pa.concat_tables(tables) if tables else schema.empty_table()


@dataclass
class Built:
    examples: list[dict[str, Any]] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    def count(self, key: str) -> None:
        self.counts[key] = self.counts.get(key, 0) + 1


def conversation(request: dict[str, Any]) -> list[dict[str, str]] | None:
    """The messages before the answer: the chat request's, or the completion prompt as a user turn."""
    if request.get("messages_json"):
        try:
            messages = json.loads(request["messages_json"])
        except ValueError:
            return None
        if isinstance(messages, list) and all(isinstance(m, dict) for m in messages):
            return [{"role": m.get("role"), "content": m.get("content") or ""} for m in messages]
        return None
    if request.get("prompt"):
        return [{"role": "user", "content": request["prompt"]}]
    return None


def build_examples(
    feedback: pa.Table,
    requests: pa.Table,
    min_rating: float,
    use_corrections: bool,
    contaminated=None,
    trusted_only: bool = True,
    exclude_keys: frozenset[str] | set[str] = frozenset(),
) -> Built:
    """SFT examples ({"messages": [...], "id": completion_id}) from feedback joined to requests;
    only feedback of trusted keys (`trusted_only`), never of `exclude_keys`."""
    from lmforge.serve.requestlog import Redactor

    redact = Redactor()
    by_id = {r["completion_id"]: r for r in requests.to_pylist()}
    latest: dict[str, dict[str, Any]] = {}
    built, seen = Built(), set()
    for row in feedback.sort_by("time").to_pylist():
        if row.get("key_id") in exclude_keys:
            built.count("skipped_excluded_key")
        elif trusted_only and not row.get("trusted"):
            built.count("skipped_untrusted_key")
        else:  # an untrusted key cannot override a trusted one's word on a completion
            latest[row["completion_id"]] = row  # the last word on a completion wins
    built.counts.update(feedback=feedback.num_rows, completions_rated=len(latest))
    for cid in sorted(latest):
        row = latest[cid]
        request = by_id.get(cid)
        if request is None:
            built.count("skipped_not_logged")
            continue
        if request.get("status") not in (None, 200):
            built.count("skipped_failed_request")
            continue
        if use_corrections and (row.get("correction") or "").strip():
            answer, kind = row["correction"].strip(), "from_corrections"
        elif row["rating"] >= min_rating and (request.get("completion") or "").strip():
            answer, kind = request["completion"].strip(), "from_ratings"
        else:
            built.count("skipped_low_rating")
            continue
        messages = conversation(request)
        if not messages or any(m["role"] not in ("system", "user", "assistant") for m in messages):
            built.count("skipped_bad_request")
            continue
        messages = redact.messages([*messages, {"role": "assistant", "content": answer}])
        key = _normalised(messages)
        if key in seen:
            built.count("dropped_duplicate")
            continue
        seen.add(key)
        if contaminated is not None and contaminated(" ".join(m["content"] for m in messages)):
            built.count("dropped_contaminated")
            continue
        built.count(kind)
        built.examples.append({"id": cid, "messages": messages})
    built.counts["examples"] = len(built.examples)
    return built


def _normalised(messages: list[dict[str, str]]) -> str:
    return json.dumps([[m["role"], " ".join(m["content"].lower().split())] for m in messages])


def ngram_filter(texts: list[str], n: int):
    """A predicate: True when a text shares a word n-gram with any of `texts` (the gate's items),
    the data pipeline's decontamination rule (lmforge.data.steps)."""
    from lmforge.data.steps import _ngrams

    grams: set[int] = set()
    for text in texts:
        grams |= _ngrams(text, n)
    return lambda text: bool(grams & _ngrams(text, n))


def task_texts(tasks: list) -> list[str]:
    """Every string in the items of the gate's tasks (prompts, contexts, choices, references)."""
    from lmforge.eval.tasks import load_items, resolve_task

    texts: list[str] = []
    for task in tasks:
        for item in load_items(resolve_task(task)).rows:
            for value in item.values():
                values = value if isinstance(value, list) else [value]
                texts += [v for v in values if isinstance(v, str) and re.search(r"\w", v)]
    return texts
