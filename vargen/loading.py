"""Loading without third-party chatter: progress bars and notes that say nothing about a vargen model."""
from __future__ import annotations

from contextlib import contextmanager


@contextmanager
def quiet_loading():
    """Silence diffusers' and transformers' loading chatter (the "Loading pipeline components" bar, the
    "should be kept in float32: []" notes on every cast) that says nothing about a vargen model;
    real errors still raise."""
    from diffusers.utils import logging as df_logging
    from transformers.utils import logging as hf_logging

    before = [(lib, lib.get_verbosity(), lib.is_progress_bar_enabled()) for lib in (df_logging, hf_logging)]
    for lib, _, _ in before:
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, level, bar in before:
            lib.set_verbosity(level)
            if bar:
                lib.enable_progress_bar()
