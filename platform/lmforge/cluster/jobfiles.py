"""What `lmforge submit` ships to the cluster: the working dir, less build outputs and secrets.

Ray packages the working dir into the job (every node of the cluster, and the dashboard that
stores it, gets a copy), so files that hold credentials never go: `SECRET_PATTERNS` is the one
list of them, also kept in the repo's `.dockerignore` so the image leaves out the same files
(tests/test_jobfiles.py holds the two together). Patterns are gitignore-style, as Ray's
`excludes` reads them; written with `**/` they mean the same in a `.dockerignore`, whose
patterns are otherwise anchored at the root. Submission says which files were left out.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

# Files that hold credentials, wherever they sit in the tree.
SECRET_PATTERNS = (
    "**/.env",
    "**/.env.*",
    "**/*.pem",
    "**/*.key",
    "**/*.p12",
    "**/*.pfx",
    "**/id_rsa*",
    "**/id_ecdsa*",
    "**/id_ed25519*",
    "**/.netrc",
    "**/.git-credentials",
    "**/.ray/auth_token",
    "**/.kube",
    "**/kubeconfig*",
    "**/.aws",
    "**/.config/gcloud",
)
# Outputs and caches: large, and nothing a job reads.
BUILD_PATTERNS = (
    ".venv",
    ".venv-mlflow-ui",
    "runs",
    ".git",
    "**/__pycache__",
    "*.egg-info",
    ".pytest_cache",
    ".ruff_cache",
)


def _matcher(patterns) -> Callable[[str], bool]:
    # Ray's own gitignore matcher, so what is listed is exactly what its packaging leaves out.
    from ray._private.thirdparty.pathspec import PathSpec

    return PathSpec.from_lines("gitwildmatch", list(patterns)).match_file


def secret_files(working_dir: str | os.PathLike) -> list[str]:
    """The files under `working_dir` (relative, sorted) that SECRET_PATTERNS keeps out of a job;
    a directory that matches counts with every file in it."""
    root = Path(working_dir)
    secret, build = _matcher(SECRET_PATTERNS), _matcher(BUILD_PATTERNS)
    found = []
    for parent, dirs, files in os.walk(root):
        rel = Path(parent).relative_to(root)
        dirs[:] = [d for d in dirs if not build(str(rel / d))]
        inside = rel != Path(".") and any(
            secret(str(p)) for p in (rel, *rel.parents) if p != Path(".")
        )
        found += [str(rel / f) for f in files if inside or secret(str(rel / f))]
    return sorted(os.path.normpath(f) for f in found)


def job_runtime_env(working_dir: str | os.PathLike) -> dict:
    """The runtime_env that ships `working_dir` without build outputs and secrets; prints one
    line naming the secret files left out, when there are any."""
    left_out = secret_files(working_dir)
    if left_out:
        shown = ", ".join(left_out[:10]) + (
            f" and {len(left_out) - 10} more" if len(left_out) > 10 else ""
        )
        print(
            f"left out of the job package (they hold credentials; lmforge.cluster.jobfiles): {shown}",
            flush=True,
        )
    return {"working_dir": str(working_dir), "excludes": [*BUILD_PATTERNS, *SECRET_PATTERNS]}
