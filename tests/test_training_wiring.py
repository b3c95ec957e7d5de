"""The training step's wiring, where a consistent bug passed the tests that compare two runs: gradient
clipping binds (of the true, unscaled gradients under a loss scale), the saved EMA is the average of the
steps' weights, the tokenizer's loss is the weighted sum the recipe asks for, and the discriminator is
told which images are real and stays frozen for the generator's GAN term."""

import pytest
import torch
from tiny_tokenizer import load, metrics_by_step, write_recipe
from torch import nn

from smapctl.models.smap import SMAP
from smapctl.train import checkpoint as ckpt
from smapctl.train import tokenizer as tok_train
from smapctl.train.runner import TrainingRun
from smapctl.train.tokenizer import train_tokenizer


def _run_with_one_net(tmp_path, *sets, scale: float | None = None):
    """A TrainingRun and one (Linear(2, 1), SGD lr 1) pair with weights 0 after a backward that gives the
    gradient [3, 4] (norm 5), under a CPU loss scaler of `scale` when given."""
    run = TrainingRun(
        load(write_recipe(tmp_path), *sets), tmp_path / "run", kind="tokenizer", build_model=None
    )
    scaler = None
    if scale is not None:
        scaler = torch.amp.GradScaler("cpu", init_scale=scale)
        run.accelerator.scaler = scaler
    net = nn.Linear(2, 1, bias=False)
    nn.init.zeros_(net.weight)
    net, opt = run.prepare(net, torch.optim.SGD(net.parameters(), lr=1.0))
    loss = net(torch.tensor([[3.0, 4.0]])).sum()
    (scaler.scale(loss) if scaler is not None else loss).backward()
    return run, net, opt


@pytest.mark.parametrize("scale", [None, 1024.0], ids=["fp32", "fp16-scale"])
def test_gradients_are_clipped_to_train_grad_clip(tmp_path, scale):
    """grad_clip 1: the gradient [3, 4] is cut to norm 1 before the step, of its true (unscaled) values;
    clipped while still scaled, the step was 1/1024 of it."""
    run, net, opt = _run_with_one_net(tmp_path, "train.grad_clip=1.0", scale=scale)
    assert run.clip_and_step((net, opt))
    torch.testing.assert_close(net.weight.detach(), -torch.tensor([[0.6, 0.8]]))


def test_grad_clip_0_does_not_clip(tmp_path):
    run, net, opt = _run_with_one_net(tmp_path, "train.grad_clip=0")
    assert run.clip_and_step((net, opt))
    torch.testing.assert_close(net.weight.detach(), -torch.tensor([[3.0, 4.0]]))


def test_the_saved_ema_averages_the_trained_weights(tmp_path):
    """One step at ema_decay 0.5: ema = 0.5 * initial + 0.5 * trained weights (floats), buffers copied."""
    recipe = load(
        write_recipe(tmp_path), "train.max_steps=1", "train.ema_decay=0.5", "train.sample_every=100"
    )
    final = train_tokenizer(recipe, tmp_path / "run")
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(recipe.train.seed)  # as train_tokenizer builds it
        initial = SMAP(recipe.model).state_dict()
    model, ema = ckpt.load_weights(final, "model"), ckpt.load_weights(final, "ema")
    assert set(model) == set(ema)
    changed = 0
    for k, w in model.items():
        if w.is_floating_point():
            torch.testing.assert_close(ema[k], 0.5 * initial[k].float() + 0.5 * w.float(), msg=k)
            changed += not torch.equal(w, initial[k])
    assert changed > 0  # the step moved the weights (else the average says nothing)


@pytest.fixture
def recipe_file(tmp_path):
    return write_recipe(tmp_path)


GAN = ["loss.gan_start_step=0", "loss.disc_width=8", "loss.disc_layers=2", "train.sample_every=100"]


