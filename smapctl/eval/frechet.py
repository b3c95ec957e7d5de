"""Frechet distance between two Gaussians fitted to feature sets (the maths behind FID).

    d^2 = ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))

The trace of the matrix square root is computed without a general (non-symmetric) `sqrtm`: with
A = S2^(1/2) S1^(1/2), S1 S2 has the same eigenvalues as the PSD matrix A^T A = S1^(1/2) S2 S1^(1/2), so
tr (S1 S2)^(1/2) is the sum of the singular values of A (its nuclear norm). Two symmetric
eigendecompositions and one SVD in float64 (numpy only) never square the condition number, so the result
stays accurate for the singular covariances one gets with fewer samples than feature dimensions.
"""

import numpy as np
import torch


def _as_float64(a: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    return np.asarray(a, dtype=np.float64)


def _psd_eigvals(eigvals: np.ndarray) -> np.ndarray:
    """Eigenvalues of a PSD matrix with round-off removed: those below D * eps * max are set to 0.

    Same tolerance as `np.linalg.matrix_rank`; without it the square roots of round-off (1e-16 -> 1e-8)
    add up over the null space of a singular covariance (fewer samples than dimensions).
    """
    tol = eigvals.size * np.finfo(np.float64).eps * max(eigvals.max(initial=0.0), 0.0)
    return np.where(eigvals > tol, eigvals, 0.0)


def _sqrt_psd(s: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix."""
    eigvals, eigvecs = np.linalg.eigh((s + s.T) / 2)
    return (eigvecs * np.sqrt(_psd_eigvals(eigvals))) @ eigvecs.T


def feature_stats(features: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D), float64, of features (N, D) with N >= 2.

    Same estimator (`np.cov`, divisor N - 1) as torch-fidelity and the ADM evaluator.
    """
    f = _as_float64(features)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"feature_stats needs an (N, D) array with N >= 2, got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def frechet_distance(
    mu1: np.ndarray | torch.Tensor,
    sigma1: np.ndarray | torch.Tensor,
    mu2: np.ndarray | torch.Tensor,
    sigma2: np.ndarray | torch.Tensor,
) -> float:
    """Squared Frechet distance between N(mu1, sigma1) and N(mu2, sigma2); mu (D,), sigma (D, D)."""
    mu1, sigma1, mu2, sigma2 = (_as_float64(a) for a in (mu1, sigma1, mu2, sigma2))
    if not all(np.isfinite(a).all() for a in (mu1, sigma1, mu2, sigma2)):
        return float("nan")  # nan or inf features (a diverged model): no distance, not an error
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(
            f"shape mismatch: mu {mu1.shape} / {mu2.shape}, sigma {sigma1.shape} / {sigma2.shape}"
        )
    a = _sqrt_psd(sigma2) @ _sqrt_psd(sigma1)  # (D, D); a^T a has the eigenvalues of sigma1 @ sigma2
    tr_covmean = np.linalg.svd(a, compute_uv=False).sum()
    diff = mu1 - mu2
    d = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)
    # Rounding can take the distance of a set to itself just below zero (-1e-13); a distance is not.
    # (Not max(0.0, d): a nan, from nan features, must stay nan, not become a perfect score.)
    return 0.0 if d < 0 else d
