"""Per-image reconstruction metrics: PSNR and SSIM on images in [-1, 1].

Both follow the usual definitions so the numbers can be compared with other tokenizers' tables:
PSNR = 10 log10(L^2 / MSE) over all pixels and channels of an image; SSIM (Wang et al. 2004) with an
11x11 Gaussian window of sigma 1.5, K1 = 0.01, K2 = 0.03, population (not sample) statistics, averaged
over the valid window positions of each channel and then over channels. This matches
`skimage.metrics.structural_similarity(..., gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
data_range=L, channel_axis=0)` on the uint8 images with L = 255, which the tests check.
"""

import torch
import torch.nn.functional as F
from einops import rearrange

SSIM_SIGMA = 1.5
SSIM_WINDOW = 11  # skimage's truncate=3.5 at sigma 1.5 gives a radius of int(3.5 * 1.5 + 0.5) = 5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(
            f"expected two (B, C, H, W) tensors of the same shape, got {tuple(x.shape)}, {tuple(y.shape)}"
        )


def _float64(t: torch.Tensor) -> torch.Tensor:
    """`t` in float64: on the CPU for a tensor on Apple's mps, which has no float64 (converting there is a
    TypeError, and a tokenizer trained on a Mac, where accelerate picks mps, would stop at its first
    validation); elsewhere on its own device."""
    return t.cpu().double() if t.device.type == "mps" else t.double()


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0, eight_bit: bool = False) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB, one value per image.

    x, y: (B, C, H, W) float, in [-1, 1] for the default `data_range` of 2. Returns (B,) float64 (on the
    CPU for mps images, `_float64`); identical images give +inf, or with `eight_bit` (both are 8-bit
    images) the PSNR of the smallest error two different 8-bit images can have, one level in one value:
    10 log10(255^2 C H W), 77.0 dB at 16 px and 101.1 at 256. So one exact reconstruction does not make a
    mean over images infinite.
    """
    _check_pair(x, y)
    mse = (_float64(x) - _float64(y)).pow(2).flatten(1).mean(dim=1)  # (B,)
    if eight_bit:
        mse = mse.clamp_min((data_range / 255) ** 2 / x[0].numel())
    return 10 * torch.log10(data_range**2 / mse)


def _gaussian_window(size: int, sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Normalised separable Gaussian window as a (size, size) tensor."""
    coords = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Structural similarity, one value per image (mean over channels of each channel's mean SSIM map).

    x, y: (B, C, H, W) float in [-1, 1] with H, W >= 11. Returns (B,) float64 in [-1, 1] (on the CPU for
    mps images); identical images give 1. Unlike PSNR, SSIM changes when the pixel values are shifted (its
    luminance term compares the local means), so the images are measured as they are stored, in [0, 1]
    with L = 1: the same number as skimage on the uint8 images with L = 255. Only "valid" window positions
    count (no padding), as skimage does by cropping the filtered borders.
    """
    _check_pair(x, y)
    b, c, h, w = x.shape
    if min(h, w) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW}, got {h}x{w}")
    x, y = (_float64(x) + 1) / 2, (_float64(y) + 1) / 2  # [-1, 1] -> [0, 1]
    data_range = 1.0
    window = _gaussian_window(SSIM_WINDOW, SSIM_SIGMA, x.dtype, x.device)
    # One depthwise convolution computes the five local moments of every channel at once.
    stack = torch.cat([x, y, x * x, y * y, x * y], dim=1)  # (B, 5C, H, W)
    kernel = window.expand(5 * c, 1, SSIM_WINDOW, SSIM_WINDOW)
    moments = F.conv2d(stack, kernel, groups=5 * c)  # (B, 5C, H-10, W-10)
    mu_x, mu_y, e_xx, e_yy, e_xy = rearrange(moments, "b (m c) h w -> m b c h w", m=5)
    var_x, var_y, cov_xy = e_xx - mu_x**2, e_yy - mu_y**2, e_xy - mu_x * mu_y
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / (
        (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    )  # (B, C, H-10, W-10)
    return ssim_map.mean(dim=(2, 3)).mean(dim=1)
