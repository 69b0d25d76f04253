"""vargen: fast autoregressive image generation without making it worse."""
__version__ = "0.1.0"

from .decoding import DecodeStats, SamplingConfig, decode_ar  # noqa: E402
from .models import LlamaGen  # noqa: E402
from .tokenizers import VQTokenizer  # noqa: E402

__all__ = ["DecodeStats", "LlamaGen", "SamplingConfig", "VQTokenizer", "decode_ar", "__version__"]


def __getattr__(name):
    # The pipeline imports diffusers' pipeline machinery; load it only when asked for.
    if name == "VarGenPipeline":
        from .pipeline import VarGenPipeline

        return VarGenPipeline
    raise AttributeError(f"module 'vargen' has no attribute {name!r}")
