"""PSNR / SSIM against closed forms and skimage; Frechet distance against closed forms; .npz I/O."""

import math

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.metrics import structural_similarity

from smapctl.errors import UserError
from smapctl.eval.frechet import feature_stats, frechet_distance
from smapctl.eval.image_sets import read_image_set
from smapctl.eval.metrics import psnr, ssim
from smapctl.eval.npz import npz_arrays, read_npz, write_npz

# ------------------------------------------------------------------------------------------ PSNR / SSIM


def test_identical_images_give_inf_psnr_and_unit_ssim():
    torch.manual_seed(0)
    x = torch.rand(3, 3, 16, 20) * 2 - 1
    assert torch.isinf(psnr(x, x)).all()
    torch.testing.assert_close(ssim(x, x), torch.ones(3, dtype=torch.float64))


def test_exact_8bit_reconstruction_counts_as_one_level_of_error():
    """`evaluate` averages the PSNRs of 8-bit images: an exact one counts as the smallest error two
    8-bit images can have (before, it made the mean inf, written as null in metrics.json)."""
    torch.manual_seed(0)
    x = torch.randint(0, 256, (2, 3, 16, 16)).double() / 127.5 - 1
    one_level = x.clone()
    one_level[1, 0, 0, 0] += 2 / 255
    exact = psnr(x, x, eight_bit=True)
    torch.testing.assert_close(
        exact, torch.full((2,), 10 * math.log10(255**2 * 3 * 16 * 16), dtype=torch.float64)
    )
    torch.testing.assert_close(exact[1], psnr(x, one_level, eight_bit=True)[1])
    torch.testing.assert_close(
        psnr(x, one_level, eight_bit=True)[1], psnr(x, one_level)[1]
    )  # real errors stay
    assert math.isfinite(psnr(x, x, eight_bit=True).mean().item())


def test_psnr_of_constant_offset_is_closed_form():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 8, 8) * 1.5 - 1
    offsets = torch.tensor([0.1, 0.25]).view(2, 1, 1, 1)
    expected = torch.tensor([10 * math.log10(4 / 0.1**2), 10 * math.log10(4 / 0.25**2)], dtype=torch.float64)
    torch.testing.assert_close(psnr(x, x + offsets), expected)
    # data_range scales the peak: L = 1 is 20 log10(2) dB lower than L = 2.
    torch.testing.assert_close(psnr(x, x + offsets, data_range=1.0), expected - 20 * math.log10(2))


