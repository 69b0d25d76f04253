"""Image tokenizers: the 2D VQ grid (LlamaGen-compatible) and the flexible-length 1D sequence."""
from .flex1d import Flex1DTokenizer
from .vq import VQTokenizer

__all__ = ["Flex1DTokenizer", "VQTokenizer"]
