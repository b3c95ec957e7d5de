"""The reference classifier: it learns, it is deterministic, and its cache round-trips."""

import json
import logging

import pytest
import torch

from smapctl.errors import UserError
from smapctl.eval import classifier as clf
from smapctl.eval.classifier import (
    ReferenceClassifier,
    accuracy,
    load_or_train_classifier,
    random_shift,
    train_reference_classifier,
)

NUM_CLASSES = 4
SIZE = 16


def synthetic_set(n_per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (N, 3, 16, 16): noise plus stripes whose colour channel and direction depend on the class."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(NUM_CLASSES).repeat_interleave(n_per_class)
    images = torch.rand(labels.shape[0], 3, SIZE, SIZE, generator=g) * 0.4
    stripes = (torch.arange(SIZE) // 2 % 2).float()  # (16,)
    for i, c in enumerate(labels.tolist()):
        pattern = stripes[:, None].expand(SIZE, SIZE) if c % 2 == 0 else stripes[None, :].expand(SIZE, SIZE)
        images[i, c // 2] += 0.6 * pattern
    return (images.clamp(0, 1) * 255).round().to(torch.uint8), labels


def test_uint8_images_become_the_floats_every_loader_gives():
    # evaluate encoded x / 127.5 - 1, which differs from the loaders' (x / 255 - 0.5) / 0.5 in the last
    # bit for 111 of the 256 values: not what tokenize encodes.
    from smapctl.data.images import eval_transform

    values = torch.arange(256, dtype=torch.uint8).repeat(3, 16, 1)  # (3, 16, 256)
    got = clf.to_signed_float(values[None])[0]
    assert got.dtype == torch.float32 and torch.equal(
        got, eval_transform(256)(values.repeat(1, 16, 1))[:, :16]
    )


def test_shapes_and_resizing():
    torch.manual_seed(0)
    model = ReferenceClassifier(NUM_CLASSES, SIZE).eval()
    x = torch.rand(2, 3, SIZE, SIZE) * 2 - 1
    assert model.features(x).shape == (2, model.widths[-1])
    assert model(x).shape == (2, NUM_CLASSES)
    # Other sizes are resized to image_size (antialiased bilinear) first.
    big = torch.rand(2, 3, 2 * SIZE, 2 * SIZE) * 2 - 1
    small = torch.nn.functional.interpolate(big, size=(SIZE, SIZE), mode="bilinear", antialias=True)
    torch.testing.assert_close(model(big), model(small))


def test_random_shift_keeps_shape_and_is_seeded():
    x = torch.rand(3, 3, SIZE, SIZE)
    a = random_shift(x, torch.Generator().manual_seed(1))
    b = random_shift(x, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.equal(a, b)
    assert not torch.equal(a, x)
    torch.testing.assert_close(random_shift(x, torch.Generator().manual_seed(1), max_shift=0.0), x)


def test_learns_separable_classes_quickly():
    train_x, train_y = synthetic_set(32, seed=0)
    test_x, test_y = synthetic_set(16, seed=1)
    model = train_reference_classifier(train_x, train_y, NUM_CLASSES, steps=60, seed=0, batch_size=32)
    assert accuracy(model, test_x, test_y) >= 0.95
    # uint8 and the equivalent float [-1, 1] input give the same predictions.
    assert accuracy(model, test_x.float() / 127.5 - 1, test_y) == accuracy(model, test_x, test_y)
    # The classifier-feature Frechet distance (clf-FD, as `evaluate` computes it): ~0 for a set with
    # itself, larger across classes.
    from smapctl.eval.semantic import SemanticReference, SemanticTally

    tally = SemanticTally(SemanticReference(model, "synthetic", list("abcd")), torch.device("cpu"))
    for name, images in [("all", test_x), ("a", test_x[:8]), ("b", test_x[8:16]), ("c", test_x[16:32])]:
        tally.add(name, images, None)
    assert abs(tally.frechet("all", "all")) < 1e-6
    assert tally.frechet("a", "c") > tally.frechet("a", "b")


def test_training_is_deterministic():
    x, y = synthetic_set(8, seed=0)
    rng_before = torch.get_rng_state()
    a = train_reference_classifier(x, y, NUM_CLASSES, steps=4, seed=3, batch_size=8)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's RNG is left alone
    b = train_reference_classifier(x, y, NUM_CLASSES, steps=4, seed=3, batch_size=8)
    c = train_reference_classifier(x, y, NUM_CLASSES, steps=4, seed=4, batch_size=8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_training_holds_uint8_images_and_makes_floats_a_batch_at_a_time(monkeypatch):
    # `images_fit_in_memory` lets a folder's uint8 training split take half the machine's memory; all of
    # it as float32 would take 4x that (a 30,000-image folder at 64 px: 3.5 GB peak, 1.3 GB of it floats).
    x, y = synthetic_set(8, seed=0)  # 32 images
    floats = clf.to_signed_float(x)
    converted = []
    real = clf.to_signed_float
    monkeypatch.setattr(clf, "to_signed_float", lambda images: converted.append(len(images)) or real(images))
    a = train_reference_classifier(x, y, NUM_CLASSES, steps=3, seed=0, batch_size=8)
    assert converted == [8, 8, 8]  # each step's batch, never the whole set
    b = train_reference_classifier(floats, y, NUM_CLASSES, steps=3, seed=0, batch_size=8)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # the same training as from the floats


def test_data_fingerprint_hashes_the_images_without_a_copy_of_them():
    import tracemalloc

    images = torch.zeros(64, 3, 64, 64, dtype=torch.uint8)  # 786 kB
    labels = torch.zeros(64, dtype=torch.long)
    tracemalloc.start()
    try:
        digest = clf._fingerprint(images, labels)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < images.numel() // 4, peak  # `tobytes()` allocated all of it again
    assert digest == clf._fingerprint(images.clone(), labels)


def test_cache_round_trip(tmp_path, monkeypatch):
    x, y = synthetic_set(8, seed=0)
    kwargs = dict(num_classes=NUM_CLASSES, cache_dir=tmp_path, steps=3, seed=0, batch_size=8)
    model = load_or_train_classifier("my set/v1", SIZE, x, y, **kwargs)
    weights = tmp_path / f"refclf-my_set_v1-{SIZE}px-3steps-v{clf.CLASSIFIER_VERSION}.safetensors"
    meta = json.loads(weights.with_suffix(".json").read_text())
    assert (
        meta["dataset"] == "my set/v1" and meta["num_classes"] == NUM_CLASSES and meta["image_size"] == SIZE
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [weights.name, weights.with_suffix(".json").name]
    )

    def no_training(*args, **kw):
        raise AssertionError("should have loaded from the cache")

    with monkeypatch.context() as m:
        m.setattr(clf, "train_reference_classifier", no_training)
        again = load_or_train_classifier("my set/v1", SIZE, x, y, **kwargs)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())
    # Another step count (a quick run) is another file: neither evicts the other.
    load_or_train_classifier("my set/v1", SIZE, x, y, **(kwargs | {"steps": 2}))
    assert weights.is_file() and (tmp_path / weights.name.replace("-3steps-", "-2steps-")).is_file()
    assert not again.training

    # Different data under the same name is not served from the cache.
    calls = []
    real_train = clf.train_reference_classifier
    monkeypatch.setattr(
        clf, "train_reference_classifier", lambda *a, **k: calls.append(1) or real_train(*a, **k)
    )
    x2 = x.clone()
    x2[0, 0, 0, 0] ^= 1
    load_or_train_classifier("my set/v1", SIZE, x2, y, **kwargs)
    assert calls == [1]


def test_a_classifier_cached_before_the_loaders_floats_is_trained_again(tmp_path, monkeypatch):
    """A smapctl before the loaders' floats (a2debfd) trained the reference classifier on x / 127.5 - 1 and
    cached it under the name and metadata of version 1; read back, it scored the same samples otherwise
    than the classifier this smapctl trains (clf-FD 126.50, not 128.47, for four digits samples)."""
    x, y = synthetic_set(8, seed=0)
    kwargs = dict(num_classes=NUM_CLASSES, cache_dir=tmp_path, steps=3, seed=0, batch_size=8)
    meta = {
        "version": 1,
        "dataset": "set",
        "image_size": SIZE,
        "num_classes": NUM_CLASSES,
        "widths": list(clf.DEFAULT_WIDTHS),
        "steps": 3,
        "seed": 0,
        "batch_size": 8,
        "num_train": len(y),
        "data_sha256": clf._fingerprint(x, y),
    }
    stale = ReferenceClassifier(NUM_CLASSES, SIZE)
    clf.save_classifier(stale, tmp_path / f"refclf-set-{SIZE}px-3steps-v1.safetensors", meta)
    calls = []
    real_train = clf.train_reference_classifier
    monkeypatch.setattr(
        clf, "train_reference_classifier", lambda *a, **k: calls.append(1) or real_train(*a, **k)
    )
    model = load_or_train_classifier("set", SIZE, x, y, **kwargs)
    assert calls == [1]
    assert any(not torch.equal(v, stale.state_dict()[k]) for k, v in model.state_dict().items())


def test_training_says_so_and_shows_progress_a_cache_hit_is_quiet(tmp_path, caplog, capsys, monkeypatch):
    """The first evaluation trains for minutes on a CPU: it used to log the same line as a cache hit and
    show nothing more, so it looked hung. Its progress is `progress`'s: not on a terminal (here), a line
    now and then (every step with SMAPCTL_PROGRESS_EVERY=0), not a bar drawn into the log."""
    monkeypatch.setenv("SMAPCTL_PROGRESS_EVERY", "0")
    x, y = synthetic_set(8, seed=0)
    kwargs = dict(num_classes=NUM_CLASSES, cache_dir=tmp_path, steps=3, seed=0, batch_size=8)
    with caplog.at_level(logging.INFO, logger="smapctl"):
        load_or_train_classifier("set", SIZE, x, y, **kwargs)
    assert f"training the reference classifier of set ({len(y)} images" in caplog.text
    assert "training the reference classifier (once): 3 of 3 steps (100.0%)" in caplog.text
    assert "\r" not in capsys.readouterr().err
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="smapctl"):
        load_or_train_classifier("set", SIZE, x, y, **kwargs)
    assert caplog.text == "" and "reference classifier" not in capsys.readouterr().err


def test_bad_inputs():
    with pytest.raises(ValueError, match="not square"):
        train_reference_classifier(torch.zeros(2, 3, 8, 10, dtype=torch.uint8), torch.zeros(2), 2, steps=1)
    with pytest.raises(ValueError, match="expected images"):
        train_reference_classifier(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.zeros(3), 2, steps=1)


def test_a_folders_classifier_is_trained_on_its_images_as_they_are(tmp_path, caplog):
    """The training images (uint8 since the eval transform gives uint8) went through to_uint8 again,
    which read them as [-1, 1] floats: every pixel became 255, and the classifier of any image folder
    predicted one class (evaluate --semantic on your own data: always chance)."""
    from PIL import Image

    from smapctl.data.config import DataConfig
    from smapctl.eval.semantic import _folder_training_images

    for name, value in (("dark", 30), ("mid", 120)):
        for i in range(4):
            (tmp_path / "data" / name).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (20, 20), (value, value + i, value)).save(tmp_path / "data" / name / f"{i}.png")
    cfg = DataConfig(dataset=str(tmp_path / "data"), val_fraction=0.0, num_workers=0)
    (tmp_path / "data" / "mid" / "broken.png").write_bytes(b"")
    with caplog.at_level(logging.INFO, logger="smapctl"):
        images, labels, names = _folder_training_images(cfg, 16)
    assert images.dtype == torch.uint8 and names == ["dark", "mid"]
    # An unreadable image it names is said to be among the classifier's training images (not the scored).
    said = [r.getMessage() for r in caplog.records]
    assert (
        said[0] == f"reading the reference classifier's training images: {cfg.dataset} (its training split)"
    )
    assert any("skipping unreadable image" in line for line in said[1:])
    means = [images[labels == c].float().mean().item() for c in (0, 1)]
    assert means[0] == pytest.approx(31, abs=2) and means[1] == pytest.approx(121, abs=2)
    # A folder whose training split would not fit in memory (ImageNet: 15.7 GB at 64 px, twice that
    # while it was concatenated) is refused before any image is read.
    caplog.clear()
    pages = {
        "SC_PAGE_SIZE": 4096,
        "SC_PHYS_PAGES": 1,
    }  # a machine of 4 KiB: 9 images of 16 px (one unreadable) do not fit
    with pytest.MonkeyPatch.context() as mp, caplog.at_level(logging.INFO, logger="smapctl"):
        mp.setattr("smapctl.runtime.os.sysconf", pages.__getitem__)
        with pytest.raises(
            UserError, match=r"--semantic: .*: its training split, 9 images of 16x16 pixels take"
        ):
            _folder_training_images(cfg, 16)
    assert not any("reading" in r.getMessage() for r in caplog.records)


def test_trains_on_no_more_images_than_a_batch():
    """A folder of fewer images than the batch size (or exactly as many) trains on all of them each step."""
    x, y = synthetic_set(2, seed=0)  # 8 images
    for batch_size in (8, 32):
        model = train_reference_classifier(x, y, NUM_CLASSES, steps=2, seed=0, batch_size=batch_size)
        assert not model.training and model(x.float() / 127.5 - 1).shape == (8, NUM_CLASSES)


def test_other_labels_for_the_same_images_are_not_served_from_the_cache(tmp_path, monkeypatch):
    x, y = synthetic_set(2, seed=0)
    kwargs = dict(num_classes=NUM_CLASSES, cache_dir=tmp_path, steps=2, seed=0, batch_size=8)
    load_or_train_classifier("set", SIZE, x, y, **kwargs)
    calls = []
    real_train = clf.train_reference_classifier
    monkeypatch.setattr(
        clf, "train_reference_classifier", lambda *a, **k: calls.append(1) or real_train(*a, **k)
    )
    load_or_train_classifier("set", SIZE, x, y.roll(1), **kwargs)
    assert calls == [1]


def test_a_full_disk_costs_the_cache_not_the_classifier(tmp_path, monkeypatch, caplog):
    from faults import fill_disk

    x, y = synthetic_set(2, seed=0)
    kwargs = dict(num_classes=NUM_CLASSES, cache_dir=tmp_path, steps=2, seed=0, batch_size=8)
    fill_disk(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="smapctl"):
        model = load_or_train_classifier("set", SIZE, x, y, **kwargs)
    assert isinstance(model, ReferenceClassifier) and not model.training
    assert "the reference classifier will be trained again next time" in caplog.text
    assert list(tmp_path.iterdir()) == []


def test_random_shift_moves_each_image_by_up_to_its_max_shift():
    """A shift, not just a resampling: a one-pixel column moves, by at most max_shift of the side."""
    x = torch.zeros(4, 3, SIZE, SIZE)
    x[..., SIZE // 2] = 1.0  # a vertical line at column 8
    out = random_shift(x, torch.Generator().manual_seed(0), max_shift=0.125)  # up to 2 px at 16 px
    columns = (out[:, 0].mean(dim=1) * torch.arange(SIZE)).sum(dim=1)  # the line's centre of mass
    moved = (columns - SIZE // 2).abs()
    assert moved.max() > 0.2 and moved.max() <= 2.0 + 1e-4
    assert len({round(c, 3) for c in columns.tolist()}) == 4  # each image its own offset


class _BrightnessClassifier(torch.nn.Module):
    """Class 1 for an image brighter than mid-grey (mean > 0 in [-1, 1]), else class 0."""

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(()))  # `accuracy` asks for its device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.mean(dim=(1, 2, 3))
        return torch.stack([-m, m], dim=1)


def test_accuracy_reads_uint8_images_as_the_floats_they_stand_for():
    """uint8 images are scored as the [-1, 1] floats the classifier was trained on, not as 0..255, and
    each prediction against its own image's label (in the order given, in batches)."""
    levels = torch.tensor([10, 240, 30, 200, 250, 5])  # dark, bright, ...
    x = levels.view(-1, 1, 1, 1).expand(-1, 3, 4, 4).to(torch.uint8).contiguous()
    truth = (levels > 127).long()  # [0, 1, 0, 1, 1, 0]
    model = _BrightnessClassifier()
    assert accuracy(model, x, truth, batch_size=4) == 1.0
    assert accuracy(model, x[:5], truth[:5], batch_size=4) == 1.0  # a last batch of one image
    assert accuracy(model, clf.to_signed_float(x), truth, batch_size=4) == 1.0
    wrong = truth.clone()
    wrong[:2] = 1 - wrong[:2]  # two of six wrong
    assert accuracy(model, x, wrong, batch_size=4) == pytest.approx(4 / 6)


def test_another_seed_is_not_served_from_the_cache(tmp_path, monkeypatch):
    x, y = synthetic_set(4, seed=0)
    kwargs = dict(num_classes=NUM_CLASSES, cache_dir=tmp_path, steps=2, batch_size=8)
    load_or_train_classifier("set", SIZE, x, y, seed=0, **kwargs)
    calls = []
    real_train = clf.train_reference_classifier
    monkeypatch.setattr(
        clf, "train_reference_classifier", lambda *a, **k: calls.append(a[4]) or real_train(*a, **k)
    )
    load_or_train_classifier("set", SIZE, x, y, seed=0, **kwargs)
    load_or_train_classifier("set", SIZE, x, y, seed=1, **kwargs)
    assert calls == [1]
