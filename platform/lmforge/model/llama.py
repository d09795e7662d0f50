"""A Llama-style decoder on one device: RMSNorm, rotary embeddings, SwiGLU, grouped-query attention.

Recipe options (all off by default, so the plain model is HF Llama): RMSNorm on each head's
queries and keys (`qk_norm`), zero-initialised residual outputs (`zero_init_out`), tanh logit
soft-capping (`logit_softcap`) and a ReLU-squared MLP (`mlp="relu2"`).

Read it top to bottom. Nothing here knows about distribution: FSDP2, activation checkpointing,
torch.compile and mixed precision are applied from outside, in `lmforge.train.parallelize`.
Only torch is imported, so a GPU box without Ray or pydantic can run the model (bench/gpu_train.sh).

Shapes: B batch, T sequence, D model width, H query heads, K key/value heads, E head dim (D / H),
V vocabulary, F MLP hidden width.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

MLP_KINDS = ("swiglu", "relu2")


@dataclass
class LlamaConfig:
    """The architecture. Plain data (JSON in `config.json`), so every stage can rebuild the model."""

    vocab_size: int = 8192
    dim: int = 384  # D
    n_layers: int = 6
    n_heads: int = 6  # H
    n_kv_heads: int = 2  # K; H % K == 0 (K == H: multi-head, K == 1: multi-query)
    ffn_dim: int = 1024  # F, the MLP hidden width
    max_seq_len: int = 512  # longest sequence the rotary table is built for
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True  # share the token embedding with the output head
    mlp: str = "swiglu"  # swiglu: w2(silu(w1 x) * w3 x); relu2: w2(relu(w1 x)^2), no w3
    qk_norm: bool = False  # RMSNorm (one E-wide weight each) on queries and keys, before RoPE
    zero_init_out: bool = False  # wo and w2 start at zero: each block starts as the identity
    logit_softcap: float | None = None  # logits = cap * tanh(logits / cap); None: off

    def __post_init__(self) -> None:
        if self.mlp not in MLP_KINDS:
            raise ValueError(f"mlp {self.mlp!r} is not one of {', '.join(MLP_KINDS)}")
        if self.logit_softcap is not None and self.logit_softcap <= 0:
            raise ValueError(f"logit_softcap {self.logit_softcap} must be > 0 (or None: off)")
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not a multiple of n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}"
            )
        if (self.dim // self.n_heads) % 2:
            raise ValueError(
                f"head dim {self.dim // self.n_heads} must be even for rotary embeddings"
            )

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> LlamaConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {', '.join(sorted(unknown))}")
        return cls(**data)


# ---------------------------------------------------------------- size and cost


def num_params(cfg: LlamaConfig, embeddings: bool = True) -> int:
    """Parameter count from the config (equals `sum(p.numel())` of the built model)."""
    D, F_, E = cfg.dim, cfg.ffn_dim, cfg.head_dim
    attn = D * cfg.n_heads * E * 2 + D * cfg.n_kv_heads * E * 2  # wq, wo, wk, wv
    mlp = (3 if cfg.mlp == "swiglu" else 2) * D * F_  # w1 (gate), w3 (up), w2 (down)
    per_layer = attn + mlp + _norm_params_per_layer(cfg)
    body = cfg.n_layers * per_layer + D  # + final norm
    emb = cfg.vocab_size * D
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * D
    return body + head + (emb if embeddings else 0)


def flops_per_token(cfg: LlamaConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward): 6 * N_matmul + 12 * L * D * T.

    N_matmul counts the weights every token multiplies with: the blocks' linear layers and the
    output head (the embedding lookup and the norms do no matmul). 6 = 2 FLOPs per
    multiply-add x (1 forward + 2 backward). The second term is attention's two T x T matmuls
    (QK^T and AV: 2 * 2 * T * D per token per layer forward, x3 for training), counted for the
    full square as in the PaLM paper's MFU definition, not halved for the causal mask.
    """
    norms = cfg.n_layers * _norm_params_per_layer(cfg) + cfg.dim
    n_matmul = num_params(cfg, embeddings=False) - norms
    if cfg.tie_embeddings:
        n_matmul += cfg.vocab_size * cfg.dim  # the tied head still does its matmul
    return 6.0 * n_matmul + 12.0 * cfg.n_layers * cfg.dim * seq_len


