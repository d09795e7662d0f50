"""Hugging Face interoperability: export an lmforge artifact as a `LlamaForCausalLM` folder, and
import a Llama-family HF folder (safetensors) as an lmforge artifact.

The only non-obvious part is rotary embeddings. lmforge (like Meta's reference code) rotates
interleaved pairs (x0, x1), (x2, x3), ... of each head; transformers' Llama rotates the two
halves of each head (x_i with x_{i + E/2}). The attention scores are the same when the rows of
wq and wk are permuted per head, interleaved -> halves; `to_hf_rows` does that on export and
`from_hf_rows` undoes it on import (the same permutation as transformers' own Llama
conversion script). Everything else is a renaming.
"""

from __future__ import annotations

import json
import re
from typing import Any

import torch

from lmforge import LmforgeError, storage
from lmforge.model.artifact import (
    TOKENIZER,
    WEIGHTS,
    load_model_config,
    save_artifact,
)
from lmforge.model.chat import CHAT_TEMPLATE, END
from lmforge.model.llama import LlamaConfig
from lmforge.model.special import (
    GENERATION_CONFIG,
    TOKENIZER_CONFIG,
    artifact_chat_template,
    import_special_files,
    is_lmforge_tokenizer,
    load_special_tokens,
)

# lmforge name -> HF name; {i} is the layer index.
_LAYER_NAMES = {
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wk.weight": "self_attn.k_proj.weight",
    "attn.wv.weight": "self_attn.v_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "mlp.w1.weight": "mlp.gate_proj.weight",
    "mlp.w3.weight": "mlp.up_proj.weight",
    "mlp.w2.weight": "mlp.down_proj.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
}
_TOP_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
SUPPORTED_MODEL_TYPES = ("llama", "mistral")


