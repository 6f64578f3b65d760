"""Shared test fixtures and helpers: where the golden fixtures live, tolerances, the tiny bundle
cache, inline stories, CLI runs, refusals and environment changes."""
from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from storymem_rt.errors import CheckpointError

# Triton reads TRITON_INTERPRET when it is imported, and the DiT imports our kernels (so Triton) with
# it: on a machine without CUDA, every test process imports Triton in interpreter mode. Whether a
# kernel *call* on CPU tensors runs the interpreter is read per call (kernels/_triton.py): only the
# kernel test modules (USES_TRITON_INTERPRETER = True) do; everything else runs the torch fallbacks.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]


def golden_dir() -> Path:
    return Path(os.environ.get("STORYMEM_GOLDEN_DIR", REPO.parent / "shared" / "golden")).resolve()


def stbench_dir() -> Path:
    return Path(os.environ.get("STORYMEM_STBENCH_DIR", REPO.parent / "shared" / "st-bench")).resolve()


STBENCH_FILES = sorted(stbench_dir().glob("*.json"))


@pytest.fixture(scope="session")
def stbench() -> Path:
    d = stbench_dir()
    if not any(d.glob("*.json")):
        pytest.fail(f"ST-Bench scripts not found at {d}: set STORYMEM_STBENCH_DIR")
    return d


@pytest.fixture(scope="session")
def golden() -> Path:
    d = golden_dir()
    if not (d / "manifest.json").is_file():
        pytest.fail(f"golden fixtures not found at {d}: set STORYMEM_GOLDEN_DIR")
    return d


@pytest.fixture(scope="session")
def golden_manifest(golden) -> dict:
    return json.loads((golden / "manifest.json").read_text())


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a.detach().double().cpu()
    b = b.detach().double().cpu()
    return float((a - b).norm() / b.norm())


@pytest.fixture(autouse=True)
def _triton_interpreter(request, monkeypatch):
    if not getattr(request.module, "USES_TRITON_INTERPRETER", False):
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    yield


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@contextlib.contextmanager
def env(**values: str | None) -> Iterator[None]:
    """Set (or, with None, unset) environment variables for the block; restore them after."""
    def apply(vals):
        for k, v in vals.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    old = {k: os.environ.get(k) for k in values}
    try:
        apply(values)
        yield
    finally:
        apply(old)


@pytest.fixture(scope="session")
def storymem_cache(tmp_path_factory):
    """A session-wide STORYMEM_CACHE holding the tiny bundle, built once (subprocesses inherit
    the variable); returns the cache folder."""
    from storymem_rt.tiny import ensure_tiny_models

    cache = tmp_path_factory.getbasetemp() / "storymem-cache"
    with env(STORYMEM_CACHE=str(cache)):
        ensure_tiny_models()
        yield cache


# --------------------------------------------------------------------------- stories and the CLI

@pytest.fixture(scope="module")
def bundle(tmp_path_factory, storymem_cache) -> Path:
    """A copy of the tiny bundle for one test module (its tests may edit or break files in it)."""
    import shutil

    from storymem_rt.tiny import ensure_tiny_models

    dst = tmp_path_factory.mktemp("bundle") / "models"
    shutil.copytree(ensure_tiny_models(), dst)
    return dst


def inline_story(*scenes, name: str = "Inline", overview: str = "A test story.") -> dict:
    """A story script (ST-Bench schema); each scene is (prompts, cuts) or (prompts, cuts, first-frame prompts)."""
    out = []
    for i, (prompts, cuts, *first) in enumerate(scenes, 1):
        scene = {"scene_num": i, "video_prompts": list(prompts)}
        if first:
            scene["first_frame_prompt"] = list(first[0])
        scene["cut"] = list(cuts)
        out.append(scene)
    return {"story_name": name, "story_overview": overview, "scenes": out}


def write_story(folder: Path, data, name: str = "story.json") -> Path:
    """`data` (a dict as JSON, or raw str / bytes) written to folder/name."""
    p = Path(folder) / name
    if isinstance(data, bytes):
        p.write_bytes(data)
    elif isinstance(data, str):
        p.write_text(data)
    else:
        p.write_text(json.dumps(data, indent=2))
    return p


def cli(*args, catch_exceptions: bool = False):
    """`storymem-rt ARGS...` in this process (click's CliRunner); returns the click Result."""
    from click.testing import CliRunner

    from storymem_rt.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=catch_exceptions)


# --------------------------------------------------------------------------- checkpoints

def refused(match: str, fn, *args, error: type[Exception] = CheckpointError, **kw) -> str:
    """fn(*args, **kw) raises `error` whose message contains `match`; returns the message."""
    with pytest.raises(error) as ei:
        fn(*args, **kw)
    msg = str(ei.value)
    assert match in msg, msg
    return msg


class CodePayload:
    """Pickles to a call that creates `marker`: a checkpoint carrying it must be refused unrun."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def run_dit(model, case: dict[str, torch.Tensor]) -> torch.Tensor:
    """One expert forward on a golden DiT case (x, t, context[, y]; unbatched), no grad."""
    with torch.no_grad():
        y = case["y"][None] if "y" in case else None
        return model(case["x"][None], case["t"], case["context"][None], y)[0]


def kill_after_shots(cmd: list[str], out: Path, shots: int, timeout: float, log: Path, cwd=None) -> None:
    """Run a render subprocess and SIGKILL it as soon as render.json records `shots` finished shots."""
    import signal
    import subprocess
    import time

    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, env=dict(os.environ))
        try:
            deadline = time.monotonic() + timeout
            while True:
                assert proc.poll() is None, f"the render ended before shot {shots} was recorded"
                assert time.monotonic() < deadline, f"shot {shots} was not recorded in time"
                p = out / "render.json"
                try:
                    done = len(json.loads(p.read_text())["shots"]) if p.is_file() else 0
                except ValueError:
                    done = 0
                if done >= shots:
                    os.kill(proc.pid, signal.SIGKILL)
                    break
                time.sleep(0.02)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