def test_psnr_is_per_image():
    torch.manual_seed(0)
    x = torch.rand(4, 3, 8, 8) * 2 - 1
    y = x + 0.1 * torch.randn_like(x)
    one_by_one = torch.cat([psnr(x[i : i + 1], y[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(psnr(x, y), one_by_one)


@pytest.mark.parametrize("size,noise", [((32, 32), 10.0), ((24, 40), 50.0), ((16, 16), 120.0)])
def test_ssim_matches_skimage_on_uint8_images(size, noise):
    """SSIM is measured on the stored images, uint8 with L = 255, as other tokenizers' tables are; a
    measurement on [-1, 1] with L = 2 gives another number (its luminance term sees shifted means)."""
    rng = np.random.default_rng(1)
    x8 = rng.integers(0, 256, (3, 3, *size)).astype(np.uint8)
    y8 = np.clip(x8 + rng.normal(0, noise, x8.shape), 0, 255).round().astype(np.uint8)
    x, y = (torch.from_numpy(a).float() / 127.5 - 1 for a in (x8, y8))  # smapctl's [-1, 1]
    ours = ssim(x, y)
    for i in range(3):
        ref = structural_similarity(
            x8[i],
            y8[i],
            data_range=255,
            channel_axis=0,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
        )
        assert abs(ours[i].item() - ref) < 1e-6, (i, ours[i].item(), ref)


def test_ssim_orders_by_degradation_and_rejects_small_images():
    torch.manual_seed(0)
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    mild, strong = x + 0.05 * torch.randn_like(x), x + 0.5 * torch.randn_like(x)
    assert ssim(x, mild).item() > ssim(x, strong).item()
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="same shape"):
        psnr(torch.zeros(1, 3, 8, 8), torch.zeros(2, 3, 8, 8))


class _OnMPS(torch.Tensor):
    """A CPU tensor that says it is on Apple's mps device, where a float64 conversion raises as torch's
    does there (this machine has no mps); what is computed from it is a plain tensor."""

    __torch_function__ = torch._C._disabled_torch_function_impl

    @property
    def device(self) -> torch.device:
        return torch.device("mps")

    def double(self):
        raise TypeError("Cannot convert a MPS Tensor to float64 dtype: the MPS framework doesn't support it")

    def cpu(self) -> torch.Tensor:
        return self.as_subclass(torch.Tensor)


def test_psnr_and_ssim_of_mps_images_are_taken_in_float64_on_the_cpu():
    # A tokenizer trained on a Mac (accelerate picks mps) validates with `psnr` on the device: it stopped
    # there at its first validation. The scores are the CPU's, in float64.
    torch.manual_seed(0)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    y = (x + 0.1 * torch.randn_like(x)).clamp(-1, 1)
    mx, my = x.as_subclass(_OnMPS), y.as_subclass(_OnMPS)
    with pytest.raises(TypeError, match="MPS"):
        mx.double()
    assert torch.equal(psnr(mx, my), psnr(x, y))
    assert torch.equal(psnr(mx, my, eight_bit=True), psnr(x, y, eight_bit=True))
    assert torch.equal(ssim(mx, my), ssim(x, y))
    assert psnr(mx, my).dtype == ssim(mx, my).dtype == torch.float64


# ---------------------------------------------------------------------------------------------- Frechet


def test_frechet_of_a_set_with_itself_is_zero():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(200, 16)) @ rng.normal(size=(16, 16))
    mu, sigma = feature_stats(feats)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6
    # Fewer samples than dimensions: singular covariance, still zero against itself.
    mu, sigma = feature_stats(torch.randn(10, 64))
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6
    # Rounding must not make it negative (it came out as -1.1e-13 for some sets).
    for seed in range(20):
        mu, sigma = feature_stats(np.random.default_rng(seed).normal(size=(50, 8)))
        assert frechet_distance(mu, sigma, mu, sigma) >= 0.0
    # ... while nan or inf features give nan: not 0, a perfect score, nor an exception.
    for bad in (np.nan, np.inf):
        feats = np.random.default_rng(0).normal(size=(50, 8))
        feats[3, 2] = bad
        with np.errstate(invalid="ignore"):  # numpy's own covariance of inf says so
            assert np.isnan(frechet_distance(*feature_stats(feats), mu, sigma))
    assert np.isnan(frechet_distance(mu, sigma, mu + np.nan, sigma))


def test_frechet_matches_closed_form_for_diagonal_gaussians():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, -1.0, 2.5])
    d1, d2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(d1 + d2 - 2 * np.sqrt(d1 * d2))
    assert frechet_distance(mu1, np.diag(d1), mu2, np.diag(d2)) == pytest.approx(expected, abs=1e-9)


def test_frechet_matches_closed_form_for_rotated_gaussians():
    """Same rotation R on both: (R D1 R^T R D2 R^T)^(1/2) = R (D1 D2)^(1/2) R^T, trace sum sqrt(d1 d2)."""
    rng = np.random.default_rng(3)
    r, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    d1, d2 = rng.uniform(0.1, 3, 5), rng.uniform(0.1, 3, 5)
    s1, s2 = r @ np.diag(d1) @ r.T, r @ np.diag(d2) @ r.T
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(d1 + d2 - 2 * np.sqrt(d1 * d2))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, abs=1e-8)
    # Symmetric in its two arguments.
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(expected, abs=1e-8)


def test_feature_stats_is_numpy_mean_and_unbiased_cov():
    feats = torch.randn(50, 4)
    mu, sigma = feature_stats(feats)
    np.testing.assert_allclose(mu, feats.double().mean(0).numpy())
    np.testing.assert_allclose(sigma, np.cov(feats.double().numpy(), rowvar=False))
    with pytest.raises(ValueError, match="N >= 2"):
        feature_stats(torch.randn(1, 4))


# --------------------------------------------------------------------------------------------- npz I/O


