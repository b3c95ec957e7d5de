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
from smapctl.ops.decode import decode_codes
from smapctl.ops.sample import sample_images
from smapctl.ops.tokenize import tokenize_images
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
    # numpy arrays (skimage, OpenCV after BGR -> RGB) as PIL reads them: one (H, W, C), a batch
    # (N, H, W, C), a list; grayscale (H, W) or (H, W, 1) and RGBA as the PIL modes L and RGBA.
    arrays = np.stack([np.array(im) for im in pil])  # (3, 20, 24, 3)
    assert torch.equal(tok.frame(arrays), framed) and torch.equal(tok.frame(list(arrays)), framed)
    assert torch.equal(tok.frame(arrays[0]), framed[:1])
    gray = np.array(pil[0].convert("L"))
    assert torch.equal(tok.frame(gray), tok.frame(pil[0].convert("L")))
    assert torch.equal(tok.frame(gray[..., None]), tok.frame(gray))
    rgba_array = np.array(pil[0].convert("RGBA"))
    assert torch.equal(tok.frame(rgba_array), tok.frame(pil[0].convert("RGBA")))
    # A PIL image is what its file gives: EXIF orientation applied (a phone's photo), the image untouched.
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90
    pil[0].resize((24, 20)).save(tmp_path / "rotated.jpg", exif=exif)
    opened = Image.open(tmp_path / "rotated.jpg")
    assert torch.equal(tok.frame(opened), tok.frame(tmp_path / "rotated.jpg")) and opened.size == (24, 20)
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


def test_what_comes_back_is_an_ordinary_tensor_and_the_model_keeps_its_mode(tiny_kl_tokenizer, tmp_path):
    """A review: tensors made under inference_mode refused backward and in-place edits; a model a notebook
    had put in train mode encoded random latents (not the KL posterior's mean)."""
    tok = smapctl.Tokenizer.load(tiny_kl_tokenizer, device="cpu")
    paths = digit_folder(tmp_path, count=4)
    tokens = tok.encode(paths, np.array([0, 0, 1, 1]))  # numpy class ids, as datasets hand them over
    assert not tokens.is_inference() and not tokens.requires_grad
    tokens[:, 4:] = 0  # editable
    torch.nn.Linear(16, 1)(tokens).sum().backward()  # usable in the caller's own training
    images = tok.decode(tokens, np.int64(1))
    assert not images.is_inference()
    tok.model.train()
    assert torch.equal(tok.encode(paths, [0, 0, 1, 1]), tok.encode(paths, torch.tensor([0, 0, 1, 1])))
    assert tok.model.training  # given back as it was
    # Latents of another float type decode as float32; VQ indices of any integer type.
    assert torch.equal(tok.decode(tokens.double(), 1), images)
    assert repr(tok).startswith("Tokenizer(") and "Tokenizer" in dir(smapctl)


def test_integer_classes_are_ids_and_strings_are_names(tiny_kl_tokenizer, monkeypatch):
    """A folder's classes `1`..`10` sort as 1, 10, 2, ...: the integer 1 (a token file's or a sample's
    label) is the class of id 1, "10"; it was looked up as the name "1" (id 0)."""
    tok = smapctl.Tokenizer.load(tiny_kl_tokenizer, device="cpu")
    names = sorted(str(i) for i in range(1, 11))  # 1, 10, 2, ..., 9
    monkeypatch.setattr(tok._tok, "class_names", names)
    assert tok.labels([1, np.int64(2), torch.tensor(3).item()], 3).tolist() == [1, 2, 3]
    assert tok.labels(torch.tensor([1, 2]), 2).tolist() == [1, 2]
    # `list(samples.labels)`: 0-d tensors, the integers they hold (a float one is no id).
    assert tok.labels(list(torch.tensor([1, 2])), 2).tolist() == [1, 2]
    assert tok.labels([np.array(1), np.array("10")], 2).tolist() == [1, 1]  # id 1; the name "10"
    with pytest.raises(UserError, match=r"classes: 1\.0 is neither a class name nor an id"):
        tok.labels([torch.tensor(1.0)], 1)
    assert tok.labels(["1", "10"], 2).tolist() == [0, 1]  # names
    assert tok.labels(np.array(["10", "2"]), 2).tolist() == [1, 2]  # an array of names
    with pytest.raises(
        UserError, match="classes: class id 10 is out of range: .* has 10 classes, ids 0 to 9"
    ):
        tok.labels(torch.tensor([10]), 1)


