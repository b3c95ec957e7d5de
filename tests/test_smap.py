"""The SMAP tokenizer's invariants (paper eq. 3-5, appendix B)."""

import pytest
import torch

from smapctl.models.regularizers import KLConfig, SoftVQConfig, VQConfig
from smapctl.models.smap import SMAP, SMAPConfig

REGULARIZERS = {
    "vq": VQConfig(codebook_size=64, token_dim=8),
    "kl": KLConfig(token_dim=6),
    "softvq": SoftVQConfig(codebook_size=64, num_codebooks=4, token_dim=6),
}


def tiny(reg="kl", **kw) -> SMAPConfig:
    base = dict(
        image_size=16,
        patch_size=4,
        enc_width=32,
        enc_depth=2,
        enc_heads=2,
        dec_width=48,
        dec_depth=2,
        dec_heads=2,
        num_latent_tokens=8,
        num_classes=5,
        regularizer=REGULARIZERS[reg],
    )
    return SMAPConfig(**(base | kw))


def batch(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 16, 16, generator=g) * 2 - 1, torch.randint(0, 5, (n,), generator=g)


@pytest.mark.parametrize("reg", REGULARIZERS)
def test_shapes_for_every_prefix(reg):
    torch.manual_seed(0)
    model = SMAP(tiny(reg)).eval()
    x, y = batch()
    out = model.encode(x, y)
    assert out.z.shape == (3, 8, model.cfg.token_dim)
    assert (out.indices is not None) == (reg == "vq")
    for k in range(0, 9):
        assert model.decode(out.z[:, :k], y).shape == x.shape
    full = model(x, y)
    assert full.recon.shape == x.shape and full.keep.tolist() == [8, 8, 8]


@pytest.mark.parametrize("reg", REGULARIZERS)
def test_gradient_reaches_encoder_through_regularizer(reg):
    torch.manual_seed(0)
    model = SMAP(tiny(reg)).train()
    x, y = batch()
    out = model(x, y, keep=torch.full((3,), 8))
    ((out.recon - x).pow(2).mean() + out.reg.loss).backward()
    grad = model.encoder.blocks[0].attn.qkv.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    assert model.class_embed.table.weight.grad.abs().sum() > 0


def test_encoder_keeps_the_query_outputs_of_patches_class_and_queries():
    """Eq. 3 written out: the blocks over [patches + pos, class embedding, latent queries], then the norm
    and the projection of the last K rows (the queries'). A slice of the patch rows, or a sequence
    without the class, trained and decoded as well in the other tests."""
    torch.manual_seed(0)
    model = SMAP(tiny("kl")).eval()
    with torch.no_grad():  # off the zero initialisation: every query and position its own
        for p in model.encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    enc, (x, y) = model.encoder, batch()
    cond = model.class_embed(y)
    seq = torch.cat([enc.patch_embed(x) + enc.pos_embed, cond[:, None], enc.queries.expand(3, -1, -1)], 1)
    for block in enc.blocks:
        seq = block(seq)
    expected = enc.to_latent(enc.norm(seq[:, -8:]))
    torch.testing.assert_close(enc(x, cond), expected)
    # The class reaches the latents: another class, other latents of the same images.
    assert not torch.allclose(model.encode(x, y).z, model.encode(x, (y + 1) % 5).z)


