"""LoRA: low-rank adapters on chosen linear layers of the Llama model (Hu et al., 2021).

`apply_lora(model, rank, alpha, dropout, targets)` turns each targeted `nn.Linear` (by its
attribute name: wq, wk, wv, wo in attention, w1, w2, w3 in the MLP) into a `LoRALinear` *in
place*: the same module with two extra parameters,

    y = x W^T + (alpha / rank) * dropout(x) A^T B^T      A: (rank, in), B: (out, rank)

A starts Kaiming-uniform, B at zero, so the adapted model computes exactly the base model until
B moves. The base weight keeps its name (`layers.0.attn.wq.weight`) and is frozen, so a base
artifact's state dict loads unchanged, only `*.lora_a` / `*.lora_b` train, and FSDP2 shards the
module like any other (mixed frozen/trainable parameters in one group are supported by its
per-parameter sharding). `merge_lora_state` folds the adapters into a consolidated state dict:
W + (alpha / rank) B A, which is what export and the model artifact store.

Why our own ~100 lines instead of peft: peft wraps Hugging Face `PreTrainedModel`s and pulls in
transformers and accelerate at run time (hundreds of MB on every training worker) for what is
one module here; our version keeps parameter names stable for DCP checkpoints and the artifact
format, and is known to compose with `fully_shard`. Torch only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.model.llama import at_least_fp32

LORA_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


class LoRALinear(nn.Linear):
    """An `nn.Linear` (frozen `weight`) plus a trainable low-rank update."""

    def __init__(
        self, in_features: int, out_features: int, rank: int, alpha: float, dropout: float = 0.0
    ) -> None:
        super().__init__(in_features, out_features, bias=False)
        self.rank, self.scale = rank, alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, in_features))
        self.lora_b = nn.Parameter(torch.zeros(out_features, rank))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_lora()

    def reset_lora(self) -> None:
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # nn.Linear's own init
        nn.init.zeros_(self.lora_b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = F.linear(x, self.weight)
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_a), self.lora_b)  # (.., out)
        return base + self.scale * update

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, scale={self.scale:g}"


def apply_lora(
    model: nn.Module,
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    targets: tuple[str, ...] | list[str] = ("wq", "wk", "wv", "wo"),
) -> list[str]:
    """Adapt every linear layer named in `targets` and freeze everything else; the adapted names.

    Call before parallelising (FSDP2 must see the final parameters). Works on a meta-device model
    too: the new parameters follow the replaced layer's device and are initialised by `reset_lora`
    (which `init_lora_weights` calls again after materialisation).
    """
    unknown = set(targets) - set(LORA_TARGETS)
    if unknown:
        raise ValueError(
            f"lora.targets: unknown layer(s) {sorted(unknown)}; choose from {', '.join(LORA_TARGETS)}"
        )
    adapted = []
    for name, module in list(model.named_modules()):
        for attr in targets:
            child = getattr(module, attr, None)
            if not isinstance(child, nn.Linear) or isinstance(child, LoRALinear):
                continue
            with torch.device(child.weight.device):
                lora = LoRALinear(child.in_features, child.out_features, rank, alpha, dropout)
            lora.weight = child.weight  # the same (base) parameter, same name
            setattr(module, attr, lora)
            adapted.append(f"{name}.{attr}" if name else attr)
    if not adapted:
        raise ValueError(f"lora.targets {list(targets)} matched no linear layer of the model")
    for pname, param in model.named_parameters():
        param.requires_grad_(".lora_" in pname)
    return adapted


@torch.no_grad()
def init_lora_weights(model: nn.Module, seed: int | None = None) -> None:
    """Re-initialise every adapter (A random, B zero), e.g. after a meta-device build."""
    if seed is not None:
        torch.manual_seed(seed)
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.reset_lora()


def merge_lora_state(state: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """A consolidated state dict with every adapter folded into its weight: W + scale * B A."""
    merged = {k: v for k, v in state.items() if ".lora_" not in k}
    for key, a in state.items():
        if not key.endswith(".lora_a"):
            continue
        prefix = key[: -len(".lora_a")]
        b, w = state[f"{prefix}.lora_b"], state[f"{prefix}.weight"]
        w32, b32, a32 = at_least_fp32(w), at_least_fp32(b), at_least_fp32(a)
        merged[f"{prefix}.weight"] = (w32 + scale * (b32 @ a32)).to(w.dtype)
    return merged
