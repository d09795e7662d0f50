"""The recipe race (issue #16, items 3 and 4): held-out bits per byte at fixed wall-clock budgets.

Every contender trains for `--seconds` of training time on one thread (evaluation pauses the
clock; `--clock cpu`, the default, counts this process's CPU seconds, so other users' load on a
shared machine does not shorten a contender's race; `--clock wall` counts wall seconds) and is scored at each of `--checkpoints` on the same held-out rows: the first
`--eval-rows` rows of the data stage's val split (documents the training split never holds),
bits per byte exactly as train/loop.py `evaluate` computes them. Contenders run one after
another, interleaved by seed (seed 0: all, then seed 1: all, ...), in this one process.

- `anchor`: bench/anchor.py, our single-file nanoGPT-style trainer (no Ray, no lmforge).
- `baseline`: lmforge's plain AdamW Llama (model/llama.py, train/optim.py) in a loop here.
- one contender per recipe change, alone on top of the baseline (see CONTENDERS); `a+b` stacks
  contenders (the later one's overrides win: `untied_lr_3e-3+qk_norm`, `untied_head+lr_5e-3`).
- `lmforge-train` (`--e2e`): the `lmforge train` command in process (`resources.in_process`,
  one thread, no Ray start) with the `--e2e-recipe` contender's changes, run for the steps that
  contender had made at its first checkpoint at or below the anchor's final bpb (else at half
  the budget), timed from the command to its exit (issue #16 item 4: at most half the anchor's
  time to the anchor's final bpb; the anchor's time counted here is only its training seconds,
  no start-up or evaluation).

The learning-rate schedule of the in-process contenders is a function of the fraction of the
budget used (total steps estimated from the step rate so far), as the anchor's.
The data is made once per vocabulary by `lmforge data prepare` from the builtin corpus (the
quickstart's slice) and reused (hashed output) on the next run.

    PYTHONPATH=platform .venv/bin/python bench/race.py [--seconds 30] [--seeds 2] [--e2e]

Prints a table (median over seeds, ratio to the baseline) and writes bench/results/race.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
WIDTH = {"dim": 128, "n_layers": 4, "n_heads": 4, "n_kv_heads": 4, "ffn_dim": 384}  # as anchor's
BATCH_ROWS, SEQ_LEN = 16, 128  # 2048 tokens per step

# name -> (vocabulary, model overrides, optimizer overrides); each change alone on the baseline.
CONTENDERS: dict[str, tuple[int, dict, dict]] = {
    "baseline": (1024, {}, {}),
    "muon": (1024, {}, {"name": "muon"}),
    "qk_norm": (1024, {"qk_norm": True}, {}),
    "zero_init_out": (1024, {"zero_init_out": True}, {}),
    "untied_head": (1024, {"tie_embeddings": False}, {}),
    "softcap_15": (1024, {"logit_softcap": 15.0}, {}),
    "relu2": (1024, {"mlp": "relu2", "ffn_dim": 576}, {}),  # 2 x 576 = 3 x 384: same params
    "wsd": (1024, {}, {"schedule": "wsd"}),
    "lr_3e-3": (1024, {}, {"lr": 3e-3}),
    "lr_3e-4": (1024, {}, {"lr": 3e-4}),
    "lr_2e-3": (1024, {}, {"lr": 2e-3}),
    "lr_5e-3": (1024, {}, {"lr": 5e-3}),
    "lr_1e-2": (1024, {}, {"lr": 1e-2}),
    "untied_lr_3e-3": (1024, {"tie_embeddings": False}, {"lr": 3e-3}),  # the two wins together
    "vocab_2048": (2048, {}, {}),
    "vocab_512": (512, {}, {}),
    # warmups (race-only: the loop below, not train/loop.py): the same tokens per step on
    # shorter sequences early, or fewer rows per step early (see WARMUPS)
    "seq_warmup": (1024, {}, {}),
    "batch_warmup": (1024, {}, {}),
    "untied_lr_3e-3_seq_warmup": (1024, {"tie_embeddings": False}, {"lr": 3e-3}),
}

# contender -> [(fraction of the budget until which it applies, sequence length, rows per step)]
# past the last entry: SEQ_LEN and BATCH_ROWS. Blocks are cut into seq-long pieces, so a step
# of the sequence warmup holds the same 2048 tokens as any other; the batch warmup's hold fewer.
WARMUPS = {
    "seq_warmup": [(0.1, 32, 64), (0.25, 64, 32)],
    "untied_lr_3e-3_seq_warmup": [(0.1, 32, 64), (0.25, 64, 32)],
    "batch_warmup": [(0.1, 128, 4), (0.25, 128, 8)],
}


def contender(name: str) -> tuple[int, dict, dict]:
    """(vocabulary, model overrides, optimizer overrides) of a contender or of `a+b+...`."""
    vocab, model, optim = 1024, {}, {}
    for part in name.split("+"):
        if part not in CONTENDERS:
            raise SystemExit(f"race.py: unknown contender {part!r} in {name!r}; one of: "
                             + ", ".join(sorted(CONTENDERS)))  # fmt: skip
        part_vocab, part_model, part_optim = CONTENDERS[part]
        vocab = part_vocab if part_vocab != 1024 else vocab
        model, optim = model | part_model, optim | part_optim
    return vocab, model, optim


def step_shape(name: str, fraction: float) -> tuple[int, int]:
    """(sequence length, rows) of a step taken at `fraction` of the budget."""
    warmup = next((WARMUPS[p] for p in name.split("+") if p in WARMUPS), [])
    for until, seq, rows in warmup:
        if fraction < until:
            return seq, rows
    return SEQ_LEN, BATCH_ROWS


def cut(blocks: torch.Tensor, seq: int) -> torch.Tensor:
    """(n, SEQ_LEN + 1) blocks as (n * SEQ_LEN / seq, seq + 1) rows: consecutive pieces that
    share their boundary token (one piece's last target is the next one's first input)."""
    if seq == blocks.shape[1] - 1:
        return blocks
    pieces = [blocks[:, i : i + seq + 1] for i in range(0, blocks.shape[1] - 1, seq)]
    return torch.cat(pieces, dim=0)


def prepare_data(vocab: int, runs_dir: str) -> str:
    """The data stage's output for this vocabulary (run once; a complete output is reused)."""
    sets = {
        "name": f"race-v{vocab}",
        "runs_dir": runs_dir,
        "sources": '[{path: "builtin:python-docs", limit: 1500}]',
        "steps": "[{step: normalize}, {step: length, min_chars: 100, min_words: 15}]",
        "tokenizer.vocab_size": vocab,
        "seq_len": SEQ_LEN,
        "val_fraction": 0.05,
    }
    cmd = [sys.executable, "-m", "lmforge.cli", "data", "prepare"]
    cmd += [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env_with_path(runs_dir))
    found = re.findall(r"(?:output|skipping): (\S+)", out.stdout + out.stderr)
    if out.returncode or not found:
        sys.exit(f"data stage failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return found[-1]


def env_with_path(runs_dir: str) -> dict[str, str]:
    """This checkout's lmforge on one thread; the race's own Ray token and LMFORGE_HOME
    (generated under runs_dir) unless the caller's environment names them."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.setdefault("RAY_AUTH_TOKEN_PATH", os.path.join(runs_dir, "ray", "auth_token"))
    env.setdefault("LMFORGE_HOME", os.path.join(runs_dir, "home"))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "platform"), env.get("PYTHONPATH", "")])
    return env


def lmforge_contender(
    data_dir, seconds, seed, checkpoints, model_over, optim_over, eval_rows, clock, name=""
):
    """lmforge's model and optimizer in a plain loop; (seconds, step, val bpb) per checkpoint."""
    from lmforge.model.llama import Llama, cross_entropy
    from lmforge.train.config import ModelConfig, OptimConfig
    from lmforge.train.data import PackedShards, bits_per_byte, read_manifest, tokens_per_byte
    from lmforge.train.optim import build_optimizer, lr_at, set_lr

    manifest = read_manifest(data_dir)
    train = PackedShards(os.path.join(data_dir, "train"), seed=seed, shuffle=True)
    val = PackedShards(os.path.join(data_dir, "val"))
    tpb = tokens_per_byte(manifest, "val", val.num_rows, val.block_len)
    arch = ModelConfig(preset="debug", **{**WIDTH, **model_over}).to_llama(
        manifest["vocab_size"], train.seq_len
    )
    model = Llama(arch)
    model.init_weights(seed)
    ocfg = OptimConfig(**optim_over)
    optimizer = build_optimizer(ocfg, model, torch.device("cpu"))

    @torch.no_grad()
    def score() -> float:  # as train/loop.py evaluate: token-mean loss over the first val rows
        total, count = 0.0, 0
        for first in range(0, min(eval_rows, val.num_rows), BATCH_ROWS):
            rows = torch.from_numpy(val.rows(first, min(BATCH_ROWS, eval_rows - first)))
            total += cross_entropy(model(rows[:, :-1]), rows[:, 1:]).item() * rows[:, 1:].numel()
            count += rows[:, 1:].numel()
        return bits_per_byte(total / count, tpb)

    marks, results = sorted(c for c in checkpoints if c < seconds) + [seconds], []
    elapsed, step, cursor = 0.0, 0, 0
    while marks:
        start = clock()
        total = max(step + 1, round(step * seconds / elapsed)) if elapsed else 10**6
        set_lr(optimizer, lr_at(ocfg, step, total))
        seq, count = step_shape(name, elapsed / seconds)
        blocks = count * seq // SEQ_LEN  # whole blocks, cut into `count` rows of `seq`
        rows = cut(torch.from_numpy(train.rows(cursor, blocks)), seq)
        cursor += blocks
        loss = cross_entropy(model(rows[:, :-1]), rows[:, 1:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), ocfg.grad_clip)
        optimizer.step()
        step += 1
        elapsed += clock() - start
        if elapsed >= marks[0]:
            model.eval()
            results.append((marks.pop(0), step, score()))
            model.train()
    return results


def e2e_contender(
    data_dir, steps, seed, eval_rows, runs_dir, model_over, optim_over
) -> tuple[float, float]:
    """`lmforge train` from the command to its exit: (wall seconds, final val bpb)."""
    sets = {
        "name": f"race-e2e-{seed}",
        "runs_dir": runs_dir,
        "data.path": data_dir,
        "model.preset": "debug",
        **{f"model.{k}": v for k, v in {**WIDTH, **model_over}.items()},
        **{f"optim.{k}": v for k, v in optim_over.items()},
        "train.max_steps": steps,
        "train.global_batch_tokens": BATCH_ROWS * SEQ_LEN,
        "train.micro_batch_size": BATCH_ROWS,
        "train.eval_every": 0,
        "train.eval_sequences": eval_rows,
        "train.precision": "fp32",
        "train.seed": seed,
        "resources.num_workers": 1,
        "resources.cpus_per_worker": 1,
        "resources.in_process": True,
        "checkpoint.every_steps": 0,
        "tracking.backend": "none",
    }
    cmd = [sys.executable, "-m", "lmforge.cli", "train"]
    cmd += [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    start = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env_with_path(runs_dir))
    wall = time.perf_counter() - start
    if out.returncode:  # recorded, not fatal: the other contenders' results still count
        print(f"lmforge train failed:\n{out.stdout[-1500:]}\n{out.stderr[-1500:]}", flush=True)
        return wall, float("nan")
    # this run's folder, as the command printed it (runs_dir may hold earlier races' runs)
    (output,) = re.findall(r"^\[train\] output: (.+)$", out.stdout, flags=re.M)
    rows = [json.loads(line) for line in (Path(output) / "metrics.jsonl").read_text().splitlines()]
    return wall, [r["val_bpb"] for r in rows if "val_bpb" in r][-1]


def e2e_steps(curves: dict, recipe: str, seconds: float) -> int:
    """The steps `lmforge train` runs: those the recipe had made at its first checkpoint at or
    below the anchor's final bpb (item 4's "reaches the anchor's final bpb"), else at half the
    budget."""
    curve = curves[recipe][-1]
    if curves.get("anchor"):
        target = curves["anchor"][-1][-1][2]
        reached = [c for c in curve if c[2] <= target]
        if reached:
            return reached[0][1]
    return next(c[1] for c in curve if c[0] >= seconds / 2)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--checkpoints", default="5,10,15,20,25", help="seconds, comma-separated")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--eval-rows", type=int, default=64)
    parser.add_argument("--only", default="", help="contenders to run (comma-separated)")
    parser.add_argument(
        "--clock",
        choices=["cpu", "wall"],
        default="cpu",
        help="the budget's clock: this process's CPU seconds (fair while others load the "
        "machine; equal to wall time on an idle core) or wall seconds",
    )
    parser.add_argument("--e2e", action="store_true", help="also race `lmforge train` (seed 0)")
    parser.add_argument(
        "--e2e-recipe",
        default="untied_lr_3e-3",
        help="the contender (or `a+b`) whose changes `lmforge train` runs with (it races too)",
    )
    parser.add_argument(
        "--base", default="baseline", help="the contender the ratio column divides by"
    )
    parser.add_argument("--runs-dir", default=os.path.join(tempfile.gettempdir(), "lmforge-race"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    import anchor

    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    checkpoints = [float(c) for c in args.checkpoints.split(",") if c]
    names = ["anchor", *CONTENDERS] if not args.only else args.only.split(",")
    if args.e2e:  # the recipe's steps at half the budget are the command's
        checkpoints = sorted(set(checkpoints) | {args.seconds / 2})
        names += [args.e2e_recipe] if args.e2e_recipe not in names else []
    vocabs = {contender(n)[0] for n in names if n != "anchor"} | {1024}
    data = {v: prepare_data(v, args.runs_dir) for v in sorted(vocabs)}
    curves: dict[str, list[list]] = {n: [] for n in names}
    e2e: list[dict] = []
    for seed in range(args.seeds):  # interleaved: every contender once per seed, in turn
        for name in names:
            if name == "anchor":
                curve = anchor.train(data[1024], args.seconds, seed, tuple(checkpoints),
                                     eval_rows=args.eval_rows, clock=clock)  # fmt: skip
            else:
                vocab, model_over, optim_over = contender(name)
                curve = lmforge_contender(data[vocab], args.seconds, seed, checkpoints,
                                          model_over, optim_over, args.eval_rows, clock, name)  # fmt: skip
            curves[name].append(curve)
            print(f"seed {seed} {name:<30} " + "  ".join(f"{t:g}s:{b:.4f}" for t, _, b in curve),
                  flush=True)  # fmt: skip
        if args.e2e and seed == 0:
            steps = e2e_steps(curves, args.e2e_recipe, args.seconds)
            vocab, model_over, optim_over = contender(args.e2e_recipe)
            wall, bpb = e2e_contender(data[vocab], steps, seed, args.eval_rows,
                                      args.runs_dir + "/e2e", model_over, optim_over)  # fmt: skip
            e2e.append({"seed": seed, "steps": steps, "wall_s": wall, "val_bpb": bpb})
            print(
                f"seed {seed} lmforge-train  {steps} steps in {wall:.1f} s: {bpb:.4f}", flush=True
            )
    report(args, checkpoints, curves, e2e)


def report(args, checkpoints, curves, e2e) -> None:
    budgets = sorted(c for c in checkpoints if c < args.seconds) + [args.seconds]
    med = {n: [statistics.median(c[i][2] for c in cs) for i in range(len(budgets))]
           for n, cs in curves.items() if cs}  # fmt: skip
    base = med.get(args.base)
    print(
        f"\nheld-out bits per byte, median of {args.seeds} seeds (1 thread; ratio: to {args.base})"
    )
    print(f"{'contender':<31}" + "".join(f"{f'{b:g} s':>9}" for b in budgets)
          + f"{'ratio':>8}{'spread':>8}{'steps':>7}")  # fmt: skip
    rows = []
    for name, values in med.items():
        finals = [c[-1][2] for c in curves[name]]
        ratio = values[-1] / base[-1] if base else float("nan")
        steps = statistics.median(c[-1][1] for c in curves[name])
        spread = (max(finals) - min(finals)) / values[-1]
        print(f"{name:<31}" + "".join(f"{v:9.4f}" for v in values)
              + f"{ratio:8.3f}{spread:8.3f}{steps:7.0f}")  # fmt: skip
        rows.append({"contender": name, "bpb": dict(zip(map(str, budgets), values, strict=True)),
                     "ratio_to": args.base, "ratio": ratio, "seed_spread": spread, "steps": steps,
                     "per_seed": curves[name]})  # fmt: skip
    if e2e:
        wall = statistics.median(r["wall_s"] for r in e2e)
        bpb = statistics.median(r["val_bpb"] for r in e2e)
        print(
            f"lmforge-train  {bpb:.4f} in {wall:.1f} s from the command ({args.e2e_recipe}, "
            "in process)"
        )
        if "anchor" in med:  # the command ran seed 0: against seed 0's anchor
            anchor_bpb = curves["anchor"][0][-1][2]
            print(f"item 4: {wall / args.seconds:.2f}x the anchor's {args.seconds:g} s (target "
                  f"<= 0.5) for {bpb / anchor_bpb:.3f}x its seed-0 final bpb {anchor_bpb:.4f} (target "
                  "<= 1)")  # fmt: skip
    out = REPO / "bench" / "results" / "race.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"seconds": args.seconds, "seeds": args.seeds, "budgets": budgets, "rows": rows,
              "e2e": e2e, "command": " ".join(sys.argv)}  # fmt: skip
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
