"""The warp-specialized Gluon attention kernel (kernels/attention_gluon.py) on a machine without a GPU.

Gluon kernels do not run in Triton's CPU interpreter, so CI cannot check their numbers (the GPU
bench does, against float64: bench/kernels.py, bench/gluon_attn.py). What CI checks: the kernel
compiles for sm_90a with the installed Triton and its bundled ptxas (a fresh process, without
TRITON_INTERPRET), it fits in an H100's shared memory, the warp specialization really happened
(partitions with their own register budgets, both consumers issuing wgmma), and `flash_attention`
routes only bf16 CUDA calls to it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

# as in test_kernels.py: whichever kernel test module pytest imports first, triton must first be
# imported with the interpreter on, or the interpreter tests of the same process break
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from storymem_rt.kernels import attention as attn_mod  # noqa: E402
from storymem_rt.kernels.attention_gluon import HAVE_GLUON  # noqa: E402

pytestmark = pytest.mark.skipif(not HAVE_GLUON, reason="this Triton has no Gluon (triton.experimental.gluon)")

H100_MAX_SHARED = 232448  # bytes of dynamic shared memory one block may use on sm_90

PROBE = r"""
import json, sys
from storymem_rt.kernels.attention_gluon import compile_ws_sm90
out = []
for bn, st, pp, D in json.loads(sys.argv[1]):
    k = compile_ws_sm90(block_n=bn, stages=st, pingpong=pp, D=D)
    ptx = k.asm["ptx"]
    out.append(dict(cfg=[bn, st, pp, D], shared=k.metadata.shared, cubin=len(k.asm["cubin"]),
                    wgmma=ptx.count("wgmma.mma_async"), setmaxnreg=ptx.count("setmaxnreg"),
                    arrive=ptx.count("mbarrier.arrive.shared"), ex2=ptx.count("ex2.approx")))
print(json.dumps(out))
"""


def _compile(cfgs):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", PROBE, json.dumps(cfgs)], capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return {tuple(d["cfg"]): d for d in json.loads(r.stdout.strip().splitlines()[-1])}


def test_ws_kernel_compiles_for_sm90_and_is_warp_specialized():
    res = _compile([[128, 3, True, 128], [128, 3, False, 128], [128, 3, True, 64]])
    for cfg, d in res.items():
        assert d["cubin"] > 0, cfg
        assert d["shared"] <= H100_MAX_SHARED, (cfg, d["shared"])
        # setmaxnreg only appears when the partitions were split off with their own register budgets
        assert d["setmaxnreg"] >= 2, (cfg, d)
        # two consumers, each issuing Q.K twice (block 0, loop) at D/16 wgmmas and P.V twice (loop, last
        # block) at block_n/16
        bn, D = cfg[0], cfg[3]
        assert d["wgmma"] == 2 * (2 * D // 16 + 2 * bn // 16), (cfg, d)
        assert d["ex2"] > 0
    pp, no_pp = res[(128, 3, True, 128)], res[(128, 3, False, 128)]
    # ping-pong adds the turn hand-overs: one arrive per MMA issue group in each consumer
    assert pp["arrive"] > no_pp["arrive"], (pp, no_pp)
    # the default config uses the ring the device sweep chose (3 stages of 128 keys) and fits
    assert pp["shared"] > 3 * 2 * 128 * 128 * 2


def test_flash_attention_routes_only_bf16_cuda_calls_to_gluon(monkeypatch):
    q = torch.zeros(1, 8, 2, 128, dtype=torch.bfloat16)
    assert not attn_mod._use_gluon(q, "bf16")  # CPU tensors: the tl kernel (interpreter) or torch
    meta = torch.empty(1, 8, 2, 128, dtype=torch.bfloat16, device="meta")
    monkeypatch.setattr(attn_mod, "is_hopper", lambda index: True)
    monkeypatch.setattr(torch.Tensor, "device", property(lambda self: torch.device("cuda", 0)))
    assert attn_mod._use_gluon(meta, "bf16")
    for mode in ("int8-int8", "int8-fp8", "int8"):
        assert not attn_mod._use_gluon(meta, mode)
    monkeypatch.setenv("STORYMEM_ATTN_KERNEL", "triton")
    assert not attn_mod._use_gluon(meta, "bf16")
    monkeypatch.setattr(attn_mod, "is_hopper", lambda index: False)
    monkeypatch.delenv("STORYMEM_ATTN_KERNEL")
    assert not attn_mod._use_gluon(meta, "bf16")
