"""FID / IS through torch-fidelity, offline: weights discovery, its error message, and the plumbing."""

import errno

import numpy as np
import pytest
import torch
from faults import PicklePayload
from PIL import Image

from smapctl.errors import UserError
from smapctl.eval import fidelity
from smapctl.eval.fidelity import (
    INCEPTION_WEIGHTS_ENV,
    INCEPTION_WEIGHTS_FILE,
    fidelity_metrics,
    find_inception_weights,
    inception_cache_dir,
)
from smapctl.eval.npz import write_npz


@pytest.fixture
def empty_torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv(INCEPTION_WEIGHTS_ENV, raising=False)
    return tmp_path / "torch_home"


def test_missing_weights_message_names_every_way_out(empty_torch_home):
    with pytest.raises(UserError) as err:
        find_inception_weights(None)
    msg = str(err.value)
    assert "\n" not in msg
    assert "--inception-weights" in msg
    assert INCEPTION_WEIGHTS_ENV in msg
    assert "weights-inception-2015-12-05-6726825d.pth" in msg
    assert str(empty_torch_home / "hub" / "checkpoints") in msg
    assert inception_cache_dir() == empty_torch_home / "hub" / "checkpoints"


def test_weights_lookup_order(empty_torch_home, tmp_path, monkeypatch):
    cached = empty_torch_home / "hub" / "checkpoints" / INCEPTION_WEIGHTS_FILE
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"x")
    assert find_inception_weights(None) == cached
    from_env = tmp_path / "env.pth"
    from_env.write_bytes(b"x")
    monkeypatch.setenv(INCEPTION_WEIGHTS_ENV, str(from_env))
    assert find_inception_weights(None) == from_env
    explicit = tmp_path / "explicit.pth"
    explicit.write_bytes(b"x")
    assert find_inception_weights(explicit) == explicit
    # An explicit path that does not exist is an error, not a silent fall-back to the env var or cache.
    with pytest.raises(UserError, match="--inception-weights: Inception weights file not found"):
        find_inception_weights(tmp_path / "typo.pth")
    with pytest.raises(
        UserError, match=rf"--inception-weights: {tmp_path} is a folder; give the weights file"
    ):
        find_inception_weights(tmp_path)
    monkeypatch.setenv(INCEPTION_WEIGHTS_ENV, str(tmp_path / "typo.pth"))
    with pytest.raises(UserError, match=f"{INCEPTION_WEIGHTS_ENV}: Inception weights file not found"):
        find_inception_weights(None)
    # `~name` of no such user was pathlib's RuntimeError traceback, "Could not determine home directory".
    monkeypatch.setenv(INCEPTION_WEIGHTS_ENV, "~no-such-user-of-smapctl/w.pth")
    with pytest.raises(UserError, match=f"^{INCEPTION_WEIGHTS_ENV}: ~no-such-user-of-smapctl/w.pth: no home"):
        find_inception_weights(None)


def test_weights_with_the_right_fc_and_other_tensors_missing_are_refused_up_front(
    random_inception_weights, tmp_path
):
    """Only `fc.weight` was checked: a file without `Mixed_7c` passed, and scoring ended in a traceback of
    thousands of key names, after the samples were read (or the reconstructions made)."""
    from smapctl.eval.common import Fidelity

    state = torch.load(random_inception_weights, weights_only=True)
    partial = tmp_path / "partial.pth"
    torch.save({k: v for k, v in state.items() if not k.startswith("Mixed_7c")}, partial)
    with pytest.raises(
        UserError,
        match=r"^--inception-weights: .*partial.pth: not torch-fidelity's Inception v3 weights \(.*\): Mis",
    ):
        Fidelity.request(True, False, partial)
    assert Fidelity.request(True, False, random_inception_weights).weights == random_inception_weights


def test_a_bad_weights_file_names_the_setting_that_gave_it(empty_torch_home, tmp_path, monkeypatch):
    """A file from SMAPCTL_INCEPTION_WEIGHTS (set long ago, in a shell profile say) that is not the weights
    was named without the variable: only --inception-weights said where its path came from."""
    from smapctl.eval.common import Fidelity

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"hi")
    monkeypatch.setenv(INCEPTION_WEIGHTS_ENV, str(garbage))
    with pytest.raises(
        UserError, match=rf"^{INCEPTION_WEIGHTS_ENV}: {garbage}: not a readable PyTorch weights"
    ):
        Fidelity.request(True, False, None)
    with pytest.raises(UserError, match=rf"^--inception-weights: {garbage}: not a readable PyTorch weights"):
        Fidelity.request(False, True, garbage)
    monkeypatch.delenv(INCEPTION_WEIGHTS_ENV)
    cached = empty_torch_home / "hub" / "checkpoints" / INCEPTION_WEIGHTS_FILE
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"hi")
    with pytest.raises(
        UserError, match=rf"^torch-fidelity's cache: {cached}: not a readable PyTorch weights"
    ):
        Fidelity.request(True, False, None)


