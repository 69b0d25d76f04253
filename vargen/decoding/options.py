"""Decoding options by signature: each method declares its options once, as its decode function's keyword
arguments; the CLI, the benchmarks, ``vargen sample`` and the pipeline route a user's options with
:func:`route_options`, so an option reaches every selected method that takes it and one that no selected
method takes is refused (never accepted and silently ignored).
"""
from __future__ import annotations

import inspect
from typing import Dict, Iterable, Optional

from ..errors import UsageError

# CLI flag (argparse dest) -> (the decode option it sets, the method family it is for; None: every method whose
# decode function takes the option). A family flag (--eagle-depth) keeps one method's knob apart from another's.
FLAGS = {
    "window": ("window", None),
    "init": ("init", None),
    "zipar_window": ("window", "zipar"),
    "zipar_min_window": ("min_window", None),
    "lpd": ("weights", "lpd"), "lpd_steps": ("steps", "lpd"),
    "nar": ("weights", "nar"),
    "eagle": ("weights", "eagle"), "eagle_tree": ("tree", "eagle"), "eagle_depth": ("depth", "eagle"),
    "eagle_topk": ("topk", "eagle"), "eagle_tokens": ("total_tokens", "eagle"),
    "mulo": ("weights", "mulo"), "mulo_radius": ("radius", "mulo"), "mulo_expand": ("expand", "mulo"),
    "mulo_rounds": ("max_rounds", "mulo"), "mulo_finish": ("finish", "mulo"),
    "lantern_delta": ("lantern_delta", None), "lantern_lambda": ("lantern_lambda", None),
    "lantern_k": ("lantern_k", None),
    "pac_width": ("pac_width", None), "pac_depth": ("pac_depth", None), "pac_chain": ("pac_chain", None),
    "pac_siblings": ("pac_siblings", None),
}
RELAXATION_OPTIONS = ("lantern_delta", "lantern_lambda", "lantern_k")
# methods that decode with a model of their own which --compile does not reach (LPD's and NAR's it compiles alike)
OWN_MODEL = ("eagle",)


def _family(name: str, family: str) -> bool:
    return name == family or name.startswith((family + "+", family + "-"))


def method_options(name: str) -> set:
    """The options ``name`` takes: its decode function's keyword arguments, less those its registry entry fixes
    (``sjd+coupling`` fixes ``coupling``), plus LANTERN's for the relaxed methods."""
    from .methods import METHODS

    fn, fixed = METHODS[name]
    own = set(inspect.signature(fn).parameters) - set(fixed) - {
        "model", "cond", "sampling", "seeds", "cond_mask", "progress", "callback", "acceptance"}
    if "pac" in own:  # SJD-PAC is chosen by name (sjd+pac); its knobs belong to the +pac methods only
        own -= {"pac", "pac_width", "pac_depth", "pac_chain", "pac_siblings"}
    return own | (set(RELAXATION_OPTIONS) if fixed.get("acceptance") == "lantern" else set())


def route_options(methods: Iterable[str], flags: dict) -> Dict[str, dict]:
    """``{method: options}`` from flag values (``{dest: value}``; ``None`` = not given) for each of ``methods``.

    A given flag goes to every selected method that takes its option (and is of its family); a flag that
    reaches none of them raises :class:`UsageError` naming the methods that would take it.
    """
    from .methods import METHODS

    methods = list(methods)
    for m in methods:
        if m not in METHODS:
            raise UsageError(f"unknown decoding method {m!r}; choose from {sorted(METHODS)}")
    routed = {m: {} for m in methods}
    # generic flags first, then family flags, so the more specific one wins (--zipar-window over --window)
    for dest, (option, family) in sorted(FLAGS.items(), key=lambda kv: kv[1][1] is not None):
        value = flags.get(dest)
        if value is None:
            continue
        takers = [m for m in methods if option in method_options(m) and (family is None or _family(m, family))]
        if not takers:
            could = [m for m in METHODS if option in method_options(m) and (family is None or _family(m, family))]
            raise UsageError(f"--{dest.replace('_', '-')} is not taken by {', '.join(methods)}; "
                             f"it is for {', '.join(could)}")
        for m in takers:
            routed[m][option] = value
    return routed


def check_compile(methods: Iterable[str], mode: Optional[str]) -> None:
    """Refuse ``--compile`` for a method whose steps run a model of its own (compiling the pipeline's GPT
    would not reach them)."""
    if not mode:
        return
    own = [m for m in methods if any(_family(m, f) for f in OWN_MODEL)]
    if own:
        raise UsageError(f"--compile compiles the pipeline's GPT (and LPD's and NAR's models); {', '.join(own)} "
                         "decode with a drafter of their own, which it does not reach: drop --compile for them")
