"""Atomic file and folder writes: a hidden temporary sibling, then one `os.replace`.

An interrupted process never leaves a half-written file (or folder) where a finished one is
expected. Every writer of the project goes through here (videos, images, JSON manifests,
safetensors, engine files, merged / FP8 expert folders, ONNX graphs, the tiny bundle); no torch
or video import, so light modules can use it too.
"""
from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TEMP_MARKER = ".tmp-"


def temp_name(path: Path) -> Path:
    """Hidden sibling of `path`, same suffix (format detection by extension keeps working)."""
    return path.with_name(f".{path.stem}{TEMP_MARKER}{os.getpid()}-{secrets.token_hex(4)}{path.suffix}")


@contextmanager
def atomic_path(path: str | os.PathLike, *, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to `path`; when the block succeeds, the file written there
    replaces `path` in one rename. On any error (KeyboardInterrupt included) the temporary
    file is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        yield tmp
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a new empty temporary folder next to `path`; when the block succeeds, it replaces
    `path` in one rename (`path` must not exist, or be an empty folder). On any error
    (KeyboardInterrupt included) the temporary folder and everything in it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}{TEMP_MARKER}", dir=path.parent))
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete temporary files a killed process left in `folder` (only our own naming)."""
    removed = []
    for p in Path(folder).glob(f".*{TEMP_MARKER}*"):
        if p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed
