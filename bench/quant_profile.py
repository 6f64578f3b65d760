"""Where the 8-bit attention's quantization pre-pass spends its time, per kernel (torch.profiler, CUPTI).

    python bench/quant_profile.py [--L 48360] [--mode int8-int8]

Prints the profiler's CUDA kernel table for `attention.quantize_qkv` at the real shape (the bytes it
must move: q, k, v read once or twice, 8-bit copies written) next to the measured copy rate.
"""
from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from storymem_rt.kernels.attention import quantize_qkv


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--L", type=int, default=48360)
    ap.add_argument("--mode", default="int8-int8")
    a = ap.parse_args()
    H, D = 40, 128
    q, k, v = (torch.randn(1, a.L, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    fn = lambda: quantize_qkv(q, k, v, a.mode, v_block=128, perm32=a.mode == "int8-int8")  # noqa: E731
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15))
    print(f"bf16 bytes of q, k, v: {3 * q.numel() * 2 / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
