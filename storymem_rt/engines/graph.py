"""The contract of an exported expert graph, and the host-side work around running one.

An expert graph (`export/onnx_export.py` writes it; onnxruntime or TensorRT runs it) takes
patchified tokens, the float32 sinusoidal timestep embedding, text states padded to text_len
and the RoPE tables, and returns patchified velocity:

    inputs  tokens   [B, L, in_dim*pt*ph*pw] float32  patchify(x, y): per token (c, pt, ph, pw)
            t_emb    [B, freq_dim] float32            timestep_embedding(t).float()
            context  [B, text_len, text_dim] float32  text states zero-padded to text_len
            rope_cos [L, head_dim/2] float32          rope_cos_sin(frame_pos, h, w, head_dim)
            rope_sin [L, head_dim/2] float32
    output  out      [B, L, pt*ph*pw*out_dim] float32 -> unpatchify(out, grid)

B and L are dynamic ("batch", "tokens"): L = (memory frames + shot frames) * h * w, so one
graph serves every memory size. The float64 parts of dit.py (timestep embedding, RoPE angles)
are computed here, outside the graph, and rounded exactly as dit.py rounds them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from storymem_rt.configs import DiTConfig, VAEConfig
from storymem_rt.dit import rope_cos_sin, timestep_embedding


# --------------------------------------------------------------------------- contract

@dataclass(frozen=True)
class DiTContract:
    """Names, shapes and dynamic axes of an expert graph (TensorRT demo/Diffusion style)."""

    config: DiTConfig

    input_names = ("tokens", "t_emb", "context", "rope_cos", "rope_sin")
    output_names = ("out",)

    @property
    def token_dim(self) -> int:
        return self.config.in_dim * math.prod(self.config.patch_size)

    @property
    def out_dim(self) -> int:
        return self.config.out_dim * math.prod(self.config.patch_size)

    def shapes(self, batch: int, tokens: int) -> dict[str, tuple[int, ...]]:
        c = self.config
        half = c.head_dim // 2
        return {"tokens": (batch, tokens, self.token_dim), "t_emb": (batch, c.freq_dim),
                "context": (batch, c.text_len, c.text_dim), "rope_cos": (tokens, half), "rope_sin": (tokens, half),
                "out": (batch, tokens, self.out_dim)}

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {"tokens": {0: "batch", 1: "tokens"}, "t_emb": {0: "batch"}, "context": {0: "batch"},
                "rope_cos": {0: "tokens"}, "rope_sin": {0: "tokens"}, "out": {0: "batch", 1: "tokens"}}


@dataclass(frozen=True)
class TokenGrid:
    """Token counts of a shot size: per latent frame, per shot, and with memory."""

    latent_frames: int  # frames of the shot itself, (frame_num - 1) / 4 + 1
    h: int  # patched grid
    w: int

    @property
    def per_frame(self) -> int:
        return self.h * self.w

    def tokens(self, memory: int) -> int:
        return (self.latent_frames + memory) * self.per_frame


def token_grid(size: tuple[int, int], frame_num: int, config: DiTConfig, vae: VAEConfig | None = None) -> TokenGrid:
    """size (W, H) in pixels -> the patched token grid of one shot (832*480, 81 frames: 21 x 30 x 52)."""
    w, h = size
    st, sh, sw = (vae or VAEConfig()).stride
    pt, ph, pw = config.patch_size
    if (frame_num - 1) % st:
        raise ValueError(f"frame_num must be {st}n+1, got {frame_num}")
    if h % (sh * ph) or w % (sw * pw):
        raise ValueError(f"size {w}*{h} must be a multiple of {sw * pw}*{sh * ph}")
    lat_f = (frame_num - 1) // st + 1
    if lat_f % pt:
        raise ValueError(f"{lat_f} latent frames are not divisible by patch_t {pt}")
    return TokenGrid(latent_frames=lat_f // pt, h=h // (sh * ph), w=w // (sw * pw))


# --------------------------------------------------------------------------- host-side pre/post

def patchify(x: Tensor, y: Tensor | None, patch: tuple[int, int, int]) -> tuple[Tensor, tuple[int, int, int]]:
    """x [B, C, F, H, W] (+ y on channels) -> tokens [B, f*h*w, C*pt*ph*pw] float32, grid (f, h, w).
    Channel order per token (c, pt, ph, pw) = Conv3d weight.flatten(1)'s order."""
    if y is not None:
        x = torch.cat([x, y], dim=1)
    b, c, f, h, w = x.shape
    pt, ph, pw = patch
    x = x.reshape(b, c, f // pt, pt, h // ph, ph, w // pw, pw).permute(0, 2, 4, 6, 1, 3, 5, 7)
    grid = (f // pt, h // ph, w // pw)
    return x.reshape(b, math.prod(grid), c * pt * ph * pw).float().contiguous(), grid


def graph_inputs(model_config: DiTConfig, x: Tensor, t: Tensor, context: Tensor, y: Tensor | None = None,
                 frame_pos=None) -> tuple[dict[str, np.ndarray], tuple[int, int, int]]:
    """The ONNX feeds for one WanDiT.forward call (same meaning as its arguments)."""
    c = model_config
    tokens, grid = patchify(x, y, c.patch_size)
    b = tokens.shape[0]
    t = t.reshape(-1)
    if t.numel() == 1:
        t = t.expand(b)
    t_emb = timestep_embedding(t.cpu(), c.freq_dim).float()
    ctx = torch.nn.functional.pad(context.float().cpu(), (0, 0, 0, c.text_len - context.shape[1]))
    f, h, w = grid
    pos = torch.arange(f) if frame_pos is None else torch.as_tensor(frame_pos)
    cos, sin = rope_cos_sin(pos, h, w, c.head_dim)
    feeds = {"tokens": tokens.cpu(), "t_emb": t_emb, "context": ctx, "rope_cos": cos, "rope_sin": sin}
    return {k: v.contiguous().numpy() for k, v in feeds.items()}, grid


def unpatchify(out: Tensor, grid: tuple[int, int, int], config: DiTConfig) -> Tensor:
    """out [B, f*h*w, pt*ph*pw*out_dim] -> [B, out_dim, F, H, W] (WanDiT.unpatchify's layout)."""
    (f, h, w), (pt, ph, pw), c = grid, config.patch_size, config.out_dim
    x = out.reshape(out.shape[0], f, h, w, pt, ph, pw, c).permute(0, 7, 1, 4, 2, 5, 3, 6)
    return x.reshape(out.shape[0], c, f * pt, h * ph, w * pw)
