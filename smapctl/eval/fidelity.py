"""FID and Inception Score through torch-fidelity 0.4.0, strictly offline.

torch-fidelity's Inception v3 (`inception-v3-compat`, a port of the TF graph used by the original FID
code) reads its weights from `feature_extractor_weights_path` (with torch.load) when that argument is
given and otherwise downloads `weights-inception-2015-12-05-6726825d.pth` into
`torch.hub.get_dir()/checkpoints`.
smapctl always passes an explicit path, found by `find_inception_weights`, so nothing is ever downloaded:
a missing file is a one-line UserError that says where to put it.

Inputs are handed over as Datasets of uint8 (3, H, W) tensors; torch-fidelity resizes them to 299 px
itself (bilinear, TF1-compatible), so samples are passed at their native resolution.
"""

import hashlib
import os
import zipfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from smapctl.errors import UserError, describe, refused_pickle, torch_load_reason
from smapctl.io import is_disk_full

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
# The start of that file's sha256, which its name carries (torch.hub's naming of published weights).
INCEPTION_SHA256_PREFIX = "6726825d"
INCEPTION_WEIGHTS_ENV = "SMAPCTL_INCEPTION_WEIGHTS"
INCEPTION_WEIGHTS_URL = (
    f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_WEIGHTS_FILE}"
)
FEATURE_EXTRACTOR = "inception-v3-compat"
ISC_SPLITS = 10  # the usual 10 splits of Salimans et al. (torch-fidelity's default)
RNG_SEED = 2020  # torch-fidelity's default seed for the IS split shuffle; fixed so runs are comparable

FidStatistics = dict[str, np.ndarray]  # {"mu": (2048,), "sigma": (2048, 2048)}, float64
FID_FEATURES = 2048  # Inception v3 pool features, torch-fidelity's default FID layer


def inception_cache_dir() -> Path:
    """Where torch-fidelity (through torch.hub) caches the Inception weights: $TORCH_HOME/hub/checkpoints."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def find_inception_weights(path: str | Path | None = None) -> Path:
    """Locate the Inception weights file; never downloads.

    Order: the explicit `path` (the CLI's `--inception-weights`), then $SMAPCTL_INCEPTION_WEIGHTS, then
    torch-fidelity's cache file `inception_cache_dir() / INCEPTION_WEIGHTS_FILE`.
    """
    for value, origin in (
        (path, "--inception-weights"),
        (os.environ.get(INCEPTION_WEIGHTS_ENV), INCEPTION_WEIGHTS_ENV),
    ):
        if value:
            try:
                candidate = Path(value).expanduser()
            except RuntimeError:  # `~name/...` of no such user: pathlib's "Could not determine home" error
                raise UserError(
                    f"{origin}: {value}: no home folder of that user for its ~; give a full path"
                ) from None
            if candidate.is_dir():
                raise UserError(
                    f"{origin}: {candidate} is a folder; give the weights file ({INCEPTION_WEIGHTS_FILE})"
                )
            if not candidate.is_file():
                raise UserError(f"{origin}: Inception weights file not found: {candidate}")
            return candidate
    cached = inception_cache_dir() / INCEPTION_WEIGHTS_FILE
    if cached.is_file():
        return cached
    raise UserError(
        "Inception weights for FID/IS not found (smapctl never downloads them): "
        f"pass --inception-weights PATH, set {INCEPTION_WEIGHTS_ENV}=PATH, "
        f"or put {INCEPTION_WEIGHTS_FILE} into {inception_cache_dir()} "
        f"(the file is published at {INCEPTION_WEIGHTS_URL})"
    )


def inception_weights_origin(path: str | Path | None) -> str:
    """What named the weights `find_inception_weights(path)` found, for its errors: the option, the
    environment variable (set long ago, perhaps, in a shell profile), or torch-fidelity's cache."""
    if path:
        return "--inception-weights"
    if os.environ.get(INCEPTION_WEIGHTS_ENV):
        return INCEPTION_WEIGHTS_ENV
    return "torch-fidelity's cache"


def check_inception_weights(weights: Path) -> None:
    """Fail early, as a UserError, on a file that is not torch-fidelity's Inception state dict."""
    if not weights.is_file():
        raise UserError(f"{weights}: Inception weights file not found")
    try:
        # Never unpickle code: a genuine Inception state dict is plain tensors and loads like this.
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:  # any unreadable file is the user's to replace
        reason = "refused: not plain tensors, nothing was run" if refused_pickle(e) else torch_load_reason(e)
        raise UserError(f"{weights}: not a readable PyTorch weights file ({reason})") from None
    fc = state.get("fc.weight") if isinstance(state, dict) else None
    if fc is None or tuple(fc.shape) != (1008, 2048):
        raise UserError(f"{weights}: not torch-fidelity's Inception v3 weights ({INCEPTION_WEIGHTS_FILE})")
    stamp = (str(weights.resolve()), weights.stat().st_size, weights.stat().st_mtime_ns)
    if stamp in _FITTING:
        return
    # Every tensor must fit torch-fidelity's model (a file with the right `fc` and other tensors missing
    # or reshaped would be a traceback of thousands of key names, after the work). Built with this very file,
    # as scoring builds it (about a second, once per file and process).
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    try:
        FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights)
        )
    except RuntimeError as e:  # load_state_dict: missing, unexpected or reshaped tensors
        problems = [line.strip() for line in str(e).splitlines()[1:] if line.strip()]
        first = problems[0] if problems else describe(e, "its tensors do not fit the model")
        raise UserError(
            f"{weights}: not torch-fidelity's Inception v3 weights ({INCEPTION_WEIGHTS_FILE}):"
            f" {first[:160]}{'...' if len(first) > 160 else ''}"
        ) from None
    _FITTING.add(stamp)


