import dataclasses

import pytest
import torch

from smapctl.models.class_embed import ClassEmbedding
from smapctl.models.kv_attention import RotaryEmbedding
from smapctl.models.llamagen import LlamaGen, LlamaGenConfig, filter_logits
from smapctl.presets import LLAMAGEN_PRESETS

K, V = 6, 16


def tiny_cfg(**kw) -> LlamaGenConfig:
    base = dict(vocab_size=V, num_tokens=K, num_classes=3, class_dim=8, width=32, depth=2, num_heads=4)
    return LlamaGenConfig(**{**base, "mlp_multiple_of": 16, **kw})


def tiny_model(dtype=torch.float32, **kw) -> LlamaGen:
    """A tiny LlamaGen with a non-zero output layer (it starts at zero, i.e. uniform predictions)."""
    torch.manual_seed(0)
    model = LlamaGen(tiny_cfg(**kw)).to(dtype).eval()
    with torch.no_grad():
        model.output.weight.normal_(0, 0.5)
    return model


def sample(model, labels, seed=0, **kw):
    return model.sample(labels, generator=torch.Generator().manual_seed(seed), **kw)


def test_loss_decreases_on_fixed_sequences():
    torch.manual_seed(0)
    model = LlamaGen(tiny_cfg(class_dropout=0.0))
    indices, labels = torch.randint(0, V, (4, K)), torch.tensor([0, 1, 2, 0])
    before = model(indices, labels).loss.item()
    assert before == pytest.approx(torch.log(torch.tensor(float(V))).item(), rel=1e-4)  # zero output layer
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(40):
        loss = model(indices, labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert model(indices, labels).loss.item() < 0.5 * before


def test_logits_are_causal():
    model = tiny_model()
    indices, labels = torch.randint(0, V, (2, K)), torch.tensor([0, 1])
    j = 3
    changed = indices.clone()
    changed[:, j] = (changed[:, j] + 1) % V
    a, b = model(indices, labels).logits, model(changed, labels).logits
    torch.testing.assert_close(a[:, : j + 1], b[:, : j + 1])
    assert not torch.allclose(a[:, j + 1], b[:, j + 1])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_kv_cache_equals_recomputation(dtype):
    model = tiny_model(dtype)
    labels = torch.tensor([0, 2, 1, 1])
    for kw in ({}, {"cfg_scale": 3.0, "cfg_schedule": "linear", "top_k": 5, "top_p": 0.9}):
        cached = sample(model, labels, use_kv_cache=True, **kw)
        full = sample(model, labels, use_kv_cache=False, **kw)
        assert cached.shape == (4, K) and cached.dtype == torch.long
        assert torch.equal(cached, full)


def test_any_prefix_length_gives_the_prefix_of_a_full_sample():
    model = tiny_model()
    labels = torch.tensor([1, 2])
    full = sample(model, labels, cfg_scale=2.0, cfg_schedule="linear")
    for k in (0, 1, 4, K):
        assert torch.equal(
            sample(model, labels, cfg_scale=2.0, cfg_schedule="linear", num_tokens=k), full[:, :k]
        )
    with pytest.raises(ValueError, match="num_tokens"):
        sample(model, labels, num_tokens=K + 1)


def test_guidance_rows_are_conditional_then_null():
    model = tiny_model()
    labels = torch.arange(3).repeat(4)
    null = torch.full_like(labels, model.class_cond.null_class)
    assert torch.equal(sample(model, labels, cfg_scale=0.0), sample(model, null))
    # MAR's linear schedule guides the first of K tokens with 1 + (s - 1) / K.
    linear = sample(model, labels, cfg_scale=5.0, cfg_schedule="linear")
    assert torch.equal(linear[:, 0], sample(model, labels, cfg_scale=1 + 4 / K)[:, 0])


def test_sampling_is_deterministic_given_a_generator():
    model = tiny_model()
    labels = torch.tensor([0, 1, 2])
    assert torch.equal(sample(model, labels, seed=3), sample(model, labels, seed=3))
    assert not torch.equal(sample(model, labels, seed=3), sample(model, labels, seed=4))


def test_top_k_and_top_p_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda out: torch.isfinite(out)[0].tolist()  # noqa: E731
    assert kept(filter_logits(logits, top_k=2)) == [True, True, False, False]
    assert kept(filter_logits(logits, top_p=0.7)) == [True, True, False, False]
    assert kept(filter_logits(logits, top_p=0.5)) == [True, False, False, False]
    assert kept(filter_logits(logits, top_p=0.81)) == [True, True, True, False]
    assert kept(filter_logits(logits)) == [True] * 4
    model = tiny_model()  # top_k = 1 is greedy decoding: no randomness left
    labels = torch.tensor([0, 1])
    assert torch.equal(sample(model, labels, seed=1, top_k=1), sample(model, labels, seed=2, top_k=1))


def test_the_most_likely_token_survives_any_top_p():
    """`--top-p 1e-320` reads as 0 in float32, and every token was dropped: sampling gave nan, said to be
    the guidance's doing."""
    logits = torch.log(torch.tensor([[0.15, 0.5, 0.3, 0.05]]))
    for top_p in (1e-320, 1e-46, 1e-3):
        assert torch.isfinite(filter_logits(logits, top_p=top_p))[0].tolist() == [False, True, False, False]


def test_temperature_divides_the_logits():
    """Near temperature 0 the draw is the most probable token (top_k = 1's); at 1 it is not."""
    model = tiny_model()
    labels = torch.tensor([0, 1, 2])
    greedy = sample(model, labels, top_k=1)
    assert torch.equal(sample(model, labels, seed=5, temperature=1e-4), greedy)
    assert not torch.equal(sample(model, labels, seed=5), greedy)


def test_shared_class_embedding_is_the_same_parameter_and_can_be_frozen():
    shared = ClassEmbedding(3, 8)
    model = LlamaGen(tiny_cfg(freeze_class_embed=True), class_embed=shared)
    assert model.class_cond.embed.table.weight is shared.table.weight
    assert not shared.table.weight.requires_grad
    assert LlamaGen(tiny_cfg()).class_cond.embed.table.weight.requires_grad


# LlamaGen's published sizes (16384-entry codebook, which we set here to compare like with like).
PUBLISHED = {
    "LlamaGen-B": 111e6,
    "LlamaGen-L": 343e6,
    "LlamaGen-XL": 775e6,
    "LlamaGen-XXL": 1.4e9,
    "LlamaGen-3B": 3.1e9,
}


@pytest.mark.parametrize("name", list(LLAMAGEN_PRESETS))
def test_presets_match_the_published_sizes(name):
    with torch.device("meta"):
        model = LlamaGen(dataclasses.replace(LLAMAGEN_PRESETS[name], vocab_size=16384))
    count = sum(p.numel() for p in model.parameters())
    assert abs(count / PUBLISHED[name] - 1) < 0.02


def test_dropout_acts_in_training_only():
    model = tiny_model(dropout=0.5, token_dropout=0.5, class_dropout=0.0)
    plain = tiny_model(class_dropout=0.0)
    plain.load_state_dict(model.state_dict())  # dropout adds no parameters
    indices, labels = torch.randint(0, V, (2, K)), torch.tensor([0, 1])
    torch.testing.assert_close(model(indices, labels).logits, plain(indices, labels).logits)
    assert torch.equal(sample(model, labels), sample(plain, labels))
    model.train()
    torch.manual_seed(1)
    a = model(indices, labels).logits
    torch.manual_seed(2)
    b = model(indices, labels).logits
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("name", ["dropout", "token_dropout"])
def test_dropout_must_be_a_probability(name):
    with pytest.raises(ValueError, match=name):
        tiny_cfg(**{name: 1.0})


@pytest.mark.parametrize("base", [0.0, -10.0, 1.0, float("inf")])
def test_rope_base_must_be_above_one(base):
    """A base of 0 or less made NaN rotary tables, and a run trained on them without a warning."""
    with pytest.raises(ValueError, match="rope_base: must be a number above 1"):
        tiny_cfg(rope_base=base)


def test_rope_base_sets_the_rotary_tables_and_survives_a_checkpoint(tiny_vq_tokenizer, tmp_path):
    """`model.rope_base` is set by no recipe: a non-default base must reach the rotary tables (and so the
    logits), and a generator trained with it must come back from its checkpoint with it (the tables are not
    in the checkpoint: they are rebuilt from the recorded recipe)."""
    from pathlib import Path

    from smapctl.recipe import load_generator_recipe
    from smapctl.train.checkpoint import load_weights
    from smapctl.train.generator import load_generator, train_generator

    default, low = tiny_model(), tiny_model(rope_base=100.0)
    head_dim = 32 // 4
    inv_freq = 100.0 ** -(torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.arange(K, dtype=torch.float64)[:, None] * torch.cat([inv_freq, inv_freq])
    torch.testing.assert_close(low.rope.cos, angles.cos().float())
    torch.testing.assert_close(low.rope.sin, angles.sin().float())
    assert not torch.allclose(low.rope.cos[1:], default.rope.cos[1:])
    indices, labels = (
        torch.randint(0, V, (2, K), generator=torch.Generator().manual_seed(0)),
        torch.tensor([0, 1]),
    )
    a, b = default(indices, labels).logits, low(indices, labels).logits
    torch.testing.assert_close(a[:, 0], b[:, 0])  # one position: nothing to rotate relative to
    assert not torch.allclose(a[:, 1:], b[:, 1:])

    model = (
        "model={kind: llamagen, vocab_size: 64, num_tokens: 8, num_classes: 10, class_dim: 32, width: 32, "
        "depth: 1, num_heads: 4, mlp_multiple_of: 16, rope_base: 100.0}"
    )
    sets = [f"latents.tokenizer={tiny_vq_tokenizer}", model, "train.max_steps=1", "train.batch_size=8"]
    sets += ["train.precision='no'", "train.warmup_steps=0", "train.sample_every=100"]
    root = Path(__file__).resolve().parents[1]
    final = train_generator(
        load_generator_recipe(root / "recipes/demo/generator.yaml", sets), tmp_path / "gen"
    )
    generator = load_generator(final)
    loaded, recipe = generator.model, generator.recipe
    assert recipe.model.rope_base == 100.0 and loaded.rope.base == 100.0
    rebuilt = RotaryEmbedding(head_dim, 8, 100.0)
    assert torch.equal(loaded.rope.cos, rebuilt.cos) and torch.equal(loaded.rope.sin, rebuilt.sin)
    # The loaded model computes what its weights do under base 100, not under the default base.
    tokens, classes = (
        torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1)),
        torch.tensor([3, 7]),
    )
    weights = load_weights(final, "ema")
    logits = {}
    for base in (100.0, 10000.0):
        fresh = LlamaGen(dataclasses.replace(recipe.model, rope_base=base)).eval()
        fresh.load_state_dict(weights)
        logits[base] = fresh(tokens, classes).logits
    with torch.no_grad():
        out = loaded(tokens, classes).logits
    torch.testing.assert_close(out, logits[100.0])
    assert not torch.allclose(out, logits[10000.0])


def test_token_dropout_acts_on_the_input_sequence():
    # LlamaGen's --token-dropout-p: dropout on the embedded input sequence, apart from the blocks' dropout.
    model = tiny_model(token_dropout=0.5, class_dropout=0.0).train()
    assert all(block.drop.p == 0 for block in model.blocks)
    indices, labels = torch.randint(0, V, (2, K)), torch.tensor([0, 1])
    torch.manual_seed(0)
    with torch.no_grad():
        train_logits = model(indices, labels).logits
        assert not torch.allclose(train_logits, model.eval()(indices, labels).logits)


def test_sample_applies_top_p():
    # A top_p below the most likely token's probability leaves that token alone: greedy, as top_k = 1.
    model, labels = tiny_model(), torch.tensor([0, 1, 2])
    greedy = sample(model, labels, seed=1, top_k=1)
    assert torch.equal(sample(model, labels, seed=2, top_p=1e-6), greedy)