def test_wrong_weights_file_is_a_user_error(tmp_path):
    images = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match=r"garbage.pth: not a readable PyTorch weights file \(not written by"):
        fidelity_metrics(images, images, fid=True, isc=False, weights=garbage)
    other = tmp_path / "other.pth"
    torch.save({"fc.weight": torch.zeros(10, 4)}, other)
    with pytest.raises(UserError, match="not torch-fidelity's Inception v3 weights"):
        fidelity_metrics(images, images, fid=True, isc=False, weights=other)


def test_malicious_weights_file_is_refused_and_not_run(tmp_path):
    images = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    target = tmp_path / "pwned.txt"
    evil = tmp_path / "evil.pth"
    torch.save({"fc.weight": PicklePayload(target)}, evil)
    with pytest.raises(UserError, match="evil.pth: not a readable PyTorch weights file"):
        fidelity_metrics(images, images, fid=True, isc=False, weights=evil)
    assert not target.exists()


def test_unknown_torch_fidelity_arguments_are_refused():
    with pytest.raises(RuntimeError, match="does not know"):
        fidelity._calculate(input1=None, fid=True, feature_extractor_weight_path="typo")


def test_fid_and_is_end_to_end_with_random_weights(random_inception_weights, tmp_path):
    """PLUMBING TEST: random Inception weights, so the numbers are meaningless.

    It checks that image sets reach torch-fidelity and that it runs offline with a local weights file:
    the same set gives FID 0 whatever its container (a tensor vs a PNG folder read by `evaluate`'s
    reader), two different sets (an .npz vs a tensor) give a positive FID, and IS comes back finite and
    >= 1; anything but a uint8 tensor is refused (files are read by `read_image_set` alone). Kept to
    4 + 4 + 10 + 4 images: Inception runs at 299 px whatever the input size.
    """
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8, generator=g)
    b = (a[:4].float() * 0.3).to(torch.uint8)  # darker copies: a clearly different set
    folder = tmp_path / "a_png"
    folder.mkdir()
    for i, img in enumerate(a[:4]):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / f"{i:03d}.png")
    npz = write_npz(tmp_path / "a.npz", a.permute(0, 2, 3, 1).numpy())
    w = random_inception_weights

    from smapctl.eval.image_sets import read_image_set

    with pytest.raises(TypeError, match="^samples: expected a uint8 tensor"):
        fidelity_metrics(folder, a[:4], fid=True, isc=False, weights=w, cuda=False)
    pngs = read_image_set(folder).images
    same = fidelity_metrics(a[:4], pngs, fid=True, isc=False, weights=w, batch_size=10, cuda=False)
    assert set(same) == {"fid"}
    assert 0 <= same["fid"] < 1e-3  # never below 0: torch-fidelity's formula can give -1e-4

    different = fidelity_metrics(
        read_image_set(npz).images, b, fid=True, isc=True, weights=w, batch_size=10, cuda=False
    )
    assert set(different) == {"fid", "is_mean", "is_std"}
    assert different["fid"] > 1e-3
    assert np.isfinite(different["is_mean"]) and different["is_mean"] >= 1.0 - 1e-6
    assert np.isfinite(different["is_std"])

    with pytest.raises(UserError, match="at least 10 samples"):
        fidelity_metrics(a[:5], None, fid=False, isc=True, weights=w, cuda=False)
    with pytest.raises(UserError, match="FID needs a reference"):
        fidelity_metrics(a, None, fid=True, isc=False, weights=w, cuda=False)


def test_the_inception_pass_says_how_far_it_got(random_inception_weights, monkeypatch, caplog):
    """`evaluate --fid/--is` of the paper's 50,000 samples ran Inception over them (and the reference)
    for hours on a CPU without a word; each set now has its progress, by the batches Inception takes."""
    import logging

    monkeypatch.setenv("SMAPCTL_PROGRESS_EVERY", "0")  # a line at every batch (no terminal here)
    caplog.set_level(logging.INFO, logger="smapctl")
    g = torch.Generator().manual_seed(0)
    samples = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8, generator=g)
    reference = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8, generator=g)
    kw = dict(fid=True, isc=False, weights=random_inception_weights, batch_size=2, cuda=False)
    fidelity_metrics(samples, reference, **kw)
    said = [r.getMessage().split(" images")[0] for r in caplog.records]
    assert said == [
        "Inception: samples: 2 of 4",
        "Inception: samples: 4 of 4",
        "Inception: reference: 2 of 3",
        "Inception: reference: 3 of 3",
    ]


