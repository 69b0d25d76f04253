"""Reading checkpoint files as research code releases them.

LlamaGen ships `.pt` files that hold `{"model": ..., "optimizer": ..., "args": Namespace}`
(DDP), raw FSDP state dicts, or `{"ema": ...}`. This module turns any of them into a
plain state dict and checks it against a module with errors that name the keys.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import pickle
import re
from typing import Iterable, Mapping

import torch

_WRAPPER_KEYS = ("model", "module", "state_dict")


# Plain classes research checkpoints pickle beside the tensors (LlamaGen: the training ``args``);
# rebuilding them runs no code from the file, so the safe loader accepts them.
SAFE_CHECKPOINT_GLOBALS = [argparse.Namespace, pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePosixPath,
                           pathlib.PureWindowsPath]
TRUST_HINT = ("load it only if you trust its source: pass trust_checkpoint=True "
              "(CLI: --trust-checkpoint), which unpickles it with torch.load(weights_only=False)")


class CheckpointError(ValueError):
    """A checkpoint does not fit the module it is loaded into."""


class UntrustedCheckpointError(CheckpointError):
    """A pickled checkpoint needs classes beyond tensors and plain types; unpickling it could run code."""


def read_checkpoint(path: str, trust_checkpoint: bool = False):
    """The object stored in a checkpoint file, read without running code from it.

    ``.safetensors`` files hold tensors only. Pickled files (``.pt``/``.pth``/``.bin``) go
    through ``torch.load(weights_only=True)`` with :data:`SAFE_CHECKPOINT_GLOBALS` allowed;
    one that needs any other class raises :class:`UntrustedCheckpointError` naming it, unless
    ``trust_checkpoint=True`` (then it is fully unpickled: only for files you trust).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    if trust_checkpoint:
        return torch.load(path, map_location="cpu", weights_only=False)
    try:
        with torch.serialization.safe_globals(SAFE_CHECKPOINT_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        offending = found.group(1) if found else "an object the safe loader refuses"
        raise UntrustedCheckpointError(
            f"{path} pickles {offending}, which is not a tensor or a plain type: unpickling it could run code "
            f"from the file, so it was not loaded; {TRUST_HINT}") from None
    except Exception as err:  # noqa: BLE001 - corrupt or foreign files: say which file
        raise CheckpointError(f"could not read {path}: {err}") from err


def checkpoint_args(obj) -> dict:
    """The training arguments a checkpoint carries (LlamaGen saves its ``argparse.Namespace`` under
    ``"args"``) as a dict; empty when there are none (released raw state dicts, safetensors)."""
    args = obj.get("args") if isinstance(obj, Mapping) else None
    if isinstance(args, argparse.Namespace):
        return vars(args)
    return dict(args) if isinstance(args, Mapping) else {}


def read_state_dict(path_or_state_dict, prefer_ema: bool = False, trust_checkpoint: bool = False) -> dict:
    """Return a flat ``{name: tensor}`` dict from a file path or an (optionally wrapped) dict.

    Accepts safetensors files, ``.pt``/``.pth``/``.bin`` files (including ones that
    pickle an ``argparse.Namespace`` under ``"args"``, as LlamaGen's do), and dicts
    wrapped under ``"model"``, ``"module"``, ``"state_dict"`` (or ``"ema"`` when
    ``prefer_ema``). ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) prefixes are stripped.
    Files are read by :func:`read_checkpoint` (safe unless ``trust_checkpoint``).
    """
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        obj = read_checkpoint(path_or_state_dict, trust_checkpoint)
    else:
        obj = path_or_state_dict
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"expected a state dict (a mapping of names to tensors), got {type(obj).__name__}")
    if prefer_ema and isinstance(obj.get("ema"), Mapping):
        obj = obj["ema"]
    else:
        for key in _WRAPPER_KEYS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise CheckpointError(f"no tensors found in checkpoint (top-level keys: {sorted(obj)[:10]})")
    # wrappers' prefixes: DDP "module.", torch.compile "_orig_mod."
    for prefix in ("module.", "_orig_mod."):
        state = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
    return state