def _norm_params_per_layer(cfg: LlamaConfig) -> int:
    return 2 * cfg.dim + (2 * cfg.head_dim if cfg.qk_norm else 0)  # (+ the q and k norms)


# ---------------------------------------------------------------- layers


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 (or wider) whatever the activation dtype: the mean of squares
        # underflows in bf16.
        x32 = at_least_fp32(x)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return x32.type_as(x) * self.weight

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """x in fp32, or as is if wider: a float64 model (the tests' reference) stays float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def rope_table(
    head_dim: int, max_seq_len: int, theta: float, device: torch.device | str | None = None
) -> torch.Tensor:
    """e^(i * angle) of each position x frequency: (T, E/2), complex64 (fp32 cos and sin).

    Complex on purpose: mixed-precision wrappers cast floating-point tensors (FSDP2 casts every
    forward input to its param dtype, `.to(bfloat16)` every floating buffer) but leave complex
    ones alone, so the angles stay fp32 on every path (as torchtitan's freqs_cis).
    """
    freqs = 1.0 / theta ** (
        torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim
    )
    positions = torch.arange(max_seq_len, dtype=torch.float32, device=device)
    angles = torch.outer(positions, freqs)  # (T, E/2)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope(
    x: torch.Tensor, table: torch.Tensor, positions: torch.Tensor | None = None
) -> torch.Tensor:
    """Rotate each (even, odd) pair of x: (B, T, heads, E) by its position's angle.

    Positions are 0..T-1 unless `positions` (B, T) gives each row its own (incremental decoding).
    The arithmetic is real (cos and sin read as a view of the complex table): compilers fuse it,
    where complex multiplication would fall back to separate kernels.
    """
    T = x.shape[1]
    pairs = at_least_fp32(x).reshape(*x.shape[:-1], -1, 2)  # (B, T, heads, E/2, 2)
    angles = torch.view_as_real(table)  # (T_max, E/2, 2): cos, sin in fp32
    angles = angles[:T, None] if positions is None else angles[positions].unsqueeze(2)
    cos, sin = angles[..., 0], angles[..., 1]  # (T or B x T, 1, E/2), broadcast over heads
    x0, x1 = pairs[..., 0], pairs[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return out.flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        # QK-norm: bounded attention logits, so a higher learning rate stays stable.
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None

    def forward(
        self, x: torch.Tensor, rope: torch.Tensor, positions=None, cache=None, mask=None
    ) -> torch.Tensor:
        B, T, _ = x.shape
        # -1 heads: under tensor parallelism each rank holds H/tp and K/tp of them.
        q = self.wq(x).view(B, T, -1, self.head_dim)  # (B, T, H, E)
        k = self.wk(x).view(B, T, -1, self.head_dim)  # (B, T, K, E)
        v = self.wv(x).view(B, T, -1, self.head_dim)
        if self.q_norm is not None:  # per head, over E; the cached path gets the same keys
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, rope, positions), apply_rope(k, rope, positions)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T, E)
        if cache is not None:
            # Incremental decoding (lmforge.model.kvcache): the cache stores this step's keys
            # and values and attends over every cached one, in place.
            y = cache.attend(q, k, v, positions)  # (B, H, T, E)
            return self.wo(y.transpose(1, 2).reshape(B, T, -1))
        # `mask` (B, 1, T, T) bool, True = may attend: a packed row's document mask (see
        # `document_mask`), or the same as a FlexAttention BlockMask (`document_block_mask`);
        # None = plain causal attention.
        # Grouped-query attention: each group of H/K query heads shares one key/value head.
        gqa = self.n_kv_heads != self.n_heads
        if not isinstance(mask, torch.Tensor | None):  # a BlockMask: packed rows on GPU
            y = flex(q.device.type)(q, k, v, block_mask=mask, enable_gqa=gqa)
            return self.wo(y.transpose(1, 2).reshape(B, T, -1))
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=mask is None,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )  # (B, H, T, E)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, D)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x); or ReLU-squared (`mlp="relu2"`): w2(relu(w1 x)^2)."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False) if cfg.mlp == "swiglu" else None
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w3 is None:
            return self.w2(F.relu(self.w1(x)).square())  # (B, T, F) -> (B, T, D)
        return self.w2(F.silu(self.w1(x)) * self.w3(x))  # (B, T, F) -> (B, T, D)


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = FeedForward(cfg)

    def forward(
        self, x: torch.Tensor, rope: torch.Tensor, positions=None, cache=None, mask=None
    ) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), rope, positions, cache, mask)  # pre-norm residual
        return x + self.mlp(self.mlp_norm(x))


# ---------------------------------------------------------------- the model


class Llama(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        # A ModuleDict keyed "0", "1", ...: FSDP2 wraps each block, and names stay stable.
        self.layers = nn.ModuleDict({str(i): Block(cfg) for i in range(cfg.n_layers)})
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # Not a parameter and not saved: rebuilt from the config, complex64 (fp32 angles) whatever
        # the model dtype (see rope_table and _apply).
        self.register_buffer("rope", torch.empty(0, dtype=torch.complex64), persistent=False)
        if self.tok_embeddings.weight.device.type != "meta":
            self.init_weights()

    def init_weights(self, seed: int | None = None) -> None:
        """(Re)initialise every weight in place; also after a meta-device build and `to_empty`.

        Normal(0, 0.02) for the inputs of each residual branch and the embeddings; the outputs
        of each branch (wo, w2) scaled by 1/sqrt(2 * n_layers) so the residual stream's variance
        stays flat with depth (GPT-2 / OLMo). An untied head gets std 1/sqrt(D), so the initial
        logits have unit scale at every width and the first loss sits near ln(V) at every preset.
        """
        if seed is not None:
            torch.manual_seed(seed)
        std, depth_std = 0.02, 0.02 / math.sqrt(2 * self.cfg.n_layers)
        nn.init.normal_(self.tok_embeddings.weight, std=std)
        for block in self.layers.values():
            inputs = (block.attn.wq, block.attn.wk, block.attn.wv, block.mlp.w1, block.mlp.w3)
            for lin in (lin for lin in inputs if lin is not None):
                nn.init.trunc_normal_(lin.weight, std=std, a=-3 * std, b=3 * std)
            for lin in (block.attn.wo, block.mlp.w2):
                if self.cfg.zero_init_out:  # modded-nanoGPT: each block starts as the identity
                    nn.init.zeros_(lin.weight)
                else:
                    nn.init.trunc_normal_(
                        lin.weight, std=depth_std, a=-3 * depth_std, b=3 * depth_std
                    )
            for norm in (block.attn_norm, block.mlp_norm, block.attn.q_norm, block.attn.k_norm):
                if norm is not None:
                    norm.reset_parameters()
        self.norm.reset_parameters()
        if not self.cfg.tie_embeddings:
            head_std = self.cfg.dim**-0.5
            nn.init.trunc_normal_(self.output.weight, std=head_std, a=-3 * head_std, b=3 * head_std)
        self.reset_rope()

    def reset_rope(self) -> None:
        device = self.tok_embeddings.weight.device
        self.rope = rope_table(
            self.cfg.head_dim, self.cfg.max_seq_len, self.cfg.rope_theta, device=device
        )

    def _apply(self, fn, recurse=True):
        """`.to()`, `.bfloat16()`, `.to_empty()`, ...: weights as asked, a tied head still tied;
        the position table only moves (rebuilt, complex64) to wherever the weights went."""
        table = self._buffers.pop("rope")
        try:
            super()._apply(fn, recurse)
        finally:
            self._buffers["rope"] = table
        # Moving across device types (meta -> cuda in `to_empty`) gives each module its own new
        # Parameter, which would leave the head a separate, never-initialised copy.
        if self.cfg.tie_embeddings and self.output.weight is not self.tok_embeddings.weight:
            self.output.weight = self.tok_embeddings.weight
        device = fn(torch.empty(0, device=table.device)).device
        if device != table.device or table.dtype != torch.complex64:
            self._buffers["rope"] = rope_table(
                self.cfg.head_dim, self.cfg.max_seq_len, self.cfg.rope_theta, device=device
            )
        return self

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        kv_cache=None,
        segments: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens (B, T) int -> logits (B, T, V).

        For incremental decoding, `positions` (B, T) are each row's positions and `kv_cache[i]`
        is layer i's cache (see lmforge.model.generate.KVCache); both default to a plain pass.
        For packed rows (several documents per row, fine-tuning), `segments` (B, T) says which
        document each token belongs to: attention stays within a document and positions restart
        at 0 for each, so every document is computed exactly as if it were alone in its row.
        """
        mask = None
        if segments is not None:
            flexible = segments.device.type in FLEX_DEVICE_TYPES and kv_cache is None
            mask = document_block_mask(segments) if flexible else document_mask(segments)
            positions = segment_positions(segments) if positions is None else positions
        T = (
            tokens.shape[1]
            if positions is None or segments is not None
            else int(positions.max()) + 1
        )
        if self.cfg.max_seq_len < T:
            raise ValueError(
                f"sequence of {T} tokens is longer than max_seq_len {self.cfg.max_seq_len}"
            )
        # A pipeline stage (train/pipeline.py) holds some of the parts, the others None: after
        # the first stage `tokens` are the activations (B, T, D); before the last they go on.
        x = tokens if self.tok_embeddings is None else self.tok_embeddings(tokens)  # (B, T, D)
        for i, block in enumerate(self.layers.values()):
            x = block(x, self.rope, positions, None if kv_cache is None else kv_cache[i], mask)
        if self.output is None:
            return x
        return self.logits(x)  # (B, T, V)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and output head (and the soft cap): hidden (B, T, D) -> logits (B, T, V).
        The one head every path uses (training, generation's KV-cached decoding)."""
        logits = self.output(self.norm(hidden))
        cap = self.cfg.logit_softcap
        return logits if cap is None else cap * torch.tanh(logits / cap)


def segment_positions(segments: torch.Tensor) -> torch.Tensor:
    """(B, T) document ids -> (B, T) positions that restart at 0 where the id changes."""
    T = segments.shape[1]
    index = torch.arange(T, device=segments.device).expand_as(segments)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - first  # (B, T)


def document_mask(segments: torch.Tensor) -> torch.Tensor:
    """(B, T) document ids -> (B, 1, T, T) bool: causal, and only within the same document."""
    T = segments.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
    same = segments[:, :, None] == segments[:, None, :]  # (B, T, T)
    return (same & causal).unsqueeze(1)


# Packed rows on these devices attend through FlexAttention: a dense (B, 1, T, T) mask rules
# out SDPA's flash and memory-efficient kernels, while a block mask keeps a fused kernel that
# also skips the blocks no document reaches. Elsewhere (CPU) the dense mask is exact and cheap.
FLEX_DEVICE_TYPES: tuple[str, ...] = ("cuda",)


def document_block_mask(segments: torch.Tensor):
    """(B, T) document ids -> the `document_mask` rule as a FlexAttention BlockMask."""
    from torch.nn.attention.flex_attention import create_block_mask

    B, T = segments.shape

    def same_document_causal(b, h, q, kv):
        return (segments[b, q] == segments[b, kv]) & (q >= kv)

    compiled = segments.device.type == "cuda"  # eager builds the (B, T, T) mask it avoids
    return create_block_mask(
        same_document_causal, B, None, T, T, device=segments.device, _compile=compiled
    )


@functools.cache
def flex(device_type: str):
    """flex_attention, compiled where it runs as a fused kernel; eager (a reference
    implementation that materialises the scores) elsewhere, for tests on CPU."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False) if device_type == "cuda" else flex_attention


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss in nats, computed in fp32 (or wider); targets of -100 are ignored."""
    return F.cross_entropy(
        at_least_fp32(logits.flatten(0, 1)), targets.flatten(0, 1).long(), ignore_index=-100
    )
