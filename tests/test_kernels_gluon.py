"""The warp-specialized Gluon attention kernels (kernels/attention_gluon.py) on a machine without a GPU.

Gluon kernels do not run in Triton's CPU interpreter, so CI cannot check their numbers (the GPU
bench does, against float64: bench/kernels.py, bench/gluon_attn.py). What CI checks: the kernel
compiles for sm_90a with the installed Triton and its bundled ptxas (a fresh process, without
TRITON_INTERPRET), it fits in an H100's shared memory, the warp specialization really happened
(partitions with their own register budgets, every consumer issuing wgmma; for int8-int8, P fed to
the tensor cores from registers without shuffles), `flash_attention` routes only bf16 and int8-int8
CUDA calls to them, and the quantizer stores V's keys in the order the int8 kernel expects.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

# as in test_kernels.py: whichever kernel test module pytest imports first, triton must first be
# imported with the interpreter on, or the interpreter tests of the same process break
os.environ["TRITON_INTERPRET"] = "1"
USES_TRITON_INTERPRETER = True  # conftest: kernel calls on CPU tensors run the interpreter here

import pytest  # noqa: E402
import torch  # noqa: E402

from storymem_rt.kernels import attention as attn_mod  # noqa: E402
from storymem_rt.kernels.attention_gluon import HAVE_GLUON  # noqa: E402

pytestmark = pytest.mark.skipif(not HAVE_GLUON, reason="this Triton has no Gluon (triton.experimental.gluon)")

H100_MAX_SHARED = 232448  # bytes of dynamic shared memory one block may use on sm_90

PROBE = r"""
import json, re, sys
from storymem_rt.kernels.attention_gluon import compile_ws_sm90
out = []
for bn, st, nc, lazy, D in json.loads(sys.argv[1]):
    k = compile_ws_sm90(block_n=bn, stages=st, consumers=nc, lazy=lazy, D=D)
    ptx = k.asm["ptx"]
    # (n, A operand from registers?) of every wgmma: Q.K is n = block_n from shared memory, P.V n = D
    # with P from registers
    mma = re.findall(r"wgmma\.mma_async\.sync\.aligned\.m64n(\d+)k16\.f32\.bf16\.bf16\s*\{[^}]*\},\s*(\{?)", ptx)
    out.append(dict(cfg=[bn, st, nc, lazy, D], shared=k.metadata.shared, cubin=len(k.asm["cubin"]),
                    mma=[f"n{n}.{'regs' if r else 'smem'}" for n, r in mma], setmaxnreg=ptx.count("setmaxnreg"),
                    ex2=ptx.count("ex2.approx"), sqrt=ptx.count("sqrt."), setp=ptx.count("setp.")))