def test_the_loss_is_the_weighted_sum_of_its_terms(tmp_path, recipe_file, vgg_file, monkeypatch):
    """Weights other than 1 (pixel 2, perceptual 0.3, GAN 0.5): a weight dropped from the sum, or the
    GAN term's weight, changes `loss` but none of the logged terms."""
    raw = []
    pixel = tok_train.pixel_loss

    def recorded(kind, x, y):
        value = pixel(kind, x, y)
        raw.append(float(value.detach()))
        return value

    monkeypatch.setattr(tok_train, "pixel_loss", recorded)
    sets = [
        *GAN,
        "loss.pixel_weight=2.0",
        "loss.perceptual_weight=0.3",
        f"loss.perceptual_weights={vgg_file}",
    ]
    sets += ["loss.gan_weight=0.5", "train.max_steps=3", "train.log_every=1"]
    train_tokenizer(load(recipe_file, *sets), tmp_path / "run")
    rows = metrics_by_step(tmp_path / "run")
    for step in (1, 2, 3):
        r = rows[step]
        assert r["pixel"] == pytest.approx(2.0 * raw[step - 1], rel=1e-5)  # logged with its weight
        expected = (
            r["pixel"] + 0.3 * r["perceptual"] + r["reg"] + 0.5 * r["gan_adaptive_weight"] * r["g_loss"]
        )
        assert r["loss"] == pytest.approx(expected, rel=1e-5, abs=1e-7), step


def test_the_discriminator_is_told_which_images_are_real(tmp_path, recipe_file, monkeypatch):
    """hinge_d_loss(real, fake): `real` must be the logits of the training images, `fake` those of the
    (detached) reconstructions; and the generator's GAN term must leave the discriminator without
    gradients (it is frozen for that forward)."""
    calls, images = [], []
    hinge, pixel, build = tok_train.hinge_d_loss, tok_train.pixel_loss, tok_train.build_discriminator

    def recorded_hinge(real_logits, fake_logits):
        calls.append((real_logits.detach().clone(), fake_logits.detach().clone()))
        return hinge(real_logits, fake_logits)

    def recorded_pixel(kind, x, y):
        images.append(y.detach().clone())
        return pixel(kind, x, y)

    forwards = []

    def built(cfg):
        disc = build(cfg)
        disc.register_forward_hook(
            lambda m, inp, out: forwards.append(
                (inp[0].detach().clone(), out.detach().clone(), any(p.requires_grad for p in m.parameters()))
            )
        )
        return disc

    monkeypatch.setattr(tok_train, "hinge_d_loss", recorded_hinge)
    monkeypatch.setattr(tok_train, "pixel_loss", recorded_pixel)
    monkeypatch.setattr(tok_train, "build_discriminator", built)
    train_tokenizer(load(recipe_file, *GAN, "loss.gan_weight=0.1", "train.max_steps=2"), tmp_path / "run")
    assert len(calls) == len(images) == 2
    judged = [f for f in forwards if len(f[0]) == 2 * len(images[0])]  # the discriminator's own forward
    generator_side = [f for f in forwards if len(f[0]) == len(images[0])]  # the GAN term of the generator
    assert len(judged) == 2 and len(generator_side) == 2
    assert not any(grad for _, _, grad in generator_side)  # frozen for the generator's term
    for (real, fake), x, (inp, out, _) in zip(calls, images, judged, strict=True):
        b = len(x)
        assert torch.equal(inp[:b], x)  # the real images first ...
        assert torch.equal(real, out[:b]) and torch.equal(fake, out[b:])  # ... and judged as the real ones


def test_the_adaptive_weight_is_taken_at_the_decoders_last_layer(tmp_path, recipe_file, monkeypatch):
    """VQGAN's ratio of gradient norms is taken at the last layer of the decoder (its pixel projection's
    weight); another parameter gives another weight, and every logged value stayed plausible."""
    seen = []
    taken = tok_train.adaptive_gan_weight

    def recorded(rec, g_loss, last_layer_weight, **kwargs):
        seen.append(last_layer_weight)
        return taken(rec, g_loss, last_layer_weight, **kwargs)

    monkeypatch.setattr(tok_train, "adaptive_gan_weight", recorded)
    built = []
    make = tok_train.build_parts
    monkeypatch.setattr(tok_train, "build_parts", lambda recipe: built.append(make(recipe)) or built[-1])
    train_tokenizer(load(recipe_file, *GAN, "loss.gan_weight=0.1", "train.max_steps=2"), tmp_path / "run")
    assert len(seen) == 2 and all(w is built[0].model.decoder.to_pixels.weight for w in seen)


