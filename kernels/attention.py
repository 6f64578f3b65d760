"""Flash attention over [memory ; shot] tokens, reading the projection layout directly.

q [B, Lq, H, D], k and v [B, Lk, H, D] (D = 128; any lengths; the layout the q/k/v projections
and `qk_norm_rope` write, i.e. [B, L, H*D] viewed per head: no transposes) -> out [B, Lq, H, D].
Non-causal, one softmax over all keys (the memory frames are ordinary keys at shifted RoPE
positions), fp32 accumulation.

Modes (`_attn_fwd_kernel`'s MODE):
- 0 "bf16": bf16 Q.K and P.V on the tensor cores. On Hopper `flash_attention` runs this mode with
  the warp-specialized Gluon kernel in attention_gluon.py (same softmax, overlapped with the MMAs,
  the key mask on the last block only and a bounded lazy rescale; 1.20x cuDNN where this `tl`
  kernel reaches 0.90x); `flash_attention(..., kernel="tl")` (attention "triton-tl") keeps the kernel below, which is also what the
  CPU interpreter tests.
- 1 "int8-fp8" (SageAttention2-style): Q as INT8 with one scale per (token, head); K smoothed
  by its mean over tokens (exact: softmax ignores a per-row constant) and INT8 with one scale
  per block of `k_block` tokens; P scaled by 448 into e4m3's range, V smoothed by its mean
  (added back at the end, exact since softmax rows sum to 1) and e4m3 with one scale per
  channel, transposed to [B, H, D, L] because Hopper's FP8 MMA wants V K-major.
- 2 "int8": INT8 Q.K as in mode 1, bf16 P.V.
- 3 "int8-int8": INT8 Q.K as in mode 1 and INT8 P.V: V smoothed and INT8 with one scale per
  channel (transposed like mode 1); P quantized against each key block's own row max, on the
  signed grid round(254 p) - 127 (255 levels; the +127 comes back through each block's column
  sums of V, precomputed). Relative to the block max the values that matter keep ~8 bits,
  where e4m3 keeps 3 mantissa bits whatever the scale. On Hopper this mode runs as a
  warp-specialized Gluon kernel (attention_gluon.py: three consumer warpgroups, P on the unsigned
  grid round(255 p) against V + 128, so that P.V needs one FMA per output element; 1.52x cuDNN where
  the `tl` kernel below reaches 1.02x), unless `kernel="tl"`.

Error against float64 on RMS-normalised, RoPE-rotated random inputs at L = 48k, and speed on an
H100 (docs/PERF.md): bf16 2.3e-3, 0.90x cuDNN (the Gluon kernel: 1.20x); int8 1.2e-2, 1.11x;
int8-int8 1.6e-2, 1.02x (the Gluon kernel: 1.52x); int8-fp8 3.6e-2, 1.32x. On random data the
output is an incoherent sum, so every per-element rounding of P and V shows up in full: e4m3
rounds each element with ~2.6% rms relative error, so FP8 P alone costs ~2.6e-2 whatever the
scaling; V's rounding costs ~2e-2 once the mean of its rounding errors per channel is taken off the
output (`quantize_qkv`). Mode 3 pays for its accuracy with a per-block pass over the int32 P.V tile
on the CUDA cores (an integer add and two FMAs per element here, one FMA in the Gluon kernel;
kernels/NOTES.md).

`attend(q, k, v, impl)` is the dispatcher the DiT calls (`choose` resolves "auto": per shape it times
our bf16 kernel against cuDNN once and keeps the faster).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._triton import device_supports_tma, is_hopper, jit, use_triton

log = logging.getLogger("storymem_rt.kernels.attention")

LOG2E = 1.4426950408889634
from ..fp8 import FP8_MAX  # noqa: E402  (one definition)

MODES = {"bf16": 0, "int8-fp8": 1, "int8": 2, "int8-int8": 3}

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # triton < 3.4
    TensorDescriptor = None


# ----------------------------------------------------------------------------- references


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """float64 softmax(q k^T * scale) v over [B, L, H, D] tensors."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k, v = (t.double().transpose(1, 2) for t in (q, k, v))
    p = torch.softmax((q @ k.transpose(-1, -2)) * scale, dim=-1)
    return (p @ v).transpose(1, 2)


