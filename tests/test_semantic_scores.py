"""evaluate's semantic scores are wired to the right sets: accuracy counts the images classified as their
target; a generator's `class_acc` is its samples' (the reference set has its own `reference_acc`); the
class checks decode the right prefix with the right class and score against the class decoded with
(class only: k = 0 and the true class y; cross-reconstructions: c = (y + 1) mod C from k = 0 and from
all K tokens); clf-FD compares each prefix with the originals. Toy classifiers, decoders and tallies
whose answers are known: the suite's other tests only saw values in [0, 1] and the keys."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from smapctl.eval.generation import score_samples
from smapctl.eval.image_sets import ImageSet
from smapctl.eval.reconstruction import _class_scores, _keep, _prefix_scores, _reconstructed, image_sets
from smapctl.eval.semantic import SemanticReference, SemanticTally


class ColourClassifier(nn.Module):
    """Predicts the class written in the red channel's value (uint8 level = class): exact and known."""

    image_size = 4

    def features(self, x):  # x in [-1, 1]
        level = torch.round((x[:, 0, 0, 0] + 1) * 127.5)  # (B,)
        return torch.stack([level, torch.zeros_like(level)], 1)  # (B, 2)

    def head(self, feats):
        return nn.functional.one_hot(feats[:, 0].long(), 3).float()  # (B, 3) logits


def images_of(classes):
    x = torch.zeros(len(classes), 3, 4, 4, dtype=torch.uint8)
    x[:, 0] = torch.tensor(classes, dtype=torch.uint8).view(-1, 1, 1)
    return x


def reference():
    return SemanticReference(ColourClassifier(), "toy", ["a", "b", "c"])


def test_accuracy_is_the_fraction_classified_as_the_target():
    tally = SemanticTally(reference(), torch.device("cpu"))
    tally.add("s", images_of([0, 1, 2, 2]), torch.tensor([0, 1, 0, 1]))  # 2 of 4 right
    tally.add("s", images_of([1]), torch.tensor([1]))  # 3 of 5
    assert tally.accuracy("s") == pytest.approx(3 / 5)
    assert tally.accuracy("never") is None


def test_samples_class_acc_is_the_samples_and_reference_acc_the_references():
    samples = ImageSet(images_of([0, 1, 2, 0]), torch.tensor([0, 1, 2, 1]), "samples")  # 3 of 4 right
    real = ImageSet(images_of([1, 1, 1, 1]), torch.tensor([0, 1, 2, 2]), "real")  # 1 of 4 right
    metrics, block = score_samples(
        samples, real, semantic=reference(), fidelity=None, batch_size=3, device=torch.device("cpu")
    )
    assert metrics["class_acc"] == pytest.approx(0.75)
    assert block["reference_acc"] == pytest.approx(0.25)
    assert metrics["clf_fd"] is not None and metrics["clf_fd"] > 0  # the two sets' features differ


class FakeModel:
    """decode(z, y) -> images whose pixel value says (k, class): (k * 10 + y) / 127.5 - 1 as uint8 level."""

    def __init__(self, num_classes: int, num_tokens: int, class_condition: bool = True):
        self.cfg = SimpleNamespace(num_classes=num_classes, class_condition=class_condition)
        self.num_tokens = num_tokens

    def encode(self, x, y):
        return SimpleNamespace(z=torch.zeros(len(x), self.num_tokens, 2))

    def decode(self, z, y):
        level = (z.shape[1] * 10 + y).float()  # (B,)
        return (level / 127.5 - 1).view(-1, 1, 1, 1).expand(-1, 3, 4, 4)


def class_checks(model, y, prefixes) -> dict:
    """The tally's calls for the class checks `reconstruct` makes of a batch of labels `y`."""
    cc = model.cfg.class_condition
    sets = image_sets(prefixes, kept=False, checks=True, class_condition=cc)
    x = torch.zeros(len(y), 3, 4, 4)
    _, _, _, *images = _reconstructed(model, x, y, prefixes, sets, torch.device("cpu"), with_ssim=False)
    tally = FakeTally()
    _keep(sets, images, y, prefixes, model.cfg, tally, None)
    return tally.calls


