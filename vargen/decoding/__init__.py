"""Decoding methods over the model protocol; all share :class:`DecodeSession`."""
from .ar import decode_ar
from .eagle import decode_eagle
from .lpd import decode_lpd
from .methods import METHODS, get_method
from .nar import decode_nar
from .sampling import (SamplingConfig, filter_logits, guided_logits, logits_to_probs, make_generators,
                       sample_categorical)
from .session import DecodeSession
from .speculative import decode_jacobi, decode_sjd
from .stats import DecodeStats
from .zipar import decode_zipar, zipar_schedule
from .zipar_adaptive import decode_zipar_adaptive

__all__ = ["METHODS", "DecodeSession", "DecodeStats", "SamplingConfig", "decode_ar", "decode_jacobi", "decode_lpd",
           "decode_nar", "decode_eagle",
           "decode_sjd", "decode_zipar", "decode_zipar_adaptive", "zipar_schedule",
           "get_method", "filter_logits", "guided_logits",
           "logits_to_probs", "make_generators", "sample_categorical"]
