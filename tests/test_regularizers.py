"""The SMAP tokenizer's regularizers (smapctl/models/regularizers.py): VQ, KL and SoftVQ (paper eq. 7-11)."""

import math

import pytest
import torch
from test_smap import REGULARIZERS, batch, tiny

from smapctl.models.regularizers import (
    GaussianRegularizer,
    KLConfig,
    SoftVectorQuantizer,
    SoftVQConfig,
    VectorQuantizer,
    VQConfig,
    build_regularizer,
    codebook_stats,
)
from smapctl.models.smap import SMAP


def test_vq_indices_map_back_to_the_codes_the_decoder_saw():
    torch.manual_seed(0)
    model = SMAP(tiny("vq")).eval()
    x, y = batch()
    out = model.encode(x, y)
    assert torch.equal(model.regularizer.lookup(out.indices), out.z)
    assert torch.equal(model.decode_indices(out.indices, y), model.decode(out.z, y))
    assert 0 < out.stats["usage"] <= 1 and out.stats["perplexity"] >= 1


def test_vq_picks_the_nearest_code_passes_gradients_straight_through_and_routes_its_losses():
    """Eq. 7 and VQ-VAE's losses: the index is the nearest unit code; the gradient of the decoder's input
    reaches the encoder as if z_q were normalize(h) (straight through); the commitment term moves only
    the encoder and the codebook term only the codes, each by its own weight. The commitment term alone
    gave the encoder a gradient, so a cut straight-through path passed the gradient test of test_smap.py
    (test_gradient_reaches_encoder_through_regularizer)."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    vq = VectorQuantizer(VQConfig(codebook_size=32, token_dim=8, commitment_weight=0.25, codebook_weight=1.5))
    h = torch.randn(2, 5, 8, requires_grad=True)
    out = vq(h)
    z, codes = F.normalize(h.detach(), dim=-1), vq.codes().detach()
    assert torch.equal(out.indices, torch.cdist(z, codes.expand(2, -1, -1)).argmin(-1))
    w = torch.randn_like(out.z)
    (through_zq,) = torch.autograd.grad((out.z * w).sum(), h, retain_graph=True)
    (through_normalize,) = torch.autograd.grad((F.normalize(h, dim=-1) * w).sum(), h)
    torch.testing.assert_close(through_zq, through_normalize)
    table = vq.codebook.weight
    h_grad, table_grad = torch.autograd.grad(out.loss, [h, table])
    chosen = F.embedding(out.indices, F.normalize(table, dim=-1))
    (commitment,) = torch.autograd.grad(0.25 * F.mse_loss(F.normalize(h, dim=-1), chosen.detach()), h)
    (codebook,) = torch.autograd.grad(1.5 * F.mse_loss(chosen, z), table)
    torch.testing.assert_close(h_grad, commitment)
    torch.testing.assert_close(table_grad, codebook)


def test_kl_samples_with_the_posteriors_standard_deviation():
    """Eq. 9: z = mean + exp(logvar / 2) * eps. Two draws differing (the test below) held for any scale."""
    torch.manual_seed(0)
    reg = GaussianRegularizer(KLConfig(token_dim=4)).train()
    mean, logvar = torch.full((1000, 8, 4), 3.0), torch.full((1000, 8, 4), math.log(4.0))
    z = reg(torch.cat([mean, logvar], -1)).z
    assert abs(z.mean().item() - 3.0) < 0.05 and abs(z.std().item() - 2.0) < 0.05  # 32,000 draws


def test_softvq_mixes_its_segments_codes_and_spreads_each_codebook():
    """Eq. 10-11 written out: z_q = softmax(cos / tau) @ codes of the token's own codebook; the batch
    entropy is each codebook's (over the tokens of its segment), averaged; the loss is token entropy
    minus batch entropy. A norm <= 1 (the test below) held for any convex mix."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    cfg = SoftVQConfig(codebook_size=16, num_codebooks=2, token_dim=4, temperature=0.5, entropy_weight=1.0)
    reg = SoftVectorQuantizer(cfg)
    h = torch.randn(3, 4, 4)
    out = reg(h)
    z = F.normalize(h, dim=-1)
    codes = F.normalize(reg.codebooks.detach(), dim=-1)  # (2 codebooks, 8 entries, 4)
    cosine = torch.cat([z[:, :2] @ codes[0].T, z[:, 2:] @ codes[1].T], 1)  # tokens 0-1: codebook 0
    mixed = torch.cat(
        [cosine[:, :2].div(0.5).softmax(-1) @ codes[0], cosine[:, 2:].div(0.5).softmax(-1) @ codes[1]], 1
    )
    torch.testing.assert_close(out.z, mixed)
    sharp = (cosine / cfg.entropy_temperature).softmax(-1)

    def entropy(p):
        return -(p * p.clamp_min(1e-10).log()).sum()

    batch_entropy = (
        entropy(sharp[:, :2].reshape(-1, 8).mean(0)) + entropy(sharp[:, 2:].reshape(-1, 8).mean(0))
    ) / 2
    torch.testing.assert_close(out.stats["batch_entropy"], batch_entropy)
    torch.testing.assert_close(out.loss, out.stats["token_entropy"] - batch_entropy)


def test_softvq_segments_use_their_own_codebook():
    torch.manual_seed(0)
    model = SMAP(tiny("softvq")).eval()
    seg = model.regularizer.segment_of(8)
    assert seg.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    x, y = batch()
    z = model.encode(x, y).z
    # Each token is a convex combination of unit codes of its own codebook: norm <= 1.
    assert (z.norm(dim=-1) <= 1 + 1e-5).all()


