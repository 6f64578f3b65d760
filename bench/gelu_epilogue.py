"""The FFN's first GEMM with GELU in cuBLASLt's epilogue (`torch._addmm_activation`) against
GEMM + a separate GELU kernel (what Inductor makes of `F.gelu(linear(x))`), at the A14B shape.

    python bench/gelu_epilogue.py [--L 48360]

Prints both times (CUDA events, median) and each output's error against float32 GELU of the same
product, with the tanh approximation (upstream Wan's) and with erf, to tell which one the epilogue
computes.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from triton.testing import do_bench


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--L", type=int, default=48360)
    a = ap.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(a.L, 5120, device="cuda", generator=g).bfloat16()
    w = (torch.randn(13824, 5120, device="cuda", generator=g) * 5120 ** -0.5).bfloat16()
    b = (torch.randn(13824, device="cuda", generator=g) * 0.1).bfloat16()

    sep = torch.compile(lambda x: F.gelu(F.linear(x, w, b), approximate="tanh"))
    epi = torch.compile(lambda x: torch._addmm_activation(b, x, w.t(), use_gelu=True))
    # which GELU the epilogue computes: in float32 (no TF32) the GEMM is exact enough to tell tanh
    # from erf (they differ by up to ~5e-4)
    torch.backends.cuda.matmul.allow_tf32 = False
    xs, ws, bs = x[:1024].float(), w[:1024].float(), b[:1024].float()
    e32 = torch._addmm_activation(bs, xs, ws.t(), use_gelu=True)
    r32 = torch.addmm(bs, xs, ws.t())
    print("float32 epilogue, max |diff| vs gelu(tanh) %.2e, vs gelu(erf) %.2e" % (
        float((e32 - F.gelu(r32, approximate="tanh")).abs().max()), float((e32 - F.gelu(r32)).abs().max())))
    ref = F.linear(x.float(), w.float(), b.float())
    for name, fn in (("GEMM + GELU kernel (inductor)", sep), ("cuBLASLt GELU epilogue", epi)):
        out = fn(x).float()
        errs = {k: float((out - F.gelu(ref, approximate=k)).norm() / F.gelu(ref, approximate=k).norm())
                for k in ("tanh", "none")}
        ms = do_bench(lambda: fn(x), warmup=50, rep=500, return_mode="median")
        print(f"{name:32s} {ms:7.3f} ms  rel err vs fp32 gelu(tanh) {errs['tanh']:.2e}, vs gelu(erf) "
              f"{errs['none']:.2e}", flush=True)


if __name__ == "__main__":
    main()
