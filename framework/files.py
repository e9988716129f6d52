"""Atomic file and directory writes: a reader sees the old content or the new, never a part.
Standard library only, so every module may use it."""
from __future__ import annotations

import contextlib
import os
import shutil
from typing import Iterator

__all__ = ["atomic_file", "atomic_write_text", "atomic_write_bytes", "atomic_dir", "fsync_dir"]


def fsync_dir(path: str) -> None:
    """Make a rename inside ``path`` durable (best effort: not every file system allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str, suffix: str = "") -> Iterator[str]:
    """Yield a temporary path beside ``path`` to write (``suffix`` keeps an extension that a writer
    reads, e.g. ".png"); on success it is fsynced and renamed over ``path``, on any error removed."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}{suffix}"
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    fsync_dir(parent)


def atomic_write_text(path: str, text: str) -> None:
    with atomic_file(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def atomic_write_bytes(path: str, data: bytes) -> None:
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


@contextlib.contextmanager
def atomic_dir(out: str) -> Iterator[str]:
    """Write a directory atomically: yields a temporary sibling to fill; on success it replaces
    ``out`` (an existing one is removed first), on any error it is deleted and ``out`` is untouched."""
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(out)}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
        for root, _, names in os.walk(tmp):
            for name in names:
                with open(os.path.join(root, name), "rb+") as f:
                    os.fsync(f.fileno())
        if os.path.exists(out):
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(parent)
