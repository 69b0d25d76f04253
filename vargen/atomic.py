"""Files that exist are complete: every write goes to a hidden temporary name in the same folder,
then an atomic rename. A killed run leaves at most a ``.NAME.tmp-PID`` file, which no reader,
glob or ``\\d+\\.png`` pattern picks up (and a resumed ``vargen sample`` removes); a write that fails
with an exception removes its temporary file itself."""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Union

import numpy as np

from .errors import UsageError

TMP_MARK = ".tmp-"
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


def _temporary(path: str) -> str:
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}{TMP_MARK}{os.getpid()}")


@contextmanager
def atomic_path(path: str):
    """Yield a temporary path to write; rename it to ``path`` on success, remove it on any failure.

    A missing parent folder is created here, at the first write: the CLI's checks only probe that it can be
    made (a fresh clone has no ``outputs/``, and ``make demo`` writes ``outputs/demo.png``)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = _temporary(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_atomic(path: str, data: Union[str, bytes]) -> None:
    """Write ``data`` (text as UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)


def image_format(path: str) -> str:
    """PIL's format name for ``path``'s extension (PNG, JPEG, WebP); other extensions are refused."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in IMAGE_FORMATS:
        raise UsageError(f"cannot write {os.path.basename(path)!r}: the extension {ext or '(none)'!r} is not one of "
                         f"{', '.join(IMAGE_FORMATS)}; name the output e.g. out.png")
    return IMAGE_FORMATS[ext]


def save_image_atomic(image: np.ndarray, path: str) -> None:
    """``[H, W, 3]`` uint8 -> ``path`` atomically, in the format its extension names."""
    from PIL import Image

    fmt = image_format(path)
    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format=fmt, **({"quality": 95} if fmt in ("JPEG", "WEBP") else {}))


def save_png_atomic(image: np.ndarray, path: str) -> None:
    """``[H, W, 3]`` uint8 -> PNG at ``path``, atomically."""
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="png")
