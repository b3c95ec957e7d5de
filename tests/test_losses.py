"""GAN, pixel and perceptual losses; the PatchGAN discriminator."""

import pytest
import torch
from torch import nn
from torchvision.models import vgg16

from smapctl.errors import UserError
from smapctl.models.discriminator import DiscriminatorConfig, PatchDiscriminator, logits_size
from smapctl.models.perceptual import PerceptualLoss, _unit
from smapctl.train.config import LossConfig
from smapctl.train.losses import (
    adaptive_gan_weight,
    build_discriminator,
    build_perceptual_loss,
    hinge_d_loss,
    hinge_g_loss,
    pixel_loss,
)

# ------------------------------------------------------------------------------------------ GAN terms


def test_hinge_losses_values():
    real = torch.tensor([2.0, 0.5])
    fake = torch.tensor([-2.0, 0.0])
    # relu(1 - real) = [0, 0.5] -> 0.25; relu(1 + fake) = [0, 1] -> 0.5; halved sum = 0.375
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.375)
    assert hinge_d_loss(torch.zeros(3), torch.zeros(3)).item() == pytest.approx(1.0)
    assert hinge_d_loss(torch.full((4,), 1.5), torch.full((4,), -3.0)).item() == 0.0
    assert hinge_g_loss(fake).item() == pytest.approx(1.0)


def test_adaptive_gan_weight_matches_hand_gradients():
    torch.manual_seed(0)
    W = nn.Parameter(torch.randn(3, 4))
    x, c = torch.randn(5, 4), torch.randn(5, 3)
    out = x @ W.T  # (5, 3)
    rec = out.square().mean()
    g = (out * c).sum()
    w = adaptive_gan_weight(rec, g, W)
    grad_rec = 2 * out.detach().T @ x / out.numel()  # d mean(out^2) / dW
    grad_g = c.T @ x  # d sum(out * c) / dW
    expect = grad_rec.norm() / (grad_g.norm() + 1e-4)
    torch.testing.assert_close(w, expect)
    assert not w.requires_grad
    (rec + w * g).backward()  # the graphs survive for the real backward pass
    assert W.grad is not None


def test_adaptive_gan_weight_under_an_fp16_loss_scale_matches_fp32():
    """fp16 on a GPU: a mean over many pixels hands each fp16 output a gradient below fp16's range (here
    about 2.5e-8 per pixel, late in training), so the unscaled gradients make a wrong weight (+18%). Taken
    of the scaled losses, as the training's backward is, the weight is fp32's."""
    torch.manual_seed(0)
    last = nn.Linear(16, 3 * 64 * 64)
    x = torch.randn(64, 16)
    with torch.no_grad():
        target = last(x) + 0.01 * torch.randn(64, 3 * 64 * 64)  # a small residual error

    def weight(fp16: bool, loss_scale: float = 1.0) -> float:
        with torch.autocast("cpu", dtype=torch.float16, enabled=fp16):
            out = last(x)
        rec, g = (out.float() - target).pow(2).mean(), -out.float().mean()
        return adaptive_gan_weight(rec, g, last.weight, loss_scale=loss_scale).item()

    fp32 = weight(False)
    assert abs(weight(True) / fp32 - 1) > 0.1  # the case underflows without the scale
    assert weight(True, loss_scale=65536.0) == pytest.approx(fp32, rel=0.02)
    assert weight(False, loss_scale=65536.0) == pytest.approx(fp32, rel=1e-4)  # the same ratio


def test_adaptive_gan_weight_of_gradients_that_overflowed_the_loss_scale_is_finite():
    """At a loss scale its gradients overflow (inf, or NaN through a LayerNorm), the weight is 0 or the
    clamp, not NaN: a NaN weight made the loss non-finite, the step was skipped before the scaler could
    lower the scale, and five such steps stopped the run."""
    W = nn.Parameter(torch.ones(2, 2))
    out = W.sum()
    for scale in (float("inf"), torch.tensor(float("inf"))):  # inf / inf: NaN
        assert adaptive_gan_weight(out, out, W, loss_scale=scale).item() == 0.0
    overflowed = out * float("inf")
    assert adaptive_gan_weight(overflowed, 0.0 * out, W).item() == 1e4  # inf / eps: the clamp


def test_adaptive_gan_weight_is_clamped():
    W = nn.Parameter(torch.ones(2, 2))
    out = W.sum()
    w = adaptive_gan_weight(100.0 * out, 0.0 * out, W)  # no generator gradient at all
    assert w.item() == 1e4


def test_pixel_loss():
    x, y = torch.zeros(1, 3, 2, 2), torch.full((1, 3, 2, 2), -0.5)
    assert pixel_loss("l1", x, y).item() == pytest.approx(0.5)
    assert pixel_loss("l2", x, y).item() == pytest.approx(0.25)
    with pytest.raises(ValueError, match="'l1' or 'l2'"):
        pixel_loss("huber", x, y)


# ------------------------------------------------------------------------------------------ discriminator