def test_npz_round_trip_and_read_image_set(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 8, 6, 3), dtype=np.uint8)
    path = write_npz(tmp_path / "sub" / "samples.npz", images)
    np.testing.assert_array_equal(read_npz(path), images)
    assert np.load(path)["arr_0"].dtype == np.uint8  # what the ADM evaluator reads
    assert not [p for p in path.parent.iterdir() if p.name != "samples.npz"]  # no temp file left
    loaded = read_image_set(path).images  # what `evaluate --samples X.npz` reads
    assert loaded.dtype == torch.uint8 and loaded.shape == (5, 3, 8, 6)
    np.testing.assert_array_equal(loaded.permute(0, 2, 3, 1).numpy(), images)
    # Class ids go in `arr_1`, beside the images; a wrong shape is refused.
    labeled = write_npz(tmp_path / "labeled.npz", images, np.array([3, 1, 4, 1, 5]))
    np.testing.assert_array_equal(np.load(labeled)["arr_1"], [3, 1, 4, 1, 5])
    with pytest.raises(ValueError, match="labels"):
        write_npz(tmp_path / "bad.npz", images, np.array([1, 2]))


def test_image_folders_are_read_recursively_and_sorted(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(3, 8, 8, 3), dtype=np.uint8)
    (tmp_path / "b").mkdir()
    Image.fromarray(images[0]).save(tmp_path / "a.png")
    Image.fromarray(images[1]).save(tmp_path / "b" / "c.PNG")
    Image.fromarray(images[2]).save(tmp_path / "b" / "d.png")
    (tmp_path / "notes.txt").write_text("ignored")
    loaded = read_image_set(tmp_path).images  # `evaluate`'s reader, for every score
    np.testing.assert_array_equal(loaded.permute(0, 2, 3, 1).numpy(), images)


def test_bad_image_sets_are_user_errors(tmp_path):
    bad_dtype = tmp_path / "float.npz"
    np.savez(bad_dtype, arr_0=np.zeros((2, 4, 4, 3), dtype=np.float32))
    with pytest.raises(UserError, match=r"float\.npz: 'arr_0' has dtype float32"):
        read_npz(bad_dtype)
    bad_shape = tmp_path / "gray.npz"
    np.savez(bad_shape, arr_0=np.zeros((2, 4, 4), dtype=np.uint8))
    with pytest.raises(UserError, match=r"gray\.npz: 'arr_0' has shape"):
        read_npz(bad_shape)
    no_arr = tmp_path / "other.npz"
    np.savez(no_arr, images=np.zeros((2, 4, 4, 3), dtype=np.uint8))
    with pytest.raises(UserError, match="no 'arr_0'"):
        read_npz(no_arr)
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, arr_0=np.array([{"a": 1}], dtype=object))
    with pytest.raises(UserError, match="pickled.npz"):
        read_npz(pickled)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip")  # numpy's own message called it pickled data, to load unsafely
    for read in (read_npz, npz_arrays):
        with pytest.raises(UserError, match=r"garbage.npz: not an .npz file \(a zip archive of .npy arrays"):
            read(garbage)
    with pytest.raises(UserError, match="missing: no such folder, .npz file or dataset"):
        read_image_set(tmp_path / "missing", size=8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty: no image files found"):
        read_image_set(tmp_path / "empty")
    (tmp_path / "mixed").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "mixed" / "a.png")
    Image.new("RGB", (8, 9)).save(tmp_path / "mixed" / "b.png")
    with pytest.raises(UserError, match=r"b\.png: image size 8x9 differs from 8x8 .* all images must share"):
        read_image_set(tmp_path / "mixed")
    read_image_set(tmp_path / "mixed", size=8)  # with a size to score at, each is brought to it


def test_write_npz_refuses_wrong_layout(tmp_path):
    with pytest.raises(ValueError, match=r"expected uint8 \(pixel values 0\.\.255: np\.clip\(x, 0, 255\)"):
        write_npz(tmp_path / "x.npz", np.zeros((2, 4, 4, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"dtype int64, expected uint8$"):  # no float hint for integers
        write_npz(tmp_path / "x.npz", np.zeros((2, 4, 4, 3), dtype=np.int64))
    with pytest.raises(ValueError, match=r"expected \(N, H, W, 3\)"):
        write_npz(tmp_path / "x.npz", np.zeros((2, 3, 4, 4), dtype=np.uint8))


def test_frechet_agrees_with_torch_fidelity():
    """Our symmetric-eigen route and torch-fidelity's eigvals(S1 S2) route give the same distance."""
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    torch.manual_seed(0)
    (mu1, s1), (mu2, s2) = feature_stats(torch.randn(300, 64) * 2), feature_stats(torch.randn(300, 64) + 0.3)
    theirs = fid_statistics_to_metric({"mu": mu1, "sigma": s1}, {"mu": mu2, "sigma": s2}, False)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(theirs["frechet_inception_distance"], rel=1e-9)
