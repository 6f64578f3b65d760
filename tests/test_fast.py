"""The fast options of the one WanDiT on the CPU at tiny size: the bench's correctness check (what
CI covers of `storymem-rt bench`), `DiTOptions.fast` against the plain options in float32 (our
kernels through their torch fallbacks and through Triton's interpreter), FP8 numerics, the per-shot
caches, CFG batched against back to back and off, the one loop with fast and plain experts, the
expert slot, the non-finite check, and the diffusers peer's key map.
"""
from __future__ import annotations

import copy
import dataclasses
import importlib
import json

import pytest
import torch

from conftest import rel_err
from storymem_rt.configs import DIT_PRESETS, SAMPLING_PRESETS
from storymem_rt.dit import DiTOptions
from storymem_rt.shot import ShotSpec, denoise, draw_noise


class _Lazy:
    """A module imported on first use. storymem_rt.fast imports triton (through our kernels); doing
    that while pytest collects would come before tests/test_kernels.py turns Triton's interpreter
    on for the worker process they share, and break those tests."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr):
        if attr.startswith("_"):  # pytest probes objects for markers while collecting: no import then
            raise AttributeError(attr)
        return getattr(importlib.import_module(self._name), attr)


bench = _Lazy("storymem_rt.benchmarks.dit")
sampling = _Lazy("storymem_rt.sampling")
backends = _Lazy("storymem_rt.backends")
fp8 = _Lazy("storymem_rt.fp8")
CFG = DIT_PRESETS["tiny-i2v"]


@pytest.fixture(autouse=True)
def _kernels_as_torch(monkeypatch):
    # tests/test_kernels.py sets TRITON_INTERPRET=1 for its whole process (xdist shares workers);
    # here the kernels run their torch fallbacks unless a test asks for the interpreter.
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def _inputs(model_dtype=torch.float32, memory=2, frames=4, h=8, w=8, seed=0):
    return bench.make_inputs(CFG, "cpu", frames=frames, h=h, w=w, memory=memory, dtype=model_dtype, seed=seed,
                       text_tokens=7)


# ---- the bench's check --------------------------------------------------------------------------
def test_bench_correctness_check_bounds():
    res = bench.correctness_check(CFG, "cpu", torch.bfloat16, seed=0, peer=True)
    print(res)
    # bf16 rounding of the plain model: the fast bf16 path may not be worse than it
    assert res["plain_bf16_vs_fp32"] < 1e-2
    assert res["fast_bf16_vs_fp32"] <= 1.5 * res["plain_bf16_vs_fp32"] + 1e-4
    # e4m3 weights and activations (per channel / per token): a few 1e-3 here, 6.6e-3 at A14B size
    assert res["fast_fp8_vs_fp32"] < 5e-2
    assert res["fast_fp8_vs_fp32"] > res["fast_bf16_vs_fp32"]  # the FP8 GEMMs are really in the path
    # cached text K/V are exactly the recomputed ones
    assert res["fast_bf16_text_cache_max_abs_diff"] == 0.0
    assert res["fast_fp8_text_cache_max_abs_diff"] == 0.0
    # CFG as one batch of 2 or two of 1 is the same function
    assert res["fast_bf16_cfg_batched_vs_sequential"] < 1e-4
    # FP8: bf16 outputs of float32 GEMMs blocked differently for batch 1 and 2 round apart now and then
    # (2.3e-4 here, before and after the one-DiT redesign: the same numbers)
    assert res["fast_fp8_cfg_batched_vs_sequential"] < 1e-3
    # diffusers peer (bf16 residual stream there, float32 here)
    assert res["diffusers_vs_plain"] < 3e-2


def test_bench_runs_end_to_end_on_cpu(tmp_path):
    out = tmp_path / "bench.json"
    args = bench.BenchArgs(model="tiny-i2v", device="cpu", layers=2, size=(64, 32), frame_num=5, memory_frames=1,
                           repeats=1, compile=False, cuda_graph=False, memory_plan=False, json_path=str(out))
    res = bench.run(args)
    kinds = [r["kind"] for r in res["rows"]]
    assert "error" not in kinds and "skipped" not in kinds, res["rows"]
    names = [r["name"] for r in res["rows"]]
    assert any("fast bf16" in n for n in names) and any("fast fp8" in n for n in names)
    assert json.loads(out.read_text())["info"]["tokens"] == 3 * 2 * 4


# ---- the fast path against WanDiT -----------------------------------------------------------------
@pytest.mark.parametrize("ops", ["kernels", "torch"])
def test_fast_fp32_equals_wandit(ops):
    """Same function as WanDiT: fused qkv, RoPE from our tables (memory at negative positions),
    affine LayerNorm as a modulation, cached text K/V. float32, so only summation order differs."""
    model = bench.random_expert(CFG, "cpu", torch.float32, seed=1)
    inp = _inputs()
    ref = model(*inp.args())
    fm = copy.deepcopy(model).convert_(DiTOptions.fast("fp32", ops=ops))
    assert type(fm) is type(model) and fm.blocks[0].self_attn.fused
    assert rel_err(fm(*inp.args()), ref) < 1e-5
    assert rel_err(fm(*inp.args()), ref) < 1e-5  # second call: from the caches
    moved = dataclasses.replace(inp, frame_pos=inp.frame_pos.clone())
    moved.frame_pos[0] -= 3  # a memory frame further back: different attention
    assert rel_err(fm(*moved.args()), ref) > 1e-4


_INTERPRETED = """
import copy, torch
from storymem_rt.benchmarks.dit import make_inputs, random_expert, rel_err
from storymem_rt.configs import DIT_PRESETS
from storymem_rt.dit import DiTOptions
cfg = DIT_PRESETS["tiny-i2v"]
model = random_expert(cfg, "cpu", torch.float32, seed=2)
inp = make_inputs(cfg, "cpu", frames=2, h=4, w=4, memory=1, dtype=torch.float32, text_tokens=5)
ref = model(*inp.args())
fast = copy.deepcopy(model).convert_(DiTOptions.fast("fp32", ops="kernels"))
print("REL", rel_err(fast(*inp.args()), ref))
"""


def test_fast_fp32_with_triton_kernels_interpreted():
    """Our Triton kernels (qk-norm + RoPE, adaLN, gated residual) under the interpreter inside
    the fast block: catches layouts the kernels refuse (e.g. transposed token rows) on the CPU.
    In a fresh process: the interpreter must be on before triton is first imported."""
    import os
    import subprocess
    import sys

    if torch.cuda.is_available():
        pytest.skip("CUDA machine: the kernels run for real in the bench")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", _INTERPRETED], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rel = float(done.stdout.split("REL")[-1])
    assert rel < 1e-5


def test_float32_reference_is_the_module_upcast():
    model = bench.random_expert(CFG, "cpu", torch.bfloat16, seed=3)
    inp = _inputs(torch.bfloat16)
    up = copy.deepcopy(model).float()
    ref = up(inp.x.float(), inp.t, inp.context.float(), inp.y.float(), inp.frame_pos)
    assert rel_err(bench.float32_forward(model, *inp.args()), ref) == 0.0


def test_text_cache_follows_the_tensor():
    model = bench.random_expert(CFG, "cpu", torch.float32, seed=4).convert_(DiTOptions.fast("fp32"))
    inp = _inputs()
    a = model(*inp.args())
    assert len(model._text_cache) == 1
    model(*inp.args())
    assert len(model._text_cache) == 1  # same tensor: no new entry
    inp.context.mul_(2.0)  # in place: the version counter moves, the cache must not serve the old K/V
    b = model(*inp.args())
    fresh = copy.deepcopy(model).convert_(dataclasses.replace(model.options, cache_text=False))
    assert torch.equal(b, fresh(*inp.args()))
    assert rel_err(a, b) > 1e-4


# ---- FP8 ----------------------------------------------------------------------------------------
def test_fp8_linear_numerics():
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 96)
    x = torch.randn(5, 7, 256)
    f8 = fp8.FP8Linear.from_linear(lin, torch.float32)
    assert f8.weight.dtype == torch.float8_e4m3fn and f8.weight_scale.shape == (96,)
    # the GEMM is exactly the product of the dequantized operands
    xq, xs = fp8.quantize_rows(x.reshape(-1, 256))
    deq = (xq.float() * xs) @ (f8.weight.float() * f8.weight_scale[:, None]).t() + lin.bias
    assert torch.allclose(f8(x).reshape(-1, 96), deq, rtol=1e-6, atol=1e-6)
    # and within e4m3's rounding of the float linear
    assert rel_err(f8(x), lin(x)) < 5e-2
    # an all-zero activation row quantizes to zeros with scale 1 (no division by zero)
    q, s = fp8.quantize_rows(torch.zeros(2, 16))
    assert torch.all(s == 1) and torch.all(q.float() == 0)
    # FP8 in, FP8 out: the weights are reused, not quantized twice
    again = fp8.FP8Linear.from_linear(f8, torch.float32)
    assert again.weight.data_ptr() == f8.weight.data_ptr()


def test_prepare_fast_precisions():
    model = bench.random_expert(CFG, "cpu", torch.bfloat16, seed=5).convert_(DiTOptions.fast("bf16"))
    qkv = model.blocks[0].self_attn.qkv
    assert qkv.weight.shape == (3 * CFG.dim, CFG.dim)
    assert not hasattr(model.blocks[0].self_attn, "q")
    assert model.blocks[0].modulation.dtype == torch.float32  # WanDiT's float32 regions stay
    model.convert_(DiTOptions.fast("fp8"))
    assert isinstance(model.blocks[0].ffn[0], fp8.FP8Linear)
    assert isinstance(model.blocks[0].self_attn.qkv, fp8.FP8Linear)  # the fused layer quantized as one
    with pytest.raises(ValueError, match="fp8"):
        model.convert_(DiTOptions.fast("bf16"))
    with pytest.raises(ValueError, match="precision"):
        DiTOptions.fast("fp12")


# ---- the step and the loop ------------------------------------------------------------------------
def _spec(steps=6):
    s = dataclasses.replace(SAMPLING_PRESETS["m2v-a14b"], sample_steps=steps, frame_num=5)
    return ShotSpec(mode="m2v", prompt="", seed=0, size=(64, 32), sampling=s)


@pytest.mark.parametrize("cfg", ["batched", "sequential"])
def test_one_loop_fast_experts_equal_plain_experts(cfg):
    experts = {"high": bench.random_expert(CFG, "cpu", torch.float32, seed=6),
               "low": bench.random_expert(CFG, "cpu", torch.float32, seed=7)}
    spec = _spec()
    memory, frames = 1, 3
    inp = bench.make_inputs(CFG, "cpu", frames, 4, 8, memory, torch.float32, text_tokens=7)
    null = torch.zeros_like(inp.context)
    noise, g = draw_noise(0, (16, frames, 4, 8), "cpu")
    ref = denoise(experts, spec, noise, g, inp.context, null, inp.y[0], inp.frame_pos, torch.float32)
    fms = {k: copy.deepcopy(m).convert_(DiTOptions.fast("fp32")) for k, m in experts.items()}
    noise, g = draw_noise(0, (16, frames, 4, 8), "cpu")
    out = denoise(fms, spec, noise, g, inp.context, null, inp.y[0], inp.frame_pos, torch.float32, cfg=cfg)
    assert rel_err(out, ref) < 1e-5


def test_guided_step_shares_time_embedding_when_sequential():
    model = bench.random_expert(CFG, "cpu", torch.float32, seed=8).convert_(DiTOptions.fast("fp32"))
    inp = _inputs(memory=1, frames=2)
    calls = []
    orig = model.embed_time
    model.embed_time = lambda *a, **k: calls.append(1) or orig(*a, **k)
    sampling.GuidedStep(model, inp.context, torch.zeros_like(inp.context), inp.y[0], inp.frame_pos, 3.5,
                        cfg="sequential")(inp.x[0], inp.t)
    assert len(calls) == 1  # once per step, not once per branch


def test_expert_slot_swaps_weights():
    experts = {n: bench.random_expert(CFG, "cpu", torch.float32, seed=s).convert_(DiTOptions.fast("fp32"))
               for n, s in (("high", 9), ("low", 10))}
    inp = _inputs()
    want = {n: m(*inp.args()) for n, m in experts.items()}
    slot = backends.ExpertSlot.from_experts(experts, "high")
    for name in ("low", "high", "low"):
        m = slot.activate(name)
        assert m is experts["high"]  # one set of device tensors
        assert torch.equal(m(*inp.args()), want[name])
    with pytest.raises(KeyError):
        slot.activate("mid")


def test_plan_residency():
    gb = 10**9
    assert backends.plan_residency(int(14.9 * gb), int(8.8 * gb)) == "resident"  # FP8, measured working set
    assert backends.plan_residency(int(29 * gb), int(20 * gb)) == "swap"


# ---- the diffusers peer -------------------------------------------------------------------------
def test_diffusers_peer_key_map_is_exact_in_float32():
    """Every weight lands where diffusers expects it (a swapped norm or projection would be O(1))."""
    pytest.importorskip("diffusers")
    model = bench.random_expert(CFG, "cpu", torch.float32, seed=11)
    inp = dataclasses.replace(_inputs(), frame_pos=None)  # diffusers puts frames at 0..F-1
    peer = bench.diffusers_peer(model, torch.float32)
    assert rel_err(bench.peer_forward(peer, inp, CFG.text_len), model(*inp.args())) < 1e-5