def test_a_tokenizer_without_classes_takes_none(tiny_unconditioned_tokenizer, tmp_path):
    tok = smapctl.Tokenizer.load(tiny_unconditioned_tokenizer, device="cpu")
    paths = digit_folder(tmp_path, count=2)
    tokens = tok.encode(paths)
    assert torch.equal(tok.decode(tokens), tok.decode(tokens, [0, 1]))  # its decoder ignores the class
    # The labels its token files hold (-1: no class) are taken back.
    assert tok.labels(None, 2).tolist() == [-1, -1] == tok.labels(torch.tensor([-1, -1]), 2).tolist()


def test_bad_input_is_a_one_line_error(tiny_kl_tokenizer, tiny_vq_tokenizer, tmp_path):
    tok = smapctl.Tokenizer.load(tiny_kl_tokenizer, device="cpu")
    paths = digit_folder(tmp_path, count=2)
    cases = [
        (lambda: tok.encode(paths), "is class-conditioned: give the images' classes"),
        (lambda: tok.encode(paths, "cat"), "classes: unknown class 'cat'; the tokenizer's classes are: 0, 1"),
        (lambda: tok.encode(paths, [1, 2, 3]), "classes: 3 given for 2 images"),
        (lambda: tok.encode(paths, 10), "classes: class id 10 is out of range"),
        (lambda: tok.encode(paths, -1), "classes: class id -1 is out of range"),
        (lambda: tok.encode(paths, 3.0), "classes: 3.0 is neither a class name nor an id"),
        (lambda: tok.encode(paths, torch.tensor([0.5, 1.0])), "classes: class ids are integers"),
        (
            lambda: tok.encode(paths, torch.tensor([[0, 0], [1, 1]])),
            "one per image, not an array of shape (2, 2)",
        ),
        (lambda: tok.encode(paths, 1, prefix=9), "prefix 9: out of range"),
        (lambda: tok.encode(paths, 1, prefix=2.5), "prefix: an integer of at least 0, not 2.5"),
        (lambda: tok.encode(paths, 1, batch_size=0), "batch_size: an integer of at least 1, not 0"),
        (lambda: tok.encode(torch.rand(2, 3, 16, 16), 1), "a tensor image is uint8 (3, H, W) or a batch"),
        (
            lambda: tok.encode(np.zeros((16, 16, 3), np.float32), 1),
            "images: a numpy image is uint8 (H, W), (H, W, 3) or (H, W, 4), or a batch (N, H, W, C), not"
            " float32 (16, 16, 3) (floats in [0, 1]: (x * 255).round().astype(np.uint8))",
        ),
        (lambda: tok.encode([np.zeros((3, 16, 16), np.uint8)], 1), "a numpy image is uint8 (H, W), (H, W,"),
        (lambda: tok.encode([{"a": 1}], 1), "a path, a PIL image, a uint8 tensor or numpy array, not dict"),
        (
            lambda: tok.encode({"a.png": 1}, 1),
            "images: a path, a PIL image, a uint8 tensor or a list of them, not dict",
        ),
        (lambda: tok.encode(tmp_path, 1), f"{tmp_path}: a folder; give its image files"),
        (lambda: tok.encode(tmp_path / "none.png", 1), "none.png"),
        (
            lambda: tok.encode(b"a.png", 1),
            "images: a path, a PIL image, a uint8 tensor or numpy array, not bytes",
        ),
        (lambda: tok.encode(torch.zeros(3, 0, 5, dtype=torch.uint8), 1), "images: an image of 5x0 pixels"),
        (lambda: tok.encode([Image.new("RGB", (0, 5))], 1), "images: an image of 0x5 pixels"),
        (lambda: tok.encode([paths[0], paths[1], b"c.png"], 1), "images[2]: a path, a PIL image, a uint8"),
        (lambda: smapctl.Tokenizer(tiny_kl_tokenizer), "a checkpoint is loaded with Tokenizer.load("),
        (lambda: smapctl.Generator(str(tiny_kl_tokenizer)), "a checkpoint is loaded with Generator.load("),
        (lambda: tok.decode(torch.zeros(2, 4), 1), "decodes (N, k, 16) floating-point latents"),
        (lambda: tok.decode(torch.zeros(2, 9, 16), 1), "tokens: 9 per image"),
        (lambda: tok.decode(torch.full((1, 2, 16), float("nan")), 1), "latents that are not finite"),
        (lambda: tok.decode(torch.full((1, 2, 16), float("-inf")), 1), "latents that are not finite"),
        # Latents that overflow: float64 beyond float32's range, and ones the decoder overflows on (the
        # images came back black; `smapctl decode` refused them).
        (
            lambda: tok.decode(torch.full((1, 2, 16), 1e300, dtype=torch.float64), 1),
            "latents that are not finite",
        ),
        (
            lambda: tok.decode(torch.cat([torch.zeros(1, 2, 16), torch.full((1, 2, 16), 1e30)]), 1),
            "tokens[1]: decode to values that are not finite",
        ),
        # A tensor on the meta device has no values (torch: NotImplementedError naming neither).
        *(
            (call, f"{name}: a tensor on the meta device, which has a shape but no values")
            for call, name in (
                (
                    lambda: tok.encode(torch.zeros(2, 3, 16, 16, dtype=torch.uint8, device="meta"), 1),
                    "images",
                ),
                (lambda: tok.encode([torch.zeros(3, 16, 16, dtype=torch.uint8, device="meta")], 1), "images"),
                (lambda: tok.encode(paths, torch.zeros(2, dtype=torch.long, device="meta")), "classes"),
                (lambda: tok.encode(paths, torch.tensor(1, device="meta")), "classes"),
                (lambda: tok.encode(paths, 1, prefix=torch.tensor(2, device="meta")), "prefix"),
                (lambda: tok.decode(torch.zeros(1, 2, 16, device="meta"), 1), "tokens"),
            )
        ),
        (lambda: smapctl.Tokenizer.load(tiny_kl_tokenizer, device="gpu"), "device 'gpu': "),
        (
            lambda: smapctl.Tokenizer.load(tiny_kl_tokenizer, weights="xyz"),
            "weights: 'ema' or 'model', not 'xyz'",
        ),
        (
            lambda: smapctl.Generator.load(tiny_kl_tokenizer, weights="EMA"),
            "weights: 'ema' or 'model', not 'EMA'",
        ),
    ]
    if not torch.cuda.is_available():
        cases.append(
            (lambda: smapctl.Tokenizer.load(tiny_kl_tokenizer, device="cuda"), "device cuda: no GPU")
        )
    if not torch.mps.is_available():  # a RuntimeError of torch's, not naming the argument
        cases.append(
            (lambda: smapctl.Generator.load(tiny_kl_tokenizer, device="mps"), "device mps: no mps device")
        )
    # A weights file named (a path copied from the checkpoint folder) is the weights loaded, or refused.
    model_file = tok.path / "model.safetensors"
    assert smapctl.Tokenizer.load(model_file, weights="model", device="cpu").path == tok.path
    cases.append(
        (
            lambda: smapctl.Tokenizer.load(model_file, device="cpu"),
            f"{model_file}: names the model weights, but this loads the ema weights; pass weights='model' "
            "for those",
        )
    )
    # None loaded the commands' demo run (or said "pass --checkpoint").
    cases.append((lambda: smapctl.Generator.load(None), "checkpoint: a run or checkpoint folder, not None"))
    # A PIL image whose file is closed (PIL: a bare AssertionError) or truncated, opened lazily.
    with Image.open(paths[0]) as closed:
        pass
    (tmp_path / "half.png").write_bytes(paths[0].read_bytes()[: paths[0].stat().st_size // 2])
    half = Image.open(tmp_path / "half.png")
    cases.append((lambda: tok.encode(closed, 1), "a PIL image that cannot be read: its file was closed"))
    cases.append((lambda: tok.encode(half, 1), "a PIL image that cannot be read: truncated or corrupt"))
    # Classes read before any image: a wrong count is said at once, not after the last image is read.
    with pytest.raises(UserError, match="classes: 1 given for 2 images"):
        tok.encode([paths[0], tmp_path / "none.png"], [1])
    vq = smapctl.Tokenizer.load(tiny_vq_tokenizer, device="cpu")
    cases.append((lambda: vq.decode(torch.full((1, 2), 64), 1), "indices 64..64, outside the codebook of 64"))
    cases.append(
        (lambda: vq.decode(torch.zeros(1, 2), 1), "decodes (N, k) integer indices, not torch.float32")
    )
    for call, message in cases:
        with pytest.raises(UserError) as e:
            call()
        assert message in str(e.value) and "\n" not in str(e.value)
    half.close()  # the caller's image, as the caller's to close (its failed load left the file open)
    # The float conversion is advised for floats only; a numpy batch's error is the batch's (as a tensor's).
    with pytest.raises(UserError) as e:
        tok.encode(np.zeros((16, 16, 3), np.int64), 1)
    assert str(e.value).endswith("or a batch (N, H, W, C), not int64 (16, 16, 3)")
    with pytest.raises(UserError) as e:
        tok.encode(np.zeros((2, 16, 16, 3), np.float32), 1)
    assert str(e.value).startswith("images: a numpy image is uint8") and "(floats in [0, 1]: (x *" in str(
        e.value
    )


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
    samples = gen.sample(["0", 3, np.int64(7)], per_class=2, seed=5, batch_size=4, cfg_scale=2.0)
    assert samples.images.dtype == torch.uint8 and samples.images.shape == (6, 3, 16, 16)
    assert torch.equal(samples.images, drawn.images) and samples.labels.tolist() == [0, 0, 3, 3, 7, 7]
    assert not samples.images.is_inference()
    # A notebook shows its repr: the shapes, not every pixel; == compared tensors (a RuntimeError).
    assert len(samples) == 6 and len(repr(samples)) < 200
    assert (
        repr(samples)
        == "Samples(6 images (3, 16, 16) torch.uint8, tokens (8, 16) torch.float32, classes: 0, 3, 7)"
    )
    assert samples == samples and samples != drawn
    # The tokens the tokenizer decodes into them (CARD's own are normalised: `latent_stats`).
    assert samples.tokens.shape == (6, 8, 16)
    assert torch.equal(gen.tokenizer.decode(samples.tokens, samples.labels), samples.images)
    normalised = gen.latent_stats.normalize(samples.tokens)
    assert torch.allclose(gen.latent_stats.denormalize(normalised), samples.tokens, atol=1e-5)
    # A class given twice is drawn twice; one class alone; none.
    assert gen.sample([7, 7], per_class=1, seed=1).labels.tolist() == [7, 7]
    assert gen.sample(7, per_class=1).labels.tolist() == [7] == gen.sample(torch.tensor(7), 1).labels.tolist()
    empty = gen.sample([], per_class=1)
    assert empty.images.shape == (0, 3, 16, 16) and empty.tokens.shape == (0, 8, 16)
    assert gen.sample(iter([7]), per_class=1).labels.tolist() == [7]  # any iterable
    # Its own settings only, named as keyword arguments in the errors.
    assert set(gen.settings) == {"cfg_scale", "cfg_schedule", "temperature", "steps", "method"}
    assert torch.equal(gen.sample(3, 1, **gen.settings).images, gen.sample(3, 1).images)
    # numpy and torch scalars (a sweep over `np.arange`, `np.float32` scales) are the numbers they hold.
    scalars = gen.sample(3, 1, steps=np.int64(2), cfg_scale=np.float32(1.5), temperature=torch.tensor(0.5))
    assert torch.equal(scalars.images, gen.sample(3, 1, steps=2, cfg_scale=1.5, temperature=0.5).images)
    counts = gen.sample(3, per_class=torch.tensor(2), seed=torch.tensor(1), batch_size=np.int64(2))
    assert torch.equal(counts.images, gen.sample(3, per_class=2, seed=1, batch_size=2).images)
    for kwargs, message in [
        ({"top_k": 5}, "top_k: not a sampling setting of a card generator: cfg_scale, cfg_schedule"),
        ({"guidance": 2}, "guidance: not a sampling setting of a card generator"),
        ({"cfg_scale": "2"}, "cfg_scale: expected a number, got '2'"),
        ({"steps": 0}, "steps: must be a positive integer"),
        ({"steps": np.float32(2)}, "steps: expected an integer, got 2.0"),
        ({"method": "rk4"}, "method: expected one of 'euler', 'heun'"),
        ({"per_class": 0}, "per_class: an integer of at least 1, not 0"),
        ({"per_class": 2.5}, "per_class: an integer of at least 1, not 2.5"),
        ({"classes": ["cat"]}, "classes: unknown class 'cat'; the generator's classes are: 0, 1"),
        ({"classes": -1}, "classes: class id -1 is out of range: the generator has 10 classes, ids 0 to 9"),
        ({"classes": torch.tensor([[3, 4]])}, "classes: a list of them, not an array of shape (1, 2)"),
        ({"classes": None}, 'classes: "all", a class name or id, or a list of them; not None'),
        ({"seed": -1}, "seed: an integer of at least 0, not -1"),
        ({"seed": 2**32}, "seed: an integer from 0 to 4294967295, not 4294967296"),  # a raw ValueError
        ({"cfg_scale": torch.tensor(2.0, device="meta")}, "cfg_scale: a tensor on the meta device"),
        ({"classes": torch.tensor([1], device="meta")}, "classes: a tensor on the meta device"),
    ]:
        with pytest.raises(UserError) as e:
            gen.sample(**{"classes": 0, "per_class": 1, **kwargs})
        assert message in str(e.value) and "--" not in str(e.value), str(e.value)


def test_a_notebooks_float64_default_dtype_loads_the_same_models(card_run):
    """`torch.set_default_dtype(torch.float64)` (a numerical notebook) before `load`: the models are built
    in float32 as the checkpoints hold them (it failed on "... is torch.float32, the model's is float64")."""
    gen = smapctl.Generator.load(card_run, device="cpu")
    images = gen.sample(3, per_class=1).images
    torch.set_default_dtype(torch.float64)
    try:
        again = smapctl.Generator.load(card_run, device="cpu")
        assert torch.get_default_dtype() == torch.float64  # the notebook's, given back
        assert torch.equal(again.sample(3, per_class=1).images, images)
    finally:
        torch.set_default_dtype(torch.float32)


def test_importing_smapctl_stays_quick():
    """The API is imported on first use: `import smapctl` (every command starts with it) loads no torch."""
    code = "import sys, smapctl; print('torch' in sys.modules, smapctl.Tokenizer.__module__)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.stdout.split() == ["False", "smapctl.api"], r.stderr


def test_calls_from_two_threads_on_a_model_in_train_mode_take_turns(tiny_kl_tokenizer, tmp_path, monkeypatch):
    """A notebook fine-tuning the model (train mode) and encoding from two threads: the short call gave
    the train mode back while the long one was still encoding (its KL latents became posterior samples,
    4.96 off), and the model was left in eval mode."""
    import threading
    import time

    tok = smapctl.Tokenizer.load(tiny_kl_tokenizer, device="cpu")
    paths = digit_folder(tmp_path, count=6)
    tok.model.train()
    ref = tok.encode(paths, 3)
    long_started = threading.Event()
    encode = tok.model.encode

    def orchestrated(*args, **kwargs):  # the long call enters while the short one runs, and outlasts it
        if threading.current_thread().name == "short":
            long_started.wait(1.0)  # (times out when the calls take turns)
        elif not long_started.is_set():
            long_started.set()
            time.sleep(0.3)
        return encode(*args, **kwargs)

    monkeypatch.setattr(tok.model, "encode", orchestrated)
    got = {}
    short = threading.Thread(
        target=lambda: got.update(short=tok.encode(paths[:2], 3, batch_size=1)), name="short"
    )
    long = threading.Thread(target=lambda: got.update(long=tok.encode(paths, 3, batch_size=1)), name="long")
    short.start()
    time.sleep(0.1)
    long.start()
    short.join()
    long.join()
    assert torch.equal(got["short"], ref[:2]) and torch.equal(got["long"], ref)
    assert tok.model.training


def test_bf16_on_a_cpu_that_emulates_it_is_said_once(tiny_kl_tokenizer, tmp_path, monkeypatch, caplog):
    """`smapctl tokenize --precision bf16` warns where bf16 is emulated (tens of times slower); the API's
    `encode(precision="bf16")` ran 5.8x slower than fp32 without a word."""
    monkeypatch.setattr("smapctl.precision.cpu_bf16_units", lambda: None)  # a CPU that does not say
    monkeypatch.setattr("smapctl.precision.cpu_bf16_speedup", lambda: 1 / 62)
    tok = smapctl.Tokenizer.load(tiny_kl_tokenizer, device="cpu")
    paths = digit_folder(tmp_path, count=2)
    tok.encode(paths, 1, precision="fp32")
    assert "bf16" not in caplog.text
    tok.encode(paths, 1, precision="bf16")
    tok.encode(paths, 1, precision="bf16")
    said = [r.getMessage() for r in caplog.records if "bf16" in r.getMessage()]
    assert said == ["precision='bf16': this CPU runs bf16 matmuls 62x slower than fp32; use precision='fp32'"]
    # One that says it has no bf16 units is believed: on a busy host the probe measured bf16 "1.17x
    # faster" in half of the fresh processes, which then said nothing (bf16 ran 2-7x slower).
    monkeypatch.setattr("smapctl.precision.cpu_bf16_units", lambda: False)
    monkeypatch.setattr("smapctl.precision.cpu_bf16_speedup", lambda: 1.17)
    caplog.clear()
    smapctl.Tokenizer.load(tiny_kl_tokenizer, device="cpu").encode(paths, 1, precision="bf16")
    said = [r.getMessage() for r in caplog.records if "bf16" in r.getMessage()]
    assert said == [
        "precision='bf16': this CPU has no bf16 units and emulates bf16, many times slower than fp32; use"
        " precision='fp32'"
    ]


def test_to_moves_a_loaded_model_and_a_generator_its_tokenizer(card_run, monkeypatch):
    gen = smapctl.Generator.load(card_run, device="cpu")
    before = gen.sample([3], per_class=2, seed=1)
    assert gen.to("cpu") is gen and torch.equal(gen.sample([3], per_class=2, seed=1).images, before.images)
    if not torch.cuda.is_available():  # refused in one line, nothing moved
        with pytest.raises(UserError, match="no GPU"):
            gen.to("cuda")
        assert gen.tokenizer.device.type == "cpu"
    # Where a second device is wanted, the meta device stands in (this machine has one device).
    monkeypatch.setattr(smapctl.api, "_device", lambda device: torch.device("meta"))
    tok = gen.tokenizer
    tok.to("elsewhere")  # the tokenizer alone: the generator stays, and says so in one line
    with pytest.raises(
        UserError, match=r"^the generator is on cpu but its tokenizer on meta: move both with"
    ):
        gen.sample([3], per_class=1)
    assert gen.to("elsewhere") is gen
    assert {p.device.type for p in gen.model.parameters()} == {"meta"}
    assert {p.device.type for p in tok.model.parameters()} == {"meta"} and tok.device.type == "meta"
