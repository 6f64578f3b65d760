"""Atomic file and folder writes: a hidden temporary sibling, then one `os.replace`.

An interrupted process never leaves a half-written file (or folder) where a finished one is
expected. Every writer of the project goes through here (videos, images, JSON manifests,
safetensors, engine files, merged / FP8 expert folders, ONNX graphs, the tiny bundle); no torch
or video import, so light modules can use it too.
"""
from __future__ import annotations

import os
import re
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
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        os_error = writer_os_error(e, path, tmp)
        if os_error is not None:
            raise os_error from e
        raise


_OS_ERROR_CODE = re.compile(r"\(os error (\d+)\)")


def writer_os_error(e: BaseException, path: Path, tmp: Path) -> OSError | None:
    """The failure of a writer at `tmp` as an OSError naming `path` (not our temporary name),
    or None to re-raise `e` as it is (no file-system error, or one about another file, e.g.
    an input the writer reads). Writers report a full disk three ways: OSError without a
    file name (Pillow), OSError naming the temporary file (PyAV), and safetensors'
    `SafetensorError("... (os error 28)")`."""
    if isinstance(e, OSError) and e.errno is not None and e.filename in (None, str(tmp), tmp):
        return OSError(e.errno, e.strerror or os.strerror(e.errno), str(path))
    m = _OS_ERROR_CODE.search(str(e)) if type(e).__name__ == "SafetensorError" else None
    if m is not None:
        code = int(m.group(1))
        return OSError(code, os.strerror(code), str(path))
    return None


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
