"""Image tokenizers: the 2D VQ grid (LlamaGen-compatible)."""
from .vq import VQTokenizer

__all__ = ["VQTokenizer"]
