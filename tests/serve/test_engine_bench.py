"""bench/serve_engine.py runs end to end on a CPU with a tiny model, with torch, tokenizers and
pyarrow only (the GPU box has no pydantic, yaml or Ray), and reports what the GPU run reports."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_engine_bench_runs_on_cpu_without_pydantic_or_ray(tmp_path):
    code = (
        "import runpy, sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('pydantic', 'yaml', 'ray'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "sys.argv = ['serve_engine.py', '--preset', 'tiny', '--device', 'cpu', '--seconds',\n"
        "            '0.5', '--clients', '1,2', '--max-tokens', '4', '--max-seq-len', '128']\n"
        f"runpy.run_path({str(ROOT / 'bench' / 'serve_engine.py')!r}, run_name='__main__')\n"
    )
    env = {**os.environ, "OUT": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "serve_engine.json").read_text())
    assert set(result["results"]) == {"eager c=1", "eager c=2"}
    for row in result["results"].values():
        assert row["output_tokens_per_s"] > 0
        assert 0 < row["itl_p50_ms"] <= row["itl_p99_ms"] and math.isfinite(row["itl_p99_ms"])
    assert "ITL p99 ms" in out.stdout
