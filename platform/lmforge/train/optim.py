"""The optimizer (AdamW with decay on weight matrices only, or Muon for the blocks' matrices with
AdamW for the rest) and the learning-rate schedules."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from lmforge import LmforgeError

if TYPE_CHECKING:  # keep this module importable with torch alone
    from lmforge.train.config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight matrices decay; norms, biases and embeddings (so also a tied head) do not."""
    decay, no_decay, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if p.ndim < 2 or "embeddings" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(
    cfg: OptimConfig, model: nn.Module, device: torch.device
) -> torch.optim.Optimizer:
    adamw_groups = param_groups(model, cfg.weight_decay)
    muon_params = []
    if cfg.name == "muon":
        muon_params = muon_matrices(model)
        chosen = {id(p) for p in muon_params}
        for group in adamw_groups:
            group["params"] = [p for p in group["params"] if id(p) not in chosen]
        # A tied head leaves no decayed matrix to AdamW; DCP cannot restore an empty group.
        adamw_groups = [group for group in adamw_groups if group["params"]]
    adamw = torch.optim.AdamW(
        adamw_groups,
        lr=cfg.lr,
        betas=cfg.betas,
        eps=cfg.eps,
        # Fused kernels on CPU too: 3-10x faster steps than foreach or the for-loop
        # (bench/train_throughput.py --optimizers; docs/training.md, Startup and throughput).
        fused=device.type in ("cuda", "cpu"),
    )
    if cfg.name == "adamw":
        return adamw
    return MuonWithAdamW(muon_params, adamw, cfg)


def muon_matrices(model: nn.Module) -> list[nn.Parameter]:
    """The blocks' 2-D weight matrices (attention and MLP projections): Muon's. Embeddings, the
    head (tied or not) and norms stay with AdamW, as in Keller Jordan's and Moonshot's setups."""
    chosen = []
    for name, p in model.named_parameters():
        if p.requires_grad and p.ndim == 2 and name.startswith("layers."):
            if isinstance(p, DTensor):
                raise LmforgeError(
                    f"optim.name=muon: {name} is sharded (FSDP2/tensor parallel), and Muon's "
                    "Newton-Schulz step needs whole matrices; train on one worker "
                    "(resources.num_workers=1) or use optim.name=adamw"
                )
            chosen.append(p)
    return chosen


class MuonWithAdamW(torch.optim.Optimizer):
    """torch.optim.Muon on the blocks' matrices and an AdamW on the rest, as one optimizer: one
    `step`, one `param_groups` list (each group's `lr_ratio` scales the schedule's lr, see
    `set_lr`) and one `state`, so DCP checkpoints and resumes it like a single AdamW."""

    def __init__(self, matrices: list[nn.Parameter], adamw: torch.optim.AdamW, cfg: OptimConfig):
        # Muon's own decoupled decay, same strength as AdamW's on matrices; "original" scales
        # each matrix's lr by sqrt(max(1, rows/cols)) (Keller Jordan's non-square adjustment).
        self.muon = torch.optim.Muon(
            matrices,
            lr=cfg.muon_lr,
            weight_decay=cfg.weight_decay,
            momentum=cfg.muon_momentum,
            adjust_lr_fn="original",
        )
        self.adamw = adamw
        for group in self.muon.param_groups:
            group["lr_ratio"] = cfg.muon_lr / cfg.lr
        for group in adamw.param_groups:
            group["lr_ratio"] = 1.0
        super().__init__(self.muon.param_groups + adamw.param_groups, defaults={})
        self._link()

    def _link(self) -> None:
        # The inner optimizers read this one's groups and state: load_state_dict replaces both.
        n = len(self.muon.param_groups)
        self.muon.param_groups, self.adamw.param_groups = (
            self.param_groups[:n],
            self.param_groups[n:],
        )
        self.muon.state = self.adamw.state = self.state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._link()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else closure()
        self.muon.step()
        self.adamw.step()
        return loss


def lr_at(cfg: OptimConfig, step: int, total_steps: int) -> float:
    """Learning rate of optimizer step `step` (0-based) of `total_steps`."""
    min_lr = cfg.lr * cfg.min_lr_ratio
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "wsd":
        decay_steps = max(1, round(cfg.decay_fraction * total_steps))
        decay_start = max(cfg.warmup_steps, total_steps - decay_steps)
        if step < decay_start:
            return cfg.lr
        frac = (step - decay_start + 1) / max(1, total_steps - decay_start)
        return cfg.lr - (cfg.lr - min_lr) * min(1.0, frac)
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps + 1) / span)
    return min_lr + 0.5 * (cfg.lr - min_lr) * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The schedule's lr on every group (Muon's groups at their `lr_ratio` of it)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_ratio", 1.0)
