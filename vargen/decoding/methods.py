"""Decoding methods by name: the one switch the pipeline, the CLI and the benchmarks use."""
from __future__ import annotations

from .acceptance import GroupedAcceptance, LanternAcceptance, codebook_neighbours
from .ar import decode_ar
from .eagle import decode_eagle
from .lpd import decode_lpd
from .mulo import decode_mulo
from .nar import decode_nar
from .sampling import SamplingConfig
from .options import RELAXATION_OPTIONS
from .speculative import COUPLING_SUFFIX, decode_jacobi, decode_sjd, sjd_method_name
from .pjd import decode_pjd
from .zipar import decode_zipar
from .zipar_adaptive import decode_zipar_adaptive

# name -> (decode function, fixed options); user options (window, init, ...) are added per call
METHODS = {
    "ar": (decode_ar, {}),
    "jacobi": (decode_jacobi, {}),
    "sjd": (decode_sjd, {"coupling": "none"}),
    "sjd+coupling": (decode_sjd, {"coupling": "maximal"}),
    "sjd+gumbel": (decode_sjd, {"coupling": "gumbel"}),
    "sjd+lantern": (decode_sjd, {"coupling": "none", "acceptance": "lantern"}),
    "sjd+coupling+lantern": (decode_sjd, {"coupling": "maximal", "acceptance": "lantern"}),
    "sjd+pac": (decode_sjd, {"coupling": "none", "pac": True}),
    "sjd+coupling+pac": (decode_sjd, {"coupling": "maximal", "pac": True}),
    "sjd+gumbel+pac": (decode_sjd, {"coupling": "gumbel", "pac": True}),
    "sjd+pac+lantern": (decode_sjd, {"coupling": "none", "pac": True, "acceptance": "lantern"}),
    "sjd+coupling+pac+lantern": (decode_sjd, {"coupling": "maximal", "pac": True, "acceptance": "lantern"}),
    "gsd": (decode_sjd, {"coupling": "none", "acceptance": "gsd", "init": "random"}),
    "zipar": (decode_zipar, {}),
    "pjd": (decode_pjd, {}),
    "zipar-adaptive": (decode_zipar_adaptive, {}),
    "lpd": (decode_lpd, {}),
    "nar": (decode_nar, {}),
    "eagle": (decode_eagle, {}),
    "eagle+lantern": (decode_eagle, {"acceptance": "lantern"}),
    "mulo": (decode_mulo, {}),
    "mulo+lantern": (decode_mulo, {"acceptance": "lantern"}),
}
RELAXATIONS = ("none", "lantern", "gsd")


def compose_method(method: str, coupling: str = "none", relax: str = "none", pac: bool = False) -> str:
    """The method name for ``--method sjd --coupling maximal --relax lantern [--pac]`` style flags
    (``"sjd+coupling+lantern"``, ``"sjd+coupling+pac"``); a combination vargen does not define raises ``ValueError``."""
    if coupling not in COUPLING_SUFFIX:
        raise ValueError(f"unknown coupling {coupling!r}; choose from {sorted(COUPLING_SUFFIX)}")
    if relax not in RELAXATIONS:
        raise ValueError(f"unknown relaxation {relax!r}; choose from {sorted(RELAXATIONS)}")
    if coupling == "none" and relax == "none" and not pac:
        return method
    if method != "sjd":
        raise ValueError(f"--coupling, --relax and --pac apply to --method sjd, not {method!r}")
    if relax == "gsd" and coupling != "none":
        raise ValueError("GSD's grouped acceptance is defined for plain SJD drafts; use --coupling none")
    name = sjd_method_name(coupling, "exact" if relax == "none" else relax, pac)
    if name not in METHODS:
        raise ValueError(f"{name!r} is not a defined combination; choose from {sorted(METHODS)}")
    return name


def check_method(name: str, options: dict) -> None:
    """Raise :class:`~vargen.errors.UsageError` for an unknown method or options it does not take (its decode
    function's keyword arguments, see :func:`~vargen.decoding.options.method_options`), without building
    anything (the CLI checks this before a model loads)."""
    from ..errors import UsageError
    from .options import method_options

    if name not in METHODS:
        raise UsageError(f"unknown decoding method {name!r}; choose from {sorted(METHODS)}")
    unknown = sorted(k for k, v in options.items() if v is not None and k not in method_options(name))
    if unknown:
        raise UsageError(f"method {name!r} takes no option(s) {unknown}; it takes {sorted(method_options(name))}")


def get_method(name: str, codebook=None, **options):
    """``decode(model, cond, sampling, seeds, cond_mask=None, progress=False, callback=None)`` for ``name``.

    ``options`` (e.g. ``window=16, init="left"``) go to the method; options a method does
    not take (``window`` for ``ar``) raise a ``ValueError`` that names them. LANTERN
    methods need the tokenizer's ``codebook`` (``[V, D]``) and take ``lantern_delta``
    (default 0.1), ``lantern_lambda`` (lambda mode instead) and ``lantern_k`` (1000); the
    neighbour table is built once here. GSD groups by the model's input embeddings.
    """
    check_method(name, options)
    fn, fixed = METHODS[name]
    fixed = dict(fixed)
    kind = fixed.pop("acceptance", None)
    relax = {k: options.pop(k) for k in RELAXATION_OPTIONS if options.get(k) is not None}
    neighbours = None
    if kind == "lantern":
        if codebook is None:
            raise ValueError(f"method {name!r} needs the tokenizer codebook for its neighbour table")
        neighbours = codebook_neighbours(codebook, relax.get("lantern_k", 1000))
    options = {**fixed, **{k: v for k, v in options.items() if v is not None}}

    def run(model, cond, sampling=SamplingConfig(), seeds=None, **kwargs):
        if kind == "lantern":
            kwargs["acceptance"] = LanternAcceptance(neighbours, delta=relax.get("lantern_delta", 0.1),
                                                     lam=relax.get("lantern_lambda"))
        elif kind == "gsd":
            if not hasattr(model, "tok_embeddings"):
                raise ValueError(f"method {name!r} needs the model's input token embeddings (tok_embeddings)")
            kwargs["acceptance"] = GroupedAcceptance(model.tok_embeddings.weight)
        return fn(model, cond, sampling, seeds, **options, **kwargs)  # stats.method is the registry name

    return run

