"""`lmforge submit` ships the working dir without credentials: Ray's own packaging of it leaves
the secret files out, submission names them in one line, and the image's .dockerignore keeps out
the same list."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from lmforge.cluster.jobfiles import SECRET_PATTERNS, job_runtime_env, secret_files

REPO = Path(__file__).resolve().parents[1]
SECRETS = [
    ".env",
    ".env.production",
    "certs/tls.key",
    "certs/ca.pem",
    "deploy/.kube/config",
    "kubeconfig.yaml",
    ".ray/auth_token",
    "home/.aws/credentials",
]
KEPT = ["jobs/train.py", "configs/train.yaml", "docs/env.md", "keys.py", "monkey.txt"]


@pytest.fixture
def project(tmp_path):
    for name in [*SECRETS, *KEPT, ".venv/lib/site.py", "runs/out/.env"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    return tmp_path


def test_the_secret_files_are_found_and_named(project, capsys):
    assert secret_files(project) == sorted(SECRETS)  # .venv and runs are not even walked
    env = job_runtime_env(project)
    line = capsys.readouterr().out.strip()
    assert line.startswith("left out of the job package") and line.count("\n") == 0
    assert all(name in line for name in SECRETS)
    assert env["working_dir"] == str(project)
    assert set(SECRET_PATTERNS) <= set(env["excludes"]) and ".venv" in env["excludes"]


def test_nothing_is_said_when_there_is_nothing_to_leave_out(tmp_path, capsys):
    (tmp_path / "train.py").write_text("x")
    job_runtime_env(tmp_path)
    assert capsys.readouterr().out == ""


def test_rays_package_of_the_working_dir_holds_no_secret(project, tmp_path_factory):
    from ray._private.runtime_env.packaging import create_package

    env = job_runtime_env(project)
    zipped = tmp_path_factory.mktemp("pkg") / "job.zip"
    create_package(str(project), zipped, include_gitignore=True, excludes=env["excludes"])
    names = {n.rstrip("/") for n in zipfile.ZipFile(zipped).namelist()}
    assert set(KEPT) <= names
    assert not names & set(SECRETS), names & set(SECRETS)
    assert not any(n.startswith((".venv", "runs")) for n in names)


def test_the_image_leaves_out_the_same_secret_files():
    lines = (REPO / ".dockerignore").read_text().splitlines()
    start = next(
        i for i, ln in enumerate(lines) if "lmforge.cluster.jobfiles.SECRET_PATTERNS" in ln
    )
    block = [ln for ln in lines[start:] if ln and not ln.startswith("#")]
    assert block == list(SECRET_PATTERNS)
