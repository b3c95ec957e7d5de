"""smapctl: SMAP semantic-aware 1D image tokenizers and CARD generators."""

__version__ = "0.1.0"
