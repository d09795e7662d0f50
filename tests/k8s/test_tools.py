"""scripts/install_k8s_tools.py: the pinned helm and kubectl, installed once."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO


def _installer():
    spec = importlib.util.spec_from_file_location(
        "install_k8s_tools", REPO / "scripts" / "install_k8s_tools.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pinned_tools_are_installed_and_a_rerun_is_a_no_op():
    tools = _installer()
    bin_dir = Path(sys.prefix) / "bin"
    if not (bin_dir / "helm").exists():
        pytest.skip(
            "helm is not installed: run `python scripts/install_k8s_tools.py` (make test does)"
        )
    assert tools.installed_version(bin_dir / "helm", "helm") == tools.HELM_VERSION == "v4.1.4"
    assert (
        tools.installed_version(bin_dir / "kubectl", "kubectl")
        == tools.KUBECTL_VERSION
        == "v1.35.2"
    )
    assert tools.install(bin_dir) == []  # nothing to do: no download, no rewrite


def test_a_missing_or_broken_tool_has_no_version(tmp_path):
    tools = _installer()
    assert tools.installed_version(tmp_path / "helm", "helm") is None
    broken = tmp_path / "kubectl"
    broken.write_text("#!/bin/sh\nexit 3\n")
    broken.chmod(0o755)
    assert tools.installed_version(broken, "kubectl") is None