def load_checked(module: torch.nn.Module, state: Mapping[str, torch.Tensor], *, what: str,
                 ignore: Iterable[str] = ()) -> None:
    """Load ``state`` into ``module`` or raise :class:`CheckpointError` naming the bad keys.

    ``ignore`` lists key suffixes that may be present in files but are not parameters
    here (stale RoPE tables, usage counters); they are dropped silently.
    """
    ignore = tuple(ignore)
    state = {k: v for k, v in state.items() if not (ignore and k.endswith(ignore))}
    _check_keys(module.state_dict(), state, what, ignore)
    module.load_state_dict({k: v for k, v in state.items()}, strict=False)


def _check_keys(own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], what: str,
                ignore: tuple = ()) -> None:
    missing = sorted(k for k in own if k not in state and not (ignore and k.endswith(ignore)))
    unexpected = sorted(k for k in state if k not in own)
    mismatched = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in state if k in own and state[k].shape != own[k].shape
    )
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_head(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_head(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches ({len(mismatched)}): {_head(mismatched)}")
    if problems:
        raise CheckpointError(
            f"checkpoint does not match {what}: " + "; ".join(problems)
            + ". Check the size/config you passed (e.g. size='GPT-B', downsample=16) matches the file."
        )


def _head(items, n: int = 8) -> str:
    shown = ", ".join(items[:n])
    return shown + (f", ... (+{len(items) - n} more)" if len(items) > n else "")


def check_saved_class(folder: str, class_name: str, what: str, hint: str) -> None:
    """Raise naming ``folder`` and ``hint`` (how to make one) unless it holds a diffusers-style save of
    ``class_name`` (a ``config.json`` with that ``_class_name``); ``what`` is e.g. ``"an LPD model"``."""
    config = os.path.join(folder, "config.json")
    if not os.path.isfile(config):
        raise FileNotFoundError(f"no {what.split(' ', 1)[1]} at {folder!r} (config.json missing); {hint}")
    with open(config) as f:
        kind = json.load(f).get("_class_name")
    if kind != class_name:
        raise ValueError(f"{folder!r} holds a {kind} checkpoint, not {what}; {hint}")


# ---------------------------------------------------------------------------- heads-only folders
# A decoder trained with its trunk frozen (NAR on the GPT, LIIF on the VQ decoder) ships only its head: the
# folder's config names the trunk folder ("trunk", relative), and loading rebuilds the trunk from it.

def check_trunk_unchanged(mine: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], *,
                          what: str, trunk: str) -> None:
    """Raise ``ValueError`` unless every tensor of ``reference`` (the trunk as the folder ``trunk`` holds it)
    equals ``mine`` (this model's trunk): a fine-tuned trunk must be saved whole."""
    changed = [k for k, v in reference.items()
               if k not in mine or not torch.equal(mine[k].detach().to(v.dtype).cpu(), v.cpu())]
    if changed:
        raise ValueError(f"this {what}'s trunk differs from the one at {trunk!r} ({len(changed)} tensors, "
                         f"e.g. {changed[0]}): it was fine-tuned, so save it whole (without trunk=)")


def trunk_folder(folder: str, trunk: str, what: str) -> str:
    """The trunk folder a heads-only ``folder`` names, or :class:`~vargen.errors.MissingInputError` if absent."""
    from ..errors import MissingInputError

    path = os.path.normpath(os.path.join(folder, trunk))
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise MissingInputError(f"the {what} at {folder!r} needs its trunk, the folder {path!r} "
                                f"(config \"trunk\": {trunk!r}), which is missing")
    return path


def load_head(module: torch.nn.Module, state: Mapping[str, torch.Tensor], *, trunk_prefix: str, what: str) -> None:
    """Load a heads-only ``state`` into ``module`` (its trunk, under ``trunk_prefix``, already loaded), or
    raise :class:`CheckpointError` naming the keys that do not fit."""
    _check_keys({k: v for k, v in module.state_dict().items() if not k.startswith(trunk_prefix)}, state, what)
    module.load_state_dict(dict(state), strict=False)