print(json.dumps(out))
"""


def _compile(cfgs):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", PROBE, json.dumps(cfgs)], capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return {tuple(d["cfg"]): d for d in json.loads(r.stdout.strip().splitlines()[-1])}


def test_ws_kernel_compiles_for_sm90_and_is_warp_specialized():
    res = _compile([[64, 4, 3, 64, 128], [64, 4, 3, 0, 128], [128, 3, 2, 64, 128], [128, 3, 2, 0, 64]])
    for cfg, d in res.items():
        bn, st, nc, lazy, D = cfg
        assert d["cubin"] > 0, cfg
        assert d["shared"] <= H100_MAX_SHARED, (cfg, d["shared"])
        # the ring of K/V stages and every consumer's Q tile are all there
        assert d["shared"] >= (2 * st * bn + nc * 64) * D * 2, (cfg, d["shared"])
        # setmaxnreg only appears when the partitions were split off with their own register budgets
        assert d["setmaxnreg"] >= 2, (cfg, d)
        # Q.K (D/16 wgmmas, both operands in shared memory) and P.V (block_n/16, P from registers)
        # come in whole groups: Q.K at block 0, in each loop body (the exact one, and the lazy one
        # if any) and at the peeled last block; P.V in each loop body, the peeled block and after it.
        # Triton 3.6 emits every consumer's copy, 3.8 shares some: at least two consumers' worth.
        qk, pv = d["mma"].count(f"n{bn}.smem"), d["mma"].count(f"n{D}.regs")
        assert qk + pv == len(d["mma"]), d
        groups = 4 if lazy else 3
        assert qk % (D // 16) == 0 and pv % (bn // 16) == 0, d
        assert 2 * groups <= qk // (D // 16) <= nc * groups and 2 * groups <= pv // (bn // 16) <= nc * groups, d
        assert d["ex2"] > 0
    lazy, exact = res[(64, 4, 3, 64, 128)], res[(64, 4, 3, 0, 128)]
    # the lazy rescale's guard: Q's row norms (a square root per row)
    assert lazy["sqrt"] > 0 and exact["sqrt"] == 0, (lazy, exact)


def test_flash_attention_routes_bf16_and_int8_int8_cuda_calls_to_gluon(monkeypatch):
    q = torch.zeros(1, 8, 2, 128, dtype=torch.bfloat16)
    assert not attn_mod.uses_gluon(q, "bf16")  # CPU tensors: the tl kernel (interpreter) or torch
    meta = torch.empty(1, 8, 2, 128, dtype=torch.bfloat16, device="meta")
    monkeypatch.setattr(attn_mod, "is_hopper", lambda index: True)
    monkeypatch.setattr(torch.Tensor, "device", property(lambda self: torch.device("cuda", 0)))
    assert attn_mod.uses_gluon(meta, "bf16") and attn_mod.uses_gluon(meta, "int8-int8")
    for mode in ("int8-fp8", "int8"):
        assert not attn_mod.uses_gluon(meta, mode)
    assert not attn_mod.uses_gluon(meta, "bf16", "tl") and not attn_mod.uses_gluon(meta, "int8-int8", "tl")
    monkeypatch.setattr(attn_mod, "is_hopper", lambda index: False)
    assert not attn_mod.uses_gluon(meta, "bf16") and not attn_mod.uses_gluon(meta, "int8-int8")


PROBE_I8 = r"""
import json, re, sys
from storymem_rt.kernels.attention_gluon import compile_ws_int8_sm90
out = []
for bn, st, nc in json.loads(sys.argv[1]):
    k = compile_ws_int8_sm90(block_n=bn, stages=st, consumers=nc)
    ptx = k.asm["ptx"]
    mma = re.findall(r"wgmma\.mma_async\.sync\.aligned\.m64n128k32\.s32\.(\w+)\.(\w+)\s*\{[^}]*\},\s*(\{?)", ptx)
    out.append(dict(cfg=[bn, st, nc], shared=k.metadata.shared, cubin=len(k.asm["cubin"]),
                    mma=[f"{a}.{b}.{'regs' if r else 'smem'}" for a, b, r in mma],
                    setmaxnreg=ptx.count("setmaxnreg"), shfl=ptx.count("shfl.sync"),
                    threads=int(ptx.split(".reqntid")[1].split()[0].strip(",")) if ".reqntid" in ptx else 0))
