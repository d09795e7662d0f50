"""Fine-tuning throughput with and without packing, on the built-in SFT data (CPU).

The same base model (default: the tiny preset, random weights: throughput does not depend on
them), the same global batch in token slots, the same optimizer, the same loop (`lmforge
finetune`'s, in this process), in one run:

  unpacked   one conversation per row, padded to seq_len + 1
  packed     several conversations per row (document-masked attention, positions reset)

Both do the same FLOPs per step (same slots); what differs is how many of those slots hold
real tokens. Reported per variant: slot tokens/s (what the loop logs), real (non-pad) tokens/s
and conversations/s (slots/s x packing efficiency, and / tokens per conversation), the packing
efficiency from the data manifest, and the packed/unpacked ratio of real tokens/s. The
document mask also costs something (SDPA with an explicit mask instead of its causal kernel):
the `unpacked` variant runs with the mask too, so the ratio isolates packing; `unpacked, causal
kernel` shows the mask's own cost on the same rows.
Writes bench/results/finetune_throughput.json and prints a table.

    .venv/bin/python bench/finetune_throughput.py [--steps 8] [--preset tiny] [--seq-len 256]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from lmforge.builtin.corpus import python_docs_files, python_docs_records  # noqa: E402
from lmforge.data.tokenizer import train_bpe  # noqa: E402
from lmforge.finetune.config import FinetuneConfig  # noqa: E402
from lmforge.finetune.data import SftDataConfig, prepare_sft  # noqa: E402
from lmforge.model import Llama, model_config  # noqa: E402
from lmforge.model.artifact import save_artifact  # noqa: E402
from lmforge.train import loop  # noqa: E402


def make_base(root: Path, preset: str, vocab: int) -> Path:
    """A tokenizer trained on a slice of the built-in corpus and a randomly initialised model."""
    texts = [t for f in python_docs_files()[:300] for _, t in python_docs_records(f)]
    tok = train_bpe(texts, vocab_size=vocab, min_frequency=2)
    cfg = model_config(preset, vocab_size=tok.get_vocab_size())
    torch.manual_seed(0)
    model = Llama(cfg)
    save_artifact(str(root / "base"), model.state_dict(), cfg, tok.to_str())
    return root / "base"


def run_variant(base: Path, data: Path, root: Path, args, name: str) -> dict:
    cfg = FinetuneConfig.model_validate(
        {
            "name": name,
            "runs_dir": str(root),
            "base": str(base),
            "train": {
                "global_batch_tokens": args.seq_len * args.micro_batch * args.accum,
                "micro_batch_size": args.micro_batch,
                "max_steps": args.steps,
                "log_every": args.steps,
                "eval_every": 0,
                "eval_at_start": False,
                "eval_sequences": 1,
                "precision": "bf16",
                "peak_tflops": 1.0,
            },
            "checkpoint": {"every_steps": 0},
            "resources": {"num_workers": 1},
            "parallel": {"fsdp": False},
        }
    )
    start = time.perf_counter()
    summary = loop.run_local(cfg, str(root / name), data_path=str(data))
    wall = time.perf_counter() - start
    manifest = json.loads((data / "manifest.json").read_text())
    eff = manifest["packing_efficiency_train"]
    per_example = manifest["tokens_train"] / manifest["examples_train"]
    slots = summary["tokens_per_s"]
    return {
        "variant": name,
        "slot_tokens_per_s": slots,
        "packing_efficiency": eff,
        "real_tokens_per_s": slots * eff,
        "conversations_per_s": slots * eff / per_example,
        "rows_train": manifest["rows_train"],
        "examples_train": manifest["examples_train"],
        "wall_s": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--accum", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--out", default=str(REPO / "bench" / "results" / "finetune_throughput.json")
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="lmforge-bench-ft-"))
    base = make_base(root, args.preset, args.vocab)
    tokenizer = (base / "tokenizer.json").read_text()
    data = {}
    for packing in (False, True):
        out = root / f"sft-{'packed' if packing else 'unpacked'}"
        prepare_sft(
            SftDataConfig(packing=packing), tokenizer, str(out), args.seq_len, use_ray=False
        )
        data[packing] = out
    results = [
        run_variant(base, data[False], root, args, "unpacked"),
        run_variant(base, data[True], root, args, "packed"),
    ]
    # The mask's own cost: the unpacked rows through SDPA's causal kernel (no segments).
    original = loop.masked_batch

    def causal_only(batch, device):
        tokens, targets, _ = original(batch, device)
        return tokens, targets, None

    loop.masked_batch = causal_only
    try:
        results.append(run_variant(base, data[False], root, args, "unpacked, causal kernel"))
    finally:
        loop.masked_batch = original
    by = {r["variant"]: r for r in results}
    report = {
        "preset": args.preset,
        "seq_len": args.seq_len,
        "global_batch_slots": args.seq_len * args.micro_batch * args.accum,
        "steps": args.steps,
        "threads": args.threads,
        "results": results,
        "packed_over_unpacked_real_tokens_per_s": by["packed"]["real_tokens_per_s"]
        / by["unpacked"]["real_tokens_per_s"],
        "mask_cost_ratio": by["unpacked"]["slot_tokens_per_s"]
        / by["unpacked, causal kernel"]["slot_tokens_per_s"],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'variant':<26}{'slots/s':>10}{'pack eff':>10}{'real tok/s':>12}{'conv/s':>9}")
    for r in results:
        print(
            f"{r['variant']:<26}{r['slot_tokens_per_s']:>10,.0f}{r['packing_efficiency']:>10.2f}"
            f"{r['real_tokens_per_s']:>12,.0f}{r['conversations_per_s']:>9.1f}"
        )
    print(
        f"packed / unpacked real tokens/s: {report['packed_over_unpacked_real_tokens_per_s']:.2f}x"
        f"; document mask vs causal kernel (unpacked slots/s): {report['mask_cost_ratio']:.2f}x"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
