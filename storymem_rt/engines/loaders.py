"""Loaders of built artifacts: each runs an expert the way `render` calls one.

Every loader is called like WanDiT, `(x, t, context, y, frame_pos) -> velocity [B, out_dim, F, H, W]`:
- `CompiledExpert`: torch.compile with memory-size buckets, run against a torch-cache
  artifact made current by `activate_compile_cache` (Inductor/Triton caches, no recompilation);
- `AotiExpert`: an AOTInductor package (`torch-aoti`), no Dynamo at all;
- `OnnxExpert`: an exported graph run by onnxruntime (CPU checks and CPU use);
- `TensorRTExpert`: a TensorRT engine on the current CUDA stream (needs TensorRT 10+).

Buckets: shapes are static per bucket except where a bucket is a range, which is compiled once
with the frame axis dynamic over that range. Default: the full-memory size static (most shots
of a story) and one dynamic graph for 0..max-1 (the first shots), i.e. two compiles per expert.
`CompiledExpert` is the one way to call a compiled expert so that render hits exactly the
graphs that `build-engines` built (`export/torch_engines.py` warms them through this class):
context padded to text_len on the host, RoPE tables computed eagerly (float64, dit.py's
rounding) and passed in, the frame axis marked dynamic only inside range buckets, automatic
dynamic shapes off.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from storymem_rt.atomic import atomic_dir
from storymem_rt.configs import DiTConfig, user_cache_dir
from storymem_rt.dit import rope_cos_sin
from storymem_rt.errors import StoryMemError

from .graph import graph_inputs, unpatchify

CACHE_SUBDIR = "inductor"
RECOMPILE_LIMIT = 64
INSTALL_MESSAGE = "install storymem-rt[tensorrt] (TensorRT 10+) on a machine with an NVIDIA GPU"


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


# --------------------------------------------------------------------------- torch: compile caches, AOTInductor

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
    work_dir = Path(work_dir) if work_dir is not None else user_cache_dir() / "inductor" / Path(artifact_dir).name
    if not work_dir.is_dir():
        with atomic_dir(work_dir) as tmp:
            shutil.copytree(src, tmp, dirs_exist_ok=True)
    set_cache_env(work_dir)
    return work_dir


def cache_env(cache_dir: str | Path) -> dict[str, str]:
    """The environment that makes Inductor and Triton read and write their caches in `cache_dir`."""
    cache_dir = Path(cache_dir).resolve()
    return {"TORCHINDUCTOR_CACHE_DIR": str(cache_dir), "TRITON_CACHE_DIR": str(cache_dir / "triton"),
            "TORCHINDUCTOR_FX_GRAPH_CACHE": "1", "TORCHINDUCTOR_AUTOGRAD_CACHE": "1"}


def set_cache_env(cache_dir: str | Path) -> None:
    env = cache_env(cache_dir)
    for key, value in env.items():
        if key.endswith("_CACHE_DIR"):
            os.environ[key] = value
        else:  # the cache switches: a user who turned one off keeps it off
            os.environ.setdefault(key, value)


def code_hash() -> str:
    """sha256 over the sources that shape the compiled graphs: the runtime's DiT modules
    (`storymem_rt/dit*.py` or a `storymem_rt/dit/` package), `storymem_rt/fp8.py` where it
    exists, and this file (how the graphs are called)."""
    pkg = Path(__file__).resolve().parents[1]
    files = [*pkg.glob("dit*.py"), *(pkg / "dit").rglob("*.py"), *pkg.glob("fp8.py"), Path(__file__).resolve()]
    h = hashlib.sha256()
    for f in sorted(set(files)):
        h.update(f.relative_to(pkg).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


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


# --------------------------------------------------------------------------- ONNX, TensorRT

class OnnxExpert:
    """An exported expert run by onnxruntime, called like WanDiT: (x, t, context, y, frame_pos)
    -> [B, out_dim, F, H, W] float32. For checks and CPU use; the GPU path is TensorRT."""

    def __init__(self, path: str | Path, config: DiTConfig, providers: list[str] | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), opts, providers=providers or ["CPUExecutionProvider"])
        self.config = config

    def __call__(self, x: Tensor, t: Tensor, context: Tensor, y: Tensor | None = None, frame_pos=None) -> Tensor:
        feeds, grid = graph_inputs(self.config, x, t, context, y, frame_pos)
        (out,) = self.session.run(["out"], feeds)
        return unpatchify(torch.from_numpy(out), grid, self.config)


class TensorRTUnavailable(StoryMemError):
    pass


def require_tensorrt():
    """The `tensorrt` module (10+), or TensorRTUnavailable with the install line."""
    try:
        import tensorrt as trt  # type: ignore
    except Exception as e:  # ImportError, or a broken install raising OSError on its libraries
        raise TensorRTUnavailable(f"TensorRT is not available ({type(e).__name__}: {e}); {INSTALL_MESSAGE}") from None
    major = int(str(trt.__version__).split(".")[0])
    if major < 10:
        raise TensorRTUnavailable(f"TensorRT {trt.__version__} is too old; {INSTALL_MESSAGE}")
    return trt


class TensorRTExpert:
    """A built engine called like WanDiT: (x, t, context, y, frame_pos) -> [B, out_dim, F, H, W].

    Inputs are prepared exactly as for the ONNX graph (`graph.graph_inputs`), copied to
    the GPU, and the engine runs on the current torch CUDA stream (execute_async_v3)."""

    def __init__(self, engine_path: str | Path, config: DiTConfig):
        trt = require_tensorrt()
        self.trt, self.config = trt, config
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise StoryMemError(f"{engine_path}: TensorRT could not load the engine (built by another TensorRT "
                                f"version or for another GPU?); rebuild it with storymem-rt build-engines")
        self.context = self.engine.create_execution_context()

    def __call__(self, x: Tensor, t: Tensor, context: Tensor, y: Tensor | None = None, frame_pos=None) -> Tensor:
        feeds, grid = graph_inputs(self.config, x, t, context, y, frame_pos)
        dev = x.device
        bufs = {k: torch.from_numpy(v).to(dev) for k, v in feeds.items()}
        for name, buf in bufs.items():
            self.context.set_input_shape(name, tuple(buf.shape))
            self.context.set_tensor_address(name, buf.data_ptr())
        out = torch.empty(tuple(self.context.get_tensor_shape("out")), dtype=torch.float32, device=dev)
        self.context.set_tensor_address("out", out.data_ptr())
        if not self.context.execute_async_v3(torch.cuda.current_stream(dev).cuda_stream):
            raise StoryMemError("TensorRT engine execution failed")
        return unpatchify(out, grid, self.config)