def test_decoder_reads_the_pixels_from_the_mask_tokens_of_masks_class_and_latents():
    """Eq. 4 written out: the blocks over [mask tokens + pos, projected class embedding, latent prefix +
    its pos], then the norm and the pixel projection of the first N rows (the mask tokens'), patches laid
    out row by row. Pixels read from other rows, or an unprojected class, decode as well elsewhere. (The
    order inside the sequence is not observable: attention is permutation-equivariant, and the positions
    are in the embeddings added before the blocks.)"""
    from einops import rearrange

    torch.manual_seed(0)
    model = SMAP(tiny("kl")).eval()
    with torch.no_grad():  # off the zero initialisation: every mask token and position its own
        for p in model.decoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    dec, (x, y), k = model.decoder, batch(), 5
    z = model.encode(x, y).z[:, :k]  # (B, k, C)
    cond = model.dec_class_proj(model.class_embed(y))  # (B, W)
    N = dec.cfg.num_patches
    masks = dec.mask_token.expand(3, N, -1) + dec.pos_embed
    seq = torch.cat(
        [masks, cond[:, None], dec.from_latent(z) + dec.latent_pos[:, :k]], 1
    )  # (B, N + 1 + k, W)
    for block in dec.blocks:
        seq = block(seq)
    pixels = dec.to_pixels(dec.norm(seq[:, :N]))  # (B, N, p * p * 3)
    expected = rearrange(pixels, "b (h w) (p q c) -> b c (h p) (w q)", h=4, p=4, c=3)
    torch.testing.assert_close(model.decode(z, y), expected)
    # The class reaches the pixels: another class, other images from the same latents.
    assert not torch.allclose(model.decode(z, y), model.decode(z, (y + 1) % 5))


@pytest.mark.parametrize("reg", REGULARIZERS)
def test_tail_mask_equals_physical_truncation(reg):
    """Eq. 5: masking latents >= k out of attention gives exactly the decoder output of z[:, :k]."""
    torch.manual_seed(0)
    model = SMAP(tiny(reg)).eval()
    x, y = batch(4)
    z = model.encode(x, y).z
    keep = torch.tensor([0, 3, 5, 8])
    masked = model.decode(z, y, keep=keep)
    for i, k in enumerate(keep.tolist()):
        truncated = model.decode(z[i : i + 1, :k], y[i : i + 1])
        torch.testing.assert_close(masked[i : i + 1], truncated, atol=1e-5, rtol=1e-5)


def test_forward_with_mixed_keep_matches_truncated_decodes():
    torch.manual_seed(0)
    model = SMAP(tiny("vq")).eval()
    x, y = batch(3)
    keep = torch.tensor([1, 4, 2])
    out = model(x, y, keep=keep)
    for i, k in enumerate(keep.tolist()):
        ref = model.decode(out.reg.z[i : i + 1, :k], y[i : i + 1])
        torch.testing.assert_close(out.recon[i : i + 1], ref, atol=1e-5, rtol=1e-5)


def test_training_samples_prefixes_from_zero_to_k():
    torch.manual_seed(0)
    model = SMAP(tiny("kl")).train()
    keeps = torch.cat([model.sample_keep(64, torch.device("cpu")) for _ in range(20)])
    assert keeps.min() == 0 and keeps.max() == 8 and len(keeps.unique()) == 9
    batch_model = SMAP(tiny("kl", tail_drop_per_sample=False)).train()
    keep = batch_model.sample_keep(16, torch.device("cpu"))
    assert len(keep.unique()) == 1
    assert SMAP(tiny("kl", tail_drop="none")).sample_keep(4, torch.device("cpu")).tolist() == [8] * 4


# Issue 11: each schedule's P(k) for K = 8, written out independently of the model code.
H9 = sum(1 / m for m in range(1, 10))
KEEP_PROBS = {
    "uniform": [1 / 9] * 9,
    "full_mix": [0.5 / 9] * 8 + [0.5 + 0.5 / 9],
    "pow2": [0.2, 0.2, 0.2, 0, 0.2, 0, 0, 0, 0.2],
    "tail_weighted": [1 / (9 - k) / H9 for k in range(9)],
}


