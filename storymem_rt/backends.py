"""The backend registry: which implementation runs the DiT experts, decided once, up front.

A name maps to a builder returning an expert with one call signature,
`expert(x, t, context, y=None, frame_pos=None) -> velocity` (TensorRT demo/Diffusion's per-stage
model dict):

| name        | what runs                                                        | where      |
|-------------|------------------------------------------------------------------|------------|
| plain       | `WanDiT`, upstream's math (`DiTOptions.plain`)                   | any device |
| fast-bf16   | `WanDiT` with `DiTOptions.fast("bf16")`: fused qkv, our kernels, cached text K/V | CUDA (CPU: tests) |
| fast-fp8    | the same with FP8 block GEMMs                                     | CUDA (CPU: tests) |
| compiled    | `WanDiT` under whole-model torch.compile, with the compile cache of `build-engines --backend torch` when present | any |
| onnxruntime | the ONNX graphs of `build-engines --backend onnx`                 | CPU        |
| tensorrt    | the engines of `build-engines --backend tensorrt`                 | NVIDIA GPU with TensorRT |

`resolve(...)` turns the CLI's options into one frozen `BackendConfig` (written into render.json)
or refuses an impossible combination with one sentence naming the options (`BackendError`, a
usage error). `load_experts(config, ...)` builds the {'high', 'low'} experts of one model kind.
Weights come from the upstream folders (the StoryMem LoRA merged as they stream) or, with
`--engines`, from `build-engines`' artifacts (merged LoRA, FP8), each checked against its inputs.

Residency: `ExpertSlot` keeps both experts in host memory and one on the device when they do not
fit together (`plan_residency`).
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import CheckpointError, StoryMemError

log = logging.getLogger("storymem_rt")

BACKENDS = ("plain", "fast-bf16", "fast-fp8", "compiled", "onnxruntime", "tensorrt")
TORCH_BACKENDS = ("plain", "fast-bf16", "fast-fp8", "compiled")
FAST_ALIASES = {"off": "plain", "bf16": "fast-bf16", "fp8": "fast-fp8"}
EXPERTS = {"high": "high_noise_model", "low": "low_noise_model"}


class BackendError(StoryMemError):
    """An impossible combination of backend options (a usage error: exit 2)."""


@dataclass(frozen=True)
class BackendConfig:
    """The resolved backend of one render.

    name: one of BACKENDS; device; precision: what the DiT computes in ("fp32", "bf16", "fp8": bf16
    compute around FP8 block GEMMs); attention / cross_attention: `kernels.attention.attend`
    implementations; compile: regional torch.compile of the block (fast backends); cfg: how guidance
    runs ("batched" / "sequential"); cuda_graph; engines: the `build-engines` folder or None;
    engines_precision: which of its artifacts."""

    name: str = "plain"
    device: str = "cpu"
    precision: str = "fp32"
    attention: str = "sdpa"
    cross_attention: str = "sdpa"
    compile: bool = False
    cfg: str = "batched"
    cuda_graph: bool = False
    engines: str | None = None
    engines_precision: str | None = None

    def __post_init__(self):
        if self.name not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {self.name!r}")

    @property
    def dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.bfloat16}[
            self.precision]

    def dit_options(self):
        """The `DiTOptions` a torch backend builds its WanDiT with."""
        from .dit import DiTOptions

        if self.name in ("fast-bf16", "fast-fp8"):
            return DiTOptions.fast(self.precision, attention=self.attention, cross_attention=self.cross_attention,
                                   compile=self.compile)
        return DiTOptions.plain(self.precision)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def resolve(*, backend: str = "auto", fast: str = "auto", attention: str = "auto", compile: bool = False,
            device: str | torch.device = "cpu", dtype: str | None = None, engines: str | Path | None = None,
            engines_precision: str | None = None, cuda_graph: bool = False) -> BackendConfig:
    """One BackendConfig from the render options, or BackendError naming the options to change.

    backend "auto" follows --fast (auto: fast-bf16 on CUDA, plain elsewhere; FP8 engines make a fast
    backend fast-fp8). --dtype float32 runs a fast backend's code path unrounded (precision fp32)."""
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    if backend != "auto" and backend not in BACKENDS:
        raise BackendError(f"--backend must be auto or one of {', '.join(BACKENDS)}; got {backend!r}")
    if fast not in ("auto", *FAST_ALIASES):
        raise BackendError(f"--fast must be auto, off, bf16 or fp8; got {fast!r}")
    if backend != "auto" and fast != "auto":
        implied = FAST_ALIASES[fast]
        if implied != backend:
            raise BackendError(f"--backend {backend} and --fast {fast} ask for different backends: give one of them "
                               f"(--fast {fast} is --backend {implied})")
    name = backend if backend != "auto" else (FAST_ALIASES[fast] if fast != "auto" else
                                              ("fast-bf16" if cuda else "plain"))
    fp8_engines = engines is not None and engines_precision == "fp8"
    if fp8_engines and name == "fast-bf16":
        if fast == "bf16" or backend == "fast-bf16":
            raise BackendError("--engines with --precision fp8 holds FP8 weights, which the bf16 fast backend cannot "
                               "run: use --fast fp8 (or --fast off), or --precision bf16 artifacts")
        name = "fast-fp8"  # --fast auto on CUDA with FP8 artifacts: the FP8 fast path
    if engines_precision is not None and engines is None:
        raise BackendError("--precision picks the artifacts of --engines DIR: add --engines or drop --precision")
    if name in ("onnxruntime", "tensorrt") and engines is None:
        raise BackendError(f"--backend {name} runs the graphs of `storymem-rt build-engines --backend "
                           f"{'onnx' if name == 'onnxruntime' else 'tensorrt'}`: add --engines DIR")
    if name == "tensorrt" and not cuda:
        raise BackendError(f"--backend tensorrt needs an NVIDIA GPU; --device is {dev}")
    if compile and name not in ("plain", "fast-bf16", "fast-fp8"):
        raise BackendError(f"--compile is the torch backends' regional compile; --backend {name} cannot use it")
    if compile and name == "plain":
        raise BackendError("--compile applies to the fast backends (--fast bf16 or fp8); for a compiled plain model "
                           "use --backend compiled")

    if name == "fast-fp8":
        precision = "fp8"
    elif fp8_engines:
        if name not in ("plain", "compiled", "onnxruntime", "tensorrt"):
            raise BackendError(f"--backend {name} cannot run FP8 artifacts")  # our bug if reached
        precision = "fp8"
    elif engines_precision is not None:
        precision = engines_precision
        if dtype is not None and {"float32": "fp32", "bfloat16": "bf16"}[dtype] != precision:
            raise BackendError(f"--dtype {dtype} and --precision {engines_precision}: the artifacts decide the "
                               f"precision; drop --dtype")
    else:
        precision = {"float32": "fp32", "bfloat16": "bf16"}[dtype or ("bfloat16" if cuda else "float32")]
    if name == "fast-bf16" and precision not in ("bf16", "fp32"):
        raise BackendError(f"the bf16 fast backend computes in bf16 (or fp32 with --dtype float32), not {precision}")

    bf16_fast = name in ("fast-bf16", "fast-fp8") and precision in ("bf16", "fp8")
    if attention != "auto" and not bf16_fast:
        raise BackendError(f"--attention {attention} runs in the fast backend in bf16: add --fast bf16 or --fast fp8 "
                           f"(with --dtype bfloat16), or leave --attention auto; the backend here is {name} in "
                           f"{precision}")
    if name in ("fast-bf16", "fast-fp8"):
        attn, cross = attention, "auto"
        cfg = "sequential"  # docs/PERF.md: as fast as batched on the H100, less memory
    else:
        attn = cross = "sdpa"
        cfg = "batched"
    if name == "onnxruntime" and cuda:
        raise BackendError("--backend onnxruntime runs on the CPU here: add --device cpu")
    return BackendConfig(name=name, device=str(dev), precision=precision, attention=attn, cross_attention=cross,
                         compile=compile, cfg=cfg, cuda_graph=cuda_graph, engines=None if engines is None else
                         str(engines), engines_precision=engines_precision)


