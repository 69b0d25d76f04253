"""AR generators speaking vargen's model protocol (see ``protocol.py``)."""
from .cache import StaticKVCache, causal_slot_mask
from .checkpoint import CheckpointError, UntrustedCheckpointError, read_state_dict
from .llamagen import GPT_SIZES, LlamaGen
from .lpd import LPD
from .prefix import PrefixModel
from .protocol import ARImageModel

# Hugging Face adapters import transformers' model classes: loaded on first use, not with vargen.models
_HF_EXPORTS = {"HFImageModel": "hf_base", "JanusImageModel": "hf", "Emu3ImageModel": "hf",
               "ChameleonImageModel": "hf", "load_hf_image_model": "hf", "SlotKVCache": "hf_cache"}

__all__ = ["ARImageModel", "CheckpointError", "GPT_SIZES", "LPD", "LlamaGen", "PrefixModel", "StaticKVCache",
           "causal_slot_mask", "read_state_dict", "UntrustedCheckpointError", *_HF_EXPORTS]


def __getattr__(name):
    if name in _HF_EXPORTS:
        from importlib import import_module

        return getattr(import_module(f".{_HF_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
