"""Decoders from tokens / features to pixels: LIIF (implicit, any resolution and scale)."""
from .liif import LIIF, MLP, EDSRBaseline, LIIFTokenDecoder, VQFeatures, make_coord, output_size

__all__ = ["LIIF", "MLP", "EDSRBaseline", "LIIFTokenDecoder", "VQFeatures", "make_coord", "output_size"]