def to_hf_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of wq/wk, per head: interleaved rotary pairs -> rotate-half order. (H*E, D)"""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def from_hf_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of `to_hf_rows`."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def state_dict_to_hf(tensors: dict[str, torch.Tensor], cfg: LlamaConfig) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in tensors.items():
        if name in _TOP_NAMES:
            out[_TOP_NAMES[name]] = t
            continue
        _, i, rest = name.split(".", 2)  # layers.{i}.{rest}
        if rest == "attn.wq.weight":
            t = to_hf_rows(t, cfg.n_heads)
        elif rest == "attn.wk.weight":
            t = to_hf_rows(t, cfg.n_kv_heads)
        out[f"model.layers.{i}.{_LAYER_NAMES[rest]}"] = t
    if cfg.tie_embeddings:
        out.pop("lm_head.weight", None)
    return {k: v.contiguous() for k, v in out.items()}


def state_dict_from_hf(
    tensors: dict[str, torch.Tensor], cfg: LlamaConfig
) -> dict[str, torch.Tensor]:
    top = {v: k for k, v in _TOP_NAMES.items()}
    layer = {v: k for k, v in _LAYER_NAMES.items()}
    out = {}
    for name, t in tensors.items():
        if name in top:
            out[top[name]] = t
            continue
        parts = name.split(".", 3)  # model.layers.{i}.{rest}
        if len(parts) != 4 or parts[:2] != ["model", "layers"] or parts[3] not in layer:
            if name.endswith("rotary_emb.inv_freq"):
                continue  # a buffer some old checkpoints saved; rebuilt from rope_theta
            raise LmforgeError(
                f"unexpected tensor '{name}' in a Llama checkpoint: this architecture is not supported"
            )
        rest = layer[parts[3]]
        if rest == "attn.wq.weight":
            t = from_hf_rows(t, cfg.n_heads)
        elif rest == "attn.wk.weight":
            t = from_hf_rows(t, cfg.n_kv_heads)
        out[f"layers.{parts[2]}.{rest}"] = t.contiguous()
    if cfg.tie_embeddings:
        out.pop("output.weight", None)
    return out


# ---------------------------------------------------------------- export


def _special_ids(artifact: str, tokenizer_json: str | None) -> dict[str, int | None]:
    if tokenizer_json is None:
        return {}
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer_json)
    if is_lmforge_tokenizer(tok):
        return {name: tok.token_to_id(f"<|{name}|>") for name in ("bos", "eos", "pad", "end")}
    special = load_special_tokens(artifact, tok)  # an imported model's own (model/special.py)
    config_path = storage.join(artifact, TOKENIZER_CONFIG)
    pad = storage.read_json(config_path).get("pad_token") if storage.exists(config_path) else None
    pad = pad.get("content") if isinstance(pad, dict) else pad
    return {
        "bos": special.bos_id,
        "eos": special.eos_id,
        "pad": tok.token_to_id(pad) if isinstance(pad, str) else None,
    }


def hf_config(
    cfg: LlamaConfig, dtype: torch.dtype, special: dict[str, int | None]
) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        # Both spellings: transformers >= 5 reads rope_parameters, older tools rope_theta.
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "bos_token_id": special.get("bos"),
        "eos_token_id": special.get("eos"),
        "pad_token_id": special.get("pad"),
        "use_cache": True,
    }


def check_hf_representable(cfg: LlamaConfig, artifact: str) -> None:
    """HF Llama has no QK-norm, soft cap or ReLU-squared MLP: refuse rather than export a
    model that would load and compute something else."""
    options = {
        "qk_norm": cfg.qk_norm,
        "logit_softcap": cfg.logit_softcap is not None,
        "mlp": cfg.mlp != "swiglu",
    }
    unsupported = [name for name, on in options.items() if on]
    if unsupported:
        raise LmforgeError(
            f"{artifact}: model.{', model.'.join(unsupported)} cannot be represented as a "
            f"Hugging Face Llama; export a model trained without them (serve it with lmforge)"
        )


def export_hf(artifact: str, out: str) -> list[str]:
    """Write `out` as a transformers/vLLM-loadable LlamaForCausalLM folder; returns the files."""
    from safetensors.torch import load, save

    cfg = load_model_config(artifact)
    check_hf_representable(cfg, artifact)
    tensors = load(storage.read_bytes(storage.join(artifact, WEIGHTS)))
    if cfg.tie_embeddings:
        tensors.pop("output.weight", None)
    dtype = tensors["tok_embeddings.weight"].dtype
    tok_path = storage.join(artifact, TOKENIZER)
    tokenizer_json = storage.read_text(tok_path) if storage.exists(tok_path) else None
    special = _special_ids(artifact, tokenizer_json)
    files = {
        "config.json": json.dumps(hf_config(cfg, dtype, special), indent=2) + "\n",
        "generation_config.json": json.dumps(
            {
                "bos_token_id": special.get("bos"),
                # A chat turn ends with <|end|>; a document with <|eos|>: either stops generation.
                "eos_token_id": [
                    i for i in (special.get("eos"), special.get("end")) if i is not None
                ]
                or None,
                "pad_token_id": special.get("pad"),
            },
            indent=2,
        )
        + "\n",
    }
    if tokenizer_json is not None:
        files["tokenizer.json"] = tokenizer_json
        files["tokenizer_config.json"] = (
            json.dumps(
                {
                    "tokenizer_class": "PreTrainedTokenizerFast",
                    "bos_token": "<|bos|>" if special.get("bos") is not None else None,
                    "eos_token": "<|eos|>" if special.get("eos") is not None else None,
                    "pad_token": "<|pad|>" if special.get("pad") is not None else None,
                    "model_max_length": cfg.max_seq_len,
                    "clean_up_tokenization_spaces": False,
                    "chat_template": artifact_chat_template(artifact) or CHAT_TEMPLATE,
                    "extra_special_tokens": {}
                    if special.get("end") is None
                    else {"end_token": END},
                },
                indent=2,
            )
            + "\n"
        )
    for name in (TOKENIZER_CONFIG, GENERATION_CONFIG):  # an imported model's own, kept
        if tokenizer_json is not None and storage.exists(storage.join(artifact, name)):
            files[name] = storage.read_text(storage.join(artifact, name))
    storage.makedirs(out)
    written = []
    for name, text in files.items():
        storage.write_text(storage.join(out, name), text)
        written.append(storage.join(out, name))
    weights = state_dict_to_hf(tensors, cfg)
    storage.write_bytes(
        storage.join(out, "model.safetensors"), save(weights, metadata={"format": "pt"})
    )
    written.append(storage.join(out, "model.safetensors"))
    return written


# ---------------------------------------------------------------- import


def config_from_hf(hf: dict[str, Any], source: str) -> LlamaConfig:
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise LmforgeError(
            f"{source}: model_type '{model_type}' is not a Llama-family model lmforge can import ({', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise LmforgeError(
                f"{source}: {key}=true is not supported (lmforge's Llama has no biases)"
            )
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise LmforgeError(
            f"{source}: rope scaling '{rope.get('rope_type', rope.get('type'))}' is not supported; only plain RoPE imports exactly"
        )
    if hf.get("sliding_window") and model_type == "mistral":
        raise LmforgeError(f"{source}: sliding-window attention is not supported")
    n_heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // n_heads
    if head_dim * n_heads != hf["hidden_size"]:
        raise LmforgeError(
            f"{source}: head_dim {head_dim} x {n_heads} heads != hidden_size {hf['hidden_size']}: not supported"
        )
    theta = rope.get("rope_theta") or hf.get("rope_theta", 10000.0)
    return LlamaConfig(
        vocab_size=hf["vocab_size"],
        dim=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        ffn_dim=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 2048),
        rope_theta=float(theta),
        norm_eps=hf.get("rms_norm_eps", 1e-5),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )


def _read_hf_tensors(hf_dir: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    index = storage.join(hf_dir, "model.safetensors.index.json")
    if storage.exists(index):
        shards = _index_shards(index, hf_dir)
    elif storage.exists(storage.join(hf_dir, "model.safetensors")):
        shards = ["model.safetensors"]
    else:
        raise LmforgeError(
            f"{hf_dir}: no model.safetensors or model.safetensors.index.json (only safetensors checkpoints import)"
        )
    tensors: dict[str, torch.Tensor] = {}
    for shard in shards:
        tensors.update(load(storage.read_bytes(storage.join(hf_dir, shard))))
    return tensors


def _index_shards(index: str, hf_dir: str) -> list[str]:
    """The shard files an index names: plain file names beside it. A downloaded index is not
    trusted to point elsewhere (`../../.ssh/id_rsa`, `/etc/passwd`, a URI)."""
    weight_map = storage.read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise LmforgeError(f"{index}: no weight_map (tensor name -> shard file); re-download it")
    shards = sorted({str(shard) for shard in weight_map.values()})
    for shard in shards:
        if not re.fullmatch(r"[^/\\:]+", shard) or shard in (".", ".."):
            raise LmforgeError(
                f"{index}: weight_map names the shard {shard!r}, which is not a file in {hf_dir} "
                "(shards are plain file names beside the index: no directories, '..', absolute "
                "paths or URIs); fix the index or re-download the model"
            )
    return shards


def import_hf(hf_dir: str, out: str, dtype: str | None = None) -> LlamaConfig:
    """Turn a Llama-family HF folder into an lmforge artifact at `out`."""
    cfg_path = storage.join(hf_dir, "config.json")
    if not storage.exists(cfg_path):
        raise LmforgeError(f"{hf_dir}: no config.json; expected a Hugging Face model folder")
    hf = storage.read_json(cfg_path)
    cfg = config_from_hf(hf, hf_dir)
    tok_path = storage.join(hf_dir, "tokenizer.json")
    if not storage.exists(tok_path):
        raise LmforgeError(
            f"{hf_dir}: no tokenizer.json; lmforge needs a fast tokenizer (convert it with transformers' AutoTokenizer(...).save_pretrained)"
        )
    tensors = state_dict_from_hf(_read_hf_tensors(hf_dir), cfg)
    if dtype:
        tensors = {k: v.to(getattr(torch, dtype)) for k, v in tensors.items()}
    save_artifact(
        out,
        tensors,
        cfg,
        tokenizer_json=storage.read_text(tok_path),
        resolved_config=f"# imported from {hf_dir}\n",
    )
    import_special_files(hf_dir, out, hf)
    storage.mark_success(out, {"imported_from": hf_dir})
    return cfg
