"""Small file helpers shared by the checkpoints, the metrics log, the trainer and the data cache."""

from __future__ import annotations

import contextlib
import fcntl
import os
from typing import Callable, Iterator, Optional


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


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, *, wait: bool,
                   on_wait: Optional[Callable[[], None]] = None) -> Iterator[int]:
    """Holds an exclusive ``flock`` on ``path`` (created if missing) for the ``with`` block and yields
    its file descriptor. Held by another process (or another open of the file): ``wait=False`` raises
    ``BlockingIOError`` at once; ``wait=True`` calls ``on_wait()`` once, then blocks until it is free.
    The lock goes with the process, so a killed holder never leaves a stale lock behind."""
    fd = os.open(os.fspath(path), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                raise
            if on_wait is not None:
                on_wait()
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield fd
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