# --------------------------------------------------------------------------- weights

@dataclass(frozen=True)
class ExpertWeights:
    """Where one expert's weights come from: an upstream (or merged) expert folder, with or without a
    LoRA merged as it streams, or an FP8 artifact folder."""

    folder: Path
    lora: object | None = None  # storymem_rt.lora.LoraWeights
    fp8: bool = False
    distill: tuple[Path, float] | None = None  # a few-step distill LoRA file and its strength (preview)


def load_torch_expert(weights: ExpertWeights, config: BackendConfig) -> nn.Module:
    """A WanDiT on the device computing as the backend says (`DiTOptions`)."""
    from .checkpoint import load_expert

    model = load_expert(weights.folder, device=config.device, dtype=config.dtype, lora=weights.lora,
                        distill=weights.distill)
    return model.convert_(config.dit_options())


_BUILDERS = {}


def _builder(*names):
    def register(fn):
        for n in names:
            _BUILDERS[n] = fn
        return fn

    return register


@_builder("plain", "fast-bf16", "fast-fp8")
def _build_torch(config: BackendConfig, weights: ExpertWeights, artifact: dict | None, meta: dict):
    return load_torch_expert(weights, config)


@_builder("compiled")
def _build_compiled(config: BackendConfig, weights: ExpertWeights, artifact: dict | None, meta: dict):
    from .engines.loaders import CompiledExpert, activate_compile_cache, parse_buckets

    model = load_torch_expert(weights, config)
    if artifact is not None:  # a compile cache from build-engines: a fresh process skips recompiling
        activate_compile_cache(Path(config.engines) / artifact["path"])
        return CompiledExpert(model, parse_buckets(artifact.get("buckets"), meta["max_memory_size"]),
                              shot_frames=meta["shot_frames"])
    return CompiledExpert(model, parse_buckets(None, meta["max_memory_size"]), shot_frames=meta["shot_frames"])


