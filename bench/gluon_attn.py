"""Configs of the warp-specialized Gluon attention kernels (kernels/attention_gluon.py), on one GPU.

    python bench/gluon_attn.py [--L 48360] [--configs ws,64,4,3,64 ws,128,3,2,0 i8,128,4,3 ...]

Checks each config against float64 at odd lengths (1 to 12000, two samples per batch so the tail
tile reads the next sample's rows) and on 128 query rows at L, then times them with do_bench
(median) next to our `tl` kernel (attention.py) and cuDNN SDPA.
Config = ws,block_n,stages,consumers,lazy (bf16: 2 or 3 consumer warpgroups of 64 rows; lazy > 0:
windows of that many key blocks with the bounded lazy rescale, 0: rescale per block), or
i8,block_n,stages,consumers[,consumer_regs] (the int8-int8 kernel: 2 or 3 consumer warpgroups of 64
rows; consumer_regs 0 or left out: the default for that many). The odd-length checks also run
sharp attention (q scaled by 3 or 8: peaked rows whose running max climbs, as in a trained model's
attention; x8 makes the bf16 kernel's lazy-rescale guard fall back) and "rise" (keys along the
queries' direction with growing norms: the row max climbs ~115 natural units, 165 log2, along the
keys, which would overflow an unguarded lazy rescale).
"""
from __future__ import annotations

import argparse
import json
import os

import torch
from triton.testing import do_bench

from storymem_rt.kernels.attention import attention_ref, sdpa
from storymem_rt.kernels import attention as attn_mod
from storymem_rt.kernels.attention_gluon import flash_attention_ws, flash_attention_ws_int8

H, D = 40, 128


def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def inputs(L, H=H, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    def one():
        x = torch.randn(1, L, H, D, device="cuda", generator=g)
        return (x / x.pow(2).mean(-1, keepdim=True).sqrt()).bfloat16()
    return one(), one(), torch.randn(1, L, H, D, device="cuda", generator=g).bfloat16()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--L", type=int, default=48360)
    ap.add_argument("--configs", nargs="*", default=["ws,64,4,3,64", "ws,64,4,3,0", "ws,128,3,2,64", "i8,128,4,3"])
    ap.add_argument("--rep", type=int, default=1000)
    a = ap.parse_args()
    cfgs = [c.split(",") for c in a.configs]

    def run(cfg, q, k, v):
        if cfg[0] == "i8":
            regs = int(cfg[4]) if len(cfg) > 4 and int(cfg[4]) else None
            return flash_attention_ws_int8(q, k, v, block_n=int(cfg[1]), stages=int(cfg[2]), consumers=int(cfg[3]),
                                           consumer_regs=regs)
        return flash_attention_ws(q, k, v, block_n=int(cfg[1]), stages=int(cfg[2]), consumers=int(cfg[3]),
                                  lazy=int(cfg[4]))

    res = dict(device=torch.cuda.get_device_name(), rows=[])
    # correctness at small odd shapes, two samples per batch (the tail tile reads the next sample's rows)
    for L, sharp in ((1, 1), (63, 1), (64, 1), (65, 1), (129, 1), (1000, 1), (4099, 1), (4099, 3), (4099, 8),
                     (12000, 8), (4099, "rise"), (12000, "rise")):
        q, k, v = inputs(L, H=3, seed=L)
        if sharp == "rise":  # keys along one direction, growing: logits climb from ~1 to ~115 natural units
            u = torch.nn.functional.normalize(torch.randn(1, 1, 3, D, device="cuda"), dim=-1) * D ** 0.5
            grow = torch.linspace(0.1, 10.0, L, device="cuda")[None, :, None, None]
            q = (u + 0.3 * q.float()).bfloat16()
            k = (grow * u + 0.3 * k.float()).bfloat16()
        else:
            q = q * sharp
        q, k, v = (torch.cat([t, t.flip(1)], 0) for t in (q, k, v))
        ref = attention_ref(q, k, v)
        for cfg in cfgs:
            try:
                e = rel(run(cfg, q, k, v), ref)
            except Exception as ex:  # report and go on
                e = f"{type(ex).__name__}: {str(ex)[:200]}"
            print(f"check L={L} q x{sharp} cfg={','.join(cfg)}: rel err {e}", flush=True)
            res["rows"].append(dict(check_L=L, sharp=sharp, cfg=cfg, err=e))
    L = a.L
    q, k, v = inputs(L)
    idx = torch.randperm(L, device="cuda")[:128]
    ref = attention_ref(q[:, idx], k, v)
    flops = 4.0 * L * L * H * D
    impls = [("triton bf16 (ours, tl)", lambda: attn_mod.launch_attention(q, k, v, D**-0.5, "bf16")),
             ("cuDNN", lambda: sdpa(q, k, v, backend="cudnn"))]
    if any(c[0] == "i8" for c in cfgs):
        impls.append(("triton int8-int8 (ours, tl)", lambda: attn_mod.launch_attention(q, k, v, D**-0.5, "int8-int8")))
    if any(c[0] == "i8" for c in cfgs):
        impls.append(("int8-int8 quantization pre-pass alone",
                      lambda: attn_mod.quantize_qkv(q, k, v, "int8-int8", v_block=128, perm32=True,
                                                    unsigned_v=True)[0]))
    for cfg in cfgs:
        impls.append((f"gluon {','.join(cfg)}", lambda cfg=cfg: run(cfg, q, k, v)))
    for name, fn in impls:
        try:
            out = fn()
            e = rel(out[:, idx], ref) if out.dtype == torch.bfloat16 else float("nan")
            ms = do_bench(fn, warmup=200, rep=a.rep, return_mode="median")
            print(f"{name:40s} L={L}: {ms:8.3f} ms {flops / ms / 1e9:6.0f} TFLOP/s rel err {e:.1e}", flush=True)
            res["rows"].append(dict(name=name, L=L, ms=ms, tflops=flops / ms / 1e9, err=e))
        except Exception as ex:
            print(f"{name}: failed {type(ex).__name__}: {str(ex)[:300]}", flush=True)
    out = os.environ.get("OUT")
    if out:
        json.dump(res, open(os.path.join(out, "gluon_attn.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
