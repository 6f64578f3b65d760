"""Correctness and speed of storymem_rt.kernels at the M2V shape, on one GPU.

    python bench/kernels.py                       # L = 48360 and 48384, prints one table
    python bench/kernels.py --sweep               # also tries kernel configs first (tuning)
    python bench/kernels.py --L 4096 --quick      # smoke test

Fresh random data per run: q/k projections [1, L, H*D] bf16 go through qk_norm_rope (so the
attention inputs are RMS-normalised and RoPE-rotated, as in the DiT), v is random. Each kernel is
checked against a float64 reference (a slice of query rows for attention) and timed with
triton.testing.do_bench (median), next to cuDNN / flash SDPA and the unfused torch ops.
Attention TFLOP/s count 4*Lq*Lk*H*D; memory-bound kernels report GB/s (bytes read + written once)
and time over the time the measured device-to-device copy rate needs for those bytes.
Writes JSON to $OUT/kernels.json (or --json).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

import torch
import triton
from triton.testing import do_bench

from storymem_rt.kernels import adaln as adaln_mod
from storymem_rt.kernels import attention as attn_mod
from storymem_rt.kernels import qk_norm_rope as qk_mod
from storymem_rt.kernels.adaln import adaln_modulate, adaln_modulate_ref, gated_residual, gated_residual_ref
from storymem_rt.kernels.attention import AttnConfig, attention_ref, flash_attention, quantize_qkv, sdpa
from storymem_rt.kernels.qk_norm_rope import qk_norm_rope, qk_norm_rope_ref, rope_tables

H, D = 40, 128
C = H * D
GRID_H, GRID_W = 30, 52  # 480x832 / (8 VAE * 2 patch)
ROWS = []  # the table


def bench_ms(fn, rep_ms: int) -> float:
    return float(do_bench(fn, warmup=max(25, rep_ms // 5), rep=rep_ms, return_mode="median"))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("nan")
    return float((a - b).norm() / b.norm())


def row(name, L, ms, err=None, tflops=None, gbs=None, vs_copy=None, note=""):
    r = dict(kernel=name, L=L, ms=ms, rel_err=err, tflops=tflops, gbs=gbs, x_copy_time=vs_copy, note=note)
    ROWS.append(r)
    return r


def copy_rate(n_bytes: int = 2 << 30) -> float:
    src = torch.randn(n_bytes // 4, device="cuda")
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src), 500)
    return 2 * n_bytes / (ms * 1e-3)  # bytes read + written per second


def positions_for(L: int):
    """10 memory frames at negative positions with gaps, then the shot at 0..T-1."""
    frames = L // (GRID_H * GRID_W)
    mem = [-3.0 * (10 - i) for i in range(10)]
    return mem + [float(t) for t in range(frames - 10)]


# ----------------------------------------------------------------------------- qk-norm + rope


def torch_qk_unfused(q, k, wq, wk, rope, eps=1e-6):
    return qk_mod.qk_norm_rope_torch(q, k, wq, wk, rope.cos, rope.sin, rope.frames, rope.grid_h, rope.grid_w, H, eps)


def bench_qk(L, rate, rep, check=True):
    pos = positions_for(L)
    rope = rope_tables(pos, GRID_H, GRID_W, D, device="cuda")
    qp = torch.randn(1, L, C, device="cuda", dtype=torch.bfloat16)
    kp = torch.randn(1, L, C, device="cuda", dtype=torch.bfloat16)
    wq = (1 + 0.1 * torch.randn(C, device="cuda")).bfloat16()
    wk = (1 + 0.1 * torch.randn(C, device="cuda")).bfloat16()
    qo, ko = qk_norm_rope(qp, kp, wq, wk, rope, H)
    err = None
    if check:
        qr, kr = qk_norm_rope_ref(qp, kp, wq, wk, pos, GRID_H, GRID_W, H)
        err = max(rel(qo, qr), rel(ko, kr))
        # every element within bf16 rounding (2^-8 relative, round to nearest) of float64
        bad = max(int(((qo.double() - qr).abs() > 2**-8 * qr.abs() * 1.001 + 1e-6).sum()),
                  int(((ko.double() - kr).abs() > 2**-8 * kr.abs() * 1.001 + 1e-6).sum()))
        del qr, kr
        torch.cuda.empty_cache()
    n_bytes = 2 * 2 * L * C * 2  # q and k, read and written, bf16
    ms = bench_ms(lambda: qk_norm_rope(qp, kp, wq, wk, rope, H), rep)
    row("qk_norm_rope (ours)", L, ms, err, gbs=n_bytes / ms / 1e6, vs_copy=ms / (n_bytes / rate * 1e3),
        note=f"{bad} elements off bf16 rounding" if check else "")
    ms_t = bench_ms(lambda: torch_qk_unfused(qp, kp, wq, wk, rope), rep)
    row("qk_norm_rope (torch unfused)", L, ms_t, None, gbs=n_bytes / ms_t / 1e6, vs_copy=ms_t / (n_bytes / rate * 1e3))
    n8 = 2 * L * C * (2 + 1)
    ms8 = bench_ms(lambda: qk_norm_rope(qp, kp, wq, wk, rope, H, quant="fp8"), rep)
    q8, qs, k8, ks = qk_norm_rope(qp, kp, wq, wk, rope, H, quant="fp8")
    err8 = rel(q8.float() * qs[..., None], qo.float())
    row("qk_norm_rope fp8 out (ours)", L, ms8, err8, gbs=n8 / ms8 / 1e6, vs_copy=ms8 / (n8 / rate * 1e3),
        note="err vs our bf16 output")
    del qp, kp
    return qo, ko


# ----------------------------------------------------------------------------- attention


def attn_inputs(L, qo=None, ko=None):
    if qo is None:
        qo, ko = qk_norm_rope(torch.randn(1, L, C, device="cuda", dtype=torch.bfloat16),
                              torch.randn(1, L, C, device="cuda", dtype=torch.bfloat16),
                              torch.ones(C, device="cuda"), torch.ones(C, device="cuda"),
                              rope_tables(positions_for(L), GRID_H, GRID_W, D, device="cuda"), H)
    v = torch.randn(1, L, H, D, device="cuda", dtype=torch.bfloat16)
    return qo, ko, v


def bench_attention(L, rep, qo=None, ko=None, n_check=128, quick=False):
    q, k, v = attn_inputs(L, qo, ko)
    flops = 4.0 * L * L * H * D
    g = torch.Generator(device="cpu").manual_seed(L)
    rows_idx = torch.cat([torch.randperm(L - 8, generator=g)[: n_check - 8], torch.arange(L - 8, L)]).cuda()
    ref = attention_ref(q[:, rows_idx], k, v)

    def err_of(out):
        return rel(out[:, rows_idx], ref)

    impls = [
        ("attention bf16 (ours)", lambda: flash_attention(q, k, v, mode="bf16"),
         "Gluon, warp-specialized" if attn_mod.uses_gluon(q, "bf16") else "tl"),
        ("attention bf16 (ours, tl kernel)", lambda: attn_mod.launch_attention(q, k, v, D**-0.5, "bf16"),
         "attention.py"),
        ("attention int8-int8 (ours, incl. quant)", lambda: flash_attention(q, k, v, mode="int8-int8"),
         "Gluon, warp-specialized" if attn_mod.uses_gluon(q, "int8-int8") else "tl"),
        ("attention int8-int8 (ours, tl kernel)", lambda: attn_mod.launch_attention(q, k, v, D**-0.5, "int8-int8"),
         "attention.py, incl. quant"),
        ("attention int8-fp8 (ours, incl. quant)", lambda: flash_attention(q, k, v, mode="int8-fp8"), "Sage2-style"),
        ("attention int8 QK, bf16 PV (ours, incl. quant)", lambda: flash_attention(q, k, v, mode="int8"), ""),
        ("SDPA cuDNN", lambda: sdpa(q, k, v, backend="cudnn"), "strided [B,L,H,D] views"),
        ("SDPA flash", lambda: sdpa(q, k, v, backend="flash"), "strided [B,L,H,D] views"),
    ]
    out = {}
    for name, fn, note in impls:
        try:
            o = fn()
            e = err_of(o)
            del o
            ms = bench_ms(fn, rep)
        except Exception as ex:  # report, keep going
            print(f"{name} failed: {type(ex).__name__}: {ex}", flush=True)
            row(name, L, float("nan"), None, note=f"failed: {type(ex).__name__}")
            continue
        out[name] = row(name, L, ms, e, tflops=flops / ms / 1e9, note=note)
    # the engine's entry point: times ours against cuDNN once for this shape, then keeps the faster
    try:
        attn_mod.clear_plan()
        t0 = time.time()
        attn_mod.attend(q, k, v, "auto")
        pick_s = time.time() - t0
        choice = next(iter(attn_mod.attention_plan().values()))[0]
        fn = lambda: attn_mod.attend(q, k, v, "auto")
        e = err_of(fn())
        ms = bench_ms(fn, rep)
        row("attend(impl='auto') (engine)", L, ms, e, tflops=flops / ms / 1e9,
            note=f"picked {choice} (first call {pick_s:.1f} s)")
    except Exception as ex:
        print(f"auto failed: {type(ex).__name__}: {ex}", flush=True)
    # the low-precision kernels without their quantization pre-pass
    for mode in ("int8-int8", "int8-fp8", "int8"):
        try:
            bn = attn_mod.DEFAULT_CONFIGS[mode].block_n
            perm = mode == "int8-int8" and attn_mod.uses_gluon(q, mode)  # the Gluon kernel's key order
            ms_q = bench_ms(lambda: quantize_qkv(q, k, v, mode, v_block=bn, perm32=perm, unsigned_v=perm),
                            max(50, rep // 10))
            row(f"  quantize q/k/v for {mode}", L, ms_q, None, note="included above")
        except Exception as ex:
            print(f"quantize {mode} failed: {ex}", flush=True)
    del ref
    torch.cuda.empty_cache()
    return out


SWEEP = {
    "bf16": [AttnConfig(128, 128, 8, 3), AttnConfig(64, 64, 4, 3), AttnConfig(64, 64, 4, 2),
             AttnConfig(64, 32, 4, 4), AttnConfig(128, 32, 8, 4), AttnConfig(64, 64, 4, 4)],
    "int8-int8": [AttnConfig(64, 128, 4, 2), AttnConfig(64, 128, 4, 3), AttnConfig(128, 128, 8, 3),
                  AttnConfig(64, 64, 4, 3), AttnConfig(128, 64, 4, 3)],
    "int8-fp8": [AttnConfig(64, 128, 4, 3),
                 AttnConfig(128, 128, 8, 3), AttnConfig(64, 64, 4, 3), AttnConfig(64, 128, 4, 2),
                 AttnConfig(64, 128, 4, 4), AttnConfig(128, 64, 4, 3)],
    "int8": [AttnConfig(128, 64, 4, 4), AttnConfig(64, 64, 4, 3), AttnConfig(64, 64, 4, 4),
             AttnConfig(64, 32, 4, 4), AttnConfig(128, 64, 8, 3)],
}


def sweep_attention(L, rep):
    """Times each candidate config; makes the fastest the default for the rest of the run."""
    q, k, v = attn_inputs(L)
    flops = 4.0 * L * L * H * D
    idx = torch.randperm(L, device="cuda")[:64]
    ref = attention_ref(q[:, idx], k, v)
    res = []
    for mode, cands in SWEEP.items():
        best = None
        for cfg in cands:
            try:
                fn = lambda: attn_mod.launch_attention(q, k, v, D**-0.5, mode, cfg)  # noqa: B023
                t0 = time.time()
                fn()
                torch.cuda.synchronize()
                err = rel(fn()[:, idx], ref)
                ms = bench_ms(fn, rep)
                res.append(dict(mode=mode, cfg=cfg.__dict__, ms=ms, tflops=flops / ms / 1e9, rel_err=err))
                print(f"sweep attn {mode} {cfg}: {ms:.2f} ms {flops / ms / 1e9:.0f} TFLOP/s err {err:.1e} "
                      f"(first call {time.time() - t0:.1f}s)", flush=True)
                if best is None or ms < best[0]:
                    best = (ms, cfg)
            except Exception as ex:
                print(f"sweep attn {mode} {cfg}: failed {type(ex).__name__}: {str(ex)[:300]}", flush=True)
                res.append(dict(mode=mode, cfg=cfg.__dict__, error=str(ex)[:300]))
        if best is not None:
            attn_mod.DEFAULT_CONFIGS[mode] = best[1]
            print(f"sweep attn {mode}: using {best[1]}", flush=True)
    return res


# ----------------------------------------------------------------------------- adaLN


def bench_adaln(L, rate, rep):
    x = torch.randn(1, L, C, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(1, L, C, device="cuda", dtype=torch.bfloat16)
    shift = torch.randn(1, 1, C, device="cuda")
    scale = 0.2 * torch.randn(1, 1, C, device="cuda")
    gate = torch.randn(1, 1, C, device="cuda")
    o = adaln_modulate(x, shift, scale)
    e = rel(o, adaln_modulate_ref(x, shift, scale))
    n_bytes = L * C * (2 + 2)
    ms = bench_ms(lambda: adaln_modulate(x, shift, scale), rep)
    row("adaLN modulate (ours)", L, ms, e, gbs=n_bytes / ms / 1e6, vs_copy=ms / (n_bytes / rate * 1e3))

    def torch_mod():
        return (torch.nn.functional.layer_norm(x.float(), (C,), eps=1e-6) * (1 + scale) + shift).bfloat16()

    ms = bench_ms(torch_mod, rep)
    row("adaLN modulate (torch unfused)", L, ms, None, gbs=n_bytes / ms / 1e6, vs_copy=ms / (n_bytes / rate * 1e3))
    for xdt in (torch.bfloat16, torch.float32):
        xx = x.to(xdt)
        o = gated_residual(xx, y, gate)
        e = rel(o, gated_residual_ref(xx, y, gate))
        n_bytes = L * C * (2 * xx.element_size() + 2)
        ms = bench_ms(lambda: gated_residual(xx, y, gate), rep)
        tag = "bf16" if xdt == torch.bfloat16 else "fp32"
        row(f"gated residual x {tag} (ours)", L, ms, e, gbs=n_bytes / ms / 1e6, vs_copy=ms / (n_bytes / rate * 1e3))
        ms = bench_ms(lambda: (xx.float() + gate * y.float()).to(xdt), rep)
        row(f"gated residual x {tag} (torch unfused)", L, ms, None, gbs=n_bytes / ms / 1e6,
            vs_copy=ms / (n_bytes / rate * 1e3))


def _sweep_mem(name, mod, attrs, fn, n_bytes, rate, grid):
    saved = tuple(getattr(mod, a) for a in attrs)
    res, best = [], None
    for vals in grid:
        for a, val in zip(attrs, vals):
            setattr(mod, a, val)
        ms = bench_ms(fn, 200)
        res.append(dict(zip(attrs, vals), ms=ms, x_copy=ms / (n_bytes / rate * 1e3)))
        print(f"sweep {name} {vals}: {ms:.3f} ms ({res[-1]['x_copy']:.2f}x copy)", flush=True)
        if best is None or ms < best[0]:
            best = (ms, vals)
    for a, val in zip(attrs, best[1] if best else saved):
        setattr(mod, a, val)
    print(f"sweep {name}: using {best[1]}", flush=True)
    return res


MEM_GRID = [(r, w) for r in (1, 2, 4) for w in (2, 4, 8)]


def sweep_mem(L, rate):
    x = torch.randn(1, L, C, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(1, L, C, device="cuda", dtype=torch.bfloat16)
    shift, scale, gate = (torch.randn(1, 1, C, device="cuda") for _ in range(3))
    rope = rope_tables(positions_for(L), GRID_H, GRID_W, D, device="cuda")
    w = torch.ones(C, device="cuda", dtype=torch.bfloat16)
    return dict(
        qk=_sweep_mem("qk_norm_rope", qk_mod, ("TOKENS_PER_PROGRAM", "NUM_WARPS"),
                      lambda: qk_norm_rope(x, y, w, w, rope, H), 8 * L * C, rate, MEM_GRID),
        adaln=_sweep_mem("adaln", adaln_mod, ("ROWS_PER_PROGRAM", "NUM_WARPS"),
                         lambda: adaln_modulate(x, shift, scale), 4 * L * C, rate, MEM_GRID),
        gated=_sweep_mem("gated_residual", adaln_mod, ("GR_ROWS_PER_PROGRAM", "GR_NUM_WARPS"),
                         lambda: gated_residual(x, y, gate), 6 * L * C, rate, MEM_GRID),
    )


# ----------------------------------------------------------------------------- main


def fmt(v, spec):
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def print_table(rate):
    print(f"\ncopy rate {rate / 1e9:.0f} GB/s (read + write)")
    hdr = f"{'kernel':<48} {'L':>6} {'ms':>8} {'TFLOP/s':>8} {'GB/s':>6} {'x copy':>6} {'rel err':>8}  note"
    print(hdr)
    print("-" * len(hdr))
    for r in ROWS:
        print(f"{r['kernel']:<48} {r['L']:>6} {fmt(r['ms'], '8.3f'):>8} {fmt(r['tflops'], '8.0f'):>8} "
              f"{fmt(r['gbs'], '6.0f'):>6} {fmt(r['x_copy_time'], '6.2f'):>6} {fmt(r['rel_err'], '8.1e'):>8}  {r['note']}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--L", type=int, nargs="+", default=[48360, 48384])
    ap.add_argument("--sweep", action="store_true", help="try kernel configs first")
    ap.add_argument("--sweep-only", action="store_true")
    ap.add_argument("--skip-sweep", nargs="*", default=[], choices=["mem"])
    ap.add_argument("--quick", action="store_true", help="short timings")
    ap.add_argument("--skip", nargs="*", default=[], choices=["qk", "attn", "adaln"])
    ap.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "kernels.json"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/kernels.py needs a CUDA GPU")
    torch.manual_seed(int(time.time()))  # fresh random data every run
    dev = torch.cuda.get_device_name()
    print(f"{dev}, torch {torch.__version__}, triton {triton.__version__}, python {platform.python_version()}",
          flush=True)
    rate = copy_rate()
    rep_mem, rep_attn = (100, 300) if args.quick else (500, 1500)
    result = dict(device=dev, torch=torch.__version__, triton=triton.__version__, copy_rate_Bps=rate,
                  argv=sys.argv)
    if args.sweep or args.sweep_only:
        L0 = args.L[0]
        if "mem" not in args.skip_sweep:
            result["sweep_mem"] = sweep_mem(L0, rate)
        result["sweep_attention"] = sweep_attention(L0, 400 if not args.quick else 200)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        if args.sweep_only:
            return
    for L in args.L:
        qo = ko = None
        if "qk" not in args.skip:
            qo, ko = bench_qk(L, rate, rep_mem)
        if "adaln" not in args.skip:
            bench_adaln(L, rate, rep_mem)
        if "attn" not in args.skip:
            bench_attention(L, rep_attn, qo, ko)
        del qo, ko
        torch.cuda.empty_cache()
    result["rows"] = ROWS
    result["configs"] = dict(attention={m: c.__dict__ for m, c in attn_mod.DEFAULT_CONFIGS.items()},
                             qk_norm_rope=(qk_mod.TOKENS_PER_PROGRAM, qk_mod.NUM_WARPS),
                             adaln=(adaln_mod.ROWS_PER_PROGRAM, adaln_mod.NUM_WARPS),
                             gated_residual=(adaln_mod.GR_ROWS_PER_PROGRAM, adaln_mod.GR_NUM_WARPS))
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    print_table(rate)


if __name__ == "__main__":
    main()
