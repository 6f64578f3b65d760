"""TensorRT engines from the expert ONNX graphs (TensorRT 10 Python API; 11 accepted).

What is built, per expert and precision: one engine with one optimization profile whose token
axis covers every memory size 0..max at the chosen shot size (min = the shot alone, opt = max
= shot + max memory, the steady state of a story once the memory bank is full) and whose
batch axis covers 1..2 (CFG batched or not). The network is strongly typed: the graph
(`onnx_export.py`) already holds dit.py's precision policy (float32 residual, norms,
modulation, head; bf16/fp16 matmuls; FP8 as Q/DQ), so TensorRT must execute those types
rather than pick its own; BF16/FP16/FP8 builder flags are only set in the weakly typed
fallback (`strongly_typed=False`, e.g. to let TensorRT choose precisions for a float32 graph).
FP8 comes from the Q/DQ nodes in the graph: float8 weight initializers + DequantizeLinear, and
QuantizeLinear/DequantizeLinear on the activations when they were calibrated (TensorRT runs an
FP8 GEMM only when both operands are quantized; with weight-only Q/DQ it stores FP8 weights
and dequantizes them into a bf16 GEMM). A timing cache (`engines/tensorrt/timing.cache`) is
shared by all builds on a machine, so a rebuild after a LoRA change skips kernel timing.

Attention is left to TensorRT's fused multi-head attention: the graph writes attention as
MatMul -> Mul(1/sqrt(D)) -> Softmax -> MatMul, the pattern TensorRT's Myelin backend fuses into
its own flash-attention kernels (bf16/fp16, and FP8 on Hopper+). The alternative, a plugin
wrapping our Triton attention kernel, is not done: a TensorRT plugin must run without a
Python JIT at execution time, so the kernel would have to go through Triton's ahead-of-time
path (compile a cubin per dtype / head_dim / block config for the target arch, and either a C++
plugin calling the generated launcher or TensorRT's Python AOT plugin API that embeds the
compiled kernel in the engine); that is a second build system per GPU arch, it hides the
attention from TensorRT's fusions (q/k norm + RoPE around it), and on Hopper TensorRT's fused
MHA is already a flash-attention-class kernel. Our Triton kernels serve the torch backend.

Engine files are named by content (TensorRT demo/Diffusion practice): the ONNX artifact's id
(which hashes the weights, LoRA and precision), size, frame count, max memory, TensorRT version
and GPU architecture all go into the name, and all are recorded in engines/manifest.json.

Nothing here runs in this workplace's CI (TensorRT cannot be installed here): `plan_engine`
and `profile_shapes` are plain Python and unit-tested; `build_engine` and `TensorRTExpert` (the
runner, in `storymem_rt/engines/loaders.py`) are written against the TensorRT 10 Python API and
exercised only on a machine with TensorRT.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from storymem_rt.configs import DiTConfig
from storymem_rt.errors import StoryMemError

from storymem_rt.engines.graph import DiTContract, TokenGrid, token_grid
from storymem_rt.engines.loaders import require_tensorrt
from storymem_rt.engines.manifest import artifact_id

log = logging.getLogger("storymem_rt")

ENGINE_NAME = "model.plan"
TIMING_CACHE = "timing.cache"
BATCH_RANGE = (1, 2, 2)  # min, opt, max: CFG runs cond + uncond as one batch of 2


# --------------------------------------------------------------------------- profiles (plain Python)

Shape = tuple[int, ...]


@dataclass(frozen=True)
class EngineProfile:
    """min/opt/max shape of every input (one TensorRT optimization profile)."""

    shapes: dict[str, tuple[Shape, Shape, Shape]]
    grid: TokenGrid
    max_memory_size: int

    def to_json(self) -> dict:
        return {"grid": {"latent_frames": self.grid.latent_frames, "h": self.grid.h, "w": self.grid.w},
                "max_memory_size": self.max_memory_size,
                "shapes": {k: {"min": list(a), "opt": list(b), "max": list(c)} for k, (a, b, c) in self.shapes.items()}}

    def covers(self, memory: int, batch: int) -> bool:
        lo, _, hi = (s[1] for s in self.shapes["tokens"])
        n = self.grid.tokens(memory)
        blo, _, bhi = (s[0] for s in self.shapes["tokens"])
        return lo <= n <= hi and blo <= batch <= bhi


def profile_shapes(config: DiTConfig, size: tuple[int, int], frame_num: int, max_memory_size: int,
                   batch: tuple[int, int, int] = BATCH_RANGE) -> EngineProfile:
    """The optimization profile serving memory sizes 0..max_memory_size at `size` (W, H).

    tokens: min = shot alone, opt = max = shot + max memory (a story spends most shots with a
    full memory bank). 832*480, 81 frames, max 10: 21*1560 = 32760 .. 31*1560 = 48360 tokens."""
    if max_memory_size < 0:
        raise ValueError(f"max_memory_size must be >= 0, got {max_memory_size}")
    grid = token_grid(size, frame_num, config)
    contract = DiTContract(config)
    lo, hi = grid.tokens(0), grid.tokens(max_memory_size)
    bmin, bopt, bmax = batch
    shapes = {}
    for name in contract.input_names:
        shapes[name] = (contract.shapes(bmin, lo)[name], contract.shapes(bopt, hi)[name],
                        contract.shapes(bmax, hi)[name])
    return EngineProfile(shapes=shapes, grid=grid, max_memory_size=max_memory_size)


@dataclass(frozen=True)
class EnginePlan:
    """What one engine will be: its content-derived id, the key hashed into it, its profile."""

    id: str
    key: dict = field(hash=False)
    profile: EngineProfile = field(hash=False)
    precision: str = "bf16"


def plan_engine(onnx_record: dict, config: DiTConfig, size: tuple[int, int], frame_num: int,
                max_memory_size: int, trt_version: str, gpu_arch: str, strongly_typed: bool = True,
                opt_level: int = 3) -> EnginePlan:
    """Name and profile of the engine built from `onnx_record` (a manifest record): the id
    changes with the ONNX artifact (weights, LoRA, precision), size, frames, max memory,
    TensorRT version, GPU arch and builder settings, and with nothing else."""
    profile = profile_shapes(config, size, frame_num, max_memory_size)
    key = {"onnx": onnx_record["id"], "size": list(size), "frame_num": frame_num,
           "max_memory_size": max_memory_size, "tensorrt": trt_version, "gpu_arch": gpu_arch,
           "strongly_typed": strongly_typed, "opt_level": opt_level}
    eid = artifact_id("tensorrt", onnx_record["model"], onnx_record["expert"], onnx_record["precision"], key)
    return EnginePlan(id=eid, key=key, profile=profile, precision=onnx_record["precision"])


# --------------------------------------------------------------------------- build (needs TensorRT)

def build_engine(onnx_path: str | Path, engine_path: str | Path, plan: EnginePlan, *,
                 timing_cache: str | Path | None = None, workspace_gib: float | None = None,
                 strongly_typed: bool = True, opt_level: int = 3) -> dict:
    """Parse `onnx_path` (external data beside it) and write a serialized engine to
    `engine_path`; returns build facts for the manifest. Raises engines.loaders.TensorRTUnavailable without
    TensorRT and StoryMemError with the parser's / builder's messages on failure."""
    trt = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    typed_flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if strongly_typed and typed_flag is not None:  # TensorRT 11: always strongly typed, flag deprecated
        flags |= 1 << int(typed_flag)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    t0 = time.perf_counter()
    # parse_from_file (not parse(bytes)) so the parser resolves model.onnx.data next to the graph.
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise StoryMemError(f"{onnx_path}: TensorRT could not parse the graph: {errors}")
    t_parse = time.perf_counter() - t0

    config = builder.create_builder_config()
    if workspace_gib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    config.builder_optimization_level = opt_level
    if not strongly_typed:
        # Weakly typed: allow reduced precisions; the Q/DQ nodes still pin FP8 where they are.
        if plan.precision in ("bf16", "fp8"):
            config.set_flag(trt.BuilderFlag.BF16)
        if plan.precision == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
        if plan.precision == "fp8":
            config.set_flag(trt.BuilderFlag.FP8)
    cache_bytes = Path(timing_cache).read_bytes() if timing_cache and Path(timing_cache).is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)

    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in plan.profile.shapes.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)

    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise StoryMemError(f"{onnx_path}: TensorRT failed to build the engine (see the TensorRT log above)")
    t_build = time.perf_counter() - t0
    engine_path = Path(engine_path)
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_bytes(engine_path, memoryview(serialized))
    if timing_cache:
        _atomic_bytes(Path(timing_cache), memoryview(config.get_timing_cache().serialize()))
    return {"tools": {"tensorrt": trt.__version__}, "parse_s": round(t_parse, 2), "build_s": round(t_build, 2),
            "strongly_typed": bool(strongly_typed), "opt_level": opt_level,
            "profile": plan.profile.to_json()}


def _atomic_bytes(path: Path, data) -> None:
    from storymem_rt.atomic import atomic_write_bytes

    atomic_write_bytes(path, data)  # a memoryview is written as is: no copy of a multi-GB engine