def test_without_the_adaptive_weight_the_gan_term_has_weight_1(tmp_path, recipe_file):
    """loss.gan_adaptive_weight false: the generator's GAN term is gan_weight * g_loss (weight 1, logged
    as such), from the GAN's start step on."""
    sets = [*GAN, "loss.gan_adaptive_weight=false", "loss.gan_weight=0.5", "loss.gan_start_step=1"]
    train_tokenizer(load(recipe_file, *sets, "train.max_steps=3", "train.log_every=1"), tmp_path / "run")
    rows = metrics_by_step(tmp_path / "run")
    assert "g_loss" not in rows[1]
    for step in (2, 3):
        r = rows[step]
        assert r["gan_adaptive_weight"] == 1.0
        assert r["loss"] == pytest.approx(r["pixel"] + r["reg"] + 0.5 * r["g_loss"], rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("kind", ["smap", "llamagen"])
def test_the_previews_model_holds_the_ema_weights_themselves_not_a_copy(tmp_path, kind):
    """The previews' and validation's model kept a copy of the EMA weights for the whole run: 1.6 GB more
    at SMAP-B size (CARD-XL 4.4 GB). It holds the average's own tensors, follows it as it moves, and
    computes the buffers that the average does not hold (LlamaGen's rotary tables)."""
    from smapctl.models.llamagen import LlamaGen, LlamaGenConfig
    from smapctl.train.ema import EMA

    recipe = load(write_recipe(tmp_path), "train.ema_decay=0.5")
    if kind == "smap":
        build = lambda: SMAP(recipe.model)  # noqa: E731
    else:
        cfg = LlamaGenConfig(
            vocab_size=16, num_tokens=6, num_classes=3, class_dim=8, width=32, depth=1, num_heads=4
        )
        build = lambda: LlamaGen(cfg)  # noqa: E731
    run = TrainingRun(recipe, tmp_path / "run", kind="tokenizer", build_model=build)
    model = build()
    ema = EMA(model, 0.5)
    for _ in range(2):
        preview = run.eval_model(ema)
        assert not preview.training and not any(p.requires_grad for p in preview.parameters())
        shadow = ema.state_dict()
        for name, tensor in preview.state_dict().items():
            assert tensor.data_ptr() == shadow[name].data_ptr(), name
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        ema.update(model)
        for name, tensor in preview.state_dict().items():  # in place: the preview's model follows
            assert torch.equal(tensor, ema.state_dict()[name]), name
    assert run.eval_model(ema) is preview
    with torch.no_grad():
        if kind == "smap":
            images = torch.zeros(2, 3, recipe.model.image_size, recipe.model.image_size)
            assert torch.isfinite(preview(images, torch.tensor([0, 1])).recon).all()
        else:
            assert preview.sample(torch.tensor([0, 1]), generator=torch.Generator().manual_seed(0)).shape == (
                2,
                6,
            )


def test_training_on_the_cpu_warns_of_a_model_too_large_for_the_machines_memory(
    tmp_path, monkeypatch, caplog
):
    """Before the first step, once: the weights, gradients, AdamW's moments and the EMA (20 bytes a
    trained parameter) against the machine's memory (here 1,000 bytes)."""
    import smapctl.runtime

    monkeypatch.setattr(smapctl.runtime, "machine_memory", lambda: 1000, raising=False)
    recipe = load(write_recipe(tmp_path), "train.max_steps=1", "train.sample_every=100")
    trained = sum(p.numel() for p in SMAP(recipe.model).parameters() if p.requires_grad)
    with caplog.at_level("WARNING", logger="smapctl"):
        train_tokenizer(recipe, tmp_path / "run")
    said = [r.getMessage() for r in caplog.records if "in fp32 takes at least" in r.getMessage()]
    assert said == [
        f"training {trained:,} parameters in fp32 takes at least {trained * 20 / 2**30:.1f} GiB of"
        " memory (weights, gradients, AdamW's two moments and the EMA), more than this machine's 0.0 GiB:"
        " the run is likely to be killed for lack of memory"
    ]