_FITTING: set[tuple[str, int, int]] = set()  # weights files checked in full in this process


def file_sha256(path: Path) -> str:
    """The sha256 of a file (about 0.1 s for the 92 MB Inception weights), read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_fid_statistics(path: str | Path) -> FidStatistics | None:
    """The `mu` and `sigma` of an ADM reference batch, or None when the `.npz` has none.

    guided-diffusion's reference batches (e.g. VIRTUAL_imagenet256_labeled.npz) hold the Inception pool
    statistics of the whole dataset beside 10,000 of its images (`arr_0`); the ADM evaluator, and so the
    paper's gFID, compares samples with those statistics. Arrays of other shapes are a UserError."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            if "mu" not in data.files or "sigma" not in data.files:
                return None
            mu, sigma = data["mu"], data["sigma"]
    except (zipfile.BadZipFile, ValueError, OSError) as e:
        raise UserError(f"{path}: not a readable .npz file ({e})") from None
    if mu.shape != (FID_FEATURES,) or sigma.shape != (FID_FEATURES, FID_FEATURES):
        raise UserError(
            f"{path}: 'mu' {mu.shape} and 'sigma' {sigma.shape} are not Inception pool statistics, "
            f"expected ({FID_FEATURES},) and ({FID_FEATURES}, {FID_FEATURES})"
        )
    return {"mu": mu.astype(np.float64), "sigma": sigma.astype(np.float64)}


