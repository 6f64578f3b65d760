"""One shot: conditioning, the denoising loop with the MoE expert switch and CFG, decoding.

Matches the reference's `WanT2V.generate()` (Wan2.2 `wan/text2video.py`) and StoryMem's
`WanM2V.generate()` (`wan/memory2video.py`) step for step: the same noise draw (shape, dtype,
generator, device, order), the same mask and condition tensor, the same scheduler calls, the same
expert switch (`t >= boundary * 1000` runs the high-noise expert) and guidance. What differs is
where the work happens: text states, memory latents and the all-zeros condition latent arrive
from caches (`storymem_rt.story`), CFG runs both branches as one batch of 2, and the memory
latents the reference decodes and throws away are never decoded.

Shapes: latents [16, T, h, w]; videos [3, F, H, W] in [-1, 1]; memory latents [16, M, h, w].
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .configs import SamplingConfig
from .errors import NonFiniteLatentError
from .schedulers import make_scheduler

MODES = ("t2v", "m2v", "mi2v", "mm2v")
# Frames of the previous shot that condition an MI2V / MM2V shot, and are dropped from its output.
KNOWN_FRAMES = {"t2v": 0, "m2v": 0, "mi2v": 1, "mm2v": 5}


@dataclass(frozen=True)
class ShotSpec:
    """Everything that decides one shot's numbers."""

    mode: str
    prompt: str
    seed: int
    size: tuple[int, int]  # (W, H) in pixels, multiples of vae_stride * patch
    sampling: SamplingConfig
    # The reference's MI2V conditions on an all-zeros encode instead of the first frame
    # (memory2video.py: the `else` of the motion-frames branch overwrites `u`). Off: we
    # condition on the frame for real. On: reproduce the reference bit for bit.
    reference_mi2v_bug: bool = False

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"shot mode must be one of {MODES}, got {self.mode!r}")
        w, h = self.size
        if w % 16 or h % 16:
            raise ValueError(f"shot size {w}x{h} must be a multiple of 16 in both sides")

    @property
    def known_frames(self) -> int:
        return KNOWN_FRAMES[self.mode]


@dataclass
class ShotResult:
    latent: torch.Tensor  # [16, M + T, h, w], memory frames included (as the reference returns)
    video: torch.Tensor  # [3, F, H, W] in [-1, 1], before the story loop trims known frames
    timings: dict = field(default_factory=dict)


def m2v_size(max_area: int, aspect_ratio: float, vae_stride=(4, 8, 8), patch=(1, 2, 2)) -> tuple[int, int]:
    """(W, H) of an M2V shot from a pixel budget and the memory's aspect ratio h/w.
    Matches memory2video.py: round(sqrt(area * ar)) // stride // patch * patch."""
    lat_h = round(np.sqrt(max_area * aspect_ratio)) // vae_stride[1] // patch[1] * patch[1]
    lat_w = round(np.sqrt(max_area / aspect_ratio)) // vae_stride[2] // patch[2] * patch[2]
    return lat_w * vae_stride[2], lat_h * vae_stride[1]


