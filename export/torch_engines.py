"""Torch engines, build side: compiled-code caches (and optional AOTInductor packages) under engines/.

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

The loaders that render uses (`CompiledExpert`, `activate_compile_cache`, `AotiExpert`) and the
memory-size buckets live in the runtime, `storymem_rt/engines/loaders.py`: the cache is warmed
here through the same `CompiledExpert` that render calls, so render hits exactly these graphs.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from storymem_rt.configs import DiTConfig
from storymem_rt.dit import rope_cos_sin
from storymem_rt.engines.graph import token_grid
from storymem_rt.engines.loaders import CACHE_SUBDIR, Bucket, CompiledExpert, cache_env

log = logging.getLogger("storymem_rt")


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
    from storymem_rt.dit import WanDiT

    from storymem_rt.dit import DiTOptions

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
    if precision == "fp8":
        model.convert_(DiTOptions(precision="fp8"))  # block linears quantized in place, as FP8 artifacts are
    return model.eval().requires_grad_(False)


def load_for_precision(weights: str | Path, precision: str, device) -> torch.nn.Module:
    """The expert as the torch backend runs it at `precision`; weights "random:<preset>"
    builds a random one on the device (`random_expert`)."""
    from storymem_rt.checkpoint import load_expert

    if str(weights).startswith("random:"):
        return random_expert(str(weights).split(":", 1)[1], precision, device)
    if precision == "fp8":
        # load_expert reads the FP8 layout from the folder's fp8_config.json
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
    env = {**os.environ, **cache_env(cache)}
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


if __name__ == "__main__":  # the build subprocess of build_compile_cache
    raw = json.loads(sys.argv[1])
    raw["size"] = tuple(raw["size"])
    raw["buckets"] = tuple(tuple(b) for b in raw["buckets"])
    result = warm(WarmupSpec(**raw))
    print(json.dumps(result))