class FakeTally:
    def __init__(self):
        self.calls = {}

    def add(self, name, images, targets, keep_features=True):
        level = images[:, 0, 0, 0].long()  # uint8 level = k * 10 + decoded class
        self.calls[name] = (level // 10, level % 10, targets.clone(), keep_features)


@pytest.mark.parametrize("prefixes", [[0, 2, 5], [2, 5]])
def test_class_only_and_cross_class_decodes(prefixes):
    C, K = 3, 5
    y = torch.tensor([0, 1, 2, 2])
    calls = class_checks(FakeModel(C, K), y, prefixes)
    c = torch.tensor([1, 2, 0, 0])  # (y + 1) mod C
    expected = {
        "cross_k0": (torch.zeros(4, dtype=torch.long), c, c),
        "cross_kK": (torch.full((4,), K), c, c),
    }
    if 0 not in prefixes:  # else reconstruct() scored k0 already
        expected["k0"] = (torch.zeros(4, dtype=torch.long), y, y)
    assert set(calls) == set(expected)
    for name, (k, decoded_with, target) in expected.items():
        got_k, got_class, got_target, keep = calls[name]
        assert torch.equal(got_k, k), name  # the prefix decoded
        assert torch.equal(got_class, decoded_with), name  # the class it was decoded with
        assert torch.equal(got_target, target), name  # the class it is scored against
        assert keep is False  # no features kept for clf-FD


def test_no_cross_class_without_class_conditioning():
    assert class_checks(FakeModel(3, 4, class_condition=False), torch.tensor([0, 1]), [0, 4]) == {}


class NamingTally:
    """accuracy(name) -> name; frechet(a, b) -> the pair as a set (the distance is symmetric)."""

    count = {"cross_k0": 1, "cross_kK": 1, "k0": 1}

    def accuracy(self, name):
        return name

    def frechet(self, name, reference):
        return frozenset((name, reference))


def test_prefix_scores_and_class_scores_read_the_right_sets():
    scores = _prefix_scores(4, NamingTally(), None, None, 8, "cpu")
    assert scores == {"class_acc": "k4", "clf_fd": frozenset(("k4", "originals"))}
    block = _class_scores(NamingTally(), class_condition=True)
    assert block["class_only_acc"] == "k0"
    assert block["cross_class_acc"] == {"k0": "cross_k0", "kK": "cross_kK"}


def test_a_clf_fd_needs_two_images_on_each_side():
    """One image has no covariance: its clf-FD is None (not nan), whichever side it is on."""
    tally = SemanticTally(reference(), torch.device("cpu"))
    tally.add("one", images_of([1]), None)
    tally.add("two", images_of([0, 2]), None)
    assert tally.frechet("one", "two") is None and tally.frechet("two", "one") is None
    assert tally.frechet("two", "missing") is None
    assert tally.frechet("two", "two") == pytest.approx(0.0, abs=1e-6)


def test_a_clf_fd_of_fewer_images_than_feature_dimensions_says_so_once(caplog):
    """6 samples' clf-FD was printed as any other: with fewer images than the classifier's feature
    dimensions a covariance is singular and the distance biased, which a warning says, once a tally
    (an evaluation scores up to 9 prefixes against the same originals)."""
    tally = SemanticTally(reference(), torch.device("cpu"))  # 2 feature dimensions
    tally.add("few", images_of([0, 1]), None)
    tally.add("ref", images_of([0, 1, 2, 2]), None)
    tally.add("many", images_of([0, 1, 2, 0]), None)
    assert tally.frechet("many", "ref") is not None and not caplog.records  # 4 images, 2 dimensions
    for _ in range(2):
        tally.frechet("few", "ref")
    said = [r.getMessage() for r in caplog.records]
    assert said == [
        "clf-FD of 2 and 4 images in 2 feature dimensions: the smaller set's covariance, from no more "
        "images than dimensions, is singular, so the distance is biased (high); compare clf-FDs of equal "
        "image counts only"
    ]


class PixelFeatures(nn.Module):
    """Features: the first 4 values of the image (B, 4), varied for random images."""

    image_size = 4

    def features(self, x):
        return x.flatten(1)[:, :4]

    def head(self, feats):
        return feats[:, :3]


def tensor_bytes(obj, seen=None) -> int:
    """The bytes of every tensor `obj` holds, through dicts, lists and object attributes."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return obj.untyped_storage().nbytes()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v, seen) for v in obj)
    return tensor_bytes(vars(obj), seen) if hasattr(obj, "__dict__") else 0


def test_the_features_kept_for_clf_fd_do_not_grow_with_the_images():
    """clf-FD needs each set's feature mean and covariance: the tally keeps their running sums, the same
    few bytes after 2 batches as after 60 (a list of every batch's features left `evaluate` of 40,000
    images at 5.6 GB of resident memory), and the distance is that of all the features at once."""
    from smapctl.data.images import to_signed_float
    from smapctl.eval.frechet import feature_stats, frechet_distance

    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 256, (8, 3, 4, 4), generator=g, dtype=torch.uint8) for _ in range(60)]
    tally = SemanticTally(SemanticReference(PixelFeatures(), "toy", ["a", "b", "c"]), torch.device("cpu"))
    for batch in batches[:2]:
        tally.add("s", batch, None)
    tally.add("r", batches[2], None)
    few = tensor_bytes(tally.features)
    for batch in batches[3:]:
        tally.add("s", batch, None)
    assert tensor_bytes(tally.features) == few
    assert tally.feature_count("s") == 8 * 59 and tally.feature_count("none") == 0
    features = PixelFeatures().features(to_signed_float(torch.cat([*batches[:2], *batches[3:]])))
    reference = PixelFeatures().features(to_signed_float(batches[2]))
    exact = frechet_distance(*feature_stats(features), *feature_stats(reference))
    assert tally.frechet("s", "r") == pytest.approx(exact, rel=1e-9)


@pytest.mark.parametrize("folder", [b"images", b"images\xe9"])
def test_an_image_folders_classifier_is_trained_on_its_training_split_at_64_px(tmp_path, monkeypatch, folder):
    """The reference classifier of an image folder reads the folder's training split at 64 px, cached under
    a name of the folder's path: only which folder is chosen was checked, so another size passed (another
    classifier: other clf-FDs and accuracies than those reported before). The name hashes the path's bytes:
    a folder named in Latin-1 (not UTF-8) was a UnicodeEncodeError traceback."""
    import hashlib
    import os

    from tokenize_helpers import write_image

    from smapctl.data.config import DataConfig
    from smapctl.eval import semantic

    images = Path(os.fsdecode(os.path.join(os.fsencode(tmp_path), folder)))
    for i, name in enumerate(("a", "a", "b", "b")):
        write_image(images / name / f"{i}.png", i)
    trained = {}

    def load_or_train(name, size, images, labels, num_classes, folder, steps):
        trained.update(name=name, size=size, shape=tuple(images.shape), labels=labels.tolist(), n=num_classes)
        return "classifier"

    monkeypatch.setattr(semantic, "load_or_train_classifier", load_or_train)
    cfg = DataConfig(dataset=str(images), val_fraction=0.0, num_workers=0)
    ref = semantic.reference_classifier(cfg)
    shown = str(images.resolve())
    assert (ref.model, ref.source, ref.class_names) == ("classifier", shown, ["a", "b"])
    assert trained == {
        "name": f"folder-{hashlib.sha256(os.fsencode(shown)).hexdigest()[:12]}",
        "size": 64,
        "shape": (4, 3, 64, 64),
        "labels": [0, 0, 1, 1],
        "n": 2,
    }