def test_reference_features_are_computed_once_per_cache(random_inception_weights, tmp_path, monkeypatch):
    """rFID over several prefixes scores each against the same originals: with `reference_cache` the
    reference goes through Inception once. Proof of reuse: a second call that names a *different*
    reference but the same cache still scores against the first one (the caller promises one reference
    per cache folder), while the samples are always recomputed."""
    import torch_fidelity.utils

    g = torch.Generator().manual_seed(1)
    ref_a = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=g)
    ref_b = (ref_a.float() * 0.3).to(torch.uint8)
    samples = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=g)
    kw = dict(fid=True, isc=False, weights=random_inception_weights, batch_size=8, cuda=False)
    cache = tmp_path / "cache"

    first = fidelity_metrics(samples, ref_a, reference_cache=cache, **kw)["fid"]
    kept = [p.name for p in cache.iterdir()]  # the reference's features and FID statistics, nothing else
    assert kept and all(name.startswith("reference-") for name in kept)
    again = fidelity_metrics(samples, ref_b, reference_cache=cache, **kw)["fid"]
    assert again == first
    assert fidelity_metrics(samples, ref_b, **kw)["fid"] != first  # without the cache: ref_b is scored
    other_samples = fidelity_metrics(ref_a, ref_b, reference_cache=cache, **kw)["fid"]
    assert abs(other_samples) < 1e-3  # samples recomputed: ref_a against the cached ref_a

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch_fidelity.utils, "torch_atomic_save", disk_full)
    fresh = fidelity_metrics(samples, ref_a, reference_cache=tmp_path / "full", **kw)["fid"]
    assert fresh == pytest.approx(first, rel=1e-6)  # a full disk costs the cache, not the score


def test_fid_against_an_adm_reference_batchs_own_statistics(random_inception_weights, tmp_path):
    """An ADM reference batch carries `mu` and `sigma` of the whole dataset beside a subset of its images
    (`arr_0`); gFID is taken against those statistics, as the ADM evaluator does. Proof: a file whose
    statistics are those of set b but whose images are set c scores like b, not like c, and IS (from the
    same single Inception pass) is the plain path's."""
    from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset

    g = torch.Generator().manual_seed(2)
    samples = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8, generator=g)
    b = (torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=g).float() * 0.4).to(torch.uint8)
    c = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=g)
    kw = dict(weights=random_inception_weights, batch_size=16, cuda=False)

    extractor = create_feature_extractor(
        fidelity.FEATURE_EXTRACTOR, ["2048"], cuda=False,
        feature_extractor_weights_path=str(random_inception_weights), verbose=False,
    )  # fmt: skip
    feats = get_featuresdict_from_dataset(fidelity.TensorImages(b), extractor, 16, False, True, False)["2048"]
    feats = feats.double().numpy()
    ref = tmp_path / "VIRTUAL_ref.npz"
    np.savez(ref, arr_0=c.permute(0, 2, 3, 1).numpy(), mu=feats.mean(0), sigma=np.cov(feats, rowvar=False))

    stats = fidelity.read_fid_statistics(ref)
    assert stats["mu"].shape == (2048,) and stats["sigma"].shape == (2048, 2048)
    with_stats = fidelity_metrics(samples, ref, fid=True, isc=True, reference_stats=stats, **kw)
    plain_b = fidelity_metrics(samples, b, fid=True, isc=True, **kw)
    plain_c = fidelity_metrics(samples, c, fid=True, isc=False, **kw)
    assert with_stats["fid"] == pytest.approx(plain_b["fid"], rel=1e-4)
    assert with_stats["fid"] != pytest.approx(plain_c["fid"], rel=1e-2)
    assert with_stats["is_mean"] == pytest.approx(plain_b["is_mean"], rel=1e-6)
    # No statistics: None (the images are the reference); statistics of another shape: one-line error.
    assert (
        fidelity.read_fid_statistics(write_npz(tmp_path / "plain.npz", c.permute(0, 2, 3, 1).numpy())) is None
    )
    np.savez(tmp_path / "bad.npz", arr_0=c.permute(0, 2, 3, 1).numpy(), mu=np.zeros(64), sigma=np.eye(64))
    with pytest.raises(UserError, match="not Inception pool statistics"):
        fidelity.read_fid_statistics(tmp_path / "bad.npz")


