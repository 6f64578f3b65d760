"""Shared test fixtures: where the golden fixtures live, and tolerances."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

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


@pytest.fixture(scope="session")
def storymem_cache(tmp_path_factory):
    """A session-wide STORYMEM_CACHE holding the tiny bundle, built once (subprocesses inherit
    the variable); returns the cache folder."""
    from storymem_rt.tiny import ensure_tiny_models

    cache = tmp_path_factory.getbasetemp() / "storymem-cache"
    old = os.environ.get("STORYMEM_CACHE")
    os.environ["STORYMEM_CACHE"] = str(cache)
    ensure_tiny_models()
    yield cache
    if old is None:
        os.environ.pop("STORYMEM_CACHE", None)
    else:
        os.environ["STORYMEM_CACHE"] = old
