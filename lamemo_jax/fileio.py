"""Small file helpers shared by the checkpoints, the metrics log and the data cache."""

from __future__ import annotations

import contextlib
import os


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` to ``path`` so that a reader sees the old file or the whole new one, never a
    part of it: a temporary file beside it (named by the process), flushed to disk, then renamed
    over ``path``. On an error the temporary file is removed and the error raised."""
    path = os.fspath(path)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