@pytest.mark.parametrize("schedule", KEEP_PROBS)
def test_tail_drop_schedules_draw_their_distribution(schedule):
    """Empirical frequencies of 40,000 draws are within 5 standard errors of P(k); impossible k never
    appear."""
    model = SMAP(tiny("kl", tail_drop=schedule)).train()
    g = torch.Generator().manual_seed(0)
    keeps = torch.cat([model.sample_keep(400, torch.device("cpu"), generator=g) for _ in range(100)])
    assert keeps.dtype == torch.long and keeps.shape == (40_000,)
    freq = torch.bincount(keeps, minlength=9).double() / len(keeps)
    assert len(freq) == 9
    want = torch.tensor(KEEP_PROBS[schedule], dtype=torch.float64)
    se = (want * (1 - want) / len(keeps)).sqrt()
    assert ((freq - want).abs() <= 5 * se + 1e-12).all(), (freq.tolist(), want.tolist())
    assert (freq[want == 0] == 0).all()
    per_batch = SMAP(tiny("kl", tail_drop=schedule, tail_drop_per_sample=False)).train()
    assert len(per_batch.sample_keep(32, torch.device("cpu")).unique()) == 1


def test_full_mix_probability_ends():
    always = SMAP(tiny("kl", tail_drop="full_mix", tail_drop_full_prob=1.0)).train()
    assert always.sample_keep(64, torch.device("cpu")).tolist() == [8] * 64
    never = SMAP(tiny("kl", tail_drop="full_mix", tail_drop_full_prob=0.0)).train()
    torch.manual_seed(0)
    assert len(never.sample_keep(2000, torch.device("cpu")).unique()) == 9
    with pytest.raises(ValueError, match="tail_drop_full_prob"):
        tiny("kl", tail_drop="full_mix", tail_drop_full_prob=1.5)


def test_class_only_decode_depends_on_the_class():
    torch.manual_seed(0)
    model = SMAP(tiny("kl")).eval()
    empty = torch.zeros(2, 0, 6)
    images = model.decode(empty, torch.tensor([1, 2]))
    assert images.shape == (2, 3, 16, 16)
    assert not torch.allclose(images[0], images[1])
    x, _ = batch(1)
    z = model.encode(x, torch.tensor([0])).z
    a, b = model.decode(z, torch.tensor([0])), model.decode(z, torch.tensor([3]))
    assert not torch.allclose(a, b)


def test_titok_baseline_has_no_class_tokens():
    model = SMAP(tiny("vq", class_condition=False)).eval()
    assert model.class_embed is None
    x, y = batch()
    out = model(x, y)
    assert torch.equal(out.recon, model(x, (y + 1) % 5).recon)


@pytest.mark.parametrize("reg", ["vq", "kl"])
def test_a_model_without_its_encoder_holds_none_of_its_weights_and_decodes_as_before(reg):
    """Generator training lets the encoder go once its tokens are cached (`SMAP.drop`): its weights go
    with it, the decoder gives the same images (a VQ's from indices, through the regularizer's codes),
    and an encode is an error that says why."""
    torch.manual_seed(0)
    model = SMAP(tiny(reg)).eval()
    x, y = batch()
    out = model.encode(x, y)
    before = model.decode_indices(out.indices, y) if reg == "vq" else model.decode(out.z, y)
    model.drop("encoder")
    assert not [name for name, _ in model.named_parameters() if name.startswith("encoder.")]
    after = model.decode_indices(out.indices, y) if reg == "vq" else model.decode(out.z, y)
    assert torch.equal(after, before)
    with pytest.raises(RuntimeError, match="encoder was let go"):
        model.encode(x, y)
    model.drop("decoder")  # what the processes that draw no previews keep: the table, a VQ's codes
    kept = {name.split(".")[0] for name in model.state_dict()}
    assert kept == {"class_embed", "dec_class_proj"} | ({"regularizer"} if reg == "vq" else set())
    with pytest.raises(RuntimeError, match="decoder was let go"):
        model.decode(out.z, y)


def test_decode_refuses_more_than_k_tokens():
    model = SMAP(tiny("kl")).eval()
    with pytest.raises(ValueError, match="prefix"):
        model.decode(torch.zeros(1, 9, 6), torch.tensor([0]))


