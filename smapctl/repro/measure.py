"""The measurements of the mini reproduction, all judged on held-out images by the reference classifier.

* `prefix_curve`: reconstruction quality at every prefix k = 0..K (the rate-quality curve behind table 3 and
  figure 1): PSNR, classifier-feature Frechet distance to the originals, and semantic accuracy.
* `class_only`: the decoder's image for each class from the class embedding alone (k = 0, figure 1).
* `class_swap`: image a's latents decoded with another class c (figure 4): how often the classifier sees c.
* `sample_quality`: semantic accuracy and Frechet distance of a generator's samples (figure 5).

Reconstructions and samples are rounded to 8 bits first, as every saved image is (`to_uint8`). The Frechet
distance lives in the small reference classifier's feature space: it is NOT an FID.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from smapctl.data.images import to_signed_float, to_uint8
from smapctl.eval.classifier import ReferenceClassifier
from smapctl.eval.frechet import feature_stats, frechet_distance
from smapctl.eval.metrics import psnr
from smapctl.models.smap import SMAP

BATCH = 256


def quantise(images: torch.Tensor) -> torch.Tensor:
    """Float images (B, 3, H, W) -> the same rounded to 8 bits, as float in [-1, 1]."""
    return to_signed_float(to_uint8(images.clamp(-1, 1)))


@dataclass
class Reference:
    """Held-out images (N, 3, S, S) in [-1, 1] with labels (N,), the classifier that judges, and the
    classifier-feature statistics of the images (the Frechet distance's reference)."""

    classifier: ReferenceClassifier
    images: torch.Tensor
    labels: torch.Tensor
    mu: np.ndarray  # (D,)
    sigma: np.ndarray  # (D, D)

    @classmethod
    def of(cls, classifier: ReferenceClassifier, images: torch.Tensor, labels: torch.Tensor) -> Reference:
        images = to_signed_float(images)
        reference = cls(classifier.eval(), images, labels.long(), np.zeros(0), np.zeros((0, 0)))
        reference.mu, reference.sigma = feature_stats(reference.features(images))
        return reference

    @property
    def num_classes(self) -> int:
        return self.classifier.num_classes

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) in [-1, 1] -> penultimate classifier features (N, D)."""
        return torch.cat([self.classifier.features(b) for b in images.split(BATCH)])

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) in [-1, 1] -> predicted classes (N,)."""
        return self.classifier.head(self.features(images)).argmax(dim=1)

    def accuracy(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        return (self.predict(images) == labels).double().mean().item()

    def frechet(self, images: torch.Tensor) -> float:
        """Frechet distance of the images' classifier features to the held-out images' (N >= 2)."""
        return self._frechet(self.features(images))

    @torch.no_grad()
    def judge(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
        """(accuracy against `labels`, Frechet distance) from one pass of the classifier."""
        features = self.features(images)  # (N, D)
        accuracy = (self.classifier.head(features).argmax(dim=1) == labels).double().mean().item()
        return accuracy, self._frechet(features)

    def _frechet(self, features: torch.Tensor) -> float:
        mu, sigma = feature_stats(features)
        return frechet_distance(mu, sigma, self.mu, self.sigma)


@torch.no_grad()
def encode(model: SMAP, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """images (N, 3, S, S), labels (N,) -> latents (N, K, C) (the posterior mean for KL in eval mode)."""
    return torch.cat(
        [model.encode(x, y).z.float() for x, y in zip(images.split(BATCH), labels.split(BATCH), strict=True)]
    )


@torch.no_grad()
def decode(model: SMAP, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Latent prefixes z (N, k, C) with classes (N,) -> 8-bit-rounded images (N, 3, S, S) in [-1, 1]."""
    out = [model.decode(a, y) for a, y in zip(z.split(BATCH), labels.split(BATCH), strict=True)]
    return quantise(torch.cat(out))


@dataclass
class PrefixCurve:
    """Held-out reconstruction quality when decoding from the first k latents, for k = 0..K."""

    k: list[int]
    psnr: list[float]  # mean PSNR in dB
    fd: list[float]  # classifier-feature Frechet distance to the originals (lower is better)
    accuracy: list[float]  # reference-classifier accuracy against the images' own classes

    def to_dict(self) -> dict:
        return {"k": self.k, "psnr": self.psnr, "fd": self.fd, "accuracy": self.accuracy}


def prefix_curve(model: SMAP, ref: Reference) -> PrefixCurve:
    """Encode the held-out images once; decode every prefix z[:, :k], k = 0..K, with the true classes."""
    z = encode(model, ref.images, ref.labels)  # (N, K, C)
    curve = PrefixCurve([], [], [], [])
    for k in range(z.shape[1] + 1):
        recon = decode(model, z[:, :k], ref.labels)
        curve.k.append(k)
        curve.psnr.append(psnr(recon, ref.images).mean().item())
        accuracy, fd = ref.judge(recon, ref.labels)
        curve.fd.append(fd)
        curve.accuracy.append(accuracy)
    return curve


def class_only(model: SMAP, ref: Reference) -> tuple[torch.Tensor, list[bool]]:
    """The class-only decode (k = 0) of every class -> images (C, 3, S, S) and, per class, whether the
    reference classifier recognises it as that class."""
    classes = torch.arange(ref.num_classes)
    empty = torch.zeros(ref.num_classes, 0, model.cfg.token_dim)
    images = decode(model, empty, classes)
    return images, (ref.predict(images) == classes).tolist()


def swapped_classes(labels: torch.Tensor, num_classes: int, seed: int = 0) -> torch.Tensor:
    """For each label y a class c != y, drawn uniformly from the other classes (seeded) -> (N,)."""
    g = torch.Generator().manual_seed(seed)
    return (labels + torch.randint(1, num_classes, labels.shape, generator=g)) % num_classes


@dataclass
class ClassSwap:
    """Image a's first k latents decoded with a class c != label(a) (figure 4)."""

    k: int
    follows_class: float  # fraction the classifier calls c
    follows_latents: float  # fraction it calls label(a)

    def to_dict(self) -> dict:
        return {"k": self.k, "follows_class": self.follows_class, "follows_latents": self.follows_latents}


def class_swap(model: SMAP, ref: Reference, ks: list[int], seed: int = 0) -> list[ClassSwap]:
    """Encode each held-out image with its own class (eq. 3), decode z[:, :k] with a swapped class."""
    z = encode(model, ref.images, ref.labels)
    other = swapped_classes(ref.labels, ref.num_classes, seed)
    swaps = []
    for k in ks:
        predicted = ref.predict(decode(model, z[:, :k], other))
        swaps.append(
            ClassSwap(
                k,
                (predicted == other).double().mean().item(),
                (predicted == ref.labels).double().mean().item(),
            )
        )
    return swaps


@dataclass
class SampleQuality:
    """A generator's class-conditional samples judged against the held-out images (figure 5)."""

    accuracy: float  # reference-classifier accuracy of the samples against the classes asked for
    fd: float  # classifier-feature Frechet distance to the held-out images
    n: int

    def to_dict(self) -> dict:
        return {"accuracy": self.accuracy, "fd": self.fd, "n": self.n}


def sample_quality(images: torch.Tensor, labels: torch.Tensor, ref: Reference) -> SampleQuality:
    """images (N, 3, S, S) in [-1, 1] sampled for classes labels (N,)."""
    accuracy, fd = ref.judge(quantise(images), labels)
    return SampleQuality(accuracy, fd, len(labels))
