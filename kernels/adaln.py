"""Fused adaLN pieces of the Wan DiT block.

- `adaln_modulate(x, shift, scale)`: `LayerNorm(x) * (1 + scale) + shift` in one pass, LayerNorm
  without affine over the last dim (Wan's `WanLayerNorm(dim, eps, elementwise_affine=False)`),
  fp32 math, bf16 out. Wan2.2 computes `norm(x.float()).type_as(x).float() * (1 + e[1]) + e[0]`
  in fp32; we skip the intermediate bf16 rounding.
- `gated_residual(x, y, gate)`: `x + gate * y`, fp32 math, out in x's dtype (Wan's
  `x = x + y * e[2]` under fp32 autocast).

x, y: [B, L, C]; shift, scale, gate: [B, 1, C] (one modulation per sample, Wan2.2 A14B) or
[B, L, C] (per token), any float dtype. Rows must be contiguous.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton import jit, skip_launch, use_triton

# Rows per program and warps, tuned on H100 at C = 5120 (bench/kernels.py, kernels/NOTES.md).
ROWS_PER_PROGRAM = 1
NUM_WARPS = 4
GR_ROWS_PER_PROGRAM = 1
GR_NUM_WARPS = 8


def adaln_modulate_ref(x, shift, scale, eps: float = 1e-6):
    """float64 result."""
    x = x.double()
    return torch.nn.functional.layer_norm(x, x.shape[-1:], eps=eps) * (1 + scale.double()) + shift.double()


def gated_residual_ref(x, y, gate):
    """float64 result."""
    return x.double() + gate.double() * y.double()


@jit
def _ln_modulate_kernel(X, SHIFT, SCALE, O, n_rows, L, C, stride_xr,
                        stride_sb, stride_sl, stride_cb, stride_cl, eps,
                        BLOCK_C: tl.constexpr, ROWS: tl.constexpr):
    cols = tl.arange(0, BLOCK_C)
    cm = cols < C
    for i in range(ROWS):
        r = tl.program_id(0).to(tl.int64) * ROWS + i
        if r < n_rows:
            b = r // L
            l = r - b * L
            x = tl.load(X + r * stride_xr + cols, mask=cm, other=0.0).to(tl.float32)
            mean = tl.sum(x, axis=0) / C
            xc = tl.where(cm, x - mean, 0.0)
            rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / C + eps)
            sh = tl.load(SHIFT + b * stride_sb + l * stride_sl + cols, mask=cm, other=0.0).to(tl.float32)
            sc = tl.load(SCALE + b * stride_cb + l * stride_cl + cols, mask=cm, other=0.0).to(tl.float32)
            y = xc * rstd * (1.0 + sc) + sh
            tl.store(O + r * C + cols, y.to(O.dtype.element_ty), mask=cm)


@jit
def _gated_residual_kernel(X, Y, G, O, n_rows, L, C, stride_xr, stride_yr, stride_gb, stride_gl,
                           BLOCK_C: tl.constexpr, ROWS: tl.constexpr):
    cols = tl.arange(0, BLOCK_C)
    cm = cols < C
    for i in range(ROWS):
        r = tl.program_id(0).to(tl.int64) * ROWS + i
        if r < n_rows:
            b = r // L
            l = r - b * L
            x = tl.load(X + r * stride_xr + cols, mask=cm, other=0.0).to(tl.float32)
            y = tl.load(Y + r * stride_yr + cols, mask=cm, other=0.0).to(tl.float32)
            g = tl.load(G + b * stride_gb + l * stride_gl + cols, mask=cm, other=0.0).to(tl.float32)
            tl.store(O + r * C + cols, (x + g * y).to(O.dtype.element_ty), mask=cm)


def _mod_strides(m: torch.Tensor, x: torch.Tensor, name: str) -> tuple[int, int]:
    B, L, C = x.shape
    if m.dim() != 3 or m.shape[0] != B or m.shape[1] not in (1, L) or m.shape[2] != C or m.stride(2) != 1:
        raise ValueError(f"{name} must be [B, 1, C] or [B, L, C] with contiguous C for x {tuple(x.shape)}, "
                         f"got {tuple(m.shape)}")
    return m.stride(0), (m.stride(1) if m.shape[1] == L and L > 1 else 0)


def _rows(x: torch.Tensor, name: str) -> int:
    if x.dim() != 3 or x.stride(2) != 1 or x.stride(0) != x.shape[1] * x.stride(1):
        raise ValueError(f"{name} must be [B, L, C] with contiguous rows, got shape {tuple(x.shape)} "
                         f"strides {x.stride()}")
    return x.stride(1)


@torch.library.triton_op("storymem::adaln_modulate", mutates_args=())
def _adaln_modulate_op(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
                       out_dtype: torch.dtype) -> torch.Tensor:
    if not use_triton(x):
        xf = x.float()
        y = torch.nn.functional.layer_norm(xf, xf.shape[-1:], eps=eps) * (1 + scale.float()) + shift.float()
        return y.to(out_dtype)
    B, L, C = x.shape
    out = torch.empty((B, L, C), dtype=out_dtype, device=x.device)
    ssb, ssl = _mod_strides(shift, x, "shift")
    scb, scl = _mod_strides(scale, x, "scale")
    if skip_launch(_ln_modulate_kernel, x):
        return out
    grid = (triton.cdiv(B * L, ROWS_PER_PROGRAM),)
    torch.library.wrap_triton(_ln_modulate_kernel)[grid](
        x, shift, scale, out, B * L, L, C, _rows(x, "x"), ssb, ssl, scb, scl, eps,
        BLOCK_C=triton.next_power_of_2(C), ROWS=ROWS_PER_PROGRAM, num_warps=NUM_WARPS)
    return out


@torch.library.triton_op("storymem::gated_residual", mutates_args=())
def _gated_residual_op(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    if not use_triton(x):
        return (x.float() + gate.float() * y.float()).to(x.dtype)
    B, L, C = x.shape
    out = torch.empty((B, L, C), dtype=x.dtype, device=x.device)
    gb, gl = _mod_strides(gate, x, "gate")
    if skip_launch(_gated_residual_kernel, x):
        return out
    grid = (triton.cdiv(B * L, GR_ROWS_PER_PROGRAM),)
    torch.library.wrap_triton(_gated_residual_kernel)[grid](
        x, y, gate, out, B * L, L, C, _rows(x, "x"), _rows(y, "y"), gb, gl,
        BLOCK_C=triton.next_power_of_2(C), ROWS=GR_ROWS_PER_PROGRAM, num_warps=GR_NUM_WARPS)
    return out


def adaln_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6,
                   out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """LayerNorm(x) * (1 + scale) + shift; x [B, L, C], shift/scale [B, 1 or L, C] -> [B, L, C] out_dtype."""
    if x.dim() != 3:
        raise ValueError(f"x must be [B, L, C], got shape {tuple(x.shape)}")
    return torch.ops.storymem.adaln_modulate(x, shift, scale, float(eps), out_dtype)


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x + gate * y; x, y [B, L, C], gate [B, 1 or L, C] -> [B, L, C] in x's dtype."""
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    return torch.ops.storymem.gated_residual(x, y, gate)
