"""Fused q/k RMSNorm + 3D rotary embedding, one pass over q and k.

From the q and k projections `[B, L, H*D]` (bf16) this applies, per token:
1. Wan's RMSNorm over the whole `H*D` row with its weight (`WanRMSNorm`: `x * rsqrt(mean(x^2) + eps) * w`),
2. Wan's 3D RoPE per head: the head dim's `D/2` rotation pairs `(x[2i], x[2i+1])` split into a
   temporal part of `D/2 - 2*(D//6)` pairs and height and width parts of `D//6` pairs each
   (D = 128: 22/21/21 pairs, i.e. 44/42/42 dims; matches Wan2.2 `model.py` `rope_params`/`rope_apply`),
   theta 10000, frequencies and angles in float64. The temporal position of latent frame `f`
   comes from a position table (`positions[f]`: any values, e.g. memory frames at negative
   positions, the shot at 0..T-1); height/width positions are the token's grid coordinates.
   Tokens are ordered (frame, h, w) row-major; tokens past `frames*grid_h*grid_w` (padding)
   are normalised but not rotated, as `rope_apply` leaves them.

and writes `[B, L, H, D]` contiguous (the layout `attention.py` reads) in bf16, or in FP8 e4m3 /
INT8 with one fp32 scale per (token, head) (`x ≈ x_q * scale[b, l, h]`).

All arithmetic is fp32 after one load; the only rounding of the result is the final store.
`qk_norm_rope_ref` (float64, complex multiply as Wan does it) defines the meaning.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._triton import jit, skip_launch, use_triton

from ..fp8 import FP8_MAX  # noqa: E402  (e4m3fn, one definition)

INT8_MAX = 127.0


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Rotation pairs of the temporal, height and width parts (Wan2.2: `c - 2*(c//3), c//3, c//3`, c = D/2)."""
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for RoPE, got {head_dim}")
    c = head_dim // 2
    return c - 2 * (c // 3), c // 3, c // 3


def _inv_freq(n_pairs: int, theta: float) -> torch.Tensor:
    # rope_params(max_len, dim=2*n_pairs): 1 / theta ** (arange(0, dim, 2) / dim), float64
    dim = 2 * n_pairs
    return 1.0 / torch.pow(theta, torch.arange(0, dim, 2, dtype=torch.float64) / dim)


@dataclass(frozen=True)
class RopeTables:
    """cos/sin [frames + grid_h + grid_w, D/2] float32. Row f < frames holds the temporal angles
    of frame f in the temporal columns; row frames + y the height angles of row y in the height
    columns; row frames + grid_h + x the width angles of column x in the width columns."""

    cos: torch.Tensor
    sin: torch.Tensor
    frames: int
    grid_h: int
    grid_w: int

    @property
    def num_tokens(self) -> int:
        return self.frames * self.grid_h * self.grid_w

    def full(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token tables cos, sin [frames*grid_h*grid_w, D/2] float32 (tokens in (f, h, w) order),
        gathered from these rows: the same float32 values, no new rounding."""
        f, h, w = self.frames, self.grid_h, self.grid_w
        nt, nh, _ = rope_split(self.cos.shape[-1] * 2)
        dev = self.cos.device
        tf = torch.arange(f, device=dev)[:, None, None].expand(f, h, w).reshape(-1)
        th = (f + torch.arange(h, device=dev))[None, :, None].expand(f, h, w).reshape(-1)
        tw = (f + h + torch.arange(w, device=dev))[None, None, :].expand(f, h, w).reshape(-1)

        def gather(tab):
            return torch.cat([tab[tf, :nt], tab[th, nt:nt + nh], tab[tw, nt + nh:]], dim=-1)

        return gather(self.cos), gather(self.sin)


def rope_tables(positions, grid_h: int, grid_w: int, head_dim: int, theta: float = 10000.0,
                device: torch.device | str | None = None) -> RopeTables:
    """Tables for `qk_norm_rope`: angles in float64 (as Wan's buffers), cos/sin rounded to float32."""
    pos = torch.as_tensor(positions, dtype=torch.float64, device="cpu").reshape(-1)
    if pos.numel() == 0 or grid_h < 1 or grid_w < 1:
        raise ValueError(f"need at least one frame and a grid of at least 1x1, got "
                         f"{pos.numel()} frames and {grid_h}x{grid_w}")
    nt, nh, nw = rope_split(head_dim)
    frames = pos.numel()
    ang = torch.zeros(frames + grid_h + grid_w, head_dim // 2, dtype=torch.float64)
    ang[:frames, :nt] = torch.outer(pos, _inv_freq(nt, theta))
    ang[frames:frames + grid_h, nt:nt + nh] = torch.outer(
        torch.arange(grid_h, dtype=torch.float64), _inv_freq(nh, theta))
    ang[frames + grid_h:, nt + nh:] = torch.outer(
        torch.arange(grid_w, dtype=torch.float64), _inv_freq(nw, theta))
    return RopeTables(torch.cos(ang).float().to(device), torch.sin(ang).float().to(device),
                      frames, grid_h, grid_w)


# ----------------------------------------------------------------------------- reference


def rope_freqs_ref(positions, grid_h: int, grid_w: int, head_dim: int,
                   theta: float = 10000.0) -> torch.Tensor:
    """complex128 [frames*grid_h*grid_w, D/2], as Wan2.2 `rope_apply` builds `freqs_i`. The split
    and frequencies are spelled out again here, so that a bug in `rope_split` or `rope_tables`
    cannot hide in the reference."""
    pos = torch.as_tensor(positions, dtype=torch.float64).reshape(-1)
    c = head_dim // 2
    nt, nh, nw = c - 2 * (c // 3), c // 3, c // 3  # Wan2.2 model.py: freqs.split([c - 2*(c//3), c//3, c//3])

    def params(n_pos, dim):  # Wan2.2 rope_params(max_seq_len, dim) evaluated at the given positions
        return torch.polar(torch.ones(n_pos.numel(), dim // 2, dtype=torch.float64), torch.outer(
            n_pos, 1.0 / torch.pow(theta, torch.arange(0, dim, 2, dtype=torch.float64).div(dim))))

    f, h, w = pos.numel(), grid_h, grid_w
    ft = params(pos, 2 * nt)
    fh = params(torch.arange(h, dtype=torch.float64), 2 * nh)
    fw = params(torch.arange(w, dtype=torch.float64), 2 * nw)
    return torch.cat([ft[:, None, None, :].expand(f, h, w, nt),
                      fh[None, :, None, :].expand(f, h, w, nh),
                      fw[None, None, :, :].expand(f, h, w, nw)], dim=-1).reshape(f * h * w, -1)


def qk_norm_rope_ref(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                     positions, grid_h: int, grid_w: int, num_heads: int, eps: float = 1e-6,
                     theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 [B, L, H, D] results for q, k [B, L, H*D]."""
    B, L, C = q.shape
    D = C // num_heads
    freqs = rope_freqs_ref(positions, grid_h, grid_w, D, theta).to(q.device)
    n = min(L, freqs.shape[0])

    def one(x, w):
        x = x.double()
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w.double()
        y = torch.view_as_complex(y.reshape(B, L, num_heads, D // 2, 2).contiguous())
        y[:, :n] = y[:, :n] * freqs[:n, None, :]
        return torch.view_as_real(y).reshape(B, L, num_heads, D)

    return one(q, q_weight), one(k, k_weight)


def quantize_per_head_ref(x: torch.Tensor, fp8: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, L, H, D] -> (values, scale [B, L, H] fp32): scale = amax over D / qmax, as the kernel does."""
    xf = x.float()
    qmax = FP8_MAX if fp8 else INT8_MAX
    scale = xf.abs().amax(-1).clamp_min(1e-12) / qmax
    v = xf / scale[..., None]
    if fp8:
        return v.to(torch.float8_e4m3fn), scale
    return torch.round(v).clamp(-127, 127).to(torch.int8), scale  # kernel rounds half away from 0


# ----------------------------------------------------------------------------- kernel


@jit
def _norm_rope_row(X, O, S, w, c, s, eps, H: tl.constexpr, D: tl.constexpr,
                   BLOCK_H: tl.constexpr, QUANT: tl.constexpr):
    offs_h = tl.arange(0, BLOCK_H)
    hd = offs_h[:, None] * D + tl.arange(0, D)[None, :]
    m = hd < H * D
    x = tl.load(X + hd, mask=m, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(tl.sum(x * x, axis=1), axis=0) / (H * D) + eps)
    y = x * rstd * w
    # consecutive pairs (x[2i], x[2i+1]) are one complex number in rope_apply
    ye, yo = tl.split(tl.reshape(y, [BLOCK_H, D // 2, 2]))
    oe = ye * c[None, :] - yo * s[None, :]
    oo = ye * s[None, :] + yo * c[None, :]
    out = tl.reshape(tl.join(oe, oo), [BLOCK_H, D])
    if QUANT == 0:
        tl.store(O + hd, out.to(O.dtype.element_ty), mask=m)
    else:
        qmax = 448.0 if QUANT == 1 else 127.0
        scale = tl.maximum(tl.max(tl.abs(out), axis=1), 1e-12) / qmax
        v = out / scale[:, None]
        if QUANT == 2:
            v = tl.where(v >= 0, v + 0.5, v - 0.5)  # fp32 -> int truncates: round half away from 0
        tl.store(O + hd, v.to(O.dtype.element_ty), mask=m)
        tl.store(S + offs_h, scale, mask=offs_h < H)


@jit
def _qk_norm_rope_kernel(Q, K, WQ, WK, COS, SIN, QO, KO, QS, KS,
                         n_tok, L, F, GH, GW,
                         stride_qb, stride_ql, stride_kb, stride_kl, eps,
                         H: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr,
                         NT: tl.constexpr, NH: tl.constexpr, TOK: tl.constexpr, QUANT: tl.constexpr):
    offs_h = tl.arange(0, BLOCK_H)
    hd = offs_h[:, None] * D + tl.arange(0, D)[None, :]
    m = hd < H * D
    # weights stay in registers for the TOK tokens of this program
    wq = tl.load(WQ + hd, mask=m, other=0.0).to(tl.float32)
    wk = tl.load(WK + hd, mask=m, other=0.0).to(tl.float32)
    j = tl.arange(0, D // 2)
    part = tl.where(j < NT, 0, tl.where(j < NT + NH, 1, 2))
    hw = GH * GW
    for i in range(TOK):
        t = tl.program_id(0).to(tl.int64) * TOK + i
        if t < n_tok:
            b = t // L
            l = t - b * L
            f = l // hw
            r = l - f * hw
            y = r // GW
            x = r - y * GW
            row = tl.where(part == 0, f, tl.where(part == 1, F + y, F + GH + x))
            in_grid = (j < D // 2) & (f < F)
            c = tl.load(COS + row * (D // 2) + j, mask=in_grid, other=1.0)
            s = tl.load(SIN + row * (D // 2) + j, mask=in_grid, other=0.0)
            _norm_rope_row(Q + b * stride_qb + l * stride_ql, QO + t * (H * D), QS + t * H,
                           wq, c, s, eps, H, D, BLOCK_H, QUANT)
            _norm_rope_row(K + b * stride_kb + l * stride_kl, KO + t * (H * D), KS + t * H,
                           wk, c, s, eps, H, D, BLOCK_H, QUANT)


# ----------------------------------------------------------------------------- launchers

# Tokens per program and warps, tuned on H100 at H*D = 5120 (bench/kernels.py, kernels/NOTES.md).
TOKENS_PER_PROGRAM = 1
NUM_WARPS = 4


def _check(q, k, q_weight, k_weight, cos, num_heads):
    if q.dim() != 3 or q.shape != k.shape:
        raise ValueError(f"q and k must both be [B, L, H*D], got {tuple(q.shape)} and {tuple(k.shape)}")
    if q.shape[-1] % num_heads:
        raise ValueError(f"row width {q.shape[-1]} is not divisible by num_heads {num_heads}")
    if q_weight.numel() != q.shape[-1] or k_weight.numel() != q.shape[-1]:
        raise ValueError(f"norm weights must have {q.shape[-1]} entries")
    if cos.shape[-1] * 2 != q.shape[-1] // num_heads:
        raise ValueError(f"rope tables are for head_dim {cos.shape[-1] * 2}, "
                         f"q has head_dim {q.shape[-1] // num_heads}")


def qk_norm_rope_torch(q, k, q_weight, k_weight, cos, sin, frames, grid_h, grid_w, num_heads, eps):
    """fp32 torch version over the same tables, for CPU tensors when Triton cannot run."""
    B, L, C = q.shape
    D = C // num_heads
    nt, nh, _ = rope_split(D)
    n = min(L, frames * grid_h * grid_w)
    t = torch.arange(n, device=q.device)
    f, y, x = t // (grid_h * grid_w), (t // grid_w) % grid_h, t % grid_w
    j = torch.arange(D // 2, device=q.device)
    row = torch.where(j < nt, f[:, None], torch.where(j < nt + nh, frames + y[:, None],
                                                      frames + grid_h + x[:, None]))
    c = torch.ones(L, D // 2, device=q.device)
    s = torch.zeros(L, D // 2, device=q.device)
    c[:n] = cos[row, j]
    s[:n] = sin[row, j]

    def one(v, w):
        v = v.float()
        v = v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps) * w.float()
        v = v.reshape(B, L, num_heads, D // 2, 2)
        ve, vo = v[..., 0], v[..., 1]
        cc, ss = c[None, :, None, :], s[None, :, None, :]
        return torch.stack([ve * cc - vo * ss, ve * ss + vo * cc], -1).reshape(B, L, num_heads, D)

    return one(q, q_weight), one(k, k_weight)


def _launch(q, k, q_weight, k_weight, cos, sin, frames, grid_h, grid_w, num_heads, eps, quant,
            qo, ko, qs, ks):
    B, L, C = q.shape
    D = C // num_heads
    nt, nh, _ = rope_split(D)
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError("q and k rows must be contiguous (stride 1 along H*D)")
    n_tok = B * L
    if skip_launch(_qk_norm_rope_kernel, q):
        return
    grid = (triton.cdiv(n_tok, TOKENS_PER_PROGRAM),)
    torch.library.wrap_triton(_qk_norm_rope_kernel)[grid](
        q, k, q_weight, k_weight, cos, sin, qo, ko, qs, ks,
        n_tok, L, frames, grid_h, grid_w,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), eps,
        H=num_heads, D=D, BLOCK_H=triton.next_power_of_2(num_heads), NT=nt, NH=nh,
        TOK=TOKENS_PER_PROGRAM, QUANT=quant, num_warps=NUM_WARPS)


@torch.library.triton_op("storymem::qk_norm_rope", mutates_args=())
def _qk_norm_rope_op(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                     cos: torch.Tensor, sin: torch.Tensor, frames: int, grid_h: int, grid_w: int,
                     num_heads: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    B, L, C = q.shape
    if not use_triton(q):
        qo, ko = qk_norm_rope_torch(q, k, q_weight, k_weight, cos, sin, frames, grid_h, grid_w, num_heads, eps)
        return qo.to(q.dtype), ko.to(q.dtype)
    shape = (B, L, num_heads, C // num_heads)
    qo = torch.empty(shape, dtype=q.dtype, device=q.device)
    ko = torch.empty(shape, dtype=q.dtype, device=q.device)
    dummy = torch.empty(1, dtype=torch.float32, device=q.device)
    _launch(q, k, q_weight, k_weight, cos, sin, frames, grid_h, grid_w, num_heads, eps, 0, qo, ko, dummy, dummy)
    return qo, ko


@torch.library.triton_op("storymem::qk_norm_rope_quant", mutates_args=())
def _qk_norm_rope_quant_op(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                           cos: torch.Tensor, sin: torch.Tensor, frames: int, grid_h: int, grid_w: int,
                           num_heads: int, eps: float, fp8: bool
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    B, L, C = q.shape
    if not use_triton(q):
        qo, ko = qk_norm_rope_torch(q, k, q_weight, k_weight, cos, sin, frames, grid_h, grid_w, num_heads, eps)
        q8, qs = quantize_per_head_ref(qo, fp8)
        k8, ks = quantize_per_head_ref(ko, fp8)
        return q8, qs, k8, ks
    shape = (B, L, num_heads, C // num_heads)
    dt = torch.float8_e4m3fn if fp8 else torch.int8
    qo = torch.empty(shape, dtype=dt, device=q.device)
    ko = torch.empty(shape, dtype=dt, device=q.device)
    qs = torch.empty(B, L, num_heads, dtype=torch.float32, device=q.device)
    ks = torch.empty(B, L, num_heads, dtype=torch.float32, device=q.device)
    _launch(q, k, q_weight, k_weight, cos, sin, frames, grid_h, grid_w, num_heads, eps,
            1 if fp8 else 2, qo, ko, qs, ks)
    return qo, qs, ko, ks


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                 rope: RopeTables, num_heads: int, eps: float = 1e-6,
                 quant: str | None = None):
    """q, k [B, L, H*D] -> (q, k) [B, L, H, D] in q's dtype, or with `quant` in {"fp8", "int8"}
    (q_q, q_scale, k_q, k_scale) with values [B, L, H, D] and fp32 scales [B, L, H]."""
    _check(q, k, q_weight, k_weight, rope.cos, num_heads)
    if rope.cos.device != q.device:
        raise ValueError(f"rope tables are on {rope.cos.device}, q is on {q.device}: "
                         "build them with rope_tables(..., device=q.device)")
    args = (q, k, q_weight, k_weight, rope.cos, rope.sin, rope.frames, rope.grid_h, rope.grid_w,
            num_heads, float(eps))
    if quant is None:
        return torch.ops.storymem.qk_norm_rope(*args)
    if quant not in ("fp8", "int8"):
        raise ValueError(f"quant must be None, 'fp8' or 'int8', got {quant!r}")
    return torch.ops.storymem.qk_norm_rope_quant(*args, quant == "fp8")