def test_last_block_computes_only_the_kept_rows_with_the_same_values_and_gradients():
    """`_run` computes the last block for the rows a tower keeps: equal to running every block whole and
    slicing, in the forward and in every parameter's gradient."""
    from smapctl.models.smap import _blocks, _run

    torch.manual_seed(0)
    blocks = _blocks(32, 3, 4, 4.0)
    x = torch.randn(2, 13, 32)
    keys = torch.rand(2, 1, 1, 13) > 0.3
    keys[..., 0] = True
    for rows, mask in ((slice(0, 9), keys), (slice(-4, None), None)):
        blocks.zero_grad()
        whole = x
        for block in blocks:
            whole = block(whole, attn_mask=mask)
        whole = whole[:, rows]
        whole.square().sum().backward()
        want = [p.grad.clone() for p in blocks.parameters()]
        blocks.zero_grad()
        got = _run(blocks, x, rows=rows, attn_mask=mask)
        got.square().sum().backward()
        torch.testing.assert_close(got, whole, atol=1e-5, rtol=1e-5)
        for g, w in zip([p.grad for p in blocks.parameters()], want, strict=True):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


def _smap_loss(b):
    model = SMAP(tiny("kl"))
    x, y = batch(b)
    return model, lambda: model(x, y).recon.mean()


def _card_loss(b):
    from smapctl.models.card import CARD, CARDConfig

    cfg = CARDConfig(num_tokens=8, token_dim=4, num_classes=5, class_dim=32, width=32, depth=1, num_heads=2)
    model = CARD(cfg)
    return model, lambda: model(torch.randn(b, 8, 4), torch.randint(0, 5, (b,))).loss


@pytest.mark.parametrize("build", [_smap_loss, _card_loss], ids=["smap", "card"])
@pytest.mark.parametrize("b", [1, 3])
def test_every_gradient_is_laid_out_as_its_parameter(build, b):
    """DDP copies (and warns about: "Grad strides do not match bucket view strides") a gradient whose
    strides are not its parameter's; a learned sequence joined to the batch by `torch.cat` used to get
    the strided slice of the whole sequence's gradient at one image per process."""
    torch.manual_seed(0)
    model, loss = build(b)
    loss().backward()
    odd = [(n, p.stride(), p.grad.stride()) for n, p in model.named_parameters() if p.grad is not None]
    assert [o for o in odd if o[1] != o[2]] == []
    assert len(odd) > 10


def test_forward_with_one_keep_for_the_batch_decodes_only_that_prefix():
    # Eq. 5 with one k shared by the batch (tail_drop_per_sample=False draws it): every sample is decoded
    # from z[:, :k] alone, no mask needed, so the tail beyond k must not reach the decoder.
    torch.manual_seed(0)
    model = SMAP(tiny("kl")).eval()
    x, y = batch(3)
    for k in (0, 3):
        out = model(x, y, keep=torch.full((3,), k))
        torch.testing.assert_close(out.recon, model.decode(out.reg.z[:, :k], y), atol=1e-5, rtol=1e-5)


def test_pow2_schedule_keeps_the_full_budget_when_k_is_no_power_of_two():
    # "pow2" (FlexTok's budgets plus 0 and K) draws uniformly from {0, 1, 2, 4, ..., K}: K itself is in
    # the set even when it is not a power of two.
    model = SMAP(tiny("kl", tail_drop="pow2", num_latent_tokens=6)).train()
    keeps = model.sample_keep(2000, torch.device("cpu"), generator=torch.Generator().manual_seed(0))
    assert sorted(keeps.unique().tolist()) == [0, 1, 2, 4, 6]


def test_towers_of_one_width_share_the_class_vectors_unprojected():
    # Appendix A: one class table for both towers; a projection only fits it to a wider decoder.
    torch.manual_seed(0)
    same = SMAP(tiny("kl", dec_width=32))
    assert not any(name.startswith("dec_class_proj") for name, _ in same.named_parameters())
    assert any(name.startswith("dec_class_proj") for name, _ in SMAP(tiny("kl")).named_parameters())