@_builder("onnxruntime")
def _build_onnx(config: BackendConfig, weights: ExpertWeights, artifact: dict | None, meta: dict):
    from .configs import DiTConfig
    from .engines.loaders import OnnxExpert

    path = Path(config.engines) / artifact["path"]
    return OnnxExpert(path / "model.onnx" if path.is_dir() else path, DiTConfig.from_json(weights.folder / "config.json"))


@_builder("tensorrt")
def _build_tensorrt(config: BackendConfig, weights: ExpertWeights, artifact: dict | None, meta: dict):
    from .configs import DiTConfig
    from .engines.loaders import TensorRTExpert

    path = Path(config.engines) / artifact["path"]
    return TensorRTExpert(path / "model.plan" if path.is_dir() else path, DiTConfig.from_json(weights.folder / "config.json"))


# the engines-folder artifact each backend runs (besides the weights artifacts)
_RUN_ARTIFACT = {"compiled": "torch-cache", "onnxruntime": "onnx", "tensorrt": "tensorrt"}


def builder(name: str):
    """The registered builder of a backend name: fn(config, weights, artifact, meta) -> expert."""
    if name not in _BUILDERS:
        raise BackendError(f"no backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return _BUILDERS[name]


class ExpertsLoader:
    """Builds the {'high', 'low'} experts of a model kind for one BackendConfig.

    paths: `models.ModelPaths`; lora_config: `lora.LoraConfig` or None (from the file); engines_spec:
    the `engines.BuildSpec` that `render --engines` describes, or None; frame_num, max_memory_size:
    the render's shot length and memory bound (the compiled backend's shape buckets); distill: preview's
    few-step LoRAs, {'t2v' | 'm2v': {'high': file, 'low': file}}, merged at `distill_strength`."""

    def __init__(self, config: BackendConfig, paths, lora_config=None, engines_spec=None, frame_num: int = 81,
                 max_memory_size: int = 10, distill: dict | None = None, distill_strength: float = 1.0):
        self.config, self.paths, self.lora_config, self.engines_spec = config, paths, lora_config, engines_spec
        self.frame_num, self.max_memory_size = frame_num, max_memory_size
        self.distill, self.distill_strength = distill, distill_strength
        if distill is not None and config.name in ("onnxruntime", "tensorrt"):
            raise BackendError(f"preview merges its distill LoRA into the experts as they load; --backend "
                               f"{config.name} runs prebuilt graphs without it: use a torch backend")

    def _records(self, kind: str, expert: str) -> tuple[Path | None, dict | None]:
        """(weights artifact folder or None, run artifact record or None); a stale artifact raises
        StaleEngineError naming what changed and the rebuild command."""
        if self.engines_spec is None:
            return None, None
        from .engines.manifest import MissingEngineError, find_engine

        spec = dataclasses.replace(self.engines_spec, kind=kind)
        dev = self.config.device
        art = "fp8" if spec.precision == "fp8" else ("merged" if kind == "m2v" else None)
        folder = None
        if art is not None:
            folder = Path(spec.out) / find_engine(spec, art, expert, device=dev)["path"]
            if not (folder / "config.json").is_file():  # artifacts keep the upstream expert folder name
                folder = folder / EXPERTS[expert]
        run = _RUN_ARTIFACT.get(self.config.name)
        record = None
        if run is not None:
            try:
                record = find_engine(spec, run, expert, device=dev)
            except MissingEngineError:
                if run != "torch-cache":  # no compile cache: compile here; graphs and engines must exist
                    raise
        return folder, record

    def preflight(self, kinds) -> None:
        """Check every artifact the story will use before anything is written."""
        for kind in kinds:
            for e in EXPERTS:
                self._records(kind, e)

    def weights(self, kind: str, expert: str, folder: Path | None) -> ExpertWeights:
        from .lora import load_lora
        from .models import expert_dir, find_lora_file

        distill = None
        if self.distill is not None:
            distill = (Path(self.distill[kind][expert]), self.distill_strength)
        if folder is not None:
            return ExpertWeights(folder, fp8=self.engines_spec.precision == "fp8", distill=distill)
        root = self.paths.t2v if kind == "t2v" else self.paths.i2v
        if root is None:
            from .errors import download_hint

            raise CheckpointError(f"no {'T2V' if kind == 't2v' else 'I2V'} model folder given; "
                                  f"{download_hint('t2v' if kind == 't2v' else 'i2v')}")
        lora = None
        if kind == "m2v":
            if self.paths.lora is None:
                from .errors import download_hint

                raise CheckpointError(f"M2V needs the StoryMem LoRA; {download_hint('lora')}")
            lora = load_lora(find_lora_file(self.paths.lora, expert), self.lora_config)
        return ExpertWeights(expert_dir(root, expert), lora=lora, distill=distill)

    def load(self, kind: str) -> dict:
        out = {}
        meta = {"max_memory_size": self.max_memory_size, "shot_frames": (self.frame_num - 1) // 4 + 1}
        for e in EXPERTS:
            folder, record = self._records(kind, e)
            out[e] = builder(self.config.name)(self.config, self.weights(kind, e, folder), record, meta)
        return out


# --------------------------------------------------------------------------- residency

def model_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def plan_residency(expert_bytes: int, working_bytes: int, budget_bytes: float = 75e9) -> str:
    """"resident" if both experts plus the working set (activations of one step, VAE, text cache,
    CUDA-graph pool) fit the budget, else "swap" (`ExpertSlot`)."""
    return "resident" if 2 * expert_bytes + working_bytes <= budget_bytes else "swap"


class ExpertSlot:
    """Both experts' weights in (pinned) host memory, one set of device tensors holding the active
    one. `activate(name)` copies that expert's tensors into the slot (host->device at PCIe speed:
    ~28.6 GB for a bf16 A14B expert) when another one is there, and drops the slot's caches. The
    sampling loop calls it at the expert boundary: twice per shot."""

    def __init__(self, slot: nn.Module, host_states: dict[str, dict[str, torch.Tensor]], active: str):
        self.model, self.host, self.active = slot, host_states, active
        self._tensors = dict(slot.state_dict(keep_vars=True).items())
        for name, sd in host_states.items():
            if set(sd) != set(self._tensors):
                raise ValueError(f"expert {name!r} does not have the slot's tensors")

    @classmethod
    def from_experts(cls, experts: dict[str, nn.Module], slot_name: str) -> "ExpertSlot":
        """Host copies of every expert (pinned where CUDA is); `experts[slot_name]`, already on the
        device, becomes the slot. The other experts can then be freed."""
        pin = torch.cuda.is_available()
        host = {}
        for name, m in experts.items():
            host[name] = {k: (v.detach().to("cpu", copy=True).pin_memory() if pin else v.detach().to("cpu", copy=True))
                          for k, v in m.state_dict().items()}
        return cls(experts[slot_name], host, slot_name)

    @torch.no_grad()
    def activate(self, name: str) -> nn.Module:
        if name not in self.host:
            raise KeyError(f"no expert {name!r}; have {sorted(self.host)}")
        if name != self.active:
            src = self.host[name]
            for k, t in self._tensors.items():
                t.data.copy_(src[k], non_blocking=True)
            clear = getattr(self.model, "clear_caches", None)
            if clear is not None:
                clear()
            self.active = name
        return self.model
