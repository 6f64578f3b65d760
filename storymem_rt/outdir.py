"""The output folder of a render: what each file is called, and who owns the folder.

Names. A shot writes `<id>.mp4` and `<id>_keyframe<j>.png` (`<id>` = `01_02`: scene 1, shot 2);
the render writes `render.json`, `storyboard.png`, `state/` and, while it runs, the lock file
`.storymem-rt.lock`. The story video is named after the story, so a story name could collide
with any of those (`"story_name": "01_01"` once wrote the story video over shot 01_01's MP4,
and every rerun joined it again). The rule: a story name whose slug looks like a shot id, or
equals another output's name, gets the prefix `story_` (`story_01_01.mp4`). A prefixed name
starts with a letter, so it can never be a shot's.

Ownership. `OutputLock` holds an exclusive `fcntl.flock` on the lock file inside the folder for
the whole render: a second render into the same folder is refused (or waits, `wait=True`)
with the holder's pid and start time. The OS drops the lock when its process ends, however
it ends (SIGKILL included), so a killed render never leaves a folder locked; a stale lock
file is simply locked again. The lock file is removed when the render ends.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

from .errors import OutputLockedError

MANIFEST = "render.json"
STATE_DIR = "state"
STORYBOARD = "storyboard.png"
LOCK_FILE = ".storymem-rt.lock"
STORY_PREFIX = "story_"
# What the story video's stem must never equal (case-insensitive file systems included).
RESERVED_STEMS = frozenset({Path(MANIFEST).stem, Path(STORYBOARD).stem, STATE_DIR})
_SHOT_LIKE = re.compile(r"\d+_\d+(_.*)?", re.ASCII)


def shot_video(shot_id: str) -> str:
    return f"{shot_id}.mp4"


def keyframe_image(shot_id: str, j: int) -> str:
    return f"{shot_id}_keyframe{j}.png"


def slug(name: str, limit: int = 60) -> str:
    """Letters, digits, '-' and '_' of `name` (others become '_'), at most `limit` characters."""
    keep = "".join(c if c.isalnum() or c in "-_" else "_" for c in name.strip())
    return keep.strip("_")[:limit].strip("_") or "story"


def story_video(name: str) -> str:
    """File name of the story video: never a shot's file name, nor another output's."""
    stem = slug(name)
    if _SHOT_LIKE.fullmatch(stem) or stem.lower() in RESERVED_STEMS:
        stem = STORY_PREFIX + stem
    return f"{stem}.mp4"


# --------------------------------------------------------------------------- the lock


def _holder(path: Path) -> str:
    """`pid 123, started 2026-12-02 16:50:01 UTC, on host` from a lock file, or what is known."""
    try:
        info = json.loads(path.read_text() or "{}")
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(info["started"])))
        return f"pid {int(info['pid'])}, started {when}, on {info.get('host', '?')}"
    except (OSError, ValueError, KeyError, TypeError):
        return "pid unknown: it is just starting"


class OutputLock:
    """Exclusive ownership of an output folder for one render (a context manager).

    Creates the folder if needed; a folder this lock created and that is still empty at the
    end (the render failed before writing anything) is removed again.
    on_wait(holder): called once when `wait=True` and the folder is busy.
    """

    def __init__(self, folder: str | os.PathLike, wait: bool = False, on_wait: Callable[[str], None] | None = None):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.wait = wait
        self.on_wait = on_wait
        self._fd: int | None = None
        self._created = False

    def __enter__(self) -> "OutputLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        try:
            self._acquire()
        except BaseException:
            self._remove_if_created()
            raise

    def _acquire(self) -> None:
        announced = False
        while True:
            if not self.folder.is_dir():
                self.folder.mkdir(parents=True, exist_ok=True)
                self._created = True
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = _holder(self.path)
                    if not self.wait:
                        raise OutputLockedError(
                            f"{self.folder} is in use by another render ({holder}); wait for it to end, "
                            "pass --wait, or pick another --out") from None
                    if not announced and self.on_wait is not None:
                        self.on_wait(holder)
                        announced = True
                    fcntl.flock(fd, fcntl.LOCK_EX)
                # The holder before us may have removed the file after we opened it: then we
                # hold a lock on a name nobody else sees. Lock the file that is there instead.
                try:
                    same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:
                    same = False
            except BaseException:
                os.close(fd)
                raise
            if same:
                break
            os.close(fd)
        info = {"pid": os.getpid(), "started": time.time(), "host": socket.gethostname(),
                "argv": [os.fsdecode(a) for a in sys.argv[:8]]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info, ensure_ascii=True).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still locked: see the inode check above
        finally:
            os.close(self._fd)
            self._fd = None
            self._remove_if_created()

    def _remove_if_created(self) -> None:
        if self._created:
            try:
                self.folder.rmdir()  # only when empty: the render wrote nothing
            except OSError:
                pass


def kept_note(folder: str | os.PathLike) -> str:
    """What a stopped render leaves in `folder` and how to go on, for its last message."""
    folder = Path(folder)
    try:
        m = json.loads((folder / MANIFEST).read_text())
        done, total = len(m["shots"]), len(m["plan"])
    except (OSError, ValueError, KeyError, TypeError):
        m, done, total = {}, 0, 0
    try:  # the state file may be a shot ahead of the manifest (storymem_rt.story: it records its own)
        from safetensors import safe_open

        with safe_open(str(folder / STATE_DIR / "memory.safetensors"), "pt") as f:
            saved = json.loads((f.metadata() or {})["state"])["manifest"]
        if len(saved["shots"]) > done:
            done, total = len(saved["shots"]), len(saved["plan"])
    except Exception:  # no state, or an older one: the manifest says it all
        pass
    if not total:
        return "no shot was finished; nothing to resume"
    if m.get("final"):
        return f"the render in {folder} is complete"
    return (f"{done} of {total} shot{'s' * (total != 1)} finished and kept in {folder}; "
            "rerun the same command to resume")
