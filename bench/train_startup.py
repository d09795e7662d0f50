"""Where `lmforge train`'s time goes before its first step and after its last, beside a plain loop.

In one run, interleaved (lmforge, in process, plain, lmforge, ...), `--repeats` times each:

  lmforge   `python -m lmforge.cli train` as a subprocess on an embedded local Ray, a small
            model (debug preset, fp32, 1 Ray Train worker); its phases from the timestamps the
            driver and rank 0 write to <run>/timings.jsonl (lmforge.stage.record_phase)
  in process  the same command and config with `resources.in_process: true`: the loop runs in
            the command's process and no Ray starts
  plain     a subprocess: python, import torch, build the same model, AdamW, one step

Phases (medians, seconds): imports (the process start to the resolved config), tracking (the
run opened; Ray starts meanwhile), ray (what is left of Ray's start), trainer (hardware
decision, Ray Train's trainer), worker group (the controller and the worker up), data open,
model build, first step, then at the end final checkpoint, artifact, and the wait for the
command to return. The targets (issue #16): launch to first step <= 5 s, last step to the
command's return <= 2 s. One warm-up run first (caches: the CPU peak, MLflow's store), not
counted. Writes bench/results/train_startup.json.

    .venv/bin/python bench/train_startup.py [--repeats 3] [--steps 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# (name, from phase, to phase): spans between timings.jsonl phases ("launch" and "exit" are
# the bench's own clock around the subprocess).
SPANS = [
    ("imports", "launch", "config"),
    ("tracking (Ray starting)", "config", "tracking"),
    ("ray start (rest)", "tracking", "ray"),
    ("hardware + trainer", "ray", "trainer"),
    ("worker group", "trainer", "worker"),
    ("data open", "worker", "data"),
    ("model build + init", "data", "model"),
    ("first step (+compile)", "model", "first_step"),
    ("LAUNCH -> FIRST STEP", "launch", "first_step"),
    ("final checkpoint", "last_step", "final_checkpoint"),
    ("artifact", "final_checkpoint", "artifact"),
    ("driver end (tracking, _SUCCESS)", "artifact", "exit"),
    ("LAST STEP -> RETURN", "last_step", "exit"),
    ("total", "launch", "exit"),
]

PLAIN = """
import json, sys, time
import torch
from lmforge.model.llama import Llama, LlamaConfig, cross_entropy
torch.set_num_threads(1)
arch, rows = LlamaConfig(**json.loads(sys.argv[1])), int(sys.argv[2])
model = Llama(arch)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
built = time.time()
x = torch.randint(0, arch.vocab_size, (rows, arch.max_seq_len + 1))
loss = cross_entropy(model(x[:, :-1]), x[:, 1:])
loss.backward()
opt.step()
print(json.dumps({"model": built, "first_step": time.time()}))
"""


def config_yaml(
    data: str, runs: str, steps: int, rows: int, seq_len: int, in_process: bool = False
) -> str:
    return json.dumps(
        {
            "name": "in-process" if in_process else "ray-train",
            "runs_dir": runs,
            "model": {"preset": "debug"},
            "data": {"path": data},
            "train": {
                "global_batch_tokens": rows * seq_len,
                "micro_batch_size": rows,
                "max_steps": steps,
                "log_every": steps,
                "eval_every": 0,
                "eval_sequences": 8,
                "precision": "fp32",
            },
            "checkpoint": {"every_steps": 0},
            "resources": {"num_workers": 1, "cpus_per_worker": 1, "in_process": in_process},
        }
    )  # JSON is YAML


def run_lmforge(cfg: Path, runs: Path, env: dict) -> dict[str, float]:
    name = json.loads(cfg.read_text())["name"]
    cmd = [sys.executable, "-m", "lmforge.cli", "train", "-c", str(cfg), "--force"]
    launch = time.time()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    end = time.time()
    if done.returncode:
        sys.exit(f"lmforge train failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    (timings,) = runs.glob(f"train/{name}-*/timings.jsonl")
    marks = {"launch": launch, "exit": end}
    for line in timings.read_text().splitlines():
        row = json.loads(line)
        marks.setdefault(row["phase"], row["t"])
    marks.setdefault("ray", marks["tracking"])  # in process: no Ray to start
    return {name: marks[b] - marks[a] for name, a, b in SPANS if a in marks and b in marks}


def run_plain(arch: dict, rows: int, env: dict) -> dict[str, float]:
    launch = time.time()
    cmd = [sys.executable, "-c", PLAIN, json.dumps(arch), str(rows)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    marks = json.loads(out.strip().splitlines()[-1])
    return {
        "imports + model build": marks["model"] - launch,
        "first step": marks["first_step"] - marks["model"],
        "LAUNCH -> FIRST STEP": marks["first_step"] - launch,
        "total": time.time() - launch,
    }


def medians(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in runs if k in r) for k in runs[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rows", type=int, default=8, help="sequences per step")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "train_startup.json"))
    parser.add_argument("--cli", help="a different `lmforge` checkout's platform/ to time")
    parser.add_argument(
        "--no-ray-train", action="store_true", help="time in process and the plain loop only"
    )
    args = parser.parse_args()
    from tests.train.conftest import make_packed_data

    work = Path(tempfile.mkdtemp(prefix="lmforge-bench-startup-"))
    seq_len = 128
    data = make_packed_data(work / "data", seq_len=seq_len, vocab_size=512, rows_per_group=64)
    runs = work / "runs"
    cfgs = {}
    kinds = (("lmforge", False), ("in process", True))[1 if args.no_ray_train else 0 :]
    for key, in_process in kinds:
        cfgs[key] = work / f"{key.replace(' ', '-')}.yaml"
        cfgs[key].write_text(
            config_yaml(str(data), str(runs), args.steps, args.rows, seq_len, in_process)
        )
    platform = args.cli or str(REPO / "platform")
    env = {**os.environ, "PYTHONPATH": platform, "LMFORGE_HOME": str(work / "home")}
    env.setdefault("RAY_AUTH_TOKEN_PATH", str(work / "ray_auth_token"))
    from lmforge.train.config import ModelConfig

    vocab = json.loads((data / "manifest.json").read_text())["vocab_size"]
    arch = vars(ModelConfig(preset="debug").to_llama(vocab_size=vocab, seq_len=seq_len))
    print("[bench] warm-up runs (cache the CPU peak and MLflow's store) ...", flush=True)
    for cfg in cfgs.values():
        run_lmforge(cfg, runs, env)
    timed: dict[str, list[dict[str, float]]] = {key: [] for key in (*cfgs, "plain")}
    load = []
    for r in range(args.repeats):
        load.append(os.getloadavg()[0])
        for key, cfg in cfgs.items():
            timed[key].append(run_lmforge(cfg, runs, env))
        timed["plain"].append(run_plain(arch, args.rows, env))
        firsts = ", ".join(f"{k} {v[-1]['LAUNCH -> FIRST STEP']:.2f} s" for k, v in timed.items())
        print(f"[bench] repeat {r + 1}: first step: {firsts} (load {load[-1]:.1f})", flush=True)
    med = {key: medians(runs_) for key, runs_ in timed.items()}
    print(f"\n| phase (median of {args.repeats}), s | " + " | ".join(cfgs) + " |")
    print("|---|" + "---|" * len(cfgs))
    for name in [n for n, _, _ in SPANS if any(n in med[k] for k in cfgs)]:
        cells = " | ".join(f"{med[k][name]:.2f}" if name in med[k] else "-" for k in cfgs)
        print(f"| {name} | {cells} |")
    print("\n| plain loop | s |\n|---|---|")
    for name, seconds in med["plain"].items():
        print(f"| {name} | {seconds:.2f} |")
    first = {k: m["LAUNCH -> FIRST STEP"] for k, m in med.items()}
    ratios = {k: first[k] / first["plain"] for k in cfgs}
    for key in cfgs:
        print(
            f"\n{key}: launch -> first step {first[key]:.2f} s (target <= 5), "
            f"{ratios[key]:.2f}x the plain loop's {first['plain']:.2f} s; last step -> return "
            f"{med[key]['LAST STEP -> RETURN']:.2f} s (target <= 2)"
        )
    print(f"load average at each repeat: {load}")
    report = {
        "repeats": args.repeats,
        "steps": args.steps,
        "rows_per_step": args.rows,
        "seq_len": seq_len,
        "cores": os.cpu_count(),
        "load_average": load,
        "median": med,
        "first_step_ratio_to_plain": ratios,
        "runs": timed,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
