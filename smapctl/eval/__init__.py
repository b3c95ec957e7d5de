"""Metrics: PSNR/SSIM, Frechet distances, FID/IS through torch-fidelity, semantic accuracy."""