def quantize_qkv_ref(q, k, v, k_block: int = 128, v_int8: bool = False):
    """The quantization of modes 1/2 in plain torch (float32 math). Returns dequantized fp32 q, k, v
    [B, L, H, D] (k and v smoothed: without their means), k's mean, and the shift added to the
    output: v's mean less the mean rounding error of v (see quantize_qkv)."""
    qf, kf, vf = q.float(), k.float(), v.float()
    qs = qf.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 127
    qd = _round_half_away(qf / qs).clamp(-127, 127) * qs
    k_mean = kf.mean(1, keepdim=True)
    kc = kf - k_mean
    B, L, H, D = kc.shape
    nb = -(-L // k_block)
    kp = torch.nn.functional.pad(kc, (0, 0, 0, 0, 0, nb * k_block - L)).reshape(B, nb, k_block, H, D)
    ks = kp.abs().amax(dim=(2, 4), keepdim=True).clamp_min(1e-12) / 127
    kd = (_round_half_away(kp / ks).clamp(-127, 127) * ks).reshape(B, nb * k_block, H, D)[:, :L]
    v_mean = vf.mean(1, keepdim=True)
    vc = vf - v_mean
    vs = vc.abs().amax(1, keepdim=True).clamp_min(1e-12) / FP8_MAX
    if v_int8:
        vs = vc.abs().amax(1, keepdim=True).clamp_min(1e-12) / 127
        vd = _round_half_away(vc / vs).clamp(-127, 127) * vs
    else:
        vd = (vc / vs).to(torch.float8_e4m3fn).float() * vs
    v_shift = v_mean - (vd - vc).mean(1, keepdim=True)
    return qd, kd, vd, k_mean, v_shift


def _round_half_away(x):
    return torch.trunc(x + torch.where(x >= 0, 0.5, -0.5))


def attention_lp_ref(q, k, v, scale: float | None = None, mode: str = "int8-fp8", k_block: int = 128,
                     block_n: int = 128):
    """What modes 1-3 compute, emulated in torch: quantized q, k (and v for modes 1, 3); P rounded
    to e4m3 after scaling by 448 with the exact row max (mode 1: the kernel's running max only
    changes which values round where), or to round(254 p) / 254 against each `block_n`-key block's
    row max (mode 3, exactly the kernel's grid). float64 out."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qd, kd, vd, _, v_shift = quantize_qkv_ref(q, k, v, k_block, v_int8=mode == "int8-int8")
    qd, kd = qd.double().transpose(1, 2), kd.double().transpose(1, 2)
    s = (qd @ kd.transpose(-1, -2)) * scale
    p = torch.exp(s - s.amax(-1, keepdim=True))
    l = p.sum(-1, keepdim=True)
    if mode == "int8-fp8":
        p8 = (p * FP8_MAX).float().to(torch.float8_e4m3fn).double() / FP8_MAX
        o = (p8 @ vd.double().transpose(1, 2)) / l + v_shift.double().transpose(1, 2)
    elif mode == "int8":
        o = (p.bfloat16().double() @ v.bfloat16().double().transpose(1, 2)) / l
    elif mode == "int8-int8":
        Lk = s.shape[-1]
        nb = -(-Lk // block_n)
        sp = F.pad(s, (0, nb * block_n - Lk), value=-math.inf).unflatten(-1, (nb, block_n))
        m_blk = sp.amax(-1, keepdim=True)
        pl = torch.exp(sp - m_blk)
        p8 = (torch.round(pl * 254) / 254 * torch.exp(m_blk - s.amax(-1, keepdim=True)[..., None]))
        p8 = p8.flatten(-2)[..., :Lk]
        o = (p8 @ vd.double().transpose(1, 2)) / l + v_shift.double().transpose(1, 2)
    else:
        raise ValueError(f"mode must be 'int8-fp8', 'int8' or 'int8-int8', got {mode!r}")
    return o.transpose(1, 2)


# ----------------------------------------------------------------------------- kernels


@jit
def _attn_step(acc, l_i, m_i, q, row_fac, desc_k, desc_v, KS, VADD, kv_row, kv_col, vt_row, n0, Lk,
               D: tl.constexpr, BLOCK_N: tl.constexpr, MODE: tl.constexpr, K_BLOCK: tl.constexpr,
               MASK: tl.constexpr, DOT_F32: tl.constexpr):
    k = desc_k.load([kv_row + n0, kv_col])
    if MODE == 0:
        if DOT_F32:
            s = tl.dot(q.to(tl.float32), k.to(tl.float32).T)
        else:
            s = tl.dot(q, k.T)
        fac = row_fac
        base = tl.zeros_like(fac)
    else:
        # |q.k| <= 127 * 127 * D < 2^22: int32 -> fp32 by adding the bit pattern of 1.5 * 2^23 and
        # reinterpreting (the float is exactly q.k + 12582912). Saves a conversion per element, which
        # would run on the same slow unit as exp2; the offset folds into the FMA below.
        s = (tl.dot(q, k.T) + 0x4B400000).to(tl.float32, bitcast=True)
        fac = row_fac * tl.load(KS + n0 // K_BLOCK)
        base = 12582912.0 * fac
    if MASK:
        # keys past Lk: zero-filled by TMA at the end of the tensor, the next sample's keys otherwise
        s = tl.where((n0 + tl.arange(0, BLOCK_N))[None, :] < Lk, s, float("-inf"))
    m_blk = tl.max(s, 1) * fac - base  # this block's row max (log2 units)
    m_new = tl.maximum(m_i, m_blk)
    alpha = tl.math.exp2(m_i - m_new)
    if MODE == 3:
        # P against this block's own row max, on the signed grid n = round(254 p) - 127: the float
        # 254 p + (1.5 * 2^23 - 127) holds n + 1.5 * 2^23 exactly (round to nearest even), and its
        # low byte is n
        p = tl.math.exp2(s * fac[:, None] - (base + m_blk)[:, None])
        beta = tl.math.exp2(m_blk - m_new)
        pn = ((p * 254.0 + 12582785.0).to(tl.int32, bitcast=True)).to(tl.int8)
        vt = desc_v.load([vt_row, n0])
        # sum_j n_j v_j + 127 sum_j v_j (VADD holds 0x4B400000 + 127 * the block's column sums of V:
        # |254 * 127 * 128| < 2^22, so the float is again exact)
        pv = tl.dot(pn, vt.T) + tl.load(VADD + (n0 // BLOCK_N) * D + tl.arange(0, D))[None, :]
        w = beta * (1.0 / 254.0)
        pvf = pv.to(tl.float32, bitcast=True) * w[:, None] - (12582912.0 * w)[:, None]
        acc = acc * alpha[:, None] + pvf
        l_i = l_i * alpha + tl.sum(p, 1) * beta
    elif MODE == 1:
        # P scaled into e4m3's range (max 448 = 2^8.807) through the exponent; l_i carries the same
        # factor, so it cancels at the end
        p = tl.math.exp2(s * fac[:, None] - (base + m_new - 8.807354922057604)[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        vt = desc_v.load([vt_row, n0])
        acc = tl.dot(p.to(tl.float8e4nv), vt.T, acc * alpha[:, None])
    else:
        acc = acc * alpha[:, None]
        p = tl.math.exp2(s * fac[:, None] - (base + m_new)[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = desc_v.load([kv_row + n0, kv_col])
        if DOT_F32:
            acc = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), acc)
        else:
            acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_new


@jit
def _attn_fwd_kernel(desc_q, desc_k, desc_v, O, QS, KS, VS, VM, VADD,
                     Lq, Lk, H, n_kblk, n_vblk, stride_ob, stride_ol, qk_scale,
                     D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     MODE: tl.constexpr, K_BLOCK: tl.constexpr, DOT_F32: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh - b * H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    # rows past Lq read the next sample's queries (or TMA zeros); they are never stored
    q = desc_q.load([b * Lq + pid_m * BLOCK_M, h * D])
    # Triton 3.8's interpreter multiplies bf16 bit patterns as integers: DOT_F32 upcasts there
    if MODE == 0:
        row_fac = tl.zeros([BLOCK_M], dtype=tl.float32) + qk_scale
    else:
        qs = tl.load(QS + (b.to(tl.int64) * Lq + offs_m) * H + h, mask=offs_m < Lq, other=1.0)
        row_fac = qs * qk_scale
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    kv_row = b * Lk
    kv_col = h * D
    vt_row = bh * D
    ks_ptr = KS + bh * n_kblk
    vadd_ptr = VADD + bh * n_vblk * D
    n_full = Lk // BLOCK_N
    for j in range(n_full):
        acc, l_i, m_i = _attn_step(acc, l_i, m_i, q, row_fac, desc_k, desc_v, ks_ptr, vadd_ptr, kv_row, kv_col,
                                   vt_row, j * BLOCK_N, Lk, D, BLOCK_N, MODE, K_BLOCK, False, DOT_F32)
    if n_full * BLOCK_N < Lk:
        acc, l_i, m_i = _attn_step(acc, l_i, m_i, q, row_fac, desc_k, desc_v, ks_ptr, vadd_ptr, kv_row, kv_col,
                                   vt_row, n_full * BLOCK_N, Lk, D, BLOCK_N, MODE, K_BLOCK, True, DOT_F32)
    acc = acc / l_i[:, None]
    if MODE == 1 or MODE == 3:
        vs = tl.load(VS + bh * D + offs_d)
        vm = tl.load(VM + bh * D + offs_d)
        acc = acc * vs[None, :] + vm[None, :]
    o_ptr = O + b.to(tl.int64) * stride_ob + offs_m[:, None].to(tl.int64) * stride_ol + h * D + offs_d[None, :]
    tl.store(o_ptr, acc.to(O.dtype.element_ty), mask=offs_m[:, None] < Lq)


@jit
def _load_token_block(X, L, H, stride_xb, stride_xl, pid_t, bh, D: tl.constexpr, BLOCK: tl.constexpr,
                      PERM32: tl.constexpr = False):
    """Tokens pid_t * BLOCK + [0, BLOCK) of head bh % H of X [B, L, H, D] as fp32 (zeros past L).
    PERM32: row k of each 32 is token c = 16 (k >> 4) + 8 ((k >> 1) & 1) + 2 ((k >> 2) & 3) + (k & 1) of
    them (the Gluon int8 kernel's key order, see _quant_v_kernel): a gather of whole rows, so the loads
    stay coalesced and the transposed store stays contiguous."""
    b = bh // H
    h = bh - b * H
    offs = pid_t * BLOCK + tl.arange(0, BLOCK)
    if PERM32:
        k = offs & 31
        offs = (offs - k) + (k & 16) + ((k >> 1) & 1) * 8 + ((k >> 2) & 3) * 2 + (k & 1)
    offs_d = tl.arange(0, D)
    rm = offs[:, None] < L
    x = tl.load(X + b.to(tl.int64) * stride_xb + offs[:, None].to(tl.int64) * stride_xl + h * D + offs_d[None, :],
                mask=rm, other=0.0).to(tl.float32)
    return b, h, offs, offs_d, rm, x


@jit
def _kv_stats_kernel(K, V, SK, SV, MN, MX, L, H, stride_kb, stride_kl, stride_vb, stride_vl,
                     D: tl.constexpr, BLOCK: tl.constexpr, WITH_V: tl.constexpr):
    """Per block of BLOCK tokens and head: K's column sums (and V's column sums, minima and maxima) into
    [n_blocks, B*H, D] partials. One read of K and V, where torch's reductions over the strided token
    axis of [B, L, H, D] took milliseconds at L = 48k."""
    pid_t = tl.program_id(0)
    bh = tl.program_id(1)
    b, h, offs, offs_d, rm, k = _load_token_block(K, L, H, stride_kb, stride_kl, pid_t, bh, D, BLOCK)
    out = (pid_t * tl.num_programs(1) + bh) * D + offs_d
    tl.store(SK + out, tl.sum(k, 0))
    if WITH_V:
        b, h, offs, offs_d, rm, v = _load_token_block(V, L, H, stride_vb, stride_vl, pid_t, bh, D, BLOCK)
        tl.store(SV + out, tl.sum(v, 0))
        tl.store(MN + out, tl.min(tl.where(rm, v, float("inf")), 0))
        tl.store(MX + out, tl.max(tl.where(rm, v, float("-inf")), 0))


@jit
def _round_to_int8(x):
    """fp32 -> int8, rounding half away from zero (the conversion itself truncates)."""
    return tl.where(x >= 0, x + 0.5, x - 0.5).to(tl.int8)


@jit
def _quant_qk_kernel(X, XM, O, S, L, H, n_blk, stride_xb, stride_xl,
                     D: tl.constexpr, BLOCK: tl.constexpr, PER_TOKEN: tl.constexpr, SMOOTH: tl.constexpr):
    """X [B, L, H, D] -> O int8 [B, L, H, D]; S [B, L, H] (PER_TOKEN) or [B, H, n_blk] (per block)."""
    pid_t = tl.program_id(0)
    bh = tl.program_id(1)
    b, h, offs, offs_d, rm, x = _load_token_block(X, L, H, stride_xb, stride_xl, pid_t, bh, D, BLOCK)
    if SMOOTH:
        x = tl.where(rm, x - tl.load(XM + bh * D + offs_d)[None, :], 0.0)
    if PER_TOKEN:
        scale = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-12) / 127.0
        tl.store(S + (b.to(tl.int64) * L + offs) * H + h, scale, mask=offs < L)
        v = x / scale[:, None]
    else:
        scale = tl.maximum(tl.max(tl.max(tl.abs(x), axis=1), axis=0), 1e-12) / 127.0
        tl.store(S + bh * n_blk + pid_t, scale)
        v = x / scale
    tl.store(O + (b.to(tl.int64) * L + offs[:, None]) * (H * D) + h * D + offs_d[None, :], _round_to_int8(v),
             mask=rm)


@jit
def _quant_v_kernel(X, XM, XS, O, E, VADD, L, Lp, H, stride_xb, stride_xl, D: tl.constexpr, BLOCK: tl.constexpr,
                    INT8: tl.constexpr, PERM32: tl.constexpr, UNSIGNED: tl.constexpr = False):
    """X [B, L, H, D] -> O e4m3 or int8 [B, H, D, Lp] = (x - mean) / scale per channel, zeros past L;
    E [n_blocks, B, H, D]: this block's sum of rounding errors (in scaled units) per channel;
    INT8: VADD [B, H, n_blocks, D] int32 = 0x4B400000 + 127 * this block's column sums (mode 3);
    UNSIGNED (with INT8): O uint8 = the int8 value + 128 (128 past L), no VADD.
    PERM32: key c = 8i + 2t + e of each 32 goes to column 16 (i >> 1) + 4t + 2 (i & 1) + e, the order in
    which the Gluon int8 kernel hands P to the tensor cores (attention_gluon._relabel_p). (Scattering the
    columns on the store instead made the stores byte-wise: 4.6 ms at L = 48k on the H100.)"""
    pid_t = tl.program_id(0)
    bh = tl.program_id(1)
    b, h, offs, offs_d, rm, x = _load_token_block(X, L, H, stride_xb, stride_xl, pid_t, bh, D, BLOCK, PERM32)
    x = tl.where(rm, (x - tl.load(XM + bh * D + offs_d)[None, :]) / tl.load(XS + bh * D + offs_d)[None, :], 0.0)
    if INT8:
        xq = _round_to_int8(x)
        if not UNSIGNED:
            tl.store(VADD + (bh * tl.num_programs(0) + pid_t) * D + offs_d,
                     0x4B400000 + 127 * tl.sum(xq.to(tl.int32), axis=0))
    else:
        xq = x.to(O.dtype.element_ty)
    tl.store(E + (pid_t * tl.num_programs(1) + bh) * D + offs_d, tl.sum(xq.to(tl.float32) - x, axis=0))
    if UNSIGNED:
        xq = (xq.to(tl.int32) + 128).to(tl.uint8)
    pos = pid_t * BLOCK + tl.arange(0, BLOCK)  # column of V^T: token `offs`, which PERM32 relabelled
    o_ptr = O + (bh.to(tl.int64) * D + offs_d[:, None]) * Lp + pos[None, :]
    tl.store(o_ptr, tl.trans(xq), mask=pos[None, :] < Lp)


# ----------------------------------------------------------------------------- launchers


@dataclass(frozen=True)
class AttnConfig:
    block_m: int = 128
    block_n: int = 128
    num_warps: int = 8
    num_stages: int = 2


# Tuned on H100 (torch 2.11, Triton 3.6) at L = 48360, H = 40, D = 128 (bench/kernels.py --sweep;
# kernels/NOTES.md has the sweeps).
DEFAULT_CONFIGS = {
    "bf16": AttnConfig(128, 128, 8, 3),
    "int8-fp8": AttnConfig(64, 128, 4, 3),  # 104 KB of shared memory: two programs per SM
    "int8": AttnConfig(128, 64, 4, 4),
    "int8-int8": AttnConfig(64, 128, 4, 2),
}
# Small blocks keep the CPU interpreter quick.
INTERPRETER_CONFIG = AttnConfig(32, 16, 4, 1)
K_BLOCK = 128  # tokens per INT8 scale of K (a multiple of block_n)
STATS_BLOCK = 128  # tokens per partial sum of `_kv_stats_kernel`


def _check_qkv(q, k, v):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [B, L, H, D], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not match "
                         "([B, Lq, H, D], [B, Lk, H, D], [B, Lk, H, D])")


def _rows2d(t: torch.Tensor) -> torch.Tensor:
    """[B, L, H, D] with packed heads -> the same memory as [B*L, H*D] (copies only if the layout is foreign)."""
    B, L, H, D = t.shape
    if not (t.stride(3) == 1 and t.stride(2) == D and t.stride(0) == L * t.stride(1)
            and (t.stride(1) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0):
        t = t.contiguous()
    return t


def _desc(t: torch.Tensor, block: list[int]):
    B, L, H, D = t.shape
    return TensorDescriptor(t, [B * L, H * D], [t.stride(1), 1], block)


def quantize_qkv(q, k, v, mode: str, k_block: int = K_BLOCK, block: int = 128, v_block: int = 128,
                 perm32: bool = False, unsigned_v: bool = False):
    """Device-side quantization for modes 1-3 (see module docstring). Returns the kernel's inputs;
    `v_block` is the kernel's block_n (mode 3's column sums of V are per key block); `perm32` stores
    V's keys in the Gluon int8 kernel's order (`_quant_v_kernel`); `unsigned_v` (mode 3) stores V + 128
    as uint8 and returns no VADD (the Gluon kernel's unsigned P.V)."""
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    dev = q.device
    q8 = torch.empty((B, Lq, H, D), dtype=torch.int8, device=dev)
    qs = torch.empty((B, Lq, H), dtype=torch.float32, device=dev)
    k8 = torch.empty((B, Lk, H, D), dtype=torch.int8, device=dev)
    n_kblk = triton.cdiv(Lk, k_block)
    ks = torch.empty((B, H, n_kblk), dtype=torch.float32, device=dev)
    n_sblk = triton.cdiv(Lk, STATS_BLOCK)
    part = torch.empty((4 if mode != "int8" else 1, n_sblk, B * H, D), dtype=torch.float32, device=dev)
    sv, mn, mx = (part[i] for i in (1, 2, 3)) if mode != "int8" else (part[0],) * 3  # unused for "int8"
    _kv_stats_kernel[(n_sblk, B * H)](
        k, v, part[0], sv, mn, mx, Lk, H, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        D=D, BLOCK=STATS_BLOCK, WITH_V=mode != "int8", num_warps=8 if q.device.type == "cuda" else 4)
    k_mean = (part[0].sum(0) / Lk).view(B, H, D)
    _quant_qk_kernel[(triton.cdiv(Lq, block), B * H)](
        q, q, q8, qs, Lq, H, 1, q.stride(0), q.stride(1), D=D, BLOCK=block, PER_TOKEN=True, SMOOTH=False)
    _quant_qk_kernel[(n_kblk, B * H)](
        k, k_mean, k8, ks, Lk, H, n_kblk, k.stride(0), k.stride(1), D=D, BLOCK=k_block,
        PER_TOKEN=False, SMOOTH=True)
    if mode == "int8":
        return q8, qs, k8, ks, v, None, None, None
    int8 = mode == "int8-int8"
    if int8:
        block = v_block  # VADD's blocks are the kernel's key blocks
    v_mean = (part[1].sum(0) / Lk).view(B, H, D)
    vmin, vmax = part[2].amin(0).view(B, H, D), part[3].amax(0).view(B, H, D)
    v_scale = (torch.maximum(vmax - v_mean, v_mean - vmin).clamp_min(1e-12)
               / (127.0 if int8 else FP8_MAX)).contiguous()
    Lp = triton.cdiv(Lk, 32 if perm32 else 16) * (32 if perm32 else 16)  # TMA: 16-byte row strides
    unsigned_v = unsigned_v and int8
    vt = torch.empty((B, H, D, Lp), dtype=(torch.uint8 if unsigned_v else torch.int8) if int8 else torch.float8_e4m3fn,
                     device=dev)
    n_vblk = triton.cdiv(Lp, block)
    err = torch.empty((n_vblk, B, H, D), dtype=torch.float32, device=dev)
    vadd = torch.empty((B, H, n_vblk, D) if int8 and not unsigned_v else (1,), dtype=torch.int32, device=dev)
    _quant_v_kernel[(n_vblk, B * H)](
        v, v_mean, v_scale, vt, err, vadd, Lk, Lp, H, v.stride(0), v.stride(1), D=D, BLOCK=block, INT8=int8,
        PERM32=perm32, UNSIGNED=unsigned_v)
    if unsigned_v:
        vadd = None
    # The rounding errors of one channel do not average out over the keys: their mean (~2x its
    # random size after smoothing, 2.5e-4 of |v| at L = 48k) adds to every output row coherently,
    # while the output itself shrinks like 1/sqrt(L). Taking it off the shift costs nothing.
    v_shift = (v_mean - err.sum(0) * v_scale / Lk).contiguous()
    return q8, qs, k8, ks, vt, v_scale, v_shift, vadd


def launch_attention(q, k, v, scale: float, mode: str, config: AttnConfig | None = None,
                      k_block: int = K_BLOCK) -> torch.Tensor:
    if TensorDescriptor is None:
        raise RuntimeError("our attention kernel needs triton >= 3.4 (tensor descriptors)")
    if not device_supports_tma(q):
        raise RuntimeError("our attention kernel needs a Hopper (sm_90) or newer GPU; use impl='sdpa'")
    cfg = config or (INTERPRETER_CONFIG if q.device.type == "cpu" else DEFAULT_CONFIGS[mode])
    if k_block % cfg.block_n:
        raise ValueError(f"k_block {k_block} must be a multiple of block_n {cfg.block_n}")
    if mode == "int8-int8" and cfg.block_n > 128:
        raise ValueError("int8-int8 needs block_n <= 128 (its int32 P.V tiles must stay below 2^22)")
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    if D not in (64, 128):
        raise ValueError(f"head dim must be 64 or 128, got {D}")
    out = torch.empty((B, Lq, H, D), dtype=torch.bfloat16, device=q.device)
    md = MODES[mode]
    q, k, v = (_rows2d(t) for t in (q, k, v))
    vadd = out  # unused unless mode 3
    n_vblk = 1
    if md == 0:
        qs = ks = vs = vm = out  # unused
        n_kblk = 1
        dv = _desc(v, [cfg.block_n, D])
    else:
        q, qs, k, ks, vq, vs, vm, vadd_ = quantize_qkv(q, k, v, mode, k_block, v_block=cfg.block_n)
        n_kblk = ks.shape[-1]
        if md == 3:
            vadd, n_vblk = vadd_, vadd_.shape[2]
        if md in (1, 3):
            dv = TensorDescriptor(vq, [B * H * D, vq.shape[-1]], [vq.shape[-1], 1], [D, cfg.block_n])
        else:
            dv = _desc(vq, [cfg.block_n, D])
            vs = vm = out  # unused
    dq = _desc(q, [cfg.block_m, D])
    dk = _desc(k, [cfg.block_n, D])
    grid = (triton.cdiv(Lq, cfg.block_m), B * H)
    _attn_fwd_kernel[grid](
        dq, dk, dv, out, qs, ks, vs, vm, vadd, Lq, Lk, H, n_kblk, n_vblk, out.stride(0), out.stride(1),
        scale * LOG2E, D=D, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, MODE=md, K_BLOCK=k_block,
 DOT_F32=q.device.type == "cpu", num_warps=cfg.num_warps,
        num_stages=cfg.num_stages)
    return out


def uses_gluon(q: torch.Tensor, mode: str, kernel: str = "auto") -> bool:
    """bf16 and int8-int8 on Hopper go to the warp-specialized Gluon kernels (attention_gluon.py),
    unless `kernel="tl"` asks for the `tl` kernel below (int8-int8 also needs Triton's
    pipeline-stages hook)."""
    if kernel == "tl" or mode not in ("bf16", "int8-int8") or q.device.type != "cuda" or q.shape[-1] not in (64, 128):
        return False
    from .attention_gluon import HAVE_GLUON, have_u8_pv

    return HAVE_GLUON and is_hopper(q.device.index or 0) and (mode == "bf16" or have_u8_pv())


@torch.library.custom_op("storymem::flash_attention", mutates_args=())
def _flash_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mode: str,
                        kernel: str) -> torch.Tensor:
    if uses_gluon(q, mode, kernel):
        from .attention_gluon import flash_attention_ws, flash_attention_ws_int8

        fn = flash_attention_ws if mode == "bf16" else flash_attention_ws_int8
        return fn(_rows2d(q), _rows2d(k), _rows2d(v), scale)
    if not use_triton(q):
        # contiguous, like the kernel's output and the fake below (torch.compile relies on that)
        if mode == "bf16":
            return attention_ref(q, k, v, scale).to(torch.bfloat16).contiguous()
        return attention_lp_ref(q, k, v, scale, mode).to(torch.bfloat16).contiguous()
    return launch_attention(q, k, v, scale, mode)


