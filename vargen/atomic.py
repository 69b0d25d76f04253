"""Files that exist are complete: every write goes to a hidden temporary name in the same folder,
then an atomic rename. A killed run leaves at most a ``.NAME.tmp-PID`` file, which no reader,
glob or ``\\d+\\.png`` pattern picks up."""
from __future__ import annotations

import os
from typing import Union

import numpy as np


def _temporary(path: str) -> str:
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{os.getpid()}")


def write_atomic(path: str, data: Union[str, bytes]) -> None:
    """Write ``data`` (text as UTF-8) to ``path`` atomically."""
    tmp = _temporary(path)
    with open(tmp, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
    os.replace(tmp, path)


def save_png_atomic(image: np.ndarray, path: str) -> None:
    """``[H, W, 3]`` uint8 -> PNG at ``path``, atomically."""
    from PIL import Image

    tmp = _temporary(path)
    Image.fromarray(image).save(tmp, format="png")
    os.replace(tmp, path)
