import dataclasses

import pytest
import torch

from smapctl.models.card import CARD, CARDConfig
from smapctl.models.class_embed import ClassEmbedding
from smapctl.presets import CARD_PRESETS, PAPER_PARAMETERS

K, C = 6, 4


def tiny_cfg(**kw) -> CARDConfig:
    base = dict(num_tokens=K, token_dim=C, num_classes=3, class_dim=8, width=32, depth=2, num_heads=4)
    return CARDConfig(**{**base, "head_depth": 2, "head_width": 32, **kw})


def tiny_card(dtype=torch.float32, **kw) -> CARD:
    """A tiny CARD moved off its zero initialisation (so the flow head and gates are not all zero)."""
    torch.manual_seed(0)
    model = CARD(tiny_cfg(**kw)).to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def sample(model: CARD, labels, seed=0, **kw):
    return model.sample(labels, steps=4, generator=torch.Generator().manual_seed(seed), **kw)


def test_config_validation():
    with pytest.raises(ValueError, match="num_heads"):
        tiny_cfg(num_heads=5)
    with pytest.raises(ValueError, match="class_dropout"):
        tiny_cfg(class_dropout=1.0)


def test_loss_decreases_on_fixed_sequences():
    torch.manual_seed(0)
    model = CARD(tiny_cfg(class_dropout=0.0))
    tokens, labels = torch.randn(4, K, C), torch.tensor([0, 1, 2, 0])

    def eval_loss():  # the same t and noise draws every time
        return model(tokens, labels, torch.Generator().manual_seed(123)).loss.item()

    before = eval_loss()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(60):
        loss = model(tokens, labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert eval_loss() < 0.7 * before


def test_transformer_is_causal():
    model = tiny_card()
    tokens, labels = torch.randn(2, K, C), torch.tensor([0, 1])
    j = 2
    changed = tokens.clone()
    changed[:, j] += 1.0
    z, z2 = model(tokens, labels).z, model(changed, labels).z
    # Position p reads token p-1: outputs up to position j are untouched, position j+1 changes.
    torch.testing.assert_close(z[:, : j + 1], z2[:, : j + 1])
    assert not torch.allclose(z[:, j + 1], z2[:, j + 1])


def test_each_token_is_the_flow_target_of_its_own_condition():
    """Token i is the flow head's target under the transformer's output at position i (which has read
    tokens < i), and so for each of the `diffusion_batch_mul` noise draws. A pairing off by one (the
    condition of token i + 1, which has read token i) or across images lowers the loss just as well, and
    the causality test looks at z, not at what the head is given."""
    model = tiny_card(diffusion_batch_mul=2)
    tokens, labels = torch.randn(3, K, C), torch.tensor([0, 1, 2])
    out = model(tokens, labels, torch.Generator().manual_seed(5))
    rows = [tokens.reshape(-1, C), out.z.reshape(-1, out.z.shape[-1])]  # image by image, token by token
    expected = model.head(*(torch.cat([r, r]) for r in rows), torch.Generator().manual_seed(5))
    torch.testing.assert_close(out.loss, expected, rtol=0, atol=0)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_kv_cache_equals_recomputation(dtype, tol):
    model = tiny_card(dtype)
    labels = torch.tensor([0, 2, 1])
    for kw in ({}, {"cfg_scale": 3.0, "cfg_schedule": "linear", "method": "heun"}):
        cached = sample(model, labels, use_kv_cache=True, **kw)
        full = sample(model, labels, use_kv_cache=False, **kw)
        assert cached.shape == (3, K, C) and cached.dtype == dtype
        torch.testing.assert_close(cached, full, atol=tol, rtol=tol)


def test_kv_cache_under_bf16_autocast():
    model = tiny_card()
    with torch.no_grad():  # a class that matters: rows mixed up by the cache would differ by far more
        for p in model.class_cond.parameters():
            p.mul_(10)
    labels = torch.tensor([0, 1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cached = sample(model, labels, cfg_scale=2.0, use_kv_cache=True)
        full = sample(model, labels, cfg_scale=2.0, use_kv_cache=False)
        swapped = sample(model, labels.flip(0), cfg_scale=2.0, use_kv_cache=True)
    assert cached.dtype == torch.float32 and bool(torch.isfinite(cached).all())
    torch.testing.assert_close(cached, full, atol=0.05, rtol=0.05)  # bf16 rounds the two paths apart
    assert (cached - swapped).abs().max() > 0.3  # the same noise, the other class: 0.46 on a Zen 3 EPYC


def test_any_prefix_length_gives_the_prefix_of_a_full_sample():
    model = tiny_card()
    labels = torch.tensor([1, 2])
    full = sample(model, labels, cfg_scale=2.0, cfg_schedule="linear")
    for k in (0, 1, 3, K):
        part = sample(model, labels, cfg_scale=2.0, cfg_schedule="linear", num_tokens=k)
        assert part.shape == (2, k, C)
        torch.testing.assert_close(part, full[:, :k])
    with pytest.raises(ValueError, match="num_tokens"):
        sample(model, labels, num_tokens=K + 1)


def test_guidance_rows_are_conditional_then_null():
    model = tiny_card()
    labels = torch.tensor([0, 1])
    plain = sample(model, labels)
    # MAR's linear schedule guides the first of K tokens with 1 + (s - 1) / K, the last with s.
    linear = sample(model, labels, cfg_scale=4.0, cfg_schedule="linear")
    first = sample(model, labels, cfg_scale=1 + 3 / K)
    torch.testing.assert_close(linear[:, 0], first[:, 0], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(linear[:, 0], plain[:, 0], atol=1e-3)
    assert not torch.allclose(linear[:, -1], plain[:, -1])
    # Scale 0 keeps only the unconditional velocity: sampling the null class without guidance.
    null = torch.full_like(labels, model.class_cond.null_class)
    torch.testing.assert_close(
        sample(model, labels, cfg_scale=0.0), sample(model, null), atol=1e-5, rtol=1e-5
    )


def test_sampling_is_deterministic_given_a_generator():
    model = tiny_card()
    labels = torch.tensor([0, 1])
    assert torch.equal(sample(model, labels, seed=4), sample(model, labels, seed=4))
    assert not torch.equal(sample(model, labels, seed=4), sample(model, labels, seed=5))


def test_shared_class_embedding_is_the_same_parameter_and_can_be_frozen():
    shared = ClassEmbedding(3, 8)
    table = shared.table.weight.detach().clone()
    model = CARD(tiny_cfg(), class_embed=shared)
    assert model.class_cond.embed is shared
    assert model.class_cond.embed.table.weight is shared.table.weight
    assert torch.equal(shared.table.weight, table)  # CARD's initialisation leaves the shared table alone
    assert shared.table.weight.requires_grad

    frozen = CARD(tiny_cfg(freeze_class_embed=True), class_embed=ClassEmbedding(3, 8))
    frozen.train()
    frozen(torch.randn(2, K, C), torch.tensor([0, 1])).loss.backward()
    assert not frozen.class_cond.embed.table.weight.requires_grad
    assert frozen.class_cond.embed.table.weight.grad is None
    assert frozen.class_cond.proj.weight.grad is not None  # the projection still trains

    with pytest.raises(ValueError, match="class_dim=8"):
        CARD(tiny_cfg(), class_embed=ClassEmbedding(3, 16))


def test_class_dropout_only_in_training():
    model = tiny_card(class_dropout=0.5)
    tokens, labels = torch.randn(8, K, C), torch.zeros(8, dtype=torch.long)
    null = torch.full_like(labels, model.class_cond.null_class)
    model.train()
    z_train = model(tokens, labels, torch.Generator().manual_seed(0)).z
    z_null = model(tokens, null).z
    dropped = torch.isclose(z_train, z_null).flatten(1).all(1)
    assert 0 < int(dropped.sum()) < 8  # some rows (not all) saw the null class
    model.eval()
    assert torch.equal(model(tokens, labels).z, model(tokens, labels).z)


@pytest.mark.parametrize("name", list(CARD_PRESETS))
def test_presets_match_the_paper_parameter_counts(name):
    with torch.device("meta"):
        model = CARD(CARD_PRESETS[name])
    count = sum(p.numel() for p in model.parameters())
    assert abs(count / PAPER_PARAMETERS[name] - 1) < 0.05
    assert dataclasses.asdict(CARD_PRESETS[name])["kind"] == "card"


def test_a_new_cards_blocks_are_the_identity():
    # adaLN-Zero (DiT, section 3.3 "adaptive normalization"): the modulation starts at zero, so gate = 0
    # and every block passes its input through unchanged, whatever the class.
    torch.manual_seed(0)
    model = CARD(tiny_cfg()).eval()
    x = torch.randn(2, K, 32)
    for block, mod in zip(model.blocks, model.modulations(torch.tensor([0, 2])), strict=True):
        assert torch.equal(mod, torch.zeros_like(mod))
        torch.testing.assert_close(block(x, mod), x)


def test_block_modulation_is_shift_scale_gate():
    # card.py's block (DiT's adaLN, section 3.3): h = LN(x) * (1 + scale) + shift, then
    # x + gate * (attn(h) + mlp(h)), with mod = [shift, scale, gate] in that order.
    model = tiny_card()
    block = model.blocks[0]
    x = torch.randn(2, K, 32)
    shift, scale, gate = torch.randn(3, 2, 1, 32).unbind(0)
    mod = torch.cat([shift, scale, gate], dim=-1)[:, 0]  # (B, 3W)
    h = block.norm(x) * (1 + scale) + shift
    torch.testing.assert_close(block(x, mod), x + gate * (block.attn(h) + block.mlp(h)))


def test_position_zero_reads_the_start_token():
    # Teacher forcing (section 3.3): position 0's input is the learned start token (then token p-1 at p),
    # so the start token conditions the first token and, through attention, every later one.
    model = tiny_card()
    tokens, labels = torch.randn(2, K, C), torch.tensor([0, 1])
    z = model(tokens, labels).z
    with torch.no_grad():
        model.start_token.add_(1.0)
    assert not torch.allclose(model(tokens, labels).z[:, 0], z[:, 0])


def test_sample_hands_temperature_and_method_to_the_flow_head():
    # Appendix A: each token is `steps` flow steps of the head; CARD.sample's temperature and solver are
    # the head's. Temperature 0 ignores the noise (any seed, the same tokens); Heun is not Euler.
    model, labels = tiny_card(), torch.tensor([0, 1])
    torch.testing.assert_close(
        sample(model, labels, 1, temperature=0.0), sample(model, labels, 2, temperature=0.0)
    )
    assert not torch.allclose(sample(model, labels, method="heun"), sample(model, labels, method="euler"))


def test_each_sampled_row_follows_its_own_label():
    # Without noise (temperature 0) a row's tokens depend on its label only, not on its batch.
    model = tiny_card()
    both = sample(model, torch.tensor([0, 1]), temperature=0.0)
    for row, label in enumerate((0, 1)):
        alone = sample(model, torch.tensor([label]), temperature=0.0)
        torch.testing.assert_close(both[row : row + 1], alone, atol=1e-5, rtol=1e-5)
