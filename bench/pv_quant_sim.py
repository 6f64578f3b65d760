"""CPU emulation (float64, fp32 where the kernel accumulates) of the int8-int8 P.V quantizations.

    python bench/pv_quant_sim.py [--L 48360] [--rows 96]

Same Q/K/V rounding as `attention.quantize_qkv_ref`, then P on three grids: against each 128-key
block's row max, signed round(254 p) - 127 with the float row sum (session 4's kernel); against the
block max, round(255 p) as uint8 with V + 128 and exact integer row sums, accumulated in fp32 the way
`_attn_fwd_ws_i8u` does (w_j = 2^(m_j - m_ref + K0)); and against the running max (what would let
the P.V accumulate inside the MMA). Prints each one's error against float64 attention, bf16 output.
"""
from __future__ import annotations

import argparse
import math

import torch

from storymem_rt.kernels.attention import attention_ref, quantize_qkv_ref


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--L", type=int, default=48360)
    ap.add_argument("--rows", type=int, default=96)
    ap.add_argument("--heads", type=int, default=2)
    a = ap.parse_args()
    torch.manual_seed(0)
    L, H, D, NQ, BN = a.L, a.heads, 128, a.rows, 128
    q, k, v = torch.randn(1, NQ, H, D), torch.randn(1, L, H, D), torch.randn(1, L, H, D)
    ref = attention_ref(q, k, v)
    qd, kd, vd, _, v_shift = quantize_qkv_ref(q, k, v, BN, v_int8=True)
    vf = v.float()
    vc = vf - vf.mean(1, keepdim=True)
    vs = vc.abs().amax(1, keepdim=True) / 127
    vi = torch.trunc(vc / vs + torch.where(vc >= 0, 0.5, -0.5)).clamp(-127, 127)
    qd, kd = qd.double().transpose(1, 2), kd.double().transpose(1, 2)
    s = qd @ kd.transpose(-1, -2) * D**-0.5 * math.log2(math.e)  # log2 units
    nb = -(-L // BN)
    sp = torch.nn.functional.pad(s, (0, nb * BN - L), value=-math.inf).unflatten(-1, (nb, BN))
    vdd, shift = vd.double().transpose(1, 2), v_shift.double().transpose(1, 2)
    m_blk = sp.amax(-1, keepdim=True)
    m_fin = s.amax(-1, keepdim=True)
    l_exact = torch.exp2(s - m_fin).sum(-1, keepdim=True)

    def err(o):
        o = o.transpose(1, 2).float().bfloat16().double()
        return float((o - ref).norm() / ref.norm())

    def dense(p):
        return p.flatten(-2)[..., :L]

    p_blk = torch.round(torch.exp2(sp - m_blk) * 254) / 254 * torch.exp2(m_blk - m_fin[..., None])
    print(f"block max, signed 254 levels, float row sums: {err(dense(p_blk) @ vdd / l_exact + shift):.4e}")
    m_run = torch.cummax(m_blk, dim=-2).values
    p_run = torch.round(torch.exp2(sp - m_run) * 254) / 254 * torch.exp2(m_run - m_fin[..., None])
    print(f"running max, 254 levels:                      {err(dense(p_run) @ vdd / l_exact + shift):.4e}")
    # the unsigned kernel: uint8 P and V + 128, fp32 accumulation of pv * w_j, integer row sums
    vu = torch.nn.functional.pad((vi + 128).double().transpose(1, 2), (0, 0, 0, nb * BN - L), value=128.0)
    vu = vu.unflatten(-2, (nb, BN))
    pu = torch.round(torch.exp2(sp - m_blk) * 255)
    acc = torch.zeros(1, H, NQ, D, dtype=torch.float64)
    l_q = torch.zeros(1, H, NQ, 1, dtype=torch.float64)
    m_ref = m_blk[..., 0, :]
    for j in range(nb):
        w = torch.exp2(m_blk[..., j, :] - m_ref + 16).float().double()
        acc = (acc + (pu[..., j, :] @ vu[:, :, j]) * w).float().double()
        l_q = (l_q + pu[..., j, :].sum(-1, keepdim=True) * w).float().double()
    o_int = acc / l_q - 128
    print(f"block max, uint8 255 levels, fp32 as kernel:  {err(o_int * vs.double().transpose(1, 2) + shift):.4e}")


if __name__ == "__main__":
    main()
