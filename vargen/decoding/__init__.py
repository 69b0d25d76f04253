"""Decoding methods over the model protocol; all share :class:`DecodeSession`."""
from .ar import decode_ar
from .sampling import (SamplingConfig, filter_logits, guided_logits, logits_to_probs, make_generators,
                       sample_categorical)
from .session import DecodeSession
from .stats import DecodeStats

__all__ = ["DecodeSession", "DecodeStats", "SamplingConfig", "decode_ar", "filter_logits", "guided_logits",
           "logits_to_probs", "make_generators", "sample_categorical"]
