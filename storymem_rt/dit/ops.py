"""The DiT's elementwise and attention pieces, each in the forms the model's `ops` option picks.

- "reference": upstream's op order and roundings (Wan2.2 `model.py`: `WanRMSNorm` rounds to the
  compute dtype before its weight, `rope_apply` rotates the rounded q/k in float32). The golden
  fixtures are checked on this form.
- "torch": the same math with one rounding per result (norm, weight and rotation in float32, then
  one cast), written so that torch.compile fuses it.
- "kernels": our Triton kernels (`storymem_rt.kernels`: adaLN, gated residual, q/k RMSNorm + RoPE in
  one pass), which fall back to the "torch" form where they cannot run (CPU without the interpreter).
In float32 the three agree to summation order. Attention goes through `kernels.attention.attend`,
whose implementation name the model receives as an option.

Shapes: x [B, L, C] float32 residual; q/k/v [B, L, H, D]; tables [L, D/2].
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..kernels.adaln import adaln_modulate, gated_residual
from ..kernels.qk_norm_rope import RopeTables, qk_norm_rope as _qk_norm_rope_kernel, rope_tables

OPS = ("reference", "torch", "kernels")
ROPE_THETA = 10000.0


# --------------------------------------------------------------------------- embeddings

def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal timestep embedding, float64. t [B] -> [B, dim] as [cos | sin].

    Matches Wan2.2 `sinusoidal_embedding_1d`: frequencies 10000^(-i/half), i < half, in float64."""
    if dim % 2:
        raise ValueError(f"freq_dim must be even, got {dim}")
    half = dim // 2
    t = t.to(torch.float64)
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = t[:, None] * freqs[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


class Rope(NamedTuple):
    """RoPE of one token grid: `tables` (per-axis rows, what the fused kernel reads; None when the
    caller passed per-token tables) and per-token cos, sin [f*h*w, D/2] float32."""

    tables: RopeTables | None
    cos: Tensor
    sin: Tensor


def rope(frame_pos: Tensor | Sequence[float], h: int, w: int, head_dim: int, device=None,
         theta: float = ROPE_THETA) -> Rope:
    """The one RoPE source. frame_pos [F]: the temporal position of each patched frame, any real
    numbers (memory frames at -M..-1, the shot at 0..T-1); height/width positions 0..h-1, 0..w-1.
    Angles in float64 (upstream `rope_params`), cos/sin rounded to float32 once
    (`kernels.qk_norm_rope.rope_tables`, split 22/21/21 pairs at D = 128)."""
    tables = rope_tables(frame_pos, h, w, head_dim, theta, device=device)
    return Rope(tables, *tables.full())


def rope_cos_sin(frame_pos, h: int, w: int, head_dim: int, device=None,
                 theta: float = ROPE_THETA) -> tuple[Tensor, Tensor]:
    """Per-token (cos, sin) [f*h*w, D/2] float32, tokens flattened (f, h, w): `rope(...)`'s tables."""
    r = rope(frame_pos, h, w, head_dim, device, theta)
    return r.cos, r.sin


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x [B, L, H, D] by cos, sin [L, D/2] in float32; returns x's dtype.

    Upstream `rope_apply`: channels (2i, 2i+1) are the complex number x_2i + i x_2i+1, multiplied by
    cos_i + i sin_i."""
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[:, None, :], sin[:, None, :]  # broadcast over heads
    return torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1).flatten(-2).to(x.dtype)


# --------------------------------------------------------------------------- norms

def rms_norm_reference(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Wan2.2 `WanRMSNorm`: `norm(x.float()).type_as(x) * weight`, over the whole last dim."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return xf.to(x.dtype) * weight.to(x.dtype)


def rms_heads(x: Tensor, weight: Tensor, heads: int, eps: float, ops: str) -> Tensor:
    """RMSNorm over the whole row [B, L, H*D] -> [B, L, H, D] in x's dtype (cross-attention q and the
    text k: no RoPE)."""
    if ops == "reference":
        return rms_norm_reference(x, weight, eps).unflatten(-1, (heads, -1))
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps) * weight.float()
    return xf.to(x.dtype).unflatten(-1, (heads, -1))


def qk_norm_rope(q: Tensor, k: Tensor, wq: Tensor, wk: Tensor, rp: Rope, heads: int, eps: float,
                 ops: str) -> tuple[Tensor, Tensor]:
    """Self-attention q, k [B, L, H*D] (rows may be strided views of a fused qkv) -> RMSNorm then RoPE,
    [B, L, H, D] in q's dtype."""
    if ops == "kernels" and rp.tables is not None:
        return _qk_norm_rope_kernel(q, k, wq, wk, rp.tables, heads, eps)
    if ops == "reference":
        return (apply_rope(rms_norm_reference(q, wq, eps).unflatten(-1, (heads, -1)), rp.cos, rp.sin),
                apply_rope(rms_norm_reference(k, wk, eps).unflatten(-1, (heads, -1)), rp.cos, rp.sin))

    def one(x, w):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps) * w.float()
        x0, x1 = xf.unflatten(-1, (heads, -1, 2)).unbind(-1)
        c, s = rp.cos[:, None, :], rp.sin[:, None, :]
        return torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1).flatten(-2).to(x.dtype)

    return one(q, wq), one(k, wk)


def modulate(x: Tensor, shift: Tensor, scale: Tensor, eps: float, dtype: torch.dtype, ops: str) -> Tensor:
    """LayerNorm(x) * (1 + scale) + shift in float32, `dtype` out. x [B, L, C] float32, shift/scale
    [B, 1, C] (or [1, 1, C]). Upstream's norm1/norm2 + modulation (`WanLayerNorm` is float32)."""
    if ops == "kernels":
        b = x.shape[0]
        return adaln_modulate(x, shift.expand(b, -1, -1), scale.expand(b, -1, -1), eps, dtype)
    return (F.layer_norm(x, x.shape[-1:], eps=eps) * (1 + scale) + shift).to(dtype)


def gated_add(x: Tensor, y: Tensor, gate: Tensor, ops: str) -> Tensor:
    """x + gate * y in float32 (x float32 [B, L, C], y compute dtype, gate [B, 1, C])."""
    if ops == "kernels":
        return gated_residual(x, y, gate)
    return x + y.float() * gate


def linear_fp32(layer: nn.Linear, x: Tensor) -> Tensor:
    """A linear layer evaluated in float32 whatever its parameter dtype (upstream's float32 autocast
    regions: time MLPs, modulation, head)."""
    bias = None if layer.bias is None else layer.bias.float()
    return F.linear(x.float(), layer.weight.float(), bias)


def gelu_linear(layer: nn.Module, h: Tensor, epilogue: bool) -> Tensor:
    """gelu_tanh(layer(h)). With `epilogue` on CUDA bf16/fp16 the GELU runs in cuBLASLt's GEMM
    epilogue on the fp32 accumulator (bench/gelu_epilogue.py: 9.44 vs 10.14 ms per A14B layer, error
    vs float32 1.7e-3 vs 2.6e-3). cuBLASLt's GELU is the tanh form, as upstream's; on the CPU
    `_addmm_activation` would compute erf, so not there."""
    if epilogue and h.is_cuda and isinstance(layer, nn.Linear) and layer.bias is not None and \
            h.dtype in (torch.bfloat16, torch.float16):
        return torch._addmm_activation(layer.bias, h.flatten(0, 1), layer.weight.t(), use_gelu=True).unflatten(
            0, h.shape[:2])
    return F.gelu(layer(h), approximate="tanh")
