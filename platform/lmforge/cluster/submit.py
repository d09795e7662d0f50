"""`lmforge submit`: send a stage's `jobs/<stage>.py` to any Ray cluster through the Ray Jobs
SDK, stream its logs and exit with the job's status: exactly what `ray job submit` or a KubeRay
RayJob runs. The config is loaded and checked here first, so a typo fails before the upload."""

from __future__ import annotations

import os
import shlex
import time
from pathlib import Path

from lmforge import LmforgeError
from lmforge.cluster.jobfiles import job_runtime_env
from lmforge.cluster.local import LocalCluster, use_token_auth
from lmforge.config import load_config
from lmforge.stage import get_stage, refuse_relative_runs_dir


def submit(
    stage_name: str,
    config: str | None,
    overrides: list[str],
    address: str | None,
    working_dir: str = ".",
    wait: bool = True,
) -> int:
    """Submit `jobs/<stage>.py` as a Ray job; stream its logs; return 0 if it succeeded."""
    stage = get_stage(stage_name)
    wd = Path(working_dir).resolve()
    entry = wd / stage.job_script
    if not entry.exists():
        raise LmforgeError(
            f"{entry} not found: --working-dir must be an lmforge checkout or a project with {stage.job_script}"
        )
    cfg = load_config(stage.config_cls, config, overrides)  # validate before spending
    if stage.cacheable:  # a check's report is its log; other stages' outputs are the point
        refuse_relative_runs_dir(cfg.runs_dir)
    args = [stage.job_script]
    if config:
        cfg_path = Path(config).resolve()
        if not cfg_path.is_relative_to(wd):
            raise LmforgeError(
                f"config {config} is outside the working dir {wd} that is shipped to the cluster; move it under {wd} or pass --working-dir"
            )
        args += ["-c", str(cfg_path.relative_to(wd))]
    for o in overrides:
        args += ["--set", o]
    entrypoint = "python " + shlex.join(args)
    client = _job_client(address)
    runtime_env = job_runtime_env(wd)  # no build outputs, no secrets
    job_id = _submit_with_retry(client, entrypoint, runtime_env)
    print(f"submitted job {job_id}: {entrypoint}", flush=True)
    if not wait:
        print(f"follow it with: ray job logs --follow {job_id}")
        return 0
    _stream_logs(client, job_id)
    final = _wait_final(client, job_id)
    info = client.get_job_info(job_id)
    print(
        f"job {job_id} {final}"
        + (f": {info.message}" if final != "SUCCEEDED" and info.message else ""),
        flush=True,
    )
    return 0 if final == "SUCCEEDED" else 1


def _submit_with_retry(client, entrypoint: str, runtime_env: dict, timeout: float = 180.0) -> str:
    """Submit, retrying while a just-started head has no job agent yet (as KubeRay's submitter does)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def _job_client(address: str | None):
    local = LocalCluster.load()
    address = address or os.environ.get("RAY_ADDRESS")
    if not address and local and local.is_alive():
        address = local.dashboard_url
    if not address:
        raise LmforgeError(
            "no Ray cluster to submit to: pass --address URL, set RAY_ADDRESS, or start one with `lmforge cluster up`"
        )
    if local and address.rstrip("/") == local.dashboard_url:
        use_token_auth(local.token_path)  # the head `cluster up` started wants its token
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as e:  # the SDK raises plain RuntimeError/ConnectionError with long texts
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = (
            "; the cluster wants a token: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or ~/.ray/auth_token)"
            if "401" in str(e) or "uthenticat" in str(e)
            else ""
        )
        raise LmforgeError(f"cannot reach the Ray cluster at {address}: {first}{hint}") from None


def _stream_logs(client, job_id: str) -> None:
    import asyncio

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    asyncio.run(tail())


def _wait_final(client, job_id: str, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        status = str(client.get_job_status(job_id).value)
        if status in ("SUCCEEDED", "FAILED", "STOPPED") or time.monotonic() > deadline:
            return status
        time.sleep(0.5)
