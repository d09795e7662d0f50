"""The `improve` stage: fold production feedback back into the served model, never promoting a
worse one. One run (by hand, or daily as a KubeRay RayCronJob):

1. the served model: `current`, else the serving pointer `<runs_dir>/serving/current.json`
   (on the first run `current` is adopted as the served model);
2. feedback since the previous run's cut-off (Ray Data over the request log's Parquet), joined
   to the logged requests -> SFT examples (lmforge.improve.feedback): well-rated completions and
   corrections, PII-redacted, deduplicated, decontaminated against the gate's tasks;
3. too few examples: recorded as a skip; else fine-tune the served model on them (the
   `finetune` stage, as `lmforge finetune` runs it);
4. the gate: both models through the `eval` stage on the same tasks and items, compared as
   `lmforge eval compare` compares (the served model's eval is reused while it stays the same);
5. pass: promote (the candidate's version.json gets its eval report; the serving pointer and a
   serving config `<runs_dir>/serving/serve.yaml` name it); fail: the served model stays.

Every decision, with its numbers, is appended to `<output>/decisions.jsonl` and written to
`<output>/runs/<time>/decision.json`; the next run reads its cut-off from there.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from lmforge import ConfigError, LmforgeError, storage
from lmforge.config import config_dict
from lmforge.improve.config import ImproveConfig
from lmforge.stage import Stage, StageContext

DECISIONS = "decisions.jsonl"


def served_artifact(cfg: ImproveConfig) -> tuple[str, bool]:
    """(the served artifact, adopted now?): the serving pointer once there is one (promotions
    move it); before that, `current`, which this run adopts as the served model."""
    from lmforge.model.artifact import resolve_artifact
    from lmforge.stage import read_serving_pointer

    pointer = read_serving_pointer(cfg.runs_dir)
    if pointer:
        return resolve_artifact(pointer["artifact"]), False
    if not cfg.current:
        raise ConfigError(
            "current: no model is served yet (no serving pointer under "
            f"{cfg.runs_dir}/serving/): set current to the model to improve, e.g. "
            "--set current=@finetune/chat"
        )
    current = cfg.current
    if current.startswith("@"):  # a run reference under this loop's runs_dir
        current = storage.join(cfg.runs_dir, current)
    return resolve_artifact(current), True


def validate(cfg: ImproveConfig) -> None:
    """Before Ray starts (`Stage.validate`): the request log is named and the served model
    (the serving pointer, else `current`) is a model artifact."""
    if not cfg.request_log:
        raise ConfigError("request_log: give the serving app's request log path (request_log.path)")
    served_artifact(cfg)


def previous_decisions(output: str) -> list[dict[str, Any]]:
    path = storage.join(output, DECISIONS)
    if not storage.exists(path):
        return []
    return [json.loads(ln) for ln in storage.read_text(path).splitlines() if ln.strip()]


def record(output: str, run_dir: str, history: list[dict], decision: dict[str, Any]) -> None:
    """The decision in its run dir and appended to the loop's history (rewritten atomically)."""
    storage.write_json(storage.join(run_dir, "decision.json"), decision)
    lines = [json.dumps(d) for d in [*history, decision]]
    storage.write_text(storage.join(output, DECISIONS), "\n".join(lines) + "\n")


