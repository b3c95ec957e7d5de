"""The learning-rate schedule and the optimiser's parameter groups (smapctl/train/schedule.py)."""

import pytest
import torch
from torch import nn

from smapctl.models.smap import SMAP, SMAPConfig
from smapctl.train.config import TrainConfig
from smapctl.train.schedule import build_optimizer, build_scheduler, lr_at

# ------------------------------------------------------------------------------------------ schedule


def test_lr_at_key_steps():
    cfg = TrainConfig(max_steps=110, lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(4, cfg) == pytest.approx(5e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(10, cfg) == pytest.approx(1e-3)  # cosine starts at the peak
    assert lr_at(60, cfg) == pytest.approx(1e-4 + 0.9e-3 * 0.5)  # half way: the middle
    assert lr_at(110, cfg) == pytest.approx(1e-4)
    assert lr_at(500, cfg) == pytest.approx(1e-4)  # past the end: stays at the floor
    decay = [lr_at(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(decay, decay[1:], strict=False))


def test_lr_at_without_warmup_or_decay():
    assert lr_at(0, TrainConfig(max_steps=10, lr=2e-4)) == pytest.approx(2e-4)
    assert lr_at(10, TrainConfig(max_steps=10, lr=2e-4)) == pytest.approx(0.0, abs=1e-20)
    flat = TrainConfig(max_steps=10, lr=2e-4, min_lr_ratio=1.0)
    assert [lr_at(s, flat) for s in range(12)] == pytest.approx([2e-4] * 12)
    # Warm-up as long as training: constant after it, no division by zero.
    long = TrainConfig(max_steps=5, lr=1e-3, warmup_steps=8)
    assert lr_at(7, long) == pytest.approx(1e-3) and lr_at(20, long) == pytest.approx(1e-3)
    # Warm-up exactly as long as training (no decay steps at all): the full lr after it, no division by 0.
    exact = TrainConfig(max_steps=8, lr=1e-3, warmup_steps=8)
    assert lr_at(7, exact) == pytest.approx(1e-3) and lr_at(8, exact) == pytest.approx(1e-3)


def test_scheduler_follows_lr_at_for_every_group():
    cfg = TrainConfig(max_steps=20, lr=1e-3, warmup_steps=5, min_lr_ratio=0.2)
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([{"params": [a]}, {"params": [b], "lr": 4e-3}], lr=cfg.lr)
    sched = build_scheduler(opt, cfg)
    for step in range(25):
        assert opt.param_groups[0]["lr"] == pytest.approx(lr_at(step, cfg))
        assert opt.param_groups[1]["lr"] == pytest.approx(4 * lr_at(step, cfg))
        opt.step()
        sched.step()


# ------------------------------------------------------------------------------------------ optimiser


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.pos_embed = nn.Parameter(torch.zeros(1, 4, 8))
        self.conv = nn.Conv2d(3, 8, 3)
        self.lin = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)


def test_optimizer_decays_only_layer_weights():
    m = _Toy()
    opt = build_optimizer(m, TrainConfig(weight_decay=0.05, lr=3e-4, betas=(0.9, 0.95)))
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.05 and plain["weight_decay"] == 0.0
    assert {id(p) for p in decayed["params"]} == {id(m.conv.weight), id(m.lin.weight)}
    expect_plain = [m.embed.weight, m.pos_embed, m.conv.bias, m.lin.bias, m.norm.weight, m.norm.bias]
    assert {id(p) for p in plain["params"]} == {id(p) for p in expect_plain}  # frozen ones left out
    assert all(g["lr"] == 3e-4 and g["betas"] == (0.9, 0.95) for g in opt.param_groups)
    assert decayed["fused"]  # CPU has a fused AdamW kernel in this torch


def test_optimizer_on_smap_leaves_tokens_and_embeddings_undecayed():
    size = dict(enc_width=32, enc_depth=1, enc_heads=2, dec_width=32, dec_depth=1, dec_heads=2)
    model = SMAP(SMAPConfig(image_size=16, patch_size=8, num_latent_tokens=4, num_classes=5, **size))
    opt = build_optimizer(model, TrainConfig())
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = sorted(names[id(p)] for p in opt.param_groups[0]["params"])
    plain = {names[id(p)] for p in opt.param_groups[1]["params"]}
    assert all(n.endswith("weight") and "norm" not in n for n in decayed)
    assert {"encoder.pos_embed", "encoder.queries", "decoder.mask_token", "class_embed.table.weight"} <= plain
    assert "encoder.patch_embed.proj.weight" in decayed
    assert len(decayed) + len(plain) == len(names)
    loss = model(torch.randn(2, 3, 16, 16), torch.tensor([0, 1])).recon.square().mean()
    loss.backward()
    opt.step()  # the fused CPU kernel runs


def test_optimizer_from_parameter_list_uses_ndim_and_lr_override():
    w, b = nn.Parameter(torch.zeros(3, 3)), nn.Parameter(torch.zeros(3))
    opt = build_optimizer([w, b], TrainConfig(weight_decay=0.1), lr=5e-5)
    assert opt.param_groups[0]["params"] == [w] and opt.param_groups[0]["weight_decay"] == 0.1
    assert opt.param_groups[1]["params"] == [b] and opt.param_groups[1]["lr"] == 5e-5


def test_scheduler_is_relative_to_the_recipes_lr_not_a_fixed_one():
    """`build_scheduler`'s factor is lr_at / cfg.lr: with an lr other than 1e-3 the group's rate is still
    lr_at's (a factor divided by anything else would scale the whole schedule)."""
    cfg = TrainConfig(max_steps=12, lr=2e-4, warmup_steps=3, min_lr_ratio=0.1)
    p = nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([p], lr=cfg.lr)
    sched = build_scheduler(opt, cfg)
    for step in range(14):
        assert opt.param_groups[0]["lr"] == pytest.approx(lr_at(step, cfg))
        opt.step()
        sched.step()


def test_attention_in_proj_weight_is_decayed_and_its_bias_is_not():
    """`nn.MultiheadAttention` holds its projection as `in_proj_weight`: a layer's weight matrix (decayed,
    by the `_weight` suffix), beside an undecayed `in_proj_bias`."""
    attn = nn.MultiheadAttention(8, 2)
    decayed, plain = build_optimizer(attn, TrainConfig(weight_decay=0.05)).param_groups
    assert {id(p) for p in decayed["params"]} == {id(attn.in_proj_weight), id(attn.out_proj.weight)}
    assert {id(p) for p in plain["params"]} == {id(attn.in_proj_bias), id(attn.out_proj.bias)}


def test_a_tied_weight_is_in_one_group_once():
    """A parameter shared by two layers is one parameter of the optimiser (AdamW refuses one given
    twice, and would step it twice)."""
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    b.weight = a.weight
    model = nn.Sequential(a, b)
    decayed, plain = build_optimizer(model, TrainConfig(weight_decay=0.05)).param_groups
    assert [id(p) for p in decayed["params"]] == [id(a.weight)]
    assert sorted(map(id, plain["params"])) == sorted([id(a.bias), id(b.bias)])


def test_frozen_tensors_of_a_parameter_list_are_left_out():
    w, frozen = nn.Parameter(torch.zeros(3, 3)), nn.Parameter(torch.zeros(3, 3), requires_grad=False)
    opt = build_optimizer([w, frozen], TrainConfig())
    assert [p for g in opt.param_groups for p in g["params"]] == [w]