def build_mask(memory_size: int, frame_num: int, known_frames: int, lat_h: int, lat_w: int,
               device=None, vae_stride_t: int = 4) -> torch.Tensor:
    """Mask channels of y: [4, M + T, lat_h, lat_w].

    Matches memory2video.py: one entry per memory frame and per video frame (ones = known);
    the first M + 1 entries are repeated x4 (the VAE encodes the first video frame alone,
    so it owns a whole latent frame), then the run is viewed as [M + T, 4] and transposed.
    With M = 0 and one known frame this is Wan2.2 I2V's mask.
    """
    msk = torch.ones(1, frame_num + memory_size, lat_h, lat_w, device=device)
    msk[:, memory_size:] = 0
    msk[:, memory_size:memory_size + known_frames] = 1
    msk = torch.cat([
        torch.repeat_interleave(msk[:, :memory_size + 1], repeats=vae_stride_t, dim=1),
        msk[:, memory_size + 1:],
    ], dim=1)
    msk = msk.view(1, msk.shape[1] // 4, 4, lat_h, lat_w)
    return msk.transpose(1, 2)[0]


def condition_video(known: torch.Tensor | None, frame_num: int, size: tuple[int, int],
                    device=None) -> torch.Tensor:
    """The pixel clip whose encoding is the shot's condition latent: the known frames
    [K, 3, H, W] (MI2V K=1, MM2V K=5) followed by zeros, as [1, 3, F, H, W]."""
    w, h = size
    clip = torch.zeros(1, 3, frame_num, h, w, device=device)
    if known is not None:
        clip[0, :, : known.shape[0]] = known.transpose(0, 1).to(clip)
    return clip


def resize_frames(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[N, 3, h, w] -> [N, 3, H, W], bicubic as the reference resizes memory and first frames.
    A no-op at the same size, which is the story engine's case."""
    w, h = size
    if frames.shape[-2:] == (h, w):
        return frames
    return F.interpolate(frames.float().cpu(), size=(h, w), mode="bicubic").to(frames.device)


def pad_context(ctx: list[torch.Tensor], text_len: int) -> torch.Tensor:
    """List of [L_i, D] text states -> [B, text_len, D], zero rows after each prompt
    (the reference pads with zeros and cross-attends to all text_len rows)."""
    out = ctx[0].new_zeros(len(ctx), text_len, ctx[0].shape[-1])
    for i, c in enumerate(ctx):
        out[i, : c.shape[0]] = c[:text_len]
    return out


def draw_noise(seed: int, shape: tuple[int, ...], device) -> tuple[torch.Tensor, torch.Generator]:
    """float32 noise drawn exactly as the reference: a generator on the run's device seeded
    with `seed`, one randn of the full latent shape (memory frames included)."""
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return torch.randn(*shape, dtype=torch.float32, generator=g, device=device), g


@torch.no_grad()
def denoise(experts: dict, spec: ShotSpec, noise: torch.Tensor, generator: torch.Generator,
            context: torch.Tensor, context_null: torch.Tensor, y: torch.Tensor | None,
            frame_pos: torch.Tensor | None, dtype: torch.dtype, progress=None,
            cfg_batch: bool = True) -> torch.Tensor:
    """The sampling loop. `experts` maps 'high'/'low' to callables model(x, t, context, y, frame_pos).

    context / context_null: [1, text_len, D] each; y: [C_y, T, h, w] or None.
    """
    s = spec.sampling
    sched = make_scheduler(s.solver, s.sample_steps, s.shift, s.num_train_timesteps, device=noise.device)
    boundary = s.boundary * s.num_train_timesteps
    latent = noise
    ctx2 = torch.cat([context, context_null]).to(dtype)
    y2 = None if y is None else y.to(dtype)[None].expand(2, *y.shape)
    for i, t in enumerate(sched.timesteps):
        high = float(t) >= boundary
        model = experts["high" if high else "low"]
        gs = s.guide_scale[1] if high else s.guide_scale[0]
        x = latent.to(dtype)
        tt = t.reshape(1).to(noise.device, torch.float32)
        if cfg_batch:
            out = model(x[None].expand(2, *x.shape), tt.expand(2), ctx2, y2, frame_pos).float()
            cond, uncond = out[0], out[1]
        else:
            yy = None if y2 is None else y2[:1]
            cond = model(x[None], tt, ctx2[:1], yy, frame_pos).float()[0]
            uncond = model(x[None], tt, ctx2[1:], yy, frame_pos).float()[0]
        pred = uncond + gs * (cond - uncond)
        latent = sched.step(pred[None], t, latent[None], generator=generator)[0]
        if not torch.isfinite(latent).all():  # black frames otherwise, and a render that looks fine
            raise NonFiniteLatentError(step=i + 1, steps=len(sched.timesteps), expert="high" if high else "low")
        if progress is not None:
            progress.update(1)
    return latent


def shot_latent_shape(spec: ShotSpec, memory_size: int, vae_stride=(4, 8, 8)) -> tuple[int, int, int, int]:
    w, h = spec.size
    t = (spec.sampling.frame_num - 1) // vae_stride[0] + 1 + memory_size
    return (16, t, h // vae_stride[1], w // vae_stride[2])


@torch.no_grad()
def generate_shot(experts: dict, vae, spec: ShotSpec, context: torch.Tensor, context_null: torch.Tensor,
                  memory_latents: torch.Tensor | None = None, known: torch.Tensor | None = None,
                  cond_latent: torch.Tensor | None = None, device=None, dtype=torch.float32,
                  progress=None, cfg_batch: bool = True, memory_at_negative_positions: bool = True) -> ShotResult:
    """Run one shot.

    experts: {'high': model, 'low': model} of the mode's model (T2V or M2V).
    context / context_null: [1, text_len, D] padded text states of the prompt and negative prompt.
    memory_latents: [16, M, h, w] (M2V family; may be M = 0 for MR2V-less M2V).
    known: [K, 3, H, W] frames of the previous shot (MI2V K=1, MM2V K=5), in [-1, 1].
    cond_latent: precomputed encode of the all-zeros clip (the story engine caches it per size and
        frame count); computed here when None and the shot needs it.
    """
    device = torch.device(device) if device is not None else context.device
    timings = {}
    w, h = spec.size
    fnum = spec.sampling.frame_num
    stride = vae.stride
    if spec.mode == "t2v":
        shape = shot_latent_shape(spec, 0, stride)
        noise, g = draw_noise(spec.seed, shape, device)
        y = None
        frame_pos = None
        memory_size = 0
    else:
        if memory_latents is None:
            raise ValueError(f"{spec.mode} shot needs memory latents")
        memory_size = memory_latents.shape[1]
        k = spec.known_frames
        if k and (known is None or known.shape[0] != k):
            raise ValueError(f"{spec.mode} shot needs {k} known frame(s) of the previous shot")
        shape = shot_latent_shape(spec, memory_size, stride)
        lat_h, lat_w = shape[2], shape[3]
        t0 = time.perf_counter()
        if k and not (spec.mode == "mi2v" and spec.reference_mi2v_bug):
            u = vae.encode(condition_video(resize_frames(known, spec.size), fnum, spec.size, device))[0]
        elif cond_latent is not None:
            u = cond_latent
        else:
            u = vae.encode(condition_video(None, fnum, spec.size, device))[0]
        timings["vae_encode"] = time.perf_counter() - t0
        msk = build_mask(memory_size, fnum, k, lat_h, lat_w, device=device, vae_stride_t=stride[0])
        y = torch.cat([msk, torch.cat([memory_latents.to(device, torch.float32), u.float()], dim=1)], dim=0)
        noise, g = draw_noise(spec.seed, shape, device)
        t_lat = shape[1] - memory_size
        # RoPE is relative, so the reference's positions 0..M+T-1 and ours (-M..-1 for memory,
        # 0..T-1 for the shot) give the same attention; ours keep the shot's positions fixed
        # whatever the memory size (one position table per shot length, not per memory size).
        if memory_at_negative_positions:
            frame_pos = torch.arange(-memory_size, t_lat, device=device)
        else:
            frame_pos = torch.arange(memory_size + t_lat, device=device)
    t0 = time.perf_counter()
    if getattr(experts["high"], "_fast", None) is not None:  # prepared by storymem_rt.fast: no host sync
        from .fast import denoise_fast

        latent = denoise_fast(experts, spec, noise, g, context, context_null, y, frame_pos, dtype, progress=progress)
    else:
        latent = denoise(experts, spec, noise, g, context, context_null, y, frame_pos, dtype, progress, cfg_batch)
    timings["dit"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    video = vae.decode(latent[None, :, memory_size:])[0].float()
    timings["vae_decode"] = time.perf_counter() - t0
    return ShotResult(latent=latent, video=video, timings=timings)