def test_inception_weights_without_fid_or_is_are_refused(tmp_path):
    """They were ignored without a word, even a file that is not one."""
    from smapctl.eval.common import Fidelity

    with pytest.raises(UserError, match=r"^--inception-weights: only with --fid or --is"):
        Fidelity.request(False, False, tmp_path / "garbage.pth")
    assert Fidelity.request(False, False, None) is None


def test_inception_runs_on_the_gpu_asked_for(monkeypatch, tmp_path):
    """torch-fidelity moves Inception and the images with `.cuda()`, to the current GPU: `device="cuda:1"`
    (the Python API's evaluate_*) put them on cuda:0, beside a tokenizer on cuda:1. Here torch.cuda's
    current-device context and torch-fidelity's calls are stand-ins recording what they see."""
    from smapctl.eval import common

    current, seen = [None], []

    class Current:  # torch.cuda.device: makes its device current inside the block
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            self.before, current[0] = current[0], self.device

        def __exit__(self, *exc):
            current[0] = self.before

    def record(*args, cuda, **kwargs):
        seen.append((current[0], cuda))
        return {}

    monkeypatch.setattr(torch.cuda, "device", Current)
    monkeypatch.setattr(common, "fidelity_metrics", record)
    monkeypatch.setattr(common, "streamed_fid_statistics", lambda *a, cuda, **k: record(cuda=cuda))
    fid = common.Fidelity(True, False, tmp_path / "inception.pth", "")
    images = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    fid.scores(images, images, 2, "cuda:1")
    fid.statistics([images], torch.device("cuda", 1))
    fid.scores(images, images, 2, "cpu")
    assert seen == [(torch.device("cuda", 1), True)] * 2 + [(None, False)]


def test_weights_other_than_the_published_file_are_said_so(random_inception_weights, monkeypatch, caplog):
    """Weights of the right shapes but other values (an untrained network: rFID 0.00 and IS 1.00 for
    every set) were taken without a word; metrics.json says which file it was, and whether published."""
    import logging

    from smapctl.eval import common, fidelity

    with caplog.at_level(logging.WARNING, logger="smapctl.eval"):
        made = common.Fidelity.request(True, False, random_inception_weights)
    assert not made.published and common.inception_block(made)["published_weights"] is False
    assert (
        f"{random_inception_weights}: not the published Inception weights (weights-inception-" in caplog.text
    )
    caplog.clear()
    monkeypatch.setattr(common, "file_sha256", lambda path: fidelity.INCEPTION_SHA256_PREFIX + "0" * 56)
    with caplog.at_level(logging.WARNING, logger="smapctl.eval"):
        made = common.Fidelity.request(True, False, random_inception_weights)
    assert made.published and "not the published" not in caplog.text


def test_what_torch_fidelity_is_asked_and_what_comes_back(random_inception_weights, monkeypatch):
    """A stand-in for torch-fidelity's computation (its Inception pass takes seconds): the sets and the IS
    settings it is given (10 splits, shuffled with its default seed 2020, as published scores take them),
    each score read from its own key, and sets too small for FID (2 images) or IS (10) refused first."""
    import torch_fidelity

    asked = []

    def calculate_metrics(**kwargs):
        asked.append(kwargs)
        return {"frechet_inception_distance": 3.0, "inception_score_mean": 5.0, "inception_score_std": 0.5}

    monkeypatch.setattr(torch_fidelity, "calculate_metrics", calculate_metrics)
    samples = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 3, 4, 4)
    reference = torch.zeros(3, 3, 4, 4, dtype=torch.uint8)
    kw = dict(weights=random_inception_weights, cuda=False)
    assert fidelity_metrics(samples, reference, fid=True, isc=True, **kw) == {
        "fid": 3.0, "is_mean": 5.0, "is_std": 0.5,
    }  # fmt: skip
    [given] = asked
    assert [int(given["input1"][i][0, 0, 0]) for i in range(len(given["input1"]))] == list(range(10))
    assert len(given["input2"]) == 3 and given["fid"] and given["isc"]
    assert (given["isc_splits"], given["rng_seed"]) == (10, 2020)
    assert given["feature_extractor_weights_path"] == str(random_inception_weights)
    with pytest.raises(UserError, match="^FID needs at least 2 images per set; samples has 1$"):
        fidelity_metrics(samples[:1], reference, fid=True, isc=False, **kw)
    with pytest.raises(UserError, match="^FID needs at least 2 images per set; reference has 1$"):
        fidelity_metrics(samples, reference[:1], fid=True, isc=False, **kw)
    with pytest.raises(UserError, match=r"^Inception Score needs at least 10 samples .*; got 9$"):
        fidelity_metrics(samples[:9], None, fid=False, isc=True, **kw)
    assert len(asked) == 1  # refused before torch-fidelity was asked
    # Its eigenvalue formula comes out a hair below 0 for equal sets: a distance is not negative.
    monkeypatch.setattr(
        torch_fidelity, "calculate_metrics", lambda **_: {"frechet_inception_distance": -1e-4}
    )
    assert fidelity_metrics(samples, reference, fid=True, isc=False, **kw) == {"fid": 0.0}