class TensorImages(Dataset):
    """uint8 images (N, 3, H, W) as a Dataset of (3, H, W) tensors. With a `label`, the batches
    torch-fidelity's loader takes (`__getitems__`) count on a progress bar of that label, opened at the
    first one: the Inception pass over the paper's 50,000 samples said nothing for hours on 2 CPU cores
    (6-14 images/s)."""

    def __init__(self, images: torch.Tensor, label: str | None = None):
        self.images, self.label, self.bar = images, label, None

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]

    def __getitems__(self, indices: list[int]) -> list[torch.Tensor]:
        if self.label is not None:
            if self.bar is None:
                from smapctl.progress import progress

                self.bar = progress(len(self), self.label, "images")
            self.bar.update(len(indices))
        return [self.images[i] for i in indices]

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def as_image_dataset(images: torch.Tensor, what: str) -> Dataset:
    """uint8 images (N, 3, H, W) -> Dataset of (3, H, W) tensors. Image files are read by `evaluate`'s one
    reader (`read_image_set`: EXIF orientation, RGBA on white, every image format) before they get here."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{what}: expected a uint8 tensor (N, 3, H, W), got {type(images).__name__}")
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"{what}: expected uint8 (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
    return TensorImages(images.cpu(), f"Inception: {what}")


def _calculate(**kwargs) -> dict:
    """torch_fidelity.calculate_metrics, refusing keyword arguments it would silently ignore."""
    import torch_fidelity
    from torch_fidelity.defaults import DEFAULTS

    unknown = sorted(set(kwargs) - set(DEFAULTS))
    if unknown:
        raise RuntimeError(f"torch-fidelity {torch_fidelity.__version__} does not know {unknown}")
    return torch_fidelity.calculate_metrics(**kwargs)


def check_set_size(n: int, *, fid: bool, isc: bool, what: str) -> None:
    """One-line error for a set too small for FID (2 images) or for the IS's splits (one image each);
    `what` introduces the count ("the samples are", "got")."""
    if fid and n < 2:
        raise UserError(f"FID needs at least 2 images per set; {what} {n}")
    if isc and n < ISC_SPLITS:
        raise UserError(f"Inception Score needs at least {ISC_SPLITS} samples (one per split); {what} {n}")


def fidelity_metrics(
    samples: torch.Tensor,
    reference: torch.Tensor | None,
    fid: bool,
    isc: bool,
    weights: Path,
    batch_size: int = 64,
    cuda: bool | None = None,
    reference_cache: Path | None = None,
    reference_stats: FidStatistics | None = None,
) -> dict[str, float]:
    """FID (samples vs reference) and/or Inception Score (of samples) with torch-fidelity's Inception v3.

    samples, reference: uint8 tensors (N, 3, H, W), any resolution (resized to 299 inside). `weights`: from
    `find_inception_weights`. `cuda`: None picks the GPU when there is one. Returns the requested subset of
    {"fid", "is_mean", "is_std"}.

    `reference_stats` (`read_fid_statistics`): FID against these precomputed statistics instead of the
    reference images, which are then not needed; the samples go through Inception once for both scores.

    `reference_cache`: a folder private to one reference set (the caller's promise), where the reference's
    Inception features are kept after the first call, so scoring several sample sets against it (rFID
    per prefix) runs Inception on the reference once. A full disk there costs the cache, not the score.
    """
    if not (fid or isc):
        raise ValueError("fidelity_metrics: ask for at least one of fid / isc")
    weights = Path(weights)
    check_inception_weights(weights)
    input1, input2 = _checked_inputs(samples, reference, fid, isc, reference_stats)
    cuda = torch.cuda.is_available() if cuda is None else cuda
    kwargs = dict(
        input1=input1,
        input2=input2,
        fid=fid,
        isc=isc,
        cuda=cuda,
        batch_size=batch_size,
        feature_extractor=FEATURE_EXTRACTOR,
        feature_extractor_weights_path=str(weights),  # explicit path: torch-fidelity never downloads
        isc_splits=ISC_SPLITS,
        rng_seed=RNG_SEED,
        cache=False,  # Dataset inputs have no stable name; nothing is written under $TORCH_HOME
        save_cpu_ram=True,  # no loader workers: the images are in memory already
        verbose=False,
    )
    try:
        out = _inception_outputs(kwargs, fid, reference_stats, reference_cache)
    finally:
        for images in (input1, input2):
            if images is not None:
                images.close()
    return _named_scores(out, fid, isc)


def _checked_inputs(
    samples: torch.Tensor,
    reference: torch.Tensor | None,
    fid: bool,
    isc: bool,
    reference_stats: FidStatistics | None,
):
    """(samples, reference) as torch-fidelity's inputs (the reference None when FID is not asked for or
    is against `reference_stats`), each checked to be large enough for the scores asked for."""
    input1 = as_image_dataset(samples, "samples")
    input2 = None
    if fid:
        sets = [("samples", input1)]
        if reference_stats is None:  # else the reference is its statistics: no images to check
            if reference is None:
                raise UserError("FID needs a reference image set")
            input2 = as_image_dataset(reference, "reference")
            sets.append(("reference", input2))
        for name, ds in sets:
            check_set_size(len(ds), fid=True, isc=False, what=f"{name} has")
    check_set_size(len(input1), fid=False, isc=isc, what="got")
    return input1, input2


def _inception_outputs(
    kwargs: dict, fid: bool, reference_stats: FidStatistics | None, reference_cache: Path | None
) -> dict:
    """torch-fidelity's outputs for `kwargs`: against `reference_stats`, or with the reference's
    features kept in `reference_cache` (a full disk there costs the cache, not the score)."""
    if fid and reference_stats is not None:
        return _against_statistics(kwargs, reference_stats)
    if reference_cache is not None and kwargs["input2"] is not None:
        # Only input2 gets a cache name, so only the reference's features (and FID statistics) are
        # kept, in the caller's folder; the samples are always recomputed.
        cached = kwargs | dict(cache=True, cache_root=str(reference_cache), input2_cache_name="reference")
        try:
            return _calculate(**cached)
        except OSError as e:
            if not is_disk_full(e):
                raise
            return _calculate(**kwargs)
    return _calculate(**kwargs)


def _named_scores(out: dict, fid: bool, isc: bool) -> dict[str, float]:
    """torch-fidelity's outputs -> the requested subset of {"fid", "is_mean", "is_std"}."""
    result = {}
    if fid:
        # torch-fidelity's formula (eigenvalues of sigma1 sigma2) can come out a hair below 0 for equal
        # sets (-1.5e-4 on 2048-d features); a distance is not negative.
        result["fid"] = max(float(out["frechet_inception_distance"]), 0.0)
    if isc:
        result["is_mean"] = float(out["inception_score_mean"])
        result["is_std"] = float(out["inception_score_std"])
    return result


