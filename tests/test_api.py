"""`smapctl.Tokenizer` / `smapctl.Generator`: the Python API gives the numbers the commands give (the
tokens `tokenize` stores, the pixels `decode` writes, the images `sample` draws), and one-line errors."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import smapctl
from smapctl.data.datasets import build_eval_dataset
from smapctl.data.images import to_uint8
from smapctl.errors import UserError
from smapctl.ops.sample import sample_images
from smapctl.ops.tokenize import decode_codes, tokenize_images
from smapctl.recipe import load_generator_recipe
from smapctl.train.generator import train_generator

ROOT = Path(__file__).resolve().parents[1]
TINY_CARD = [
    *("model.num_tokens=8", "model.class_dim=32", "model.width=32", "model.depth=1", "model.num_heads=2"),
    *("model.head_depth=1", "model.head_width=32", "train.batch_size=16", "train.precision='no'"),
    *("train.warmup_steps=0", "train.max_steps=4", "train.sample_every=100", "train.ckpt_every=100"),
    "sample.steps=3",
]


@pytest.fixture(scope="module")
def card_run(tiny_kl_tokenizer, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("api-card")
    with pytest.MonkeyPatch.context() as mp:  # module fixtures run before the per-test cache fixture
        mp.setenv("SMAPCTL_CACHE", str(tmp_path_factory.getbasetemp() / "smapctl-cache"))
        sets = [f"latents.tokenizer={tiny_kl_tokenizer}", *TINY_CARD]
        train_generator(load_generator_recipe(ROOT / "recipes/demo/generator.yaml", sets), run_dir)
    return run_dir


def digit_folder(root: Path, count: int = 6, size: tuple[int, int] = (24, 20)) -> list[Path]:
    """`count` digits as PNGs of another size than the tokenizers' 16 px (framing is part of the
    comparison), in class folders; their paths."""
    digits = build_eval_dataset("digits", 32)
    paths = []
    for i in range(count):
        image, label = digits[i]
        path = root / str(label) / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(to_uint8(image).permute(1, 2, 0).numpy()).resize(size, Image.BICUBIC).save(path)
        paths.append(path)
    return paths


@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_encode_and_decode_give_what_tokenize_and_decode_give(
    kind, tiny_kl_tokenizer, tiny_vq_tokenizer, tmp_path
):
    run = tiny_kl_tokenizer if kind == "kl" else tiny_vq_tokenizer
    digit_folder(tmp_path / "data")
    result = tokenize_images([tmp_path / "data"], tmp_path / "codes.pt", checkpoint=run, prefix=6)
    codes = result.codes
    tok = smapctl.Tokenizer.load(run, device="cpu")
    assert (tok.regularizer, tok.num_tokens, tok.image_size) == (kind, 8, 16)
    paths = [tmp_path / "data" / p for p in codes.paths]
    tokens = tok.encode(paths, codes.labels, prefix=6)
    assert tokens.dtype == codes.tokens.dtype and torch.equal(tokens, codes.tokens)
    # Names of classes, one per image, give the same labels as their ids.
    names = [tok.class_names[y] for y in codes.labels.tolist()]
    assert torch.equal(tok.encode(paths, names, prefix=6), tokens)
    # The pixels `smapctl decode` writes.
    decoded = decode_codes(tmp_path / "codes.pt", tmp_path / "recon", checkpoint=run, prefix=4)
    images = tok.decode(tokens[:, :4], codes.labels)
    assert images.dtype == torch.uint8 and images.shape == (len(paths), 3, 16, 16)
    for image, file in zip(images, decoded.files, strict=True):
        assert np.array_equal(image.permute(1, 2, 0).numpy(), np.asarray(Image.open(file).convert("RGB")))


def test_images_as_paths_pil_images_or_tensors_are_the_same_images(tiny_kl_tokenizer, tmp_path):
    tok = smapctl.Tokenizer.load(tiny_kl_tokenizer, device="cpu")
    paths = digit_folder(tmp_path, count=3)
    pil = [Image.open(p).convert("RGB") for p in paths]
    tensors = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in pil])  # (3, 3, 20, 24)
    framed = tok.frame(paths)
    assert framed.shape == (3, 3, 16, 16) and framed.dtype == torch.uint8
    assert torch.equal(tok.frame(pil), framed) and torch.equal(tok.frame(tensors), framed)
    assert torch.equal(tok.frame(list(tensors)), framed) and torch.equal(tok.frame(paths[0]), framed[:1])
    # A PIL image of another mode is converted as a file of it is read (transparency on white).
    rgba = pil[0].convert("RGBA")
    rgba.putalpha(0)
    assert torch.equal(tok.frame(rgba), torch.full((1, 3, 16, 16), 255, dtype=torch.uint8))
    assert torch.equal(tok.frame(pil[0].convert("L")), tok.frame(pil[0].convert("L").convert("RGB")))
    # One class for all; the reconstruction is the decode of the encoding, from any prefix (0: class only).
    tokens = tok.encode(tensors, "3", prefix=2)
    assert tokens.shape == (3, 2, 16) and tokens.dtype == torch.float32
    assert torch.equal(tok.reconstruct(pil, 3, prefix=2), tok.decode(tokens, [3, 3, 3]))
    class_only = tok.decode(tokens[:, :0], "3")
    assert torch.equal(class_only[0], class_only[1])  # no token: the class alone decides the image
    assert tok.encode([], "3").shape == (0, 8, 16) and tok.decode(tokens[:0], "3").shape == (0, 3, 16, 16)


def test_a_tokenizer_without_classes_takes_none(tiny_unconditioned_tokenizer, tmp_path):
    tok = smapctl.Tokenizer.load(tiny_unconditioned_tokenizer, device="cpu")
    paths = digit_folder(tmp_path, count=2)
    tokens = tok.encode(paths)
    assert torch.equal(tok.decode(tokens), tok.decode(tokens, [0, 1]))  # its decoder ignores the class


def test_bad_input_is_a_one_line_error(tiny_kl_tokenizer, tiny_vq_tokenizer, tmp_path):
    tok = smapctl.Tokenizer.load(tiny_kl_tokenizer, device="cpu")
    paths = digit_folder(tmp_path, count=2)
    cases = [
        (lambda: tok.encode(paths), "a class-conditioned tokenizer needs the images' classes"),
        (lambda: tok.encode(paths, "cat"), "classes: unknown class 'cat'; the tokenizer's classes are: 0, 1"),
        (lambda: tok.encode(paths, [1, 2, 3]), "classes: 3 given for 2 images"),
        (lambda: tok.encode(paths, 10), "classes: class id 10 is out of range"),
        (lambda: tok.encode(paths, -1), "classes: class id -1 is negative"),
        (lambda: tok.encode(paths, torch.tensor([0.5, 1.0])), "classes: class ids are integers"),
        (lambda: tok.encode(paths, 1, prefix=9), "prefix 9: out of range"),
        (
            lambda: tok.encode(torch.rand(2, 3, 16, 16), 1),
            "a tensor image is uint8 (3, H, W), not torch.float32",
        ),
        (lambda: tok.encode(tmp_path / "none.png", 1), "none.png"),
        (
            lambda: tok.encode([np.zeros((16, 16, 3), np.uint8)], 1),
            "a path, a PIL image or a uint8 tensor, not",
        ),
        (lambda: tok.decode(torch.zeros(2, 4), 1), "decodes (N, k, 16) floating-point latents"),
        (lambda: tok.decode(torch.zeros(2, 9, 16), 1), "tokens: 9 per image"),
    ]
    vq = smapctl.Tokenizer.load(tiny_vq_tokenizer, device="cpu")
    cases.append((lambda: vq.decode(torch.full((1, 2), 64), 1), "indices 64..64, outside the codebook of 64"))
    for call, message in cases:
        with pytest.raises(UserError) as e:
            call()
        assert message in str(e.value) and "\n" not in str(e.value)


def test_sample_draws_the_images_smapctl_sample_draws(card_run, tmp_path):
    gen = smapctl.Generator.load(card_run, device="cpu")
    assert gen.kind == "card" and gen.class_names == [str(d) for d in range(10)]
    assert gen.settings["steps"] == 3 and gen.tokenizer.num_tokens == 8
    drawn = sample_images(
        card_run,
        tmp_path / "s",
        classes="0,3,7",
        per_class=2,
        seed=5,
        batch_size=4,
        device="cpu",
        cfg_scale=2.0,
    )
    samples = gen.sample("0,3,7", per_class=2, seed=5, batch_size=4, cfg_scale=2.0)
    assert samples.images.dtype == torch.uint8 and samples.images.shape == (6, 3, 16, 16)
    assert torch.equal(samples.images, drawn.images) and samples.labels.tolist() == [0, 0, 3, 3, 7, 7]
    # Classes as a list of names and ids, in the order given.
    again = gen.sample(["0", 3, "7"], per_class=2, seed=5, batch_size=4, cfg_scale=2.0)
    assert torch.equal(again.images, samples.images)
    assert gen.sample(7, seed=1).labels.tolist() == [7]
    with pytest.raises(UserError, match="--top-k"):  # a setting CARD does not use
        gen.sample("0", top_k=5)
    with pytest.raises(UserError, match="unknown class 'cat'"):
        gen.sample(["cat"])


def test_importing_smapctl_stays_quick():
    """The API is imported on first use: `import smapctl` (every command starts with it) loads no torch."""
    code = "import sys, smapctl; print('torch' in sys.modules, smapctl.Tokenizer.__module__)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.stdout.split() == ["False", "smapctl.api"], r.stderr
