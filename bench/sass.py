"""Compile an attention kernel for sm_90a without a GPU and count its SASS instructions.

    python bench/sass.py --mode bf16 --cfg 128,128,8,3 [--dump out.sass]
    python bench/sass.py --mode gluon --cfg 64,4,3,64,0 --all-loops   # the warp-specialized Gluon kernel
    python bench/sass.py --mode gluon-int8 --cfg 128,3,3,0   # its int8-int8 sibling

Triton's bundled ptxas/nvdisasm do the work, so this runs on a CPU-only machine (its Triton may be
newer than the device's: counts are a guide to the instruction mix, not the device's exact code).
Prints the instruction histogram of the kernel's hottest loop (the longest backward branch
target range), which is what the tile time model in kernels/NOTES.md counts.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


def compile_attention(mode: str, bm: int, bn: int, warps: int, stages: int, D: int = 128):
    import torch

    torch.cuda.is_available = lambda: True  # make kernels/_triton.jit build compiled (not interpreter) kernels
    from storymem_rt.kernels import attention as A

    md = A.MODES[mode]
    qdt = "bf16" if md == 0 else "i8"
    vdt = {0: "bf16", 1: "fp8e4nv", 2: "bf16", 3: "i8"}[md]
    vblock = f"[{bn}, {D}]" if md in (0, 2) else f"[{D}, {bn}]"
    sig = {"desc_q": f"tensordesc<{qdt}[{bm}, {D}]>", "desc_k": f"tensordesc<{qdt}[{bn}, {D}]>",
           "desc_v": f"tensordesc<{vdt}{vblock}>", "O": "*bf16", "QS": "*fp32", "KS": "*fp32", "VS": "*fp32",
           "VM": "*fp32", "VADD": "*i32", "Lq": "i32", "Lk": "i32", "H": "i32", "n_kblk": "i32",
           "n_vblk": "i32", "stride_ob": "i32", "stride_ol": "i32", "qk_scale": "fp32",
           "D": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "MODE": "constexpr",
           "K_BLOCK": "constexpr", "DOT_F32": "constexpr"}
    consts = {"D": D, "BLOCK_M": bm, "BLOCK_N": bn, "MODE": md, "K_BLOCK": A.K_BLOCK, "DOT_F32": False}
    fn = A._attn_fwd_kernel
    src = ASTSource(fn=fn, signature=sig, constexprs=consts)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})


def _tool(name: str, k, *args) -> str:
    exe = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        return subprocess.run([exe, *args, f.name], capture_output=True, text=True, check=True).stdout


def sass_of(k) -> str:
    return _tool("nvdisasm", k, "-c")


def resources(k) -> str:
    """Registers, spills and shared memory as cuobjdump reports them."""
    out = _tool("cuobjdump", k, "-res-usage")
    m = re.search(r"REG:(\d+).*?SHARED:(\d+)", out, re.S)
    return f"regs {m.group(1)} shared {m.group(2)} B (static), dynamic {k.metadata.shared} B" if m else out


LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)")


def _instructions(sass: str):
    """[(address, opcode, line, predicated)] and {label: address} (nvdisasm names branch targets `.L_x_N`)."""
    ins, labels, pending = [], {}, []
    for line in sass.splitlines():
        lab = re.match(r"\s*(\.L_x_\d+):", line)
        if lab:
            pending.append(lab.group(1))
            continue
        m = LINE.search(line)
        if m:
            addr = int(m.group(1), 16)
            for name in pending:
                labels[name] = addr
            pending = []
            ins.append((addr, m.group(3), line, bool(m.group(2))))
    return ins, labels


def loops(sass: str):
    """Every loop, as its instructions, largest first. A loop closes with a predicated branch back to a
    label; the unconditional ones come back from the mbarrier-wait retry stubs at the end of the kernel."""
    ins, labels = _instructions(sass)
    out = []
    for addr, op, line, predicated in ins:
        tgt = re.search(r"\((\.L_x_\d+)\)", line) if op.startswith("BRA") and predicated else None
        if tgt and tgt.group(1) in labels and labels[tgt.group(1)] < addr:
            out.append([i for i in ins if labels[tgt.group(1)] <= i[0] <= addr])
    return sorted(out, key=len, reverse=True)


def hot_loop(sass: str):
    """Instructions (address, opcode, line, predicated) of the largest loop; the whole kernel if none."""
    found = loops(sass)
    return found[0] if found else _instructions(sass)[0]


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", default="bf16",
                    help="a mode of attention.py, or 'gluon' / 'gluon-int8' (attention_gluon.py)")
    ap.add_argument("--cfg", default="128,128,8,3",
                    help="block_m,block_n,warps,stages; gluon: block_n,stages,consumers,lazy,consumer_regs (0: default); "
                         "gluon-int8: block_n,stages,consumers,consumer_regs (0: default)")
    ap.add_argument("--dump")
    ap.add_argument("--all-loops", action="store_true", help="also print every loop's size and MUFU count")
    a = ap.parse_args(argv)
    if a.mode == "gluon":
        from storymem_rt.kernels.attention_gluon import compile_ws_sm90

        bn, st, nc, lazy, regs = (int(x) for x in a.cfg.split(","))
        k = compile_ws_sm90(bn, st, nc, lazy, regs or None)
    elif a.mode == "gluon-int8":
        from storymem_rt.kernels.attention_gluon import compile_ws_int8_sm90

        bn, st, nc, regs = (int(x) for x in a.cfg.split(","))
        k = compile_ws_int8_sm90(bn, st, nc, regs or None)
    else:
        bm, bn, w, s = (int(x) for x in a.cfg.split(","))
        k = compile_attention(a.mode, bm, bn, w, s)
    sass = sass_of(k)
    if a.dump:
        open(a.dump, "w").write(sass)
        open(a.dump + ".ptx", "w").write(k.asm["ptx"])
    loop = hot_loop(sass)
    hist = collections.Counter(op.split(".")[0] for _, op, _, _ in loop)
    print(f"{a.mode} {a.cfg}: {resources(k)}; hot loop {len(loop)} instructions")
    for op, n in hist.most_common():
        print(f"  {op:10s} {n}")
    if a.all_loops:
        for lp in (lp for lp in loops(sass) if len(lp) >= 16):
            h = collections.Counter(op.split(".")[0] for _, op, _, _ in lp)
            print(f"  loop {lp[0][0]:#x}-{lp[-1][0]:#x}: {len(lp)} instructions, {h['MUFU']} MUFU, "
                  f"{h['FMUL']} FMUL, {h['HGMMA']} HGMMA")


if __name__ == "__main__":
    sys.exit(main())
