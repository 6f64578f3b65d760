"""Model and sampling configs: frozen dataclasses with named presets.

The A14B numbers are Wan2.2's (`wan/configs/wan_{t2v,i2v}_A14B.py`, StoryMem's
`wan_m2v_A14B.py`). Tiny checkpoints carry their own `config.json`, read by `from_json`.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CheckpointError

# Shot shape and memory defaults of `render`, `build-engines` and `bench` (the reference's 480p
# A14B setting; StoryMem's --max_memory_size defaults to 8 there, 10 here).
DEFAULT_SIZE = (832, 480)  # (W, H) in pixels
DEFAULT_FRAME_NUM = 81
DEFAULT_MAX_MEMORY = 10


def format_size(size) -> str:
    """(832, 480) -> "832*480", the way --size spells it."""
    return f"{size[0]}*{size[1]}"


def read_json(path: str | Path, what: str, fix: str | None = None, *, error: type[Exception] = CheckpointError) -> Any:
    """The parsed JSON of a sidecar file (config.json, fp8_config.json, storymem_tiny.json, a
    manifest), or `error` with one sentence: the file, what is wrong with it, then `fix`."""
    path = Path(path)
    tail = f"; {fix}" if fix else ""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise error(f"{path}: {what} is missing{tail}") from None
    except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8
        raise error(f"{path}: {what} is not valid JSON ({e}){tail}") from None
    except OSError as e:
        raise error(f"{path}: {what} cannot be read ({e}){tail}") from None


def user_cache_dir() -> Path:
    """$STORYMEM_CACHE, else $XDG_CACHE_HOME/storymem-rt (~/.cache/storymem-rt): the tiny bundle,
    working copies of compile caches."""
    base = os.environ.get("STORYMEM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "storymem-rt")
    return Path(base)

# The reference's default negative prompt (Wan2.2 shared_config.py `sample_neg_prompt`).
DEFAULT_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，"
    "最差质量，低质量，JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，"
    "画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，"
    "杂乱的背景，三条腿，背景人很多，倒着走"
)

# Wan2.1 VAE latent normalisation constants (vae2_1.py `mean`/`std`).
VAE_LATENT_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
VAE_LATENT_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)


@dataclass(frozen=True)
class DiTConfig:
    """One Wan2.2 expert (WanModel). `in_dim` 16 for T2V, 36 for I2V/M2V (16 + 4 mask + 16 cond)."""

    model_type: str = "t2v"
    dim: int = 5120
    ffn_dim: int = 13824
    freq_dim: int = 256
    text_dim: int = 4096
    num_heads: int = 40
    num_layers: int = 40
    in_dim: int = 16
    out_dim: int = 16
    text_len: int = 512
    patch_size: tuple[int, int, int] = (1, 2, 2)
    qk_norm: bool = True
    cross_attn_norm: bool = True
    eps: float = 1e-6

    def __post_init__(self):
        if self.model_type not in ("t2v", "i2v"):
            raise ValueError(f"model_type must be 't2v' or 'i2v', got {self.model_type!r}")
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if (self.dim // self.num_heads) % 2:
            raise ValueError(f"head dim {self.dim // self.num_heads} must be even for RoPE")
        if len(self.patch_size) != 3:
            raise ValueError(f"patch_size must have 3 entries, got {self.patch_size}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @classmethod
    def from_name(cls, name: str) -> "DiTConfig":
        if name not in DIT_PRESETS:
            raise ValueError(f"unknown DiT preset {name!r}; choose one of {sorted(DIT_PRESETS)}")
        return DIT_PRESETS[name]

    @classmethod
    def from_json(cls, path: str | Path) -> "DiTConfig":
        """Read an upstream `config.json`. `text_dim` defaults to 4096 when absent (the reference
        builds every expert with text_dim 4096 whatever the file says; we honour the file)."""
        path = Path(path)
        raw = read_json(path, "config.json")
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in raw.items() if k in names}
        if "patch_size" in kw:
            kw["patch_size"] = tuple(kw["patch_size"])
        kw.setdefault("text_dim", 4096)
        try:
            return cls(**kw)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: {e}") from None

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


DIT_PRESETS: dict[str, DiTConfig] = {
    "t2v-a14b": DiTConfig(model_type="t2v", in_dim=16),
    "i2v-a14b": DiTConfig(model_type="i2v", in_dim=36),
    "tiny-t2v": DiTConfig(model_type="t2v", dim=128, ffn_dim=256, freq_dim=32, text_dim=64,
                          num_heads=2, num_layers=2, in_dim=16),
    "tiny-i2v": DiTConfig(model_type="i2v", dim=128, ffn_dim=256, freq_dim=32, text_dim=64,
                          num_heads=2, num_layers=2, in_dim=36),
}


# The most denoising steps a render accepts (`--sample-steps`): one per training timestep. Every
# count 1..this runs with both solvers (tests/test_schedulers.py sweeps them).
MAX_SAMPLE_STEPS = 1000


@dataclass(frozen=True)
class SamplingConfig:
    """Sampling defaults of one model (T2V-A14B or M2V-A14B in the reference)."""

    shift: float
    boundary: float  # expert switch at boundary * num_train_timesteps
    sample_steps: int = 40
    guide_scale: tuple[float, float] = (3.5, 3.5)  # (low-noise expert, high-noise expert)
    frame_num: int = DEFAULT_FRAME_NUM
    fps: int = 16
    num_train_timesteps: int = 1000
    solver: str = "unipc"
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    step_list: tuple[int, ...] | None = None  # solver "distill": the timesteps of its steps (1000, 750, ...)
    boundary_step: int | None = None  # switch experts after this many steps (None: at boundary * 1000)
    guided: tuple[str, ...] = ("high", "low")  # experts that run classifier-free guidance

    def __post_init__(self):
        if self.solver not in ("unipc", "dpm++", "distill"):
            raise ValueError(f"solver must be 'unipc', 'dpm++' or 'distill', got {self.solver!r}")
        if self.solver == "distill" and self.step_list is not None and len(self.step_list) != self.sample_steps:
            raise ValueError(f"the distill step list {list(self.step_list)} has {len(self.step_list)} steps, "
                             f"sample_steps is {self.sample_steps}")
        if self.boundary_step is not None and not 0 <= self.boundary_step <= self.sample_steps:
            raise ValueError(f"boundary_step must be within 0..{self.sample_steps}, got {self.boundary_step}")
        if not set(self.guided) <= {"high", "low"}:
            raise ValueError(f"guided experts must be among 'high', 'low'; got {list(self.guided)}")
        if not 0.0 < self.boundary < 1.0:
            raise ValueError(f"boundary must be in (0, 1), got {self.boundary}")
        if not 1 <= self.sample_steps <= MAX_SAMPLE_STEPS:
            raise ValueError(f"sample_steps must be between 1 and {MAX_SAMPLE_STEPS}, got {self.sample_steps}")
        if (self.frame_num - 1) % 4:
            raise ValueError(f"frame_num must be 4n+1 (the VAE's temporal stride), got {self.frame_num}")


SAMPLING_PRESETS: dict[str, SamplingConfig] = {
    "t2v-a14b": SamplingConfig(shift=12.0, boundary=0.875),
    "m2v-a14b": SamplingConfig(shift=4.0, boundary=0.9),
}


@dataclass(frozen=True)
class T5Config:
    """UMT5 encoder as the Wan checkpoint lays it out (t5.py `umt5_xxl` encoder-only)."""

    vocab: int = 256384
    dim: int = 4096
    dim_attn: int = 4096
    dim_ffn: int = 10240
    num_heads: int = 64
    num_layers: int = 24
    num_buckets: int = 32
    shared_pos: bool = False
    dropout: float = 0.0
    text_len: int = 512

    @classmethod
    def from_json(cls, path: str | Path) -> "T5Config":
        raw = read_json(path, "T5 config")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})


@dataclass(frozen=True)
class VAEConfig:
    """Wan2.1 VAE (vae2_1.py `_video_vae`): base dim 96 upstream."""

    dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    dropout: float = 0.0
    latent_mean: tuple[float, ...] = field(default=VAE_LATENT_MEAN)
    latent_std: tuple[float, ...] = field(default=VAE_LATENT_STD)
    stride: tuple[int, int, int] = (4, 8, 8)

    @classmethod
    def from_json(cls, path: str | Path) -> "VAEConfig":
        raw = read_json(path, "VAE config")
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in raw.items() if k in names}
        return cls(**kw)