def test_discriminator_shapes_and_batch_independence():
    torch.manual_seed(0)
    d = PatchDiscriminator(DiscriminatorConfig(width=8, layers=3))
    x = torch.rand(3, 3, 64, 64) * 2 - 1
    logits = d(x)
    assert logits.shape == (3, 1, 64 // 8 - 2, 64 // 8 - 2)
    # GroupNorm, not BatchNorm: a sample's logits do not depend on the rest of the batch.
    torch.testing.assert_close(d(x[:1]), logits[:1])
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in d.modules())
    assert sum(1 for m in d.modules() if isinstance(m, nn.GroupNorm)) == 3


def test_discriminator_starts_from_the_pix2pix_initialisation():
    """N(0, 0.02) convolutions with zero biases; GroupNorm gains N(1, 0.02) and zero shifts."""
    torch.manual_seed(0)
    d = PatchDiscriminator(DiscriminatorConfig(width=64, layers=3))
    convs = [m for m in d.modules() if isinstance(m, nn.Conv2d)]
    norms = [m for m in d.modules() if isinstance(m, nn.GroupNorm)]
    weights = torch.cat([m.weight.flatten() for m in convs])
    assert abs(weights.mean().item()) < 1e-3 and weights.std().item() == pytest.approx(0.02, rel=0.02)
    assert all(not m.bias.any() for m in convs if m.bias is not None)
    gains = torch.cat([m.weight for m in norms])
    assert gains.mean().item() == pytest.approx(1.0, abs=0.01) and gains.std().item() < 0.03
    assert all(not m.bias.any() for m in norms)


@pytest.mark.parametrize("layers", [1, 2, 3])
def test_logits_size_is_the_discriminators_own(layers):
    """`logits_size` (the recipe check's) matches the logit map the discriminator gives, down to 0."""
    d = PatchDiscriminator(DiscriminatorConfig(width=8, layers=layers))
    for size in (8, 16, 24, 32, 40, 64):
        if logits_size(size, layers) == 0:  # too small: the convolutions run out of pixels
            with pytest.raises((RuntimeError, ValueError)):  # a kernel larger than its input, or 1x1 norms
                d(torch.zeros(1, 3, size, size))
        else:
            assert logits_size(size, layers) == d(torch.zeros(1, 3, size, size)).shape[-1]
    assert [logits_size(16, n) for n in (1, 2, 3)] == [6, 2, 0]


def test_discriminator_from_recipe():
    assert build_discriminator(LossConfig(gan_weight=0.0)) is None
    d = build_discriminator(LossConfig(gan_weight=0.1, disc_width=64, disc_layers=3))
    # pix2pix NLayer with 3 layers, 4x4 kernels: 3->64 (+bias), 64->128, 128->256, 256->512 (no bias, each
    # followed by a GroupNorm with 2C parameters), 512->1 (+bias).
    convs = (3 * 64 * 16 + 64) + 64 * 128 * 16 + 128 * 256 * 16 + 256 * 512 * 16 + (512 * 16 + 1)
    norms = 2 * (128 + 256 + 512)
    assert sum(p.numel() for p in d.parameters()) == convs + norms == 2_765_633
    assert d(torch.zeros(1, 3, 256, 256)).shape == (1, 1, 30, 30)


# ------------------------------------------------------------------------------------------ perceptual


def _random_vgg_state() -> dict[str, torch.Tensor]:
    """A randomly initialised VGG-16 state dict in torchvision's key layout (plumbing tests only: these
    are not the ImageNet weights, so the distances mean nothing perceptually)."""
    g = torch.Generator().manual_seed(0)
    with torch.device("meta"):
        ref = vgg16(weights=None)
    state = {}
    for k, v in ref.state_dict().items():
        if k.startswith("features."):
            fan_in = v[0].numel() if v.ndim > 1 else 1
            state[k] = torch.randn(v.shape, generator=g) * (2.0 / fan_in) ** 0.5
        else:  # classifier weights are in the real file too; keep them small here
            state[k] = torch.zeros(1)
    return state


@pytest.fixture(scope="module")
def vgg_state():
    return _random_vgg_state()


def _manual_lpips(state, x, y):
    """The same distance written out independently: run torchvision's VGG-16 layer by layer and tap the
    last ReLU of each of the five blocks."""
    with torch.device("meta"):
        feats = vgg16(weights=None).features
    feats.load_state_dict(
        {k[len("features.") :]: v for k, v in state.items() if k.startswith("features.")}, assign=True
    )
    relus = [3, 8, 15, 22, 29]
    assert all(isinstance(feats[i], nn.ReLU) and isinstance(feats[i + 1], nn.MaxPool2d) for i in relus)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    a, b = ((x + 1) / 2 - mean) / std, ((y + 1) / 2 - mean) / std
    total = torch.zeros(x.shape[0])
    for i, layer in enumerate(feats[: relus[-1] + 1]):
        a, b = layer(a), layer(b)
        if i in relus:
            na = a / (a.square().sum(1, keepdim=True).sqrt() + 1e-10)
            nb = b / (b.square().sum(1, keepdim=True).sqrt() + 1e-10)
            total += (na - nb).square().sum(1).mean((1, 2))
    return total


