"""Inference operations: tokenize, reconstruct, cross-reconstruct, sample."""
