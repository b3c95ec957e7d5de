"""smapctl: SMAP semantic-aware 1D image tokenizers and CARD generators.

`smapctl.Tokenizer` and `smapctl.Generator` load trained checkpoints in your own code (`smapctl.api`);
they are imported on first use, so `import smapctl` (and `smapctl --help`) stays quick."""

__version__ = "0.1.0"

__all__ = ["Generator", "Samples", "Tokenizer", "__version__"]


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


def __getattr__(name: str):
    if name in ("Generator", "Samples", "Tokenizer"):
        from smapctl import api

        return getattr(api, name)
    raise AttributeError(f"module 'smapctl' has no attribute {name!r}")
