"""Datasets: image folders in the ImageNet layout, the embedded real-image sets, cached latents."""