def test_perceptual_plumbing(vgg_state):
    # 16x16 is the smallest input that reaches relu5_3 (1x1 after four poolings).
    torch.manual_seed(0)
    loss = PerceptualLoss(vgg_state)
    x = (torch.rand(2, 3, 16, 16) * 2 - 1).requires_grad_(True)
    y = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(loss.distance(x, y), _manual_lpips(vgg_state, x, y))
        assert loss(y, y).item() == pytest.approx(0.0, abs=1e-6)
    value = loss(x, y)
    assert value.item() > 0
    value.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in loss.parameters())
    loss.train()
    assert not loss.training  # stays a fixed feature extractor


def test_perceptual_normalisation_has_a_finite_gradient_at_zero():
    """LPIPS's f / (|f| + eps) has a NaN gradient at an all-zero feature vector (in VGG the ReLU's backward
    happens to mask it, as its inputs there are <= 0; the normalisation no longer relies on that)."""
    zeros = torch.zeros(1, 4, 2, 2, requires_grad=True)
    _unit(zeros).sum().backward()
    assert torch.isfinite(zeros.grad).all()
    f = torch.randn(2, 4, 3, 3)  # elsewhere it is LPIPS's normalisation
    torch.testing.assert_close(_unit(f), f / (f.square().sum(1, keepdim=True).sqrt() + 1e-10))


def test_build_perceptual_loss_reads_local_file(tmp_path, vgg_state):
    assert build_perceptual_loss(LossConfig(perceptual_weight=0.0)) is None
    path = tmp_path / "vgg16-397923af.pth"
    torch.save(vgg_state, path)
    loss = build_perceptual_loss(LossConfig(perceptual_weight=1.0, perceptual_weights=str(path)))
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    torch.testing.assert_close(loss.distance(x, -x), PerceptualLoss(vgg_state).distance(x, -x))


def test_perceptual_missing_weights_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match=r"^loss\.perceptual_weights: not set.*vgg16-397923af\.pth"):
        build_perceptual_loss(LossConfig(perceptual_weight=0.1))
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(
        UserError, match=r"^loss\.perceptual_weights: .*nowhere\.pth not found.*vgg16-397923af"
    ):
        build_perceptual_loss(LossConfig(perceptual_weight=0.1, perceptual_weights=str(missing)))
    # `~name` of no such user was pathlib's RuntimeError traceback, "Could not determine home directory".
    with pytest.raises(
        UserError, match=r"^loss\.perceptual_weights: ~no-such-user-of-smapctl/v\.pth not found"
    ):
        build_perceptual_loss(
            LossConfig(perceptual_weight=0.1, perceptual_weights="~no-such-user-of-smapctl/v.pth")
        )


def test_perceptual_wrong_file_is_a_user_error(tmp_path, vgg_state):
    bad = tmp_path / "bad.pth"
    torch.save({"features.0.weight": torch.zeros(1)}, bad)
    with pytest.raises(UserError, match=r"not a VGG-16 state dict.*features\.0\.weight' has shape"):
        build_perceptual_loss(LossConfig(perceptual_weight=0.1, perceptual_weights=str(bad)))
    partial = {k: v for k, v in vgg_state.items() if k != "features.28.bias"}
    torch.save(partial, bad)
    with pytest.raises(UserError, match=r"no 'features\.28\.bias'"):
        build_perceptual_loss(LossConfig(perceptual_weight=0.1, perceptual_weights=str(bad)))


@pytest.mark.parametrize("content", [b"junk\n", b"not a checkpoint", b""])
def test_perceptual_unreadable_file_is_a_user_error(tmp_path, content):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(content)  # torch.load raises KeyError, UnpicklingError or EOFError on these
    with pytest.raises(UserError, match=r"^loss\.perceptual_weights: .*bad\.pth is not a VGG-16 state dict"):
        build_perceptual_loss(LossConfig(perceptual_weight=0.1, perceptual_weights=str(bad)))


def test_perceptual_file_of_a_pickle_or_no_dict_is_a_user_error(tmp_path):
    """A file holding Python objects other than tensors is refused unread (never run), and one holding a
    tensor or a list, not a state dict, is said so: one line naming the file, not a traceback."""
    from faults import PicklePayload

    target = tmp_path / "pwned"
    bad = tmp_path / "bad.pth"
    torch.save({"features.0.weight": PicklePayload(target)}, bad)
    what = r"^loss\.perceptual_weights: .*bad\.pth is not a VGG-16 state dict like vgg16-397923af\.pth"
    with pytest.raises(UserError, match=rf"{what} \(it holds Python objects other than tensors; refused\)$"):
        build_perceptual_loss(LossConfig(perceptual_weight=0.1, perceptual_weights=str(bad)))
    assert not target.exists()
    for value, held in ((torch.zeros(3), "Tensor"), ([torch.zeros(3)], "list")):
        torch.save(value, bad)
        with pytest.raises(UserError, match=rf"{what} \(it holds a {held}\)$"):
            build_perceptual_loss(LossConfig(perceptual_weight=0.1, perceptual_weights=str(bad)))