@_flash_attention_op.register_fake
def _(q, k, v, scale, mode, kernel):
    return q.new_empty(q.shape, dtype=torch.bfloat16)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                    mode: str = "bf16", kernel: str = "auto") -> torch.Tensor:
    """Our kernel. q [B, Lq, H, D], k, v [B, Lk, H, D] bf16 -> [B, Lq, H, D] bf16; mode in MODES.
    kernel: "auto" (the Gluon kernels on Hopper where they exist, else the `tl` kernel) or "tl"."""
    if kernel not in ("auto", "tl"):
        raise ValueError(f"kernel must be 'auto' or 'tl', got {kernel!r}")
    _check_qkv(q, k, v)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {sorted(MODES)}, got {mode!r}")
    if q.dtype != torch.bfloat16 or k.dtype != torch.bfloat16 or v.dtype != torch.bfloat16:
        raise ValueError(f"q, k, v must be bfloat16, got {q.dtype}, {k.dtype}, {v.dtype}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return torch.ops.storymem.flash_attention(q, k, v, scale, mode, kernel)


# ----------------------------------------------------------------------------- the dispatcher
# The one place that decides which attention implementation runs. The DiT receives an implementation
# name as a construction option and calls `attend`; "auto" is resolved here, per shape, by timing.

IMPLS = ("auto", "sdpa", "cudnn", "triton", "triton-tl", "int8-int8", "int8-fp8", "int8", "flash", "efficient",
         "math")
LOW_PRECISION = ("int8-int8", "int8-fp8", "int8")


def sdpa(q, k, v, scale: float | None = None, backend: str | None = "cudnn") -> torch.Tensor:
    """torch SDPA on [B, L, H, D] views (strided, no copies in), out [B, Lq, H, D]; backend None lets
    torch choose (on the CPU: its math/flash CPU kernels)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    if backend is None:
        return F.scaled_dot_product_attention(qt, kt, vt, scale=scale).transpose(1, 2)
    if backend == "cudnn":  # the aten op itself: what the bench measured, no dispatcher checks per call
        return torch.ops.aten._scaled_dot_product_cudnn_attention(qt, kt, vt, None, False, scale=scale)[0].transpose(
            1, 2)
    backends = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "math": SDPBackend.MATH}
    with sdpa_kernel(backends[backend]):
        return F.scaled_dot_product_attention(qt, kt, vt, scale=scale).transpose(1, 2)


def time_ms(fn, reps: int = 3) -> float:
    """Median CUDA-event time of `fn()` in ms, after one warm-up call (CUDA only)."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


# (q shape, k shape, dtype, device index) -> (impl, {candidate: ms}); timed once per process
_PLAN: dict[tuple, tuple[str, dict[str, float]]] = {}


def attention_plan() -> dict[tuple, tuple[str, dict[str, float]]]:
    """What "auto" chose so far, per (q shape, k shape, dtype, device index), with the times it measured."""
    return dict(_PLAN)


def clear_plan() -> None:
    _PLAN.clear()


def choose(impl: str, q_shape: tuple, k_shape: tuple, dtype: torch.dtype, device) -> str:
    """The implementation that runs for one call shape: `impl` itself, except
    - "auto" on a CUDA bf16 call with head dim 64/128: cuDNN and our kernel timed once on random
      data of this shape, the faster kept (the plan); any other "auto" call: "sdpa";
    - "cudnn" off CUDA: "sdpa" (the same math through torch's CPU kernels)."""
    if impl not in IMPLS:
        raise ValueError(f"attention must be one of {', '.join(IMPLS)}; got {impl!r}")
    device = torch.device(device)
    if device.type != "cuda":
        return "sdpa" if impl in ("auto", "cudnn") else impl
    if impl != "auto":
        return impl
    if dtype != torch.bfloat16 or q_shape[-1] not in (64, 128) or torch.compiler.is_compiling():
        return "sdpa"
    key = (tuple(q_shape), tuple(k_shape), dtype, device.index)
    if key not in _PLAN:
        q = torch.randn(q_shape, dtype=dtype, device=device)
        k, v = torch.randn(k_shape, dtype=dtype, device=device), torch.randn(k_shape, dtype=dtype, device=device)
        times = {}
        for cand in ("cudnn", "triton"):
            try:
                times[cand] = time_ms(lambda: attend(q, k, v, cand))
            except Exception as e:  # no Hopper, old Triton, cuDNN refuses the layout: not a candidate
                log.info("attention %s unavailable for %s: %s", cand, q_shape, e)
        _PLAN[key] = (min(times, key=times.get) if times else "sdpa", times)
        log.info("attention %s x %s: %s -> %s", q_shape, k_shape, {c: round(t, 3) for c, t in times.items()},
                 _PLAN[key][0])
    return _PLAN[key][0]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, impl: str = "auto",
           scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v: q [B, Lq, H, D], k, v [B, Lk, H, D] -> [B, Lq, H, D] (no transposes
    in memory). impl: one of IMPLS ("auto" goes through `choose`): "sdpa" torch's own choice, "cudnn"
    cuDNN, "triton" our bf16 kernel (Gluon on Hopper), "triton-tl" our `tl` kernel, "int8-int8" /
    "int8-fp8" / "int8" our low-precision kernels, "flash" / "efficient" / "math" SDPA's backends."""
    _check_qkv(q, k, v)
    if impl == "auto":
        impl = choose(impl, tuple(q.shape), tuple(k.shape), q.dtype, q.device)
    if impl == "sdpa":
        return sdpa(q, k, v, scale, None)
    if impl in ("cudnn", "flash", "efficient", "math"):
        if impl == "cudnn" and q.device.type != "cuda":
            return sdpa(q, k, v, scale, None)
        return sdpa(q, k, v, scale, impl)
    if impl in ("triton", "triton-tl"):
        return flash_attention(q, k, v, scale, "bf16", "tl" if impl == "triton-tl" else "auto")
    if impl in LOW_PRECISION:
        return flash_attention(q, k, v, scale, impl)
    raise ValueError(f"attention must be one of {', '.join(IMPLS)}; got {impl!r}")
