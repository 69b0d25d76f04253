"""AR generators speaking vargen's model protocol (see ``protocol.py``)."""
from .cache import StaticKVCache, causal_slot_mask
from .checkpoint import CheckpointError, read_state_dict
from .llamagen import GPT_SIZES, LlamaGen
from .protocol import ARImageModel

__all__ = ["ARImageModel", "CheckpointError", "GPT_SIZES", "LlamaGen", "StaticKVCache", "causal_slot_mask",
           "read_state_dict"]