def run(cfg: ImproveConfig, ctx: StageContext) -> dict[str, Any]:
    from lmforge.improve import feedback as fb
    from lmforge.model.artifact import read_version, write_serving_pointer
    from lmforge.monitor.stats import parse_since

    current, adopted = served_artifact(cfg)  # checked by validate before Ray started
    if adopted:
        write_serving_pointer(
            cfg.runs_dir,
            current,
            version=read_version(current)["version"],
            reason="adopted by improve as the served model",
        )
    history = previous_decisions(ctx.output)
    until = dt.datetime.now(dt.UTC)
    since = parse_since(cfg.feedback.since, until) if cfg.feedback.since else None
    if since is None and history:
        since = dt.datetime.fromisoformat(history[-1]["until"])
    run_dir = storage.join(ctx.output, "runs", until.strftime("%Y%m%dT%H%M%S%fZ"))
    decision: dict[str, Any] = {
        "time": until.isoformat(),
        "since": since.isoformat() if since else None,
        "until": until.isoformat(),
        "run_dir": run_dir,
        "current": {"artifact": current, "version": read_version(current)["version"]},
    }
    say(
        f"served model {decision['current']['version']} ({current}); feedback since {since or 'the start'}"
    )

    feedback = fb.read_with_ray(cfg.request_log, fb.FEEDBACK, since, until)
    # The requests that feedback names may be older than the window: read them all up to now.
    requests = fb.read_with_ray(cfg.request_log, fb.REQUESTS, None, until)
    contaminated = fb.ngram_filter(fb.task_texts(cfg.gate.tasks), cfg.feedback.decontaminate_ngram)
    built = fb.build_examples(
        feedback,
        requests,
        cfg.feedback.min_rating,
        cfg.feedback.use_corrections,
        contaminated,
        trusted_only=cfg.feedback.keys == "trusted",
        exclude_keys=set(cfg.feedback.exclude_keys),
    )
    decision["data"] = built.counts
    say("feedback: " + ", ".join(f"{k} {v}" for k, v in built.counts.items()))
    if len(built.examples) < cfg.feedback.min_examples:
        decision.update(
            action="skip",
            reason=f"{len(built.examples)} usable examples, fewer "
            f"than feedback.min_examples={cfg.feedback.min_examples}",
        )
        return finish(ctx.output, run_dir, history, decision)

    train_file, val_file = write_examples(built.examples, run_dir, cfg.feedback.val_fraction)
    candidate_run = finetune(cfg, current, train_file, val_file)
    candidate = storage.join(candidate_run, "model")
    decision["candidate"] = {"artifact": candidate, "version": read_version(candidate)["version"]}

    reports = {
        which: evaluate(cfg, path, which)
        for which, path in (("current", current), ("candidate", candidate))
    }
    checks, passed, improved = gate(cfg, reports)
    decision["gate"] = {
        "reports": reports,
        "passed": passed,
        "improved": improved,
        "checks": [
            {
                "task": c.task,
                "metric": c.metric,
                "current": c.baseline,
                "candidate": c.candidate,
                "allowed": c.allowed,
                "regression": c.regression,
                "failed": c.failed,
            }
            for c in checks
        ],
    }
    promote = passed and (improved or not cfg.gate.require_improvement)
    if promote:
        promote_candidate(cfg, candidate, reports["candidate"], current, run_dir)
        decision.update(action="promote", served=decision["candidate"])
    else:
        why = "a gated metric regressed" if not passed else "no gated metric improved"
        decision.update(action="keep", reason=why, served=decision["current"])
    return finish(ctx.output, run_dir, history, decision, checks)


def finish(
    output: str, run_dir: str, history: list[dict], decision: dict[str, Any], checks=()
) -> dict[str, Any]:
    record(output, run_dir, history, decision)
    for c in checks:
        mark = "FAIL" if c.failed else "ok"
        cand = "missing" if c.candidate is None else f"{c.candidate:.4f}"
        say(f"  {mark:<4} {c.task}/{c.metric}: current {c.baseline:.4f} -> candidate {cand}")
    say(
        f"decision: {decision['action'].upper()}"
        + (f" ({decision['reason']})" if decision.get("reason") else "")
        + f"; served: {decision.get('served', decision['current'])['version']}"
    )
    return decision


def say(text: str) -> None:
    print(f"[improve] {text}", flush=True)


