"""The one place that turns an exception a user can cause into one line and an exit code.

`failure(exc)` maps every such class: our own `StoryMemError`s (each names its exit code),
file-system errors (disk full, permissions, names too long), device errors, memory, text
that is no valid Unicode, and interrupts (Ctrl-C, SIGTERM). Anything else is a bug of ours
and keeps its traceback. The command line (`cli._Group`) is the only caller that prints.

`terminal_safe(text)` escapes what must never reach a terminal raw (escape sequences from a
story's prompts, lone surrogates from undecodable file names); `sigterm_as_exception()` turns
SIGTERM into `Terminated`, so a render unwinds (closing its progress bars, releasing its
output folder) exactly as on Ctrl-C. No torch import at module level: `validate` stays light.
"""
from __future__ import annotations

import errno
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from .errors import StoryMemError

# exit code -> meaning; the README's table is this one.
EXIT_CODES = {
    0: "success",
    1: "the render cannot go on: a checkpoint, an engine artifact, or settings that differ from the output folder's",
    2: "usage error or a broken story script (nothing was written)",
    3: "the output folder is in use by another render",
    4: "file-system error: disk full, permission denied, file name too long, read-only",
    5: "device error: no such device, no GPU, out of memory",
    6: "the latents of a shot became NaN/Inf",
    130: "interrupted by Ctrl-C (SIGINT)",
    143: "terminated by SIGTERM",
}
EXIT_FILE_SYSTEM, EXIT_DEVICE, EXIT_SIGINT, EXIT_SIGTERM = 4, 5, 130, 143

# The errno values whose message says what to do (anything else: the system's words).
_OS_ADVICE = {
    errno.ENOSPC: "no space left on the device; free some space",
    errno.EDQUOT: "disk quota exceeded; free some space",
    errno.EACCES: "permission denied; check the permissions of the folder",
    errno.EPERM: "operation not permitted; check the permissions of the folder",
    errno.EROFS: "read-only file system; pick a writable --out",
    errno.ENAMETOOLONG: "file name too long; use a shorter --out path or story name",
    errno.EMFILE: "too many open files; raise the limit (ulimit -n)",
}


class Terminated(BaseException):
    """SIGTERM arrived (a BaseException, like KeyboardInterrupt, so no `except Exception` in a
    library swallows it)."""


@dataclass(frozen=True)
class Failure:
    message: str
    exit_code: int


def failure(exc: BaseException, kept: str = "") -> Failure | None:
    """One line and an exit code for an exception a user can cause, or None for our bugs.

    kept: a clause that says what the output folder holds and how to resume (see
    `storymem_rt.outdir.kept_note`), appended to interrupts and file-system errors.
    """
    tail = f"; {kept}" if kept else ""
    if isinstance(exc, KeyboardInterrupt):
        return Failure(f"interrupted (Ctrl-C){tail}", EXIT_SIGINT)
    if isinstance(exc, Terminated):
        return Failure(f"terminated (SIGTERM){tail}", EXIT_SIGTERM)
    if isinstance(exc, StoryMemError):
        return Failure(str(exc), exc.exit_code)
    if isinstance(exc, OSError) and exc.errno is not None:
        where = f"{os.fsdecode(exc.filename)}: " if exc.filename is not None else ""
        what = _OS_ADVICE.get(exc.errno) or (exc.strerror or os.strerror(exc.errno))
        return Failure(f"{where}{what}{tail}", EXIT_FILE_SYSTEM)
    if isinstance(exc, MemoryError):
        return Failure(f"out of host memory; try a smaller --size or --frame-num, or --offload{tail}", EXIT_DEVICE)
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(exc, getattr(torch.cuda, "OutOfMemoryError", ())):
        return Failure(f"out of GPU memory; try --offload, a smaller --size or --frame-num{tail}", EXIT_DEVICE)
    if isinstance(exc, RuntimeError) and "DefaultCPUAllocator: not enough memory" in str(exc):
        return Failure(f"out of host memory; try a smaller --size or --frame-num, or --offload{tail}", EXIT_DEVICE)
    if isinstance(exc, RuntimeError) and str(exc).startswith(("CUDA error", "CUDA driver error")):
        return Failure(f"GPU error: {_first_line(exc)}{tail}", EXIT_DEVICE)
    if isinstance(exc, UnicodeError):
        return Failure(f"text that is not valid Unicode ({_first_line(exc)}); check the story's "
                       "strings and the file names", 2)
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


# Bidirectional overrides and isolates reorder what a terminal shows ("Trojan Source").
_BIDI = {"\u202a", "\u202b", "\u202c", "\u202d", "\u202e", "\u2066", "\u2067", "\u2068", "\u2069"}


def terminal_safe(text: str, keep_newlines: bool = True) -> str:
    """`text` with control characters (ESC and the rest of C0 and C1, DEL), bidi overrides and
    lone surrogates written as visible escapes (`\\x1b`, `\\u202e`, `\\udcff`)."""
    out = []
    for c in text:
        o = ord(c)
        if c == "\n" and keep_newlines or c == "\t":
            out.append(c)
        elif o < 0x20 or 0x7F <= o <= 0x9F:
            out.append(f"\\x{o:02x}")
        elif 0xD800 <= o <= 0xDFFF or c in _BIDI:
            out.append(f"\\u{o:04x}")
        else:
            out.append(c)
    return "".join(out)


@contextmanager
def sigterm_as_exception() -> Iterator[None]:
    """Within the block, SIGTERM raises `Terminated` in the main thread (elsewhere: no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if frame is not None and frame.f_code.co_name == "__del__":
            # An exception raised inside a finalizer is printed and dropped, and the render would go
            # on: raise it a moment later, once the finalizer has returned.
            signal.setitimer(signal.ITIMER_REAL, 0.05)
            return
        raise Terminated()

    old = signal.signal(signal.SIGTERM, handler)
    old_alarm = signal.signal(signal.SIGALRM, handler)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGTERM, old)
        signal.signal(signal.SIGALRM, old_alarm)