def _against_statistics(kwargs: dict, stats: FidStatistics) -> dict:
    """torch-fidelity's own steps for one feature extractor (its `calculate_metrics_one_feature_extractor`),
    with the second input's FID statistics given: one Inception pass over input 1 for FID and IS."""
    from torch_fidelity.metric_fid import fid_featuresdict_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_isc import isc_featuresdict_to_metric
    from torch_fidelity.utils import (
        create_feature_extractor,
        extract_featuresdict_from_input_id,
        resolve_feature_layer_for_metric,
    )

    fid_layer = resolve_feature_layer_for_metric("fid", **kwargs)
    isc_layer = resolve_feature_layer_for_metric("isc", **kwargs) if kwargs["isc"] else None
    layers = sorted({fid_layer, isc_layer} - {None})
    extractor = create_feature_extractor(FEATURE_EXTRACTOR, layers, **kwargs)
    features = extract_featuresdict_from_input_id(1, extractor, **kwargs)
    out = isc_featuresdict_to_metric(features, isc_layer, **kwargs) if isc_layer else {}
    ours = {
        k: np.asarray(v, dtype=np.float64)
        for k, v in fid_featuresdict_to_statistics(features, fid_layer).items()
    }
    return out | fid_statistics_to_metric(ours, stats, verbose=False)


class FeatureMoments:
    """Running float64 sums of feature vectors (D,) and of their outer products (D, D), for their mean and
    unbiased covariance (np.cov's, as torch-fidelity takes it) in O(D^2) memory, whatever their number.
    The vectors are summed about the first batch's mean: the covariance is the same, and the cancellation
    in sum(x x^T) - n mean mean^T stays small."""

    def __init__(self, dim: int = FID_FEATURES):
        self.count = 0
        self.shift: torch.Tensor | None = None  # (D,) the first batch's mean
        self.sum = torch.zeros(dim, dtype=torch.float64)  # (D,) of x - shift
        self.outer = torch.zeros(dim, dim, dtype=torch.float64)  # (D, D) of (x - shift)(x - shift)^T

    def add(self, features: torch.Tensor) -> None:
        """features (B, D), any float dtype."""
        if not len(features):
            return
        x = features.to(torch.float64)
        if self.shift is None:
            self.shift = x.mean(0)
        x = x - self.shift  # (B, D)
        self.count += len(x)
        self.sum += x.sum(0)
        self.outer.addmm_(x.T, x)

    def statistics(self) -> FidStatistics:
        """{"mu": (D,), "sigma": (D, D)}, float64; sigma divided by count - 1 (needs 2 vectors or more)."""
        n = self.count
        mean = self.sum / n  # (D,) of x - shift
        sigma = (self.outer - n * torch.outer(mean, mean)) / (n - 1)
        return {"mu": (mean + self.shift).numpy(), "sigma": sigma.numpy()}


def streamed_fid_statistics(
    batches: Iterable[torch.Tensor], weights: Path, cuda: bool | None = None
) -> tuple[FidStatistics, int]:
    """The Inception statistics of uint8 image batches (B, 3, H, W), computed as they come -> ({"mu",
    "sigma"}, the number of images): the extractor and layer `_against_statistics` uses, and the mu and
    sigma torch-fidelity's `fid_featuresdict_to_statistics` gives for the same images (to ~1e-7), while
    memory holds one batch and the 2048 x 2048 sums instead of every image (or feature). `cuda` as in
    `fidelity_metrics`."""
    from torch_fidelity.utils import create_feature_extractor, resolve_feature_layer_for_metric

    weights = Path(weights)
    check_inception_weights(weights)
    cuda = torch.cuda.is_available() if cuda is None else cuda
    kwargs = dict(
        feature_extractor=FEATURE_EXTRACTOR,
        feature_extractor_weights_path=str(weights),  # explicit path: torch-fidelity never downloads
        verbose=False,
    )
    layer = resolve_feature_layer_for_metric("fid", **kwargs)
    extractor = create_feature_extractor(FEATURE_EXTRACTOR, [layer], cuda=cuda, **kwargs)
    moments = FeatureMoments()
    with torch.no_grad():
        for batch in batches:
            if cuda:
                batch = batch.cuda(non_blocking=True)
            features = extractor.convert_features_tuple_to_dict(extractor(batch))[layer]  # (B, 2048)
            moments.add(features.cpu())
    check_set_size(moments.count, fid=True, isc=False, what="the reference has")
    return moments.statistics(), moments.count
