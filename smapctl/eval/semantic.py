"""Semantic scores from the reference classifier (`eval/classifier.py`): which classifier scores which data,
and the running tallies of accuracy and classifier features that `evaluate` fills batch by batch.

The classifier of a dataset is trained on that dataset's training split, at a fixed resolution per
dataset (it resizes its inputs, so one classifier serves tokenizers of every image size), and cached in
the data cache next to the embedded datasets.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from smapctl.data.config import DataConfig, embedded_name
from smapctl.data.embedded import load_embedded
from smapctl.data.images import to_signed_float, to_uint8
from smapctl.errors import UserError
from smapctl.eval.classifier import (
    CLASSIFIER_STEPS,
    ReferenceClassifier,
    classifier_cache,
    load_or_train_classifier,
)
from smapctl.eval.fidelity import FeatureMoments
from smapctl.eval.frechet import frechet_distance

logger = logging.getLogger("smapctl.eval")

# The classifier's input size per dataset. Digits are 8x8 glyphs upscaled: 32 px holds all there is. The
# photo crops are stored at any size; 64 px keeps training practical on a CPU (the classifier resizes).
CLASSIFIER_SIZES = {"digits": 32, "photos": 64}
FOLDER_CLASSIFIER_SIZE = 64
CLF_FD_NOTE = (
    "clf_fd: Frechet distance between the reference classifier's penultimate features of two image sets; "
    "it lives in that small classifier's feature space and is NOT comparable with Inception FID"
)


@dataclass
class SemanticReference:
    """A trained reference classifier and what it knows: the dataset it was trained on and its classes."""

    model: ReferenceClassifier
    source: str  # "digits", "photos" or the image folder
    class_names: list[str]


def reference_classifier(source: str | DataConfig, check=None) -> SemanticReference:
    """The cached reference classifier of an embedded dataset ("digits", "photos") or, for a `DataConfig`
    naming an image folder, of that folder's training split (all its images are read at 64 px: meant for
    small folders). Trained on a cache miss (deterministic: seed 0, `CLASSIFIER_STEPS` steps). `check`,
    called with its class names and the name it is shown by before any training, may refuse them."""
    if isinstance(source, str):
        size = CLASSIFIER_SIZES[source]
        data = load_embedded(source, size)
        images, labels, names = data.train_images, data.train_labels, data.class_names
        name, shown = source, source
        if check is not None:
            check(names, shown)
    else:
        size = FOLDER_CLASSIFIER_SIZE
        shown = str(Path(source.dataset).expanduser().resolve())
        # (a folder's name that is not UTF-8: hashed as its own bytes, which `surrogateescape` gives back)
        name = f"folder-{hashlib.sha256(shown.encode('utf-8', 'surrogateescape')).hexdigest()[:12]}"
        # Listed, checked, then read (every image of the split: minutes for a large folder).
        images, labels, names = _folder_training_images(source, size, partial(_refuse, check, shown))
    folder = classifier_cache()
    model = load_or_train_classifier(name, size, images, labels, len(names), folder, steps=CLASSIFIER_STEPS)
    return SemanticReference(model, shown, names)


def _refuse(check, shown: str, names: list[str], labels) -> None:
    """A folder's classes before its images are read: two or more with images (a classifier of one
    scores every image right), then `check`'s."""
    present = sorted({int(y) for y in labels})
    if len(present) < 2:  # every image "right": the scores would say nothing
        one = f" ({names[present[0]]})" if present else ""
        raise UserError(
            f"--semantic: {shown} has images of a single class{one}; a classifier needs two or more"
        )
    if check is not None:
        check(names, shown)


