"""optim.name=muon: Muon on the blocks' 2-D matrices, AdamW on the rest, as one optimizer that
steps, follows the schedule and checkpoints (DCP) like AdamW."""

from __future__ import annotations

import pytest
import torch

from lmforge import LmforgeError
from lmforge.model.llama import Llama, LlamaConfig, cross_entropy
from lmforge.train.checkpoint import Checkpointer
from lmforge.train.config import OptimConfig
from lmforge.train.optim import MuonWithAdamW, build_optimizer, set_lr

CFG = LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48)
CPU = torch.device("cpu")


def model(tie: bool = True) -> Llama:
    torch.manual_seed(0)
    return Llama(LlamaConfig(**{**CFG.to_dict(), "tie_embeddings": tie}))


def test_muon_gets_the_blocks_matrices_and_adamw_the_rest():
    m = model(tie=False)
    opt = build_optimizer(OptimConfig(name="muon", lr=1e-3, muon_lr=0.02), m, CPU)
    assert isinstance(opt, MuonWithAdamW)
    muon = {id(p) for g in opt.muon.param_groups for p in g["params"]}
    adamw = {id(p) for g in opt.adamw.param_groups for p in g["params"]}
    names = {id(p): n for n, p in m.named_parameters()}
    # 2 layers x (wq, wk, wv, wo, w1, w2, w3) = 14 matrices; the rest: embeddings, untied head,
    # 2 x 2 block norms and the final norm = 7.
    assert len(muon) == 14 and len(adamw) == 7 and not muon & adamw
    assert all(names[i].startswith("layers.") and names[i].endswith("weight") for i in muon)
    assert {names[i] for i in adamw} >= {"tok_embeddings.weight", "output.weight", "norm.weight"}
    assert len(muon) + len(adamw) == len(list(m.parameters()))
    # AdamW keeps its decay split: no decay on embeddings, head is a matrix (decays), norms none.
    decayed = [g for g in opt.adamw.param_groups if g["weight_decay"] > 0]
    assert [names[id(p)] for g in decayed for p in g["params"]] == ["output.weight"]


def test_the_schedule_sets_muon_groups_at_their_ratio():
    opt = build_optimizer(OptimConfig(name="muon", lr=1e-3, muon_lr=0.02), model(), CPU)
    set_lr(opt, 5e-4)
    assert [g["lr"] for g in opt.muon.param_groups] == [pytest.approx(1e-2)]
    assert {g["lr"] for g in opt.adamw.param_groups} == {5e-4}


def test_a_muon_step_decreases_the_loss_on_a_tiny_batch():
    m = model()
    opt = build_optimizer(OptimConfig(name="muon", lr=3e-3, muon_lr=0.02), m, CPU)
    torch.manual_seed(1)
    tokens = torch.randint(0, 64, (4, 17))
    losses = []
    for _ in range(5):
        opt.zero_grad(set_to_none=True)
        loss = cross_entropy(m(tokens[:, :-1]), tokens[:, 1:])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses
    assert opt.state[m.layers["0"].attn.wq.weight]["momentum_buffer"].abs().sum() > 0


def trained(steps: int) -> tuple[Llama, MuonWithAdamW]:
    m = model()
    opt = build_optimizer(OptimConfig(name="muon"), m, CPU)
    torch.manual_seed(2)
    for _ in range(steps):
        tokens = torch.randint(0, 64, (2, 9))
        opt.zero_grad(set_to_none=True)
        cross_entropy(m(tokens[:, :-1]), tokens[:, 1:]).backward()
        opt.step()
    return m, opt


def test_a_muon_checkpoint_round_trips_and_resumes_identically(tmp_path):
    m, opt = trained(2)
    set_lr(opt, 7e-4)
    ckpt = Checkpointer(str(tmp_path / "ckpt"), keep_last=2, rank=0, world_size=1, in_ray=False)
    ckpt.save(2, 4, m, opt, {})
    ckpt.close()
    restored = model()
    restored_opt = build_optimizer(OptimConfig(name="muon"), restored, CPU)
    assert ckpt.restore(restored, restored_opt)["step"] == 2
    for (name, a), b in zip(m.state_dict().items(), restored.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    wq, rwq = m.layers["1"].attn.wq.weight, restored.layers["1"].attn.wq.weight
    buf = restored_opt.state[rwq]["momentum_buffer"]
    assert torch.equal(buf, opt.state[wq]["momentum_buffer"])
    emb, remb = m.tok_embeddings.weight, restored.tok_embeddings.weight
    assert torch.equal(restored_opt.state[remb]["exp_avg_sq"], opt.state[emb]["exp_avg_sq"])
    assert [g["lr"] for g in restored_opt.param_groups] == [g["lr"] for g in opt.param_groups]
    # The inner optimizers read the restored state: one more step on both is the same step.
    torch.manual_seed(3)
    tokens = torch.randint(0, 64, (2, 9))
    for mm, oo in ((m, opt), (restored, restored_opt)):
        oo.zero_grad(set_to_none=True)
        cross_entropy(mm(tokens[:, :-1]), tokens[:, 1:]).backward()
        oo.step()
    assert restored_opt.muon.state is restored_opt.state
    for a, b in zip(m.parameters(), restored.parameters(), strict=True):
        assert torch.equal(a, b)


def test_muon_refuses_sharded_matrices_in_one_line(monkeypatch):
    import lmforge.train.optim as optim

    monkeypatch.setattr(optim, "DTensor", torch.nn.Parameter)  # every parameter "is sharded"
    with pytest.raises(LmforgeError) as e:
        build_optimizer(OptimConfig(name="muon"), model(), CPU)
    assert "\n" not in str(e.value) and "resources.num_workers=1" in str(e.value)
    assert isinstance(build_optimizer(OptimConfig(), model(), CPU), torch.optim.AdamW)