print(json.dumps(out))
"""


def test_int8_ws_kernels_compile_for_sm90_with_p_from_registers(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compiled here, not a cached PTX from before a change
    cfgs = [[128, 4, 3], [128, 3, 2]]  # the default, and two consumers
    r = subprocess.run([sys.executable, "-c", PROBE_I8, json.dumps(cfgs)], capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = {tuple(d["cfg"]): d for d in json.loads(r.stdout.strip().splitlines()[-1])}
    for (bn, st, nc), d in res.items():
        assert d["cubin"] > 0 and d["shared"] <= H100_MAX_SHARED, d
        assert d["setmaxnreg"] >= 2, d
        # Q.K (D/32 wgmmas of k = 32, both operands in shared memory, int8) and P.V (block_n/32, P
        # from registers: _relabel_p converts trivially, the compile would fail otherwise) come in
        # whole groups, one per call site of the block function (first block, unmasked loop body,
        # masked last block) for at least two consumers (Triton 3.6 emits every consumer's copy, 3.8
        # shares some); the P.V ones read both operands as unsigned (the `_u8_pv_hook` rewrite)
        qk, pv = d["mma"].count("s8.s8.smem"), d["mma"].count("u8.u8.regs")
        assert qk + pv == len(d["mma"]), d  # nothing else: no P.V left signed, no Q.K read as unsigned
        assert qk * (bn // 32) == pv * (128 // 32), d
        assert 2 * 2 <= qk // 4 <= nc * 3, d
        # warpgroups: nc consumers and the loader's
        assert d["threads"] == 128 * (nc + 1), d
        # shuffles only for the row max and sum (2 per row-reduction step): no layout shuffles of P
        assert d["shfl"] <= nc * 3 * 2 * 2 * 2 + 8, d


def test_u8_patch_rewrites_only_the_pv_wgmmas_of_the_unsigned_kernel():
    from storymem_rt.kernels.attention_gluon import _u8_pv_patch

    regs_a = "wgmma.mma_async.sync.aligned.m64n128k32.s32.s8.s8 {%r1,%r2}, {%r9,%r10,%r11,%r12}, %rd3, p, 1;"
    smem_a = "wgmma.mma_async.sync.aligned.m64n128k32.s32.s8.s8 {%r1,%r2}, %rd1, %rd2, p, 1;"
    body = f"{{\n\t{smem_a}\n\t{regs_a}\n}}"
    out = _u8_pv_patch(".entry _attn_fwd_ws_i8u(\n" + body)
    assert smem_a in out and regs_a not in out
    assert regs_a.replace(".s8.s8", ".u8.u8") in out
    other = ".entry _attn_fwd_ws_i8(\n" + body  # any other kernel is left alone
    assert _u8_pv_patch(other) == other


def test_quantizer_stores_v_in_the_gluon_kernels_key_order():
    from storymem_rt.kernels.attention import quantize_qkv

    g = torch.Generator().manual_seed(0)
    B, L, H, D = 2, 77, 2, 128
    q, k, v = (torch.randn(B, L, H, D, generator=g).bfloat16() for _ in range(3))
    plain = quantize_qkv(q, k, v, "int8-int8", v_block=32)
    perm = quantize_qkv(q, k, v, "int8-int8", v_block=32, perm32=True)
    vt0, vt1 = plain[4], perm[4]
    assert vt1.shape[-1] % 32 == 0 and vt1.shape[-1] >= L
    # key c = 8i + 2t + e of each 32 sits at column 16 (i >> 1) + 4t + 2 (i & 1) + e
    c = torch.arange(vt1.shape[-1])
    i, t, e = (c % 32) // 8, (c % 8) // 2, c % 2
    col = c - c % 32 + 16 * (i // 2) + 4 * t + 2 * (i % 2) + e
    want = torch.zeros_like(vt1)
    want[..., col] = torch.nn.functional.pad(vt0, (0, vt1.shape[-1] - vt0.shape[-1]))
    assert torch.equal(want, vt1)
    assert not torch.equal(vt1[..., :vt0.shape[-1]], vt0)  # the order really differs
    # the per-block column sums (VADD) and the output shift do not depend on the order (up to float sums)
    assert torch.equal(plain[7], perm[7])
    torch.testing.assert_close(plain[6], perm[6], rtol=1e-6, atol=1e-7)  # fp32 sums in another order
    # the unsigned kernel's V: the same values + 128 as uint8 (128 past L), no VADD
    uns = quantize_qkv(q, k, v, "int8-int8", v_block=32, perm32=True, unsigned_v=True)
    assert uns[4].dtype == torch.uint8 and uns[7] is None
    assert torch.equal(uns[4].to(torch.int16), vt1.to(torch.int16) + 128)
    uns_plain = quantize_qkv(q, k, v, "int8-int8", v_block=32, unsigned_v=True)[4]
    assert (uns_plain[..., L:] == 128).all() and torch.equal(uns_plain[..., :L].to(torch.int16),
                                                              vt0[..., :L].to(torch.int16) + 128)
    for a, b in zip(uns[:4] + uns[5:7], perm[:4] + perm[5:7]):
        assert torch.equal(a, b)