@pytest.mark.parametrize("reg", ["vq", "softvq"])
def test_the_quantizers_choose_in_fp32_under_bf16_autocast(reg):
    """Under bf16 autocast (train.precision: bf16) the code distances were taken in bf16: near-ties
    went to other codes. Outside the quantizer, autocast goes on as before."""
    torch.manual_seed(0)
    cfg = (
        VQConfig(codebook_size=4096, token_dim=16)
        if reg == "vq"
        else SoftVQConfig(codebook_size=512, token_dim=16)
    )
    quantizer = build_regularizer(cfg)
    h = torch.randn(8, 32, 16)
    exact = quantizer(h)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = quantizer(h)
        assert torch.mm(h[0], h[0].T).dtype == torch.bfloat16  # still on for the rest
    assert torch.equal(mixed.z, exact.z)
    if reg == "vq":
        assert torch.equal(mixed.indices, exact.indices)


def test_kl_is_deterministic_in_eval_and_sampled_in_training():
    torch.manual_seed(0)
    model = SMAP(tiny("kl"))
    x, y = batch()
    model.eval()
    assert torch.equal(model.encode(x, y).z, model.encode(x, y).z)
    model.train()
    assert not torch.equal(model.encode(x, y).z, model.encode(x, y).z)


def test_softvq_entropy_is_sharper_and_moves_only_the_encoder():
    """As in SoftVQ's code: the entropy loss takes a softmax at entropy_temperature (0.01) of the cosine
    similarities to the detached codebook; the codes learn only through z_q."""
    torch.manual_seed(0)
    cfg = SoftVQConfig(codebook_size=16, num_codebooks=2, token_dim=4, entropy_weight=1.0)
    reg = SoftVectorQuantizer(cfg).train()
    h = torch.randn(3, 4, 4, requires_grad=True)
    out = reg(h)
    out.loss.backward(retain_graph=True)  # the entropy loss alone
    assert reg.codebooks.grad is None or not reg.codebooks.grad.any()
    assert h.grad.abs().sum() > 0
    z = torch.nn.functional.normalize(h.detach(), dim=-1)
    codes = torch.nn.functional.normalize(reg.codebooks.detach(), dim=-1)[reg.segment_of(4)]
    log_p = (torch.einsum("bkc,knc->bkn", z, codes) / 0.01).log_softmax(-1)
    torch.testing.assert_close(out.stats["token_entropy"], -(log_p.exp() * log_p).sum(-1).mean())
    out.z.sum().backward()  # the codes do learn through z_q
    assert reg.codebooks.grad.abs().sum() > 0


def test_kl_term_is_nats_per_image_as_in_the_papers_codebase():
    """The KL is summed over an image's K x C values and averaged over images (the SoftVQ codebase's
    sum / batch), so kl_weight 1e-6 means what it means there; it was averaged over tokens (K x weaker)."""
    reg = GaussianRegularizer(KLConfig(token_dim=3, kl_weight=0.5)).train()
    mean, logvar = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    out = reg(torch.cat([mean, logvar], -1))
    per_value = 0.5 * (mean**2 + logvar.exp() - 1 - logvar)  # closed form for N(mean, e^logvar) || N(0, 1)
    expected = per_value.sum() / 2
    torch.testing.assert_close(out.stats["kl"], expected)
    torch.testing.assert_close(out.loss, 0.5 * expected)


def test_codebook_stats_on_a_known_histogram():
    # Codes of 2 images x 2 positions in a codebook of 4: position 0 is code 0 in both (perplexity 1),
    # position 1 is codes 1 and 2 (perplexity 2); pooled, the histogram (2, 1, 1, 0) uses 3 of 4 codes.
    stats = codebook_stats(torch.tensor([[0, 1], [0, 2]]), 4)
    pooled = torch.tensor([0.5, 0.25, 0.25])
    torch.testing.assert_close(stats["usage"], torch.tensor(0.75))
    torch.testing.assert_close(stats["perplexity"], (-(pooled * pooled.log()).sum()).exp())
    torch.testing.assert_close(stats["position_perplexity"], torch.tensor(1.5))


def test_softvq_stats_count_every_codebooks_entries():
    # The hard assignments are ids in the flat codebook (segment s: s * entries onwards): two segments
    # that each pick their own entry 0 are two codes used, not one.
    cfg = SoftVQConfig(codebook_size=8, num_codebooks=2, token_dim=4)
    reg = SoftVectorQuantizer(cfg)
    with torch.no_grad():
        reg.codebooks.copy_(torch.eye(4)[:4].expand(2, 4, 4))  # entry j of each codebook is e_j
    h = torch.tensor([[1.0, 0, 0, 0], [1.0, 0, 0, 0]])[None]  # (1, 2 tokens, 4): each nearest its entry 0
    out = reg(h)
    torch.testing.assert_close(out.stats["usage"], torch.tensor(2 / 8))
    torch.testing.assert_close(out.stats["perplexity"], torch.tensor(2.0))


def test_kl_std_statistic_is_the_posteriors_standard_deviation():
    # Eq. 9: sigma = exp(logvar / 2); the logged "std" is its mean.
    h = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(0))
    out = GaussianRegularizer(KLConfig(token_dim=4))(h)
    torch.testing.assert_close(out.stats["std"], h[..., 4:].mul(0.5).exp().mean())


@pytest.mark.parametrize("reg", REGULARIZERS)
def test_latents_come_back_in_the_inputs_dtype(reg):
    # The regularizers compute in fp32 (`fp32`), then hand the decoder latents in the encoder's dtype.
    torch.manual_seed(0)
    module = build_regularizer(REGULARIZERS[reg])
    h = torch.randn(2, 4, module.in_dim, dtype=torch.bfloat16)
    assert module(h).z.dtype == torch.bfloat16