def test_feature_moments_are_numpy_s_mean_and_covariance_in_any_batching():
    """gFID's streamed statistics (`FeatureMoments`): the mean and np.cov's unbiased covariance of every
    vector added, whatever the batches (uneven, an empty one), with features far from zero (the shift
    keeps the sums' cancellation small) and in float32 as Inception gives them."""
    rng = np.random.default_rng(0)
    features = (rng.standard_normal((37, 6)) * [1, 2, 3, 0.5, 1, 4] + 1e5).astype(np.float32)
    moments = fidelity.FeatureMoments(dim=6)
    for start, stop in [(0, 5), (5, 5), (5, 6), (6, 30), (30, 37)]:
        moments.add(torch.from_numpy(features[start:stop]))
    stats = moments.statistics()
    exact = features.astype(np.float64)
    assert moments.count == 37
    np.testing.assert_allclose(stats["mu"], exact.mean(0), rtol=0, atol=1e-9)
    np.testing.assert_allclose(stats["sigma"], np.cov(exact, rowvar=False), rtol=1e-9, atol=1e-9)


def test_only_the_reference_gets_a_cache_name(random_inception_weights, monkeypatch, tmp_path):
    """With `reference_cache` torch-fidelity keeps the features of the input that has a cache name: the
    reference's (input2), never the samples' (input1), which differ at every call (rFID per prefix)."""
    import torch_fidelity

    asked = []

    def calculate_metrics(**kwargs):
        asked.append(kwargs)
        return {"frechet_inception_distance": 3.0}

    monkeypatch.setattr(torch_fidelity, "calculate_metrics", calculate_metrics)
    samples = torch.zeros(4, 3, 4, 4, dtype=torch.uint8)
    cache = tmp_path / "cache"
    kw = dict(fid=True, isc=False, weights=random_inception_weights, cuda=False)
    fidelity_metrics(samples, samples + 1, reference_cache=cache, **kw)
    [given] = asked
    assert given["cache"] and given["cache_root"] == str(cache)
    assert given["input2_cache_name"] == "reference" and "input1_cache_name" not in given


def test_images_other_than_uint8_rgb_are_refused():
    """torch-fidelity reads uint8 images in [0, 255]: float images (in [-1, 1], a model's output) would be
    scored as almost black, so they are refused, as are other layouts."""
    with pytest.raises(ValueError, match=r"^samples: expected uint8 \(N, 3, H, W\), got torch.float32"):
        fidelity.as_image_dataset(torch.zeros(2, 3, 4, 4), "samples")
    with pytest.raises(
        ValueError, match=r"^reference: expected uint8 \(N, 3, H, W\), got torch.uint8 \(2, 1"
    ):
        fidelity.as_image_dataset(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), "reference")
    with pytest.raises(TypeError, match="^samples: expected a uint8 tensor"):
        fidelity.as_image_dataset(np.zeros((2, 3, 4, 4), dtype=np.uint8), "samples")
    assert len(fidelity.as_image_dataset(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), "samples")) == 2


def test_reference_statistics_stored_in_float32_are_read_as_float64(tmp_path):
    """A reference batch may store its `mu` and `sigma` in float32: they come back in float64, in which the
    Frechet distance is computed (the square root of 2048 x 2048 covariances loses digits in float32)."""
    rng = np.random.default_rng(0)
    mu = rng.normal(size=2048).astype(np.float32)
    sigma = np.diag(rng.uniform(0.5, 2.0, size=2048)).astype(np.float32)
    np.savez(tmp_path / "ref.npz", mu=mu, sigma=sigma)
    stats = fidelity.read_fid_statistics(tmp_path / "ref.npz")
    assert stats["mu"].dtype == stats["sigma"].dtype == np.float64
    np.testing.assert_array_equal(stats["mu"], mu)
    np.testing.assert_array_equal(stats["sigma"], sigma)
