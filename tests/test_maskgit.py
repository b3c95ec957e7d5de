import math

import pytest
import torch

from smapctl.models.class_embed import ClassEmbedding
from smapctl.models.maskgit import MaskGIT, MaskGITConfig, gumbel_noise, masked_counts
from smapctl.presets import MASKGIT_PRESETS, PAPER_PARAMETERS

K, V = 12, 16


def tiny_cfg(**kw) -> MaskGITConfig:
    base = dict(vocab_size=V, num_tokens=K, num_classes=3, class_dim=8, width=32, depth=2, num_heads=4)
    return MaskGITConfig(**{**base, **kw})


def tiny_model(**kw) -> MaskGIT:
    torch.manual_seed(0)
    return MaskGIT(tiny_cfg(**kw)).eval()


def decode(model, labels, seed=0, **kw):
    return list(model.decode_steps(labels, generator=torch.Generator().manual_seed(seed), **kw))


def test_loss_decreases_on_fixed_sequences():
    torch.manual_seed(0)
    model = MaskGIT(tiny_cfg(class_dropout=0.0))
    indices, labels = torch.randint(0, V, (4, K)), torch.tensor([0, 1, 2, 0])

    def eval_loss():  # the same masks every time
        return model(indices, labels, torch.Generator().manual_seed(9)).loss.item()

    before = eval_loss()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(50):
        loss = model(indices, labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert eval_loss() < 0.5 * before


def test_training_masks_follow_the_cosine_schedule():
    model = tiny_model()
    g = torch.Generator().manual_seed(0)
    mask = model.draw_mask(4000, torch.device("cpu"), g)
    counts = mask.sum(1)
    assert counts.min() >= 1 and counts.max() <= K
    # E[ceil(K cos(pi u / 2))] is about K * 2/pi + 1/2.
    assert counts.float().mean().item() == pytest.approx(K * 2 / math.pi + 0.5, abs=0.3)
    out = model(torch.randint(0, V, (3, K)), torch.tensor([0, 1, 2]), g)
    assert out.logits.shape == (3, K, V) and out.mask.shape == (3, K)


def test_masked_counts_schedule():
    assert masked_counts(128, 8) == [125, 118, 106, 90, 71, 48, 24, 0]
    for k, steps in ((1, 8), (5, 8), (12, 3), (128, 12)):
        counts = masked_counts(k, steps)
        assert counts[-1] == 0 and len(counts) <= steps
        assert all(a > b for a, b in zip([k, *counts], counts, strict=False))


@pytest.mark.parametrize("steps, k", [(8, K), (4, 7), (20, 5)])
def test_every_position_is_unmasked_exactly_once(steps, k):
    model = tiny_model()
    labels = torch.tensor([0, 1, 2])
    states = decode(model, labels, steps=steps, num_tokens=k, cfg_scale=2.0)
    mask_id = model.mask_id
    prev = torch.full((3, k), mask_id)
    unmasked_at = torch.full((3, k), -1)
    for t, (state, n_masked) in enumerate(zip(states, masked_counts(k, steps), strict=True)):
        assert bool(((state == mask_id).sum(1) == n_masked).all())  # the cosine schedule's count
        newly = (prev == mask_id) & (state != mask_id)
        assert bool(newly.any(1).all())  # every step fixes at least one position per row
        assert torch.equal(state[prev != mask_id], prev[prev != mask_id])  # fixed tokens never change
        unmasked_at[newly] = t
        prev = state
    assert bool((prev != mask_id).all()) and bool((unmasked_at >= 0).all())
    assert bool((prev < V).all())


def test_gumbel_noise_is_finite_and_standard():
    g = gumbel_noise(torch.Size([20000]), torch.device("cpu"), torch.Generator().manual_seed(0))
    assert bool(torch.isfinite(g).all())
    assert g.mean().item() == pytest.approx(0.5772, abs=0.03)  # the Euler-Mascheroni constant


def test_sampling_is_deterministic_for_a_seed():
    model = tiny_model()
    labels = torch.tensor([0, 1, 2])
    a = model.sample(labels, steps=8, cfg_scale=3.0, generator=torch.Generator().manual_seed(1))
    b = model.sample(labels, steps=8, cfg_scale=3.0, generator=torch.Generator().manual_seed(1))
    c = model.sample(labels, steps=8, cfg_scale=3.0, generator=torch.Generator().manual_seed(2))
    assert a.shape == (3, K) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_prefix_lengths_and_guidance_rows():
    model = tiny_model()
    labels = torch.tensor([0, 1, 2])
    for k in (0, 1, 5, K):
        out = model.sample(labels, num_tokens=k, generator=torch.Generator().manual_seed(0))
        assert out.shape == (3, k) and bool((out < V).all())
    with pytest.raises(ValueError, match="num_tokens"):
        model.sample(labels, num_tokens=K + 1)
    null = torch.full_like(labels, model.class_cond.null_class)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # off its initialisation, where the logits hardly heard the class
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    assert not torch.equal(decode(model, labels)[-1], decode(model, null)[-1])
    assert torch.equal(decode(model, labels, cfg_scale=0.0)[-1], decode(model, null)[-1])


def test_training_input_hides_the_masked_tokens():
    """The model is asked for the masked tokens without seeing them: what sits at a masked position
    leaves every logit as it is (the input was the unmasked sequence, and the loss still went down)."""
    model = tiny_model()
    indices, labels = torch.randint(0, V, (3, K)), torch.tensor([0, 1, 2])
    out = model(indices, labels, torch.Generator().manual_seed(1))
    assert out.mask.any() and not out.mask.all()
    hidden = model(
        torch.where(out.mask, (indices + 1) % V, indices), labels, torch.Generator().manual_seed(1)
    )
    seen = model(torch.where(out.mask, indices, (indices + 1) % V), labels, torch.Generator().manual_seed(1))
    torch.testing.assert_close(hidden.logits, out.logits, rtol=0, atol=0)
    assert not torch.allclose(seen.logits, out.logits)


@pytest.mark.parametrize("choice_temperature", [0.0, 2.0])
def test_a_step_fixes_the_most_confident_of_the_tokens_it_draws(monkeypatch, choice_temperature):
    """A step keeps the drawn tokens of the positions whose draw was most probable, log p plus the Gumbel
    noise annealed by choice_temperature x (1 - (t + 1) / steps), and leaves the rest masked, as many as
    the cosine schedule says. The network's logits and the noise are fixed here: the choice is under test."""
    from smapctl.models import maskgit

    model, labels, steps = tiny_model(), torch.tensor([0, 1]), 4
    fixed_logits = torch.randn(2, K, V, generator=torch.Generator().manual_seed(3)) * 2
    noise = torch.randn(2, K, generator=torch.Generator().manual_seed(6))
    model.logits = lambda indices, cond: fixed_logits
    monkeypatch.setattr(maskgit, "gumbel_noise", lambda shape, device, generator: noise)
    [first, *_] = decode(model, labels, steps=steps, choice_temperature=choice_temperature)
    g = torch.Generator().manual_seed(0)  # the draws the step makes, from the same seed
    probs = fixed_logits.softmax(-1)
    drawn = torch.multinomial(probs.flatten(0, 1), 1, generator=g).view(2, K)
    score = probs.gather(-1, drawn[..., None])[..., 0].log() + choice_temperature * (1 - 1 / steps) * noise
    n_fixed = K - masked_counts(K, steps)[0]
    for row in range(2):
        expected = set(score[row].topk(n_fixed).indices.tolist())
        fixed = set((first[row] != model.mask_id).nonzero()[:, 0].tolist())
        assert fixed == expected
        assert torch.equal(first[row, sorted(fixed)], drawn[row, sorted(fixed)])


@pytest.mark.parametrize("k", [K, 5])
@pytest.mark.parametrize("schedule", ["constant", "linear"])
def test_guidance_and_temperature_shape_the_logits_drawn_from(schedule, k):
    """Guided decoding at scale s and temperature T draws from (u + s_t (c - u)) / T, s_t = s
    (constant) or 1 + (s - 1) x the share of the k tokens drawn fixed after step t (linear; of k, not
    K, for a prefix: the full scale at its own last step): the same draws as an unguided model whose
    logits are that already."""
    cond_logits = torch.randn(2, K, V, generator=torch.Generator().manual_seed(4))
    null_logits = torch.randn(2, K, V, generator=torch.Generator().manual_seed(5))
    guided, plain = tiny_model(), tiny_model()
    null_class = guided.class_cond.null_class
    null_row = guided.class_cond(torch.tensor([null_class]))[0]

    def two_rows(indices, cond):  # [conditional rows; null rows], told apart by their class token
        is_null = torch.isclose(cond, null_row).all(-1)
        return torch.where(is_null[:, None, None], null_logits.repeat(2, 1, 1), cond_logits.repeat(2, 1, 1))

    steps, s, T = 4, 3.0, 0.7
    scales = iter(
        [s] * steps
        if schedule == "constant"
        else [1 + (s - 1) * (k - n) / k for n in masked_counts(k, steps)]
    )

    def combined(indices, cond):
        scale = next(scales)
        return (null_logits + scale * (cond_logits - null_logits)) / T

    guided.logits, plain.logits = two_rows, combined
    labels = torch.tensor([0, 1])
    got = decode(guided, labels, steps=steps, cfg_scale=s, cfg_schedule=schedule, temperature=T, num_tokens=k)
    want = decode(plain, labels, steps=steps, num_tokens=k)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_shared_class_embedding_is_the_same_parameter_and_can_be_frozen():
    shared = ClassEmbedding(3, 8)
    model = MaskGIT(tiny_cfg(freeze_class_embed=True), class_embed=shared)
    assert model.class_cond.embed.table.weight is shared.table.weight
    assert not shared.table.weight.requires_grad


def test_preset_matches_the_paper_parameter_count():
    with torch.device("meta"):
        model = MaskGIT(MASKGIT_PRESETS["MaskGIT-ViT"])
    count = sum(p.numel() for p in model.parameters())
    assert abs(count / PAPER_PARAMETERS["MaskGIT-ViT"] - 1) < 0.05


def test_label_smoothing_and_dropout():
    smooth = tiny_model(label_smoothing=0.1, dropout=0.5, class_dropout=0.0)
    plain = tiny_model(class_dropout=0.0)
    plain.load_state_dict(smooth.state_dict())  # dropout adds no parameters
    indices, labels = torch.randint(0, V, (3, K)), torch.tensor([0, 1, 2])
    g = torch.Generator().manual_seed(3)
    out = smooth(indices, labels, generator=g)  # eval mode: no dropout
    ref = plain(indices, labels, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(out.logits, ref.logits)
    assert torch.equal(out.mask, ref.mask)
    expected = torch.nn.functional.cross_entropy(ref.logits[ref.mask], indices[ref.mask], label_smoothing=0.1)
    torch.testing.assert_close(out.loss, expected)
    smooth.train()
    a = smooth(indices, labels, generator=torch.Generator().manual_seed(3)).logits
    b = smooth(indices, labels, generator=torch.Generator().manual_seed(3)).logits
    assert not torch.allclose(a, b)  # same masks, different dropout


@pytest.mark.parametrize("name", ["dropout", "label_smoothing"])
def test_regularisers_must_be_probabilities(name):
    with pytest.raises(ValueError, match=name):
        tiny_cfg(**{name: 1.0})


@pytest.mark.parametrize("factor, fixed", [(1.1, True), (0.9, False)])
def test_choice_noise_is_annealed_by_one_minus_t_plus_one_over_steps(monkeypatch, factor, fixed):
    """MaskGIT's choice: log p + choice_temperature x (1 - (t + 1) / steps) x Gumbel. With 2 steps the
    first step's noise weighs choice_temperature / 2: positions 0..3 (log p = -log V, noise +1) beat the
    others (log p = 0, noise 0) exactly when choice_temperature / 2 > log V."""
    from smapctl.models import maskgit

    model, labels = tiny_model(), torch.tensor([0])
    logits = torch.full((1, K, V), float("-inf"))
    logits[:, :4] = 0.0  # uniform: whatever is drawn, log p = -log V
    logits[:, 4:, 0] = 0.0  # certain: log p = 0
    noise = torch.zeros(1, K)
    noise[:, :4] = 1.0
    model.logits = lambda indices, cond: logits
    monkeypatch.setattr(maskgit, "gumbel_noise", lambda shape, device, generator: noise)
    assert K - masked_counts(K, 2)[0] == 4  # the first step fixes four positions
    [first, _] = decode(model, labels, steps=2, choice_temperature=factor * 2 * math.log(V))
    assert bool((first[0, :4] != model.mask_id).all()) is fixed
    assert bool((first[0, :4] == model.mask_id).all()) is not fixed


def test_logits_are_permutation_equivariant_without_positions():
    # Bidirectional attention and the MLM head read the token rows (not the class token's): with the
    # positional embeddings at zero, permuting the input tokens permutes the logits alike.
    model = tiny_model()
    with torch.no_grad():
        model.pos_embed.zero_()
    g = torch.Generator().manual_seed(0)
    indices = torch.randint(0, V + 1, (2, K), generator=g)  # some [MASK] ids too
    cond = model.class_cond(torch.tensor([0, 2]))
    perm = torch.randperm(K, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(model.logits(indices[:, perm], cond), model.logits(indices, cond)[:, perm])


def test_logits_add_the_output_bias():
    # MaskGIT's MLM head: logits = h @ E^T + b, with b a learned per-token bias.
    model = tiny_model()
    indices, cond = torch.randint(0, V, (2, K)), model.class_cond(torch.tensor([0, 1]))
    with torch.no_grad():
        before = model.logits(indices, cond)
        bias = torch.randn(V)
        model.logit_bias.add_(bias)
        torch.testing.assert_close(model.logits(indices, cond), before + bias)


def test_dropout_also_acts_on_the_input_sequence():
    # MaskGIT's `dropout` acts on the embedded input too, not only inside the blocks (maskgit.py).
    model = tiny_model(dropout=0.5, class_dropout=0.0).train()
    for block in model.blocks:  # leave only the input dropout
        for m in block.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
    indices, cond = torch.randint(0, V, (2, K)), model.class_cond(torch.tensor([0, 1]))
    torch.manual_seed(0)
    with torch.no_grad():
        train_logits = model.logits(indices, cond)
        assert not torch.allclose(train_logits, model.eval().logits(indices, cond))


def test_sample_is_the_last_decoding_step_of_the_same_arguments():
    # MaskGIT.sample passes its arguments on to decode_steps positionally: each must land in its place.
    model, labels = tiny_model(), torch.tensor([0, 1])
    with torch.no_grad():  # off its initialisation, where the logits hardly heard the class
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    kw = dict(steps=4, cfg_scale=8.0, cfg_schedule="linear", temperature=0.3, choice_temperature=9.0)
    *_, last = decode(model, labels, num_tokens=7, **kw)
    got = model.sample(labels, num_tokens=7, generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(got, last)


def test_confidence_is_the_probability_of_the_token_drawn_not_of_the_likeliest():
    """A position's confidence is log p of the token it drew (the module docstring, as in MaskGIT), not
    log max p: a position that drew an unlikely token stays masked even where its distribution is peaked.
    test_a_step_fixes_the_most_confident_of_the_tokens_it_draws fixes one token per row, there also the
    likeliest position's argmax; with two steps four are fixed, and the two readings pick different ones."""
    model, labels = tiny_model(), torch.tensor([0, 1])
    fixed_logits = torch.randn(2, K, V, generator=torch.Generator().manual_seed(3)) * 2
    model.logits = lambda indices, cond: fixed_logits
    [first, *_] = decode(model, labels, steps=2, choice_temperature=0.0)
    probs = fixed_logits.softmax(-1)
    drawn = torch.multinomial(probs.flatten(0, 1), 1, generator=torch.Generator().manual_seed(0)).view(2, K)
    n_fixed = K - masked_counts(K, 2)[0]
    of_drawn = probs.gather(-1, drawn[..., None])[..., 0].topk(n_fixed).indices.sort().values
    of_peak = probs.amax(-1).topk(n_fixed).indices.sort().values
    assert not torch.equal(of_drawn, of_peak)  # the two readings differ on this draw
    fixed = (first != model.mask_id).nonzero()[:, 1].view(2, n_fixed)
    assert torch.equal(fixed, of_drawn)


def test_class_dropout_only_in_training():
    """Labels become the null class with probability class_dropout in training only (as CARD's): in eval
    mode the loss and logits are those of the true labels, so a validation loss is the conditional one."""
    model = tiny_model(class_dropout=0.5)
    indices, labels = torch.randint(0, V, (8, K)), torch.zeros(8, dtype=torch.long)
    null = torch.full_like(labels, model.class_cond.null_class)

    def logits_given(out, classes):
        masked = indices.masked_fill(out.mask, model.mask_id)
        return model.logits(masked, model.class_cond(classes))

    out = model(indices, labels, torch.Generator().manual_seed(0))  # eval (tiny_model)
    torch.testing.assert_close(out.logits, logits_given(out, labels), rtol=0, atol=0)
    model.train()
    out = model(indices, labels, torch.Generator().manual_seed(0))
    dropped = torch.isclose(out.logits, logits_given(out, null)).flatten(1).all(1)
    assert 0 < int(dropped.sum()) < 8  # some rows (not all) saw the null class
