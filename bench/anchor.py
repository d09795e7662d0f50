"""The anchor: a single-file PyTorch trainer (nanoGPT-style, no Ray, no lmforge) on a data stage's
packed shards, the baseline `bench/race.py` holds lmforge to (issue #16, item 4).

A GPT-2-style decoder (learned positions, LayerNorm, GELU MLP, tied head), AdamW, a cosine
learning rate over the wall-clock budget, fp32. It reads the shards with pyarrow and scores
held-out bits per byte as lmforge does (train/loop.py `evaluate`, train/data.py): the mean
next-token loss over the first val rows, in bits, times the val split's tokens per byte.

    python bench/anchor.py DATA_DIR [--seconds 60] [--seed 0]
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import time

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from torch import nn


def read_split(data_dir: str, split: str) -> np.ndarray:
    """Every packed row of a split, (rows, seq_len + 1) int64, in file then row order."""
    parts = []
    for path in sorted(glob.glob(os.path.join(data_dir, split, "*.parquet"))):
        col = pq.read_table(path, columns=["tokens"]).column("tokens").combine_chunks()
        parts.append(col.flatten().to_numpy().astype(np.int64).reshape(len(col), -1))
    return np.concatenate(parts)


def val_tokens_per_byte(data_dir: str, val_rows: int, block_len: int) -> float:
    """The manifest's val tokens over its val bytes (rows x block length when it lacks a count)."""
    with open(os.path.join(data_dir, "manifest.json")) as f:
        manifest = json.load(f)
    return (manifest.get("tokens_val") or val_rows * block_len) / manifest["bytes_val"]


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc, self.out = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(D, dim=2)
        q, k, v = (t.view(B, T, self.heads, -1).transpose(1, 2) for t in (q, k, v))  # (B, H, T, E)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, D))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, vocab: int, seq_len: int, dim: int, layers: int, heads: int) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, dim), nn.Embedding(seq_len, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.wte.weight  # tied, as GPT-2
        for name, p in self.named_parameters():  # GPT-2 init; residual outputs scaled by depth
            if p.ndim == 2:
                std = (
                    0.02 / math.sqrt(2 * layers)
                    if name.endswith(("proj.weight", "out.weight"))
                    else 0.02
                )
                nn.init.normal_(p, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))  # (B, T, D)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))  # (B, T, V)


@torch.no_grad()
def val_bpb(model: GPT, val: np.ndarray, tpb: float, batch: int) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(val), batch):
        rows = torch.from_numpy(val[i : i + batch])
        logits = model(rows[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), rows[:, 1:].flatten(), reduction="sum")
        total, count = total + loss.item(), count + rows[:, 1:].numel()
    model.train()
    return total / count / math.log(2) * tpb


def train(data_dir: str, seconds: float, seed: int = 0, checkpoints: tuple[float, ...] = (),
          dim: int = 128, layers: int = 4, heads: int = 4, batch_rows: int = 16, lr: float = 1e-3,
          eval_rows: int = 64, clock=time.perf_counter) -> list[tuple[float, int, float]]:  # fmt: skip
    """Train for `seconds` of training time on `clock` (evaluation paused); (seconds, step,
    val bpb) at each checkpoint and at the end."""
    torch.manual_seed(seed)
    train_rows, val_all = read_split(data_dir, "train"), read_split(data_dir, "val")
    tpb = val_tokens_per_byte(data_dir, len(val_all), val_all.shape[1])
    val = val_all[:eval_rows]
    with open(os.path.join(data_dir, "manifest.json")) as f:
        vocab = json.load(f)["vocab_size"]
    model = GPT(vocab, train_rows.shape[1] - 1, dim, layers, heads)
    decay = [p for p in model.parameters() if p.ndim == 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))
    order = np.random.default_rng(seed).permutation(len(train_rows))
    marks, results = sorted(c for c in checkpoints if c < seconds) + [seconds], []
    elapsed, step = 0.0, 0
    while marks:
        start = clock()
        # Cosine over the budget: progress is the fraction of the training time used.
        warm = min(1.0, (step + 1) / 10)
        opt.param_groups[0]["lr"] = opt.param_groups[1]["lr"] = (
            lr * warm * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, elapsed / seconds))))
        )
        idx = order[[(step * batch_rows + j) % len(order) for j in range(batch_rows)]]
        rows = torch.from_numpy(train_rows[idx])
        logits = model(rows[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        elapsed += clock() - start
        if elapsed >= marks[0]:
            results.append((marks.pop(0), step, val_bpb(model, val, tpb, batch_rows)))
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data_dir")
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for t, step, bpb in train(args.data_dir, args.seconds, args.seed, (args.seconds / 2,)):
        print(f"{t:6.0f} s  step {step:5d}  val bpb {bpb:.4f}")
