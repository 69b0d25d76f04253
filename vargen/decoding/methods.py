"""Decoding methods by name: the one switch the pipeline, the CLI and the benchmarks use."""
from __future__ import annotations

from functools import partial
from typing import Optional, Sequence

from .acceptance import LanternAcceptance, codebook_neighbours
from .ar import decode_ar
from .sampling import SamplingConfig
from .speculative import decode_sjd
from .zipar import decode_zipar

# name -> (decode function, fixed options); user options (window, init, ...) are added per call
METHODS = {
    "ar": (decode_ar, {}),
    "sjd": (decode_sjd, {"coupling": "none"}),
    "sjd+coupling": (decode_sjd, {"coupling": "maximal"}),
    "sjd+gumbel": (decode_sjd, {"coupling": "gumbel"}),
    "sjd+lantern": (decode_sjd, {"coupling": "none", "acceptance": "lantern"}),
    "sjd+coupling+lantern": (decode_sjd, {"coupling": "maximal", "acceptance": "lantern"}),
    "zipar": (decode_zipar, {}),
}
LOSSLESS = ("ar", "sjd", "sjd+coupling", "sjd+gumbel")
RELAXATION_OPTIONS = ("lantern_delta", "lantern_lambda", "lantern_k")


def get_method(name: str, codebook=None, **options):
    """``decode(model, cond, sampling, seeds, cond_mask=None, progress=False, callback=None)`` for ``name``.

    ``options`` (e.g. ``window=16, init="left"``) go to the method; options a method does
    not take (``window`` for ``ar``) raise a ``ValueError`` that names them. LANTERN
    methods need the tokenizer's ``codebook`` (``[V, D]``) and take ``lantern_delta``
    (default 0.1), ``lantern_lambda`` (lambda mode instead) and ``lantern_k`` (1000).
    """
    if name not in METHODS:
        raise ValueError(f"unknown decoding method {name!r}; choose from {sorted(METHODS)}")
    fn, fixed = METHODS[name]
    fixed = dict(fixed)
    relax = {k: options.pop(k) for k in RELAXATION_OPTIONS if options.get(k) is not None}
    if fixed.get("acceptance") == "lantern":
        if codebook is None:
            raise ValueError(f"method {name!r} needs the tokenizer codebook for its neighbour table")
        fixed["acceptance"] = LanternAcceptance(codebook_neighbours(codebook, relax.get("lantern_k", 1000)),
                                                delta=relax.get("lantern_delta", 0.1), lam=relax.get("lantern_lambda"))
    elif relax:
        raise ValueError(f"method {name!r} takes no option(s) {sorted(relax)} (relaxed acceptance is sjd+lantern)")
    import inspect

    accepted = set(inspect.signature(fn).parameters)
    unknown = sorted(k for k, v in options.items() if v is not None and k not in accepted)
    if unknown:
        raise ValueError(f"method {name!r} takes no option(s) {unknown}")
    return partial(fn, **fixed, **{k: v for k, v in options.items() if v is not None})


def decode(method: str, model, cond, sampling: SamplingConfig = SamplingConfig(),
           seeds: Optional[Sequence[int]] = None, cond_mask=None, progress: bool = False, callback=None,
           codebook=None, **options):
    """Run decoding method ``method`` (see :data:`METHODS`); returns ``(tokens [B, N], DecodeStats)``."""
    return get_method(method, codebook=codebook, **options)(model, cond, sampling, seeds, cond_mask=cond_mask,
                                                             progress=progress, callback=callback)