def _folder_training_images(
    cfg: DataConfig, size: int, check=None
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The training split of an image folder (as training would split it), eval transform, uint8.
    `check`, called with its class names and labels once the folder is listed, may refuse them before
    any image is read."""
    from smapctl.data.datasets import build_datasets
    from smapctl.runtime import images_fit_in_memory

    bundle = build_datasets(cfg, size, train_augment=False)
    if check is not None:
        check(bundle.class_names, bundle.train.labels)
    count = len(bundle.train)
    too_many = images_fit_in_memory(count, (3, size, size))
    if too_many is not None:
        raise UserError(
            f"--semantic: {cfg.dataset}: its training split, {too_many}; the reference classifier trains on "
            "them in memory (meant for folders of a few classes): --no-semantic, or a smaller folder"
        )
    # Said first: an unreadable image named below is in these, not in the images being scored.
    logger.info("reading the reference classifier's training images: %s (its training split)", cfg.dataset)
    images = torch.empty(count, 3, size, size, dtype=torch.uint8)  # filled in place (a list and a cat: twice)
    labels, at = torch.empty(count, dtype=torch.long), 0
    for x, y in DataLoader(bundle.train, batch_size=256, num_workers=cfg.num_workers):
        images[at : at + len(x)], labels[at : at + len(x)] = to_uint8(x), y
        at += len(x)
    return images[:at], labels[:at], bundle.class_names


def semantic_source(
    spec: str | None, recipe_data: DataConfig | None, forced: bool, scores_spec: bool = False
) -> str | DataConfig | None:
    """Which classifier scores an evaluation: the embedded dataset named by `spec` (e.g. "digits:train")
    or by the checkpoint's recipe data; with `forced` (--semantic) and neither embedded, an image
    folder: the one `spec` names (samples scored against it), or, when the images scored are `spec`'s own
    (`scores_spec`: a tokenizer's reconstructions of them), the checkpoint's training folder first.
    (Otherwise `--checkpoint RUN --data VAL --semantic` would train the classifier on the very images it
    then scores, and give its training accuracy as the reference.) None when semantic scores are off or
    impossible."""
    for name in (spec, recipe_data.dataset if recipe_data is not None else None):
        if name is not None and embedded_name(name):
            return embedded_name(name)
    folders = []
    if forced:
        named = None if spec is None else DataConfig(dataset=str(Path(spec).expanduser().resolve()))
        folders = [recipe_data, named] if scores_spec else [named, recipe_data]
    return next((f for f in folders if f is not None), None)


@dataclass
class SemanticTally:
    """Accuracy counts and classifier features of named image sets, accumulated batch by batch. Of the
    features only their running sums for a mean and covariance (`FeatureMoments`) are kept, all clf-FD
    needs: with a list of every batch's features, `evaluate` of 40,000 16 px images peaks at 5.6 GB of
    resident memory (the memory freed between those small tensors is never given back), with the sums at
    0.87 GB."""

    ref: SemanticReference
    device: torch.device
    correct: dict[str, int] = field(default_factory=dict)
    count: dict[str, int] = field(default_factory=dict)
    features: dict[str, FeatureMoments] = field(default_factory=dict)
    warned_few: bool = False  # `frechet` of sets smaller than the feature dimension said so (once)

    @torch.no_grad()
    def add(self, name: str, images: torch.Tensor, targets: torch.Tensor | None, keep_features: bool = True):
        """Score uint8 images (B, 3, H, W) against target classes (B,) (None: features only)."""
        model = self.ref.model
        feats = model.features(to_signed_float(images).to(self.device))  # (B, D)
        if keep_features:
            self.features.setdefault(name, FeatureMoments(dim=feats.shape[1])).add(feats.cpu())
        if targets is not None:
            pred = model.head(feats).argmax(dim=1).cpu()  # (B,)
            self.correct[name] = self.correct.get(name, 0) + int((pred == targets.cpu()).sum())
            self.count[name] = self.count.get(name, 0) + len(pred)

    def accuracy(self, name: str) -> float | None:
        """Fraction of `name`'s images classified as their target, in [0, 1]; None if never scored."""
        return self.correct[name] / self.count[name] if self.count.get(name) else None

    def feature_count(self, name: str) -> int:
        """How many images of `name` gave their features (0 if none)."""
        return self.features[name].count if name in self.features else 0

    def frechet(self, name: str, reference: str) -> float | None:
        """clf-FD between the features of two sets (see CLF_FD_NOTE); None with fewer than 2 images."""
        if name not in self.features or reference not in self.features:
            return None
        a, b = self.features[name], self.features[reference]
        if a.count < 2 or b.count < 2:
            return None
        dim = a.sum.shape[0]
        if min(a.count, b.count) <= dim and not self.warned_few:
            # As the Inception Score's warning: a number printed as any other, but of little meaning.
            logger.warning(
                "clf-FD of %d and %d images in %d feature dimensions: the smaller set's covariance, from "
                "no more images than dimensions, is singular, so the distance is biased (high); compare "
                "clf-FDs of equal image counts only",
                a.count, b.count, dim,
            )  # fmt: skip
            self.warned_few = True
        a, b = a.statistics(), b.statistics()
        return frechet_distance(a["mu"], a["sigma"], b["mu"], b["sigma"])