def write_examples(
    examples: list[dict], run_dir: str, val_fraction: float
) -> tuple[str, str | None]:
    """JSONL train/val files of the feedback examples (a seeded hash split by completion id)."""
    import hashlib

    def is_val(example: dict) -> bool:
        digest = hashlib.blake2b(example["id"].encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") / 2**64 < val_fraction

    val = [e for e in examples if is_val(e)]
    train = [e for e in examples if not is_val(e)] or val
    paths = []
    for name, rows in (("train", train), ("val", val)):
        if rows:
            path = storage.join(run_dir, "sft", f"{name}.jsonl")
            storage.write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
            paths.append(path)
        else:
            paths.append(None)
    return paths[0], paths[1]


def finetune(cfg: ImproveConfig, current: str, train_file: str, val_file: str | None) -> str:
    """The candidate: the `finetune` stage on the feedback examples, from the served model."""
    from lmforge.finetune.config import FinetuneConfig
    from lmforge.model.artifact import is_artifact
    from lmforge.stage import get_stage, run_stage

    settings = config_dict(cfg.finetune)
    data = {
        "sources": [train_file],
        "val_sources": [val_file] if val_file else [],
        "val_fraction": 0.0,
        "seq_len": settings.pop("seq_len"),
        "truncate": settings.pop("truncate"),
    }
    ft_cfg = FinetuneConfig.model_validate(
        {
            "name": f"{cfg.name}-candidate",
            "runs_dir": cfg.runs_dir,
            "base": current,
            "data": data,
            "checkpoint": {"every_steps": 0, "keep_last": 1},
            **settings,
        }
    )
    result = run_stage(get_stage("finetune"), ft_cfg)
    if not is_artifact(storage.join(result.output, "model")):
        raise LmforgeError(f"the fine-tune {result.output} left no model artifact")
    return result.output


def evaluate(cfg: ImproveConfig, artifact: str, which: str) -> str:
    """The `eval` stage on one model with the gate's tasks; its report.json."""
    from lmforge.eval.config import EvalConfig
    from lmforge.stage import get_stage, run_stage

    eval_cfg = EvalConfig.model_validate(
        {
            "name": f"{cfg.name}-gate-{which}",
            "runs_dir": cfg.runs_dir,
            "model": artifact,
            "tasks": [t if isinstance(t, str) else config_dict(t) for t in cfg.gate.tasks],
            "limit": cfg.gate.limit,
            "val_data": None,
            "resources": {"num_actors": cfg.gate.num_actors},
        }
    )
    return storage.join(run_stage(get_stage("eval"), eval_cfg).output, "report.json")


def gate(cfg: ImproveConfig, reports: dict[str, str]):
    """(checks, passed, improved) of candidate vs current, as `lmforge eval compare` decides."""
    from lmforge.eval.compare import compare, parse_gates, read_report

    gates = parse_gates(cfg.gate.metrics, cfg.gate.max_regression) if cfg.gate.metrics else None
    checks = compare(
        read_report(reports["current"]),
        read_report(reports["candidate"]),
        cfg.gate.max_regression,
        gates,
        sigmas=cfg.gate.sigmas,
    )
    if not checks:
        raise LmforgeError(
            "gate: no metric to compare (the gate tasks gave no metric with a known direction); "
            "name them with gate.metrics"
        )
    passed = not any(c.failed for c in checks)
    improved = any(c.regression is not None and c.regression < -1e-12 for c in checks)
    return checks, passed, improved


def promote_candidate(
    cfg: ImproveConfig, candidate: str, report: str, current: str, run_dir: str
) -> None:
    """Point serving at the candidate: lineage gets the gate's report; pointer and serve config."""
    import yaml

    from lmforge.model.artifact import read_version, write_serving_pointer, write_version

    record_ = read_version(candidate)
    record_["eval_report"] = report
    write_version(candidate, **record_)
    write_serving_pointer(
        cfg.runs_dir,
        candidate,
        version=record_["version"],
        previous_artifact=current,
        decided_by=run_dir,
    )
    serve = {
        "models": [{"name": cfg.serve_name, "artifact": storage.absolute(candidate)}],
        "request_log": {"path": cfg.request_log},
    }
    text = yaml.safe_dump(serve, sort_keys=False)
    storage.write_text(storage.join(cfg.runs_dir, "serving", "serve.yaml"), text)
    storage.write_text(storage.join(run_dir, "serve.yaml"), text)


STAGE = Stage(
    name="improve",
    config_cls=ImproveConfig,
    run=run,
    help="Fold production feedback into the served model: feedback since the last run -> SFT "
    "data -> fine-tune -> eval gate against the served model -> promote only if it passes; "
    "every decision is recorded with its numbers.",
    cacheable=False,
    validate=validate,
)
