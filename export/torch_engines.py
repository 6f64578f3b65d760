"""Torch engines: compiled-code caches (and optional AOTInductor packages) under engines/.

A fresh `render` process that `torch.compile`s an A14B expert spends minutes in Dynamo,
Inductor and Triton before its first step. `build-engines --backend torch` does that work once
and keeps the result:

- "torch-cache" (default): the expert is compiled in a fresh subprocess whose
  TORCHINDUCTOR_CACHE_DIR (and TRITON_CACHE_DIR inside it) is an empty folder, once per
  memory-size bucket; the folder (FX graph cache, AOTAutograd cache, compiled C++/Triton
  kernels) becomes the artifact. A later process calls `activate_compile_cache` before its
  first compile and gets cache hits all the way down (CPU tiny: first call 24 s -> 2-3 s).
  Compiled graphs take the weights as inputs (no freezing), so the cache depends on the DiT
  config, precision, shapes and the code/tool versions, not on the weights: a new LoRA needs
  no recompilation. Inductor's keys are content hashes, so a stale cache costs time, never
  correctness.
- "torch-aoti" (opt-in, `--torch-mode aoti`): `torch._inductor.aoti_compile_and_package` of
  the expert with a dynamic token axis, one `.pt2` per expert and precision (weights inside,
  so it depends on them); loaded with `torch._inductor.aoti_load_package`, no Dynamo at all.

Buckets: shapes are static per bucket except where a bucket is a range, which is compiled
once with the frame axis dynamic over that range. Default: the full-memory size static (most
shots of a story) and one dynamic graph for 0..max-1 (the first shots), i.e. two compiles per
expert. `CompiledExpert` is the one way to call a compiled expert so that render hits exactly
the graphs that were built: context padded to text_len on the host, RoPE tables computed
eagerly (float64, dit.py's rounding) and passed in, the frame axis marked dynamic only inside
range buckets, automatic dynamic shapes off.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from storymem_rt.configs import DiTConfig
from storymem_rt.dit import rope_cos_sin

log = logging.getLogger("storymem_rt")

CACHE_SUBDIR = "inductor"
RECOMPILE_LIMIT = 64


# --------------------------------------------------------------------------- buckets

Bucket = tuple[int, int]  # inclusive memory-size range; lo == hi is a static shape


def default_buckets(max_memory_size: int) -> list[Bucket]:
    if max_memory_size <= 0:
        return [(0, 0)]
    if max_memory_size == 1:
        return [(1, 1), (0, 0)]
    return [(max_memory_size, max_memory_size), (0, max_memory_size - 1)]


def parse_buckets(text: str | None, max_memory_size: int) -> list[Bucket]:
    """"10,0-9" -> [(10, 10), (0, 9)]; None/"" -> default_buckets. Ranges may not overlap."""
    if not text:
        return default_buckets(max_memory_size)
    out = []
    for part in text.split(","):
        part = part.strip()
        lo, _, hi = part.partition("-")
        try:
            b = (int(lo), int(hi or lo))
        except ValueError:
            raise ValueError(f"bucket {part!r} is not N or LO-HI") from None
        if not 0 <= b[0] <= b[1] <= max_memory_size:
            raise ValueError(f"bucket {part!r} must lie within memory sizes 0..{max_memory_size}")
        out.append(b)
    cover = [m for lo, hi in out for m in range(lo, hi + 1)]
    if len(cover) != len(set(cover)):
        raise ValueError(f"buckets {text!r} overlap")
    return out


def format_buckets(buckets: list[Bucket]) -> str:
    return ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in buckets)


# --------------------------------------------------------------------------- the compiled expert

class CompiledExpert:
    """torch.compile'd expert with bucketed shapes; called like WanDiT (x, t, context, y, frame_pos).

    grid: the shot's patched token grid (latent frames T, h, w); memory size = F / pt - T.
    A memory size outside every bucket still works (Dynamo compiles it), it just is not cached.
    """

    def __init__(self, model: torch.nn.Module, buckets: list[Bucket], shot_frames: int, mode: str | None = None):
        self.model = model
        self.config: DiTConfig = model.config
        self.buckets = list(buckets)
        self.shot_frames = shot_frames
        self.compiled = torch.compile(model, dynamic=False, mode=mode)
        self._rope: dict = {}

    def bucket(self, memory: int) -> Bucket | None:
        return next((b for b in self.buckets if b[0] <= memory <= b[1]), None)

    def rope(self, frame_pos, grid, device) -> tuple[Tensor, Tensor]:
        key = (tuple(torch.as_tensor(frame_pos).tolist()), grid, str(device))
        if key not in self._rope:
            f, h, w = grid
            self._rope = {key: rope_cos_sin(frame_pos, h, w, self.config.head_dim, device)}  # keep the last only
        return self._rope[key]

    def __call__(self, x: Tensor, t: Tensor, context: Tensor, y: Tensor | None = None, frame_pos=None) -> Tensor:
        c = self.config
        pt, ph, pw = c.patch_size
        grid = (x.shape[2] // pt, x.shape[3] // ph, x.shape[4] // pw)
        if frame_pos is None:
            frame_pos = torch.arange(grid[0])
        cos, sin = self.rope(frame_pos, grid, x.device)
        b = x.shape[0]
        t = t.reshape(-1)
        t = t.expand(b).contiguous() if t.numel() == 1 else t
        if context.shape[1] < c.text_len:  # pad here so the compiled graph has one context shape
            context = F.pad(context, (0, 0, 0, c.text_len - context.shape[1]))
        bucket = self.bucket(grid[0] - self.shot_frames)
        if bucket is not None and bucket[0] < bucket[1]:
            lo, hi = ((self.shot_frames + m) for m in bucket)
            for tensor in (x, y):
                if tensor is not None:
                    torch._dynamo.mark_dynamic(tensor, 2, min=lo * pt, max=hi * pt)
            for tensor in (cos, sin):
                torch._dynamo.mark_dynamic(tensor, 0, min=lo * grid[1] * grid[2], max=hi * grid[1] * grid[2])
        with torch._dynamo.config.patch(automatic_dynamic_shapes=False, recompile_limit=RECOMPILE_LIMIT):
            return self.compiled(x, t, context, y, rope=(cos, sin))


def activate_compile_cache(artifact_dir: str | Path, work_dir: str | Path | None = None) -> Path:
    """Point Inductor and Triton at a copy of a torch-cache artifact; call before the first
    torch.compile of the process. The copy (default: ~/.cache/storymem-rt/inductor/<name>)
    keeps the engines folder unchanged when the process compiles something new."""
    src = Path(artifact_dir) / CACHE_SUBDIR
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: not a torch-cache artifact (no {CACHE_SUBDIR}/ folder)")
    if work_dir is None:
        base = os.environ.get("STORYMEM_CACHE") or os.path.join(
            os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "storymem-rt")
        work_dir = Path(base) / "inductor" / Path(artifact_dir).name
    work_dir = Path(work_dir)
    if not work_dir.is_dir():
        tmp = work_dir.with_name(work_dir.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)
        os.replace(tmp, work_dir)
    set_cache_env(work_dir)
    return work_dir


def set_cache_env(cache_dir: Path) -> None:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(cache_dir).resolve())
    os.environ["TRITON_CACHE_DIR"] = str(Path(cache_dir).resolve() / "triton")
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")


def code_hash() -> str:
    """sha256 over the sources that shape the compiled graphs (dit.py, fp8.py, this file)."""
    import storymem_rt

    h = hashlib.sha256()
    root = Path(storymem_rt.__file__).parent
    for path in sorted(root.glob("dit/*.py")) + [root / "fp8.py", Path(sys.modules[__name__].__file__)]:
        h.update(path.read_bytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- building (subprocess)

@dataclass(frozen=True)
class WarmupSpec:
    """One compile-cache build: which weights, where, and which shapes."""

    weights: str  # expert folder (merged / plain, or FP8)
    precision: str
    device: str
    size: tuple[int, int]
    frame_num: int
    buckets: tuple[Bucket, ...]
    batch: int = 2
    mode: str | None = None

    def to_json(self) -> dict:
        return {"weights": self.weights, "precision": self.precision, "device": self.device,
                "size": list(self.size), "frame_num": self.frame_num, "buckets": [list(b) for b in self.buckets],
                "batch": self.batch, "mode": self.mode}


PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.bfloat16}


def random_expert(preset: str, precision: str, device, seed: int = 0) -> torch.nn.Module:
    """A WanDiT of a named preset (e.g. "i2v-a14b") with random weights made directly on
    `device` in the compute dtype (A14B bf16: 28 GB, no host copy); fp8 quantizes each block
    linear in place, one at a time. For cold-start and speed benchmarks, not for pictures."""
    from storymem_rt.dit import DiTOptions, WanDiT

    cfg = DiTConfig.from_name(preset)
    dtype = PRECISION_DTYPES[precision]
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = WanDiT(cfg)
    finally:
        torch.set_default_dtype(old)
    model.cast_(dtype)
    if precision == "fp8":  # block linears quantized in place, as build-engines' FP8 weights are
        model.convert_(DiTOptions(precision="fp8"))
    return model.eval().requires_grad_(False)


def load_for_precision(weights: str | Path, precision: str, device) -> torch.nn.Module:
    """The expert as the torch backend runs it at `precision`; weights "random:<preset>"
    builds a random one on the device (`random_expert`)."""
    from storymem_rt.checkpoint import load_expert

    if str(weights).startswith("random:"):
        return random_expert(str(weights).split(":", 1)[1], precision, device)
    if precision == "fp8":  # load_expert reads the FP8 layout from the folder's fp8_config.json
        return load_expert(weights, device=device, dtype=torch.bfloat16)
    return load_expert(weights, device=device, dtype=PRECISION_DTYPES[precision])


def sample_call(config: DiTConfig, grid_t: int, h: int, w: int, memory: int, batch: int, device, seed: int = 0):
    """Random inputs shaped like one denoising step of shot.py (CFG batch, memory at -M..-1)."""
    g = torch.Generator().manual_seed(seed)
    pt, ph, pw = config.patch_size
    f = (grid_t + memory) * pt
    x = torch.randn(batch, config.out_dim, f, h * ph, w * pw, generator=g).to(device)
    y = (torch.randn(batch, config.in_dim - config.out_dim, f, h * ph, w * pw, generator=g).to(device)
         if config.in_dim > config.out_dim else None)
    ctx = torch.randn(batch, 24, config.text_dim, generator=g).to(device)
    t = torch.full((batch,), 900.0, device=device)
    frame_pos = torch.arange(-memory, grid_t)
    return x, t, ctx, y, frame_pos


def warm(spec: WarmupSpec) -> dict:
    """Compile every bucket in this process (run it in a fresh one: see `build_compile_cache`)."""
    from .onnx_export import token_grid

    t0 = time.perf_counter()
    model = load_for_precision(spec.weights, spec.precision, spec.device)
    t_load = time.perf_counter() - t0
    grid = token_grid(spec.size, spec.frame_num, model.config)
    expert = CompiledExpert(model, list(spec.buckets), grid.latent_frames, spec.mode)
    times = {}
    with torch.no_grad():
        for lo, hi in spec.buckets:
            args = sample_call(model.config, grid.latent_frames, grid.h, grid.w, lo, spec.batch, spec.device)
            t0 = time.perf_counter()
            expert(*args)
            if torch.device(spec.device).type == "cuda":
                torch.cuda.synchronize()
            times[f"{lo}-{hi}"] = round(time.perf_counter() - t0, 3)
    return {"load_s": round(t_load, 3), "compile_s": times}


def build_compile_cache(spec: WarmupSpec, out_dir: str | Path, timeout: float | None = None) -> dict:
    """Run `warm(spec)` in a fresh Python whose Inductor/Triton caches live in
    `out_dir/inductor` (which must not exist); returns the subprocess's timings."""
    out_dir = Path(out_dir)
    cache = out_dir / CACHE_SUBDIR
    cache.mkdir(parents=True)
    env = dict(os.environ)
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    env.pop("TRITON_CACHE_DIR", None)
    env.update({"TORCHINDUCTOR_CACHE_DIR": str(cache.resolve()), "TRITON_CACHE_DIR": str(cache.resolve() / "triton"),
                "TORCHINDUCTOR_FX_GRAPH_CACHE": "1", "TORCHINDUCTOR_AUTOGRAD_CACHE": "1"})
    cmd = [sys.executable, "-m", "storymem_rt.export.torch_engines", json.dumps(spec.to_json())]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        from storymem_rt.errors import StoryMemError

        raise StoryMemError(f"compiling {spec.weights} for the torch backend failed:\n{tail}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    return json.loads(lines[-1]) if lines else {}


# --------------------------------------------------------------------------- AOTInductor (opt-in)

class _ExportWrapper(torch.nn.Module):
    """WanDiT.forward with RoPE tables as positional inputs (what torch.export needs)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, t, context, y, cos, sin):
        return self.model(x, t, context, y, rope=(cos, sin))


def build_aoti_package(model: torch.nn.Module, size: tuple[int, int], frame_num: int, max_memory_size: int,
                       package_path: str | Path, batch: int = 2) -> Path:
    """AOTInductor package of `model` whose frame axis is dynamic over memory 0..max.

    One .pt2 (weights included) serves every memory size; load with
    `torch._inductor.aoti_load_package(path)` and call (x, t, context[text_len], y, cos, sin)."""
    from torch.export import Dim

    from .onnx_export import token_grid

    c = model.config
    grid = token_grid(size, frame_num, c)
    device = next(model.parameters()).device
    lo, hi = grid.latent_frames, grid.latent_frames + max_memory_size
    memory = max(0, min(1, max_memory_size))
    x, t, ctx, y, frame_pos = sample_call(c, grid.latent_frames, grid.h, grid.w, memory, batch, device)
    ctx = F.pad(ctx, (0, 0, 0, c.text_len - ctx.shape[1]))
    cos, sin = rope_cos_sin(frame_pos, grid.h, grid.w, c.head_dim, device)
    frames = Dim("frames", min=lo, max=max(hi, lo + 1))
    pt = c.patch_size[0]
    fdim = frames * pt if pt > 1 else frames
    tokens = frames * (grid.h * grid.w)
    dyn = {"x": {2: fdim}, "t": None, "context": None, "y": {2: fdim} if y is not None else None,
           "cos": {0: tokens}, "sin": {0: tokens}}
    ep = torch.export.export(_ExportWrapper(model).eval(), (x, t, ctx, y, cos, sin), dynamic_shapes=dyn, strict=False)
    package_path = Path(package_path)
    package_path.parent.mkdir(parents=True, exist_ok=True)
    return Path(torch._inductor.aoti_compile_and_package(ep, package_path=str(package_path)))


class AotiExpert:
    """An AOTInductor package called like WanDiT: (x, t, context, y, frame_pos) -> velocity."""

    def __init__(self, package_path: str | Path, config: DiTConfig):
        self.runner = torch._inductor.aoti_load_package(str(package_path))
        self.config = config

    def __call__(self, x: Tensor, t: Tensor, context: Tensor, y: Tensor | None = None, frame_pos=None) -> Tensor:
        c = self.config
        pt, ph, pw = c.patch_size
        f, h, w = x.shape[2] // pt, x.shape[3] // ph, x.shape[4] // pw
        cos, sin = rope_cos_sin(torch.arange(f) if frame_pos is None else frame_pos, h, w, c.head_dim, x.device)
        t = t.reshape(-1)
        t = t.expand(x.shape[0]).contiguous() if t.numel() == 1 else t
        context = F.pad(context, (0, 0, 0, c.text_len - context.shape[1]))
        return self.runner(x, t, context, y, cos, sin)


if __name__ == "__main__":  # the build subprocess of build_compile_cache
    raw = json.loads(sys.argv[1])
    raw["size"] = tuple(raw["size"])
    raw["buckets"] = tuple(tuple(b) for b in raw["buckets"])
    result = warm(WarmupSpec(**raw))
    print(json.dumps(result))
