"""Prompt drift: a tiny model trained here on one corpus, served, then sent prompts from that
corpus and from another; the drift ratio must rise with the other corpus."""

from __future__ import annotations

import random
import time

import pytest
import torch
from fastapi.testclient import TestClient

from lmforge import storage
from lmforge.data.tokenizer import train_bpe
from lmforge.model import Llama, LlamaConfig
from lmforge.model.artifact import save_artifact, write_version
from lmforge.serve.config import ServeArgs
from lmforge.serve.drift import prompt_bits_per_byte, served_model_info
from lmforge.serve.openai import local_app

ADJ = ["quick", "lazy", "brown", "small", "happy", "old", "green", "quiet"]
ANIMAL = ["fox", "dog", "cat", "horse", "bird", "mouse", "goat", "cow"]
VERB = ["jumps over", "runs past", "sleeps near", "looks at", "walks around", "sits by"]
PLACE = ["the fence", "the river", "the barn", "the old tree", "the green hill", "the house"]


def sentence(rng: random.Random) -> str:
    return f"the {rng.choice(ADJ)} {rng.choice(ANIMAL)} {rng.choice(VERB)} {rng.choice(PLACE)}."


def other_corpus(rng: random.Random) -> str:
    """Text unlike the training corpus: hex ids, digits and punctuation."""
    return " ".join(f"0x{rng.getrandbits(32):08X}#{rng.randint(0, 99999)}" for _ in range(2))


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A training run dir: model/ (an artifact trained for ~2 s) and train_summary.json with
    the validation bits per byte on held-out sentences of the same corpus."""
    rng = random.Random(0)
    train = [sentence(rng) for _ in range(400)]
    tok = train_bpe(train, vocab_size=300, min_frequency=1)
    cfg = LlamaConfig(
        vocab_size=tok.get_vocab_size(), dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
        ffn_dim=128, max_seq_len=128,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Llama(cfg)
    eos = tok.token_to_id("<|eos|>")
    stream = []
    for text in train:
        stream += [eos, *tok.encode(text).ids]
    data = torch.tensor(stream)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        starts = torch.randint(0, len(data) - 33, (16,))
        batch = torch.stack([data[s : s + 33] for s in starts])  # (B, 33)
        logits = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    held_out = [sentence(random.Random(1000 + i)) for i in range(20)]
    val_bpb = sum(prompt_bits_per_byte(model, tok, t) for t in held_out) / len(held_out)
    run = tmp_path_factory.mktemp("run")
    save_artifact(str(run / "model"), model.state_dict(), cfg, tokenizer_json=tok.to_str())
    storage.write_json(str(run / "train_summary.json"), {"steps": 150, "val_bpb": val_bpb})
    return run, val_bpb


def test_validation_bpb_comes_from_override_lineage_or_train_summary(trained_run, tmp_path):
    run, val_bpb = trained_run
    artifact = str(run / "model")
    info = served_model_info(artifact)
    assert info.version.startswith("v-") and info.val_bpb == pytest.approx(val_bpb)
    assert served_model_info(artifact, val_bpb=9.5).val_bpb == 9.5
    copy = tmp_path / "model"
    copy.mkdir()
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        (copy / name).write_bytes((run / "model" / name).read_bytes())
    write_version(str(copy), val_bpb=1.25)
    assert served_model_info(str(copy)) == type(info)(info.version, 1.25)


def test_drift_ratio_rises_when_prompts_come_from_another_corpus(trained_run):
    run, val_bpb = trained_run
    assert val_bpb < 2.0  # the model did learn its corpus
    model = {"name": "tiny", "artifact": str(run), "torch_threads": 1}
    args = ServeArgs(
        models=[model],
        api_key_env="LMFORGE_UNSET_ENV",
        drift={"sample_rate": 1.0, "window": 8},
    )
    app = local_app(args)
    drift = app.state.drift

    def send(prompts: list[str]) -> float:
        before = drift.scored
        for prompt in prompts:
            body = {"model": "tiny", "prompt": prompt, "max_tokens": 1, "temperature": 0}
            assert client.post("/v1/completions", json=body).status_code == 200
        deadline = time.monotonic() + 30
        while drift.scored < before + len(prompts) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert drift.scored == before + len(prompts)
        return drift.ratio("tiny")

    with TestClient(app) as client:
        same = send([sentence(random.Random(5000 + i)) for i in range(8)])
        other = send([other_corpus(random.Random(i)) for i in range(8)])  # fills the window
        metrics = client.get("/metrics").text
    print(f"drift ratio: {same:.2f} on the training corpus, {other:.2f} on another")
    assert 0.5 < same < 1.5
    assert other > 2.5 * same
    assert f'lmforge_drift_ratio{{model="tiny"}} {other}' in metrics
    assert f'lmforge_validation_bits_per_byte{{model="tiny"}} {val_bpb}' in metrics
    rolling = drift.prompt_bpb("tiny")
    assert f'lmforge_prompt_bits_per_byte{{model="tiny"}} {rolling}' in metrics
    assert rolling == pytest.approx(other * val_bpb)
