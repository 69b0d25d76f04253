"""Image tokenizers: the 2D VQ grid (LlamaGen-compatible) and the flexible-length 1D sequence."""
import json
import os
from typing import Optional

from .flex1d import Flex1DTokenizer
from .vq import VQTokenizer

__all__ = ["Flex1DTokenizer", "VQTokenizer", "load_tokenizer"]

TOKENIZER_TYPES = {"vq": VQTokenizer, "flex1d": Flex1DTokenizer}


def load_tokenizer(path: str, kind: Optional[str] = None):
    """A saved tokenizer folder as the class its ``config.json`` names (``VQTokenizer`` or
    ``Flex1DTokenizer``); ``kind`` (``"vq"`` / ``"flex1d"``) forces one."""
    if kind is None:
        config = os.path.join(path, "config.json")
        if not os.path.isfile(config):
            from ..errors import MissingInputError

            raise MissingInputError(f"no tokenizer at {path!r} (config.json missing)")
        with open(config) as f:
            name = json.load(f).get("_class_name")
        kind = "flex1d" if name == Flex1DTokenizer.__name__ else "vq"
    if kind not in TOKENIZER_TYPES:
        raise ValueError(f"tokenizer_type must be one of {sorted(TOKENIZER_TYPES)}, got {kind!r}")
    from ..errors import load_local

    return load_local(TOKENIZER_TYPES[kind], path, "tokenizer")
