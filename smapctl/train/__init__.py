"""Training on accelerate: one function per model family, shared EMA/schedule/checkpoint helpers."""
