"""The failures a user can fix, as one family: the CLI turns any :class:`VargenError` into exit 2 and one
message that says what was wrong and what to do (``--debug`` adds the traceback); anything else is a bug.

The subclasses that replace a ``ValueError`` / ``FileNotFoundError`` of older code also derive from it, so
library callers that catch those keep working.
"""
from __future__ import annotations

import math
import os
from contextlib import contextmanager


class VargenError(Exception):
    """A failure caused by the user's input or environment, not by vargen."""


class UsageError(VargenError, ValueError):
    """An option value or combination that cannot work."""


class PromptError(UsageError):
    """A prompt the text encoder cannot turn into a condition."""


class ModelLoadError(VargenError):
    """A model folder or weights file that cannot be read (missing, truncated, config and weights disagree)."""


class MissingInputError(VargenError, FileNotFoundError):
    """A file or folder the command reads (an earlier run, a config) does not exist."""


class OutputError(VargenError):
    """An output path that cannot be written."""


class MemoryBudgetError(VargenError):
    """A request that cannot fit the memory budget however it is chunked."""


class RunStateError(VargenError):
    """A sample folder that does not hold what a command needs (settings differ, records are missing)."""


class RunLockedError(RunStateError):
    """Another process is writing the same sample folder."""


def shorten(text: str, limit: int = 120) -> str:
    """``text`` cut to ``limit`` characters with the cut said, so an error never echoes a whole input."""
    text = str(text)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def finite(name: str, value: float) -> float:
    """``value`` if finite, else a :class:`UsageError` naming the option."""
    if not math.isfinite(value):
        raise UsageError(f"{name} must be a finite number, got {value}")
    return value


def existing_folder(path: str, what: str, hint: str) -> str:
    """``path`` if it is a folder; else a :class:`MissingInputError` saying what it should hold and how to make it.

    Loaders that fall back to a hub download (``from_pretrained``) would otherwise answer a mistyped local
    path with a network error."""
    if not os.path.isdir(path):
        raise MissingInputError(f"{what} not found at {path!r}: {hint}")
    return path


@contextmanager
def reading_model(path: str):
    """Turn the many ways a damaged model folder fails to load into one :class:`ModelLoadError`."""
    try:
        yield
    except VargenError:
        raise
    except Exception as err:  # safetensors, json, torch's meta-tensor copy, hub fallbacks: all mean "bad files"
        detail = shorten(str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__, 200)
        raise ModelLoadError(f"cannot load the model at {path!r} ({type(err).__name__}: {detail}); its files are "
                             "incomplete or its config.json does not match its weights: export or copy it "
                             "again") from err


def load_local(cls, folder: str, what: str):
    """``cls.from_pretrained(folder)`` for a local folder (an earlier run's output): a missing folder says so,
    instead of the hub fallback's "couldn't connect to huggingface.co", and damaged files give one clear error."""
    existing_folder(folder, what, "check the path, or run the recipe that writes it first")
    with reading_model(folder):
        return cls.from_pretrained(folder)


def _probe_folder(folder: str) -> None:
    """Prove a file can be made in ``folder``, or, if it does not exist yet, in its nearest existing ancestor
    (nothing is created: a command refused later leaves no empty folder behind). Permission bits alone do
    not tell: root ignores them, and read-only mounts or full disks only show on a write."""
    target = os.path.abspath(folder)
    while not os.path.exists(target):
        target = os.path.dirname(target)
    try:
        if not os.path.isdir(target):
            raise NotADirectoryError(20, "Not a directory")
        probe = os.path.join(target, f".vargen-probe-{os.getpid()}")
        with open(probe, "wb"):
            pass
        os.remove(probe)
    except OSError as err:
        raise OutputError(f"cannot write into {folder!r} ({err.strerror or err}): choose a writable folder") from err


def writable_folder(folder: str, what: str = "output folder") -> str:
    """``folder`` after checking it is (or can become) a writable folder."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise OutputError(f"the {what} {folder!r} is a file, not a folder: choose another path")
    _probe_folder(folder)
    return folder


def writable_file(path: str, what: str = "output") -> str:
    """``path`` after checking a file can be written there (not a folder, its folder writable)."""
    if os.path.isdir(path):
        raise OutputError(f"the {what} {path!r} is a folder: give a file name, e.g. {os.path.join(path, 'out.png')}")
    _probe_folder(os.path.dirname(os.path.abspath(path)))
    return path
