"""Decoding with a model trained from the AR GPT (LPD, NAR, the EAGLE drafter, MuLo's drafter pair).

One place decides where such a model lives (``<AR model folder>/<method>``, e.g. ``scenes-t2i/nar``,
or the path given by ``--<method> PATH``), loads it once per folder version and checks it fits the
AR model it decodes with.
"""
from __future__ import annotations

import os
from functools import lru_cache

import torch


@lru_cache(maxsize=8)
def _cached(load, path: str, stamp: float):
    return load(path)


def folder_stamp(path: str) -> float:
    """Newest modification time in ``path`` (a retrained model reloads), 0 if it is not a folder."""
    if not os.path.isdir(path):
        return 0.0
    return max([os.path.getmtime(os.path.join(path, f)) for f in os.listdir(path)] or [0.0])


def default_trained_path(model, method: str, what: str, hint: str) -> str:
    """``<model folder>/<method>``: the trained model shipped beside the AR GPT's folder.

    ``what`` names it in errors ("an LPD model"); ``hint`` says how to train one.
    """
    source = getattr(getattr(model, "config", None), "_name_or_path", None)
    if not source:
        raise FileNotFoundError(f"--method {method} needs {what} and this AR model was not loaded from a folder: "
                                f"pass weights=PATH (CLI: --{method} PATH); {hint}")
    path = os.path.join(os.path.dirname(os.path.normpath(source)), method)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--method {method} needs {what}: the model has none ({path!r} is missing) and no "
                                f"--{method} PATH was given; {hint}")
    return path


def resolve_trained(model, weights, cls, name: str, method: str, what: str, load, hint: str):
    """The ``cls`` model to decode with: ``model`` itself if it is one, else ``weights`` (a ``cls`` or its
    folder; default :func:`default_trained_path`, read by ``load(path)`` once per folder version),
    checked against ``model`` (``cls.check_matches``) and moved to its device/dtype."""
    base = getattr(model, "model", model)  # a CompiledModel wraps the GPT
    if isinstance(base, cls):
        return base
    if not hasattr(base, "tok_embeddings"):
        raise ValueError(f"{name} decodes with a model trained from a LlamaGen GPT; {type(base).__name__} is not one")
    if isinstance(weights, cls):
        trained, where = weights, f"the given {name} model"
    else:
        path = os.path.abspath(weights if weights is not None else default_trained_path(base, method, what, hint))
        trained, where = _cached(load, path, folder_stamp(path)), f"the {name} model at {path!r}"
    trained.check_matches(base, where)
    param = next(base.parameters())
    return torch.nn.Module.to(trained, device=param.device, dtype=param.dtype).eval()
