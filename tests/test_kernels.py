"""storymem_rt.kernels under Triton's CPU interpreter, against float64 references.

TRITON_INTERPRET is set here, before anything imports triton; on a machine without CUDA the
kernels are interpreter kernels whatever the import order (kernels/_triton.py).

Bounds. The interpreter stores fp32 -> bf16 by truncation (Triton 3.8), so a correct fused kernel
is within one bf16 ulp (2^-7 relative) of float64 on every element; a wrong RoPE split, position
or frequency moves some elements by O(1). Its fp32 -> e4m3 conversion mishandles values that
round up to a power of two, so the e4m3 paths get loose bounds here and tight ones for their
torch reference math (which uses torch's correct conversion).
"""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"
USES_TRITON_INTERPRETER = True  # conftest: kernel calls on CPU tensors run the interpreter here

import pytest  # noqa: E402
import torch  # noqa: E402

from storymem_rt.kernels import attention as attn_mod  # noqa: E402
from storymem_rt.kernels import qk_norm_rope as qk_mod  # noqa: E402
from storymem_rt.kernels.adaln import (adaln_modulate, adaln_modulate_ref, gated_residual,  # noqa: E402
                                       gated_residual_ref)
from storymem_rt.kernels.attention import (attend, attention_lp_ref, attention_ref,  # noqa: E402
                                           flash_attention, quantize_qkv_ref)
from storymem_rt.kernels.qk_norm_rope import (qk_norm_rope, qk_norm_rope_ref, rope_freqs_ref,  # noqa: E402
                                              rope_split, rope_tables)


def _interpreted() -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(qk_mod._qk_norm_rope_kernel, InterpretedFunction)


pytestmark = pytest.mark.skipif(
    not _interpreted(), reason="kernels were built for the GPU before TRITON_INTERPRET=1 was set: "
                               "run `pytest tests/test_kernels.py` on its own")


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def assert_within_bf16(out, ref, ulps: float = 1.0):
    """Every element within `ulps` bf16 ulps (2^-7 relative) of the float64 reference."""
    out, ref = out.double(), ref.double()
    bound = ulps * 2**-7 * ref.abs() + 1e-5 * ref.abs().max()
    excess = (out - ref).abs() - bound
    bad = int((excess > 0).sum())
    assert bad == 0, (f"{bad} of {ref.numel()} elements off by more than {ulps} bf16 ulp; worst "
                      f"|out - ref| = {float((out - ref).abs().max()):.4g} at |ref| max {float(ref.abs().max()):.4g}")


# ----------------------------------------------------------------------------- RoPE tables


def test_rope_split_is_wans():
    assert rope_split(128) == (22, 21, 21)  # 44/42/42 dims
    assert rope_split(64) == (12, 10, 10)
    with pytest.raises(ValueError):
        rope_split(127)


def test_rope_tables_match_reference_freqs():
    pos, gh, gw, d = [-7.0, -3.0, 0.0, 1.0, 5.0], 3, 4, 128
    rt = rope_tables(pos, gh, gw, d)
    ref = rope_freqs_ref(pos, gh, gw, d)  # complex128 [F*gh*gw, d/2]
    nt, nh, _ = rope_split(d)
    t = torch.arange(len(pos) * gh * gw)
    f, y, x = t // (gh * gw), (t // gw) % gh, t % gw
    j = torch.arange(d // 2)
    row = torch.where(j < nt, f[:, None], torch.where(j < nt + nh, len(pos) + y[:, None], len(pos) + gh + x[:, None]))
    assert (rt.cos[row, j].double() - ref.real).abs().max() < 1e-7
    assert (rt.sin[row, j].double() - ref.imag).abs().max() < 1e-7


# ----------------------------------------------------------------------------- qk-norm + RoPE

QK_CASES = [
    # B, positions (gaps, negative, non-integer), grid h x w, heads, head dim, padding tokens
    pytest.param(2, [-9.0, -5.0, -4.0, 0.0, 1.0, 2.0], 3, 5, 3, 128, 3, id="mem-gaps-neg-pad3"),
    pytest.param(1, [0.0, 1.0, 2.0, 3.0], 2, 7, 5, 128, 0, id="5heads-exact"),
    pytest.param(1, [-2.5, 0.0, 7.0], 4, 3, 4, 64, 1, id="d64-fractional"),
]


def _qk_inputs(B, n_tok, H, D, strided=False):
    C = H * D
    if strided:  # q and k as column slices of one fused qkv projection
        qkv = torch.randn(B, n_tok, 3 * C).bfloat16()
        q, k = qkv[..., :C], qkv[..., C:2 * C]
    else:
        q, k = torch.randn(B, n_tok, C).bfloat16(), (2 * torch.randn(B, n_tok, C)).bfloat16()
    wq = (1 + 0.2 * torch.randn(C)).bfloat16()
    wk = (1 + 0.2 * torch.randn(C))  # fp32 weight works too
    return q, k, wq, wk


@pytest.mark.parametrize("B,pos,gh,gw,H,D,pad", QK_CASES)
def test_qk_norm_rope_matches_float64(B, pos, gh, gw, H, D, pad):
    L = len(pos) * gh * gw + pad
    q, k, wq, wk = _qk_inputs(B, L, H, D, strided=(pad == 0))
    qo, ko = qk_norm_rope(q, k, wq, wk, rope_tables(pos, gh, gw, D), H)
    assert qo.shape == (B, L, H, D) and qo.dtype == torch.bfloat16 and qo.is_contiguous()
    qr, kr = qk_norm_rope_ref(q, k, wq, wk, pos, gh, gw, H)
    assert_within_bf16(qo, qr)
    assert_within_bf16(ko, kr)


@pytest.mark.parametrize("fp8", [False, True], ids=["int8", "fp8"])
def test_qk_norm_rope_quantized_output(fp8):
    pos, gh, gw, H, D = [-6.0, -2.0, 0.0, 1.0], 3, 3, 3, 128
    L = len(pos) * gh * gw + 2
    q, k, wq, wk = _qk_inputs(2, L, H, D)
    qv, qs, kv, ks = qk_norm_rope(q, k, wq, wk, rope_tables(pos, gh, gw, D), H, quant="fp8" if fp8 else "int8")
    qmax = 448.0 if fp8 else 127.0
    for v, s, r in zip((qv, kv), (qs, ks), qk_norm_rope_ref(q, k, wq, wk, pos, gh, gw, H)):
        assert v.dtype == (torch.float8_e4m3fn if fp8 else torch.int8) and s.shape == (2, L, H)
        # one scale per (token, head): its amax over D maps to the format's max
        torch.testing.assert_close(s.double(), r.abs().amax(-1) / qmax, rtol=1e-5, atol=0)
        deq = v.double() * s.double()[..., None]
        if fp8:
            ok = (deq - r).abs() <= 2**-4 * r.abs() + s.double()[..., None] * 2**-9
            assert ok.double().mean() > 0.9  # the interpreter's e4m3 rounding is off near powers of 2
            assert rel(deq, r) < 0.06
        else:
            assert ((deq - r).abs() <= 0.501 * s.double()[..., None] + 1e-6).all()


def test_qk_norm_rope_torch_fallback(monkeypatch):
    """CPU tensors without the interpreter run the torch path: same function, torch's rounding."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    pos, gh, gw, H, D = [-4.0, 0.0, 1.0], 2, 3, 2, 128
    q, k, wq, wk = _qk_inputs(1, len(pos) * gh * gw + 1, H, D)
    qo, ko = qk_norm_rope(q, k, wq, wk, rope_tables(pos, gh, gw, D), H)
    qr, kr = qk_norm_rope_ref(q, k, wq, wk, pos, gh, gw, H)
    assert_within_bf16(qo, qr, ulps=0.51)  # round to nearest: half an ulp
    assert_within_bf16(ko, kr, ulps=0.51)


def test_qk_norm_rope_rejects_bad_shapes():
    rt = rope_tables([0.0], 2, 2, 128)
    q = torch.randn(1, 4, 256).bfloat16()
    with pytest.raises(ValueError, match="divisible"):
        qk_norm_rope(q, q, torch.ones(256), torch.ones(256), rt, 3)
    with pytest.raises(ValueError, match="head_dim"):
        qk_norm_rope(q, q, torch.ones(256), torch.ones(256), rt, 4)


# ----------------------------------------------------------------------------- attention


def _attn_inputs(B, Lq, Lk, H, D=128, normed=True):
    if normed:  # RMS-normalised and RoPE-rotated q and k, as in the DiT
        pos = [-5.0, -1.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
        rt = rope_tables(pos, 3, 3, D)
        x = torch.randn(B, max(Lq, Lk), H * D).bfloat16()
        y = torch.randn(B, max(Lq, Lk), H * D).bfloat16()
        q, k = qk_norm_rope(x, y, torch.ones(H * D), torch.ones(H * D), rt, H)
        q, k = q[:, :Lq], k[:, :Lk]
    else:
        q, k = torch.randn(B, Lq, H, D).bfloat16(), torch.randn(B, Lk, H, D).bfloat16()
    v = torch.randn(B, Lk, H, D).bfloat16()
    return q, k, v


ATTN_SHAPES = [pytest.param(2, 37, 45, 2, id="B2-Lq37-Lk45"), pytest.param(1, 50, 50, 3, id="self-L50-H3")]


@pytest.mark.parametrize("B,Lq,Lk,H", ATTN_SHAPES)
def test_attention_bf16(B, Lq, Lk, H):
    q, k, v = _attn_inputs(B, Lq, Lk, H)
    out = flash_attention(q, k, v)
    assert out.shape == (B, Lq, H, 128) and out.dtype == torch.bfloat16
    ref = attention_ref(q, k, v)
    # bf16 P and output (truncated here) against float64: ~5e-3; a softmax scale off by 10% gives ~6e-2
    assert rel(out, ref) < 1e-2
    assert rel(flash_attention(q, k, v, scale=0.3), attention_ref(q, k, v, scale=0.3)) < 1e-2


def test_attention_reads_strided_projection_layout():
    """q, k, v as head views of one fused [B, L, 3, H, D] projection: no copies, same result."""
    B, L, H, D = 1, 33, 2, 128
    qkv = torch.randn(B, L, 3, H, D).bfloat16()
    q, k, v = qkv.unbind(2)
    assert not q.is_contiguous()
    assert rel(flash_attention(q, k, v), attention_ref(q, k, v)) < 1e-2


def test_attention_int8_qk():
    q, k, v = _attn_inputs(2, 37, 70, 2)
    out = attn_mod.launch_attention(q, k, v, 128**-0.5, "int8", k_block=32)  # three K blocks
    ref = attention_ref(q, k, v)
    assert rel(out, ref) < 2.5e-2
    assert rel(out, attention_lp_ref(q, k, v, mode="int8", k_block=32)) < 1e-2


def test_attention_int8_fp8():
    q, k, v = _attn_inputs(2, 37, 70, 2)
    out = attn_mod.launch_attention(q, k, v, 128**-0.5, "int8-fp8", k_block=32)
    assert torch.isfinite(out.float()).all()
    # loose: the interpreter's e4m3 rounding is broken near powers of two (tight bounds below on
    # the reference math); a lost 448 or V scale gives O(1)
    assert rel(out, attention_ref(q, k, v)) < 0.1
    assert rel(out, attention_lp_ref(q, k, v, mode="int8-fp8", k_block=32)) < 0.1


def test_attention_int8_int8():
    """INT8 P.V: P against each key block's row max on the signed 255-level grid, V INT8 per channel."""
    q, k, v = _attn_inputs(2, 37, 70, 2)  # 5 key blocks of 16, the last one masked
    bn = attn_mod.INTERPRETER_CONFIG.block_n
    out = attn_mod.launch_attention(q, k, v, 128**-0.5, "int8-int8", k_block=32)
    # the kernel is the emulation's math: only the interpreter's truncating bf16 store and ties differ
    # (~3e-3); dropping the block's 127 * colsum(V) term gives 0.62, a missing block weight 0.71
    assert rel(out, attention_lp_ref(q, k, v, mode="int8-int8", k_block=32, block_n=bn)) < 8e-3
    assert rel(out, attention_ref(q, k, v)) < 2.5e-2
    # the grid depends on the kernel's key blocks: the emulation at another block size differs
    assert rel(attention_lp_ref(q, k, v, mode="int8-int8", k_block=32, block_n=bn),
               attention_lp_ref(q, k, v, mode="int8-int8", k_block=32, block_n=32)) > 1e-4


@pytest.mark.parametrize("mode,bound", [("int8", 2e-2), ("int8-int8", 2e-2), ("int8-fp8", 5e-2)])
def test_low_precision_reference_math(mode, bound):
    """The quantization scheme itself, in torch: error against float64 as documented."""
    q, k, v = _attn_inputs(1, 64, 400, 2, normed=False)
    assert rel(attention_lp_ref(q, k, v, mode=mode), attention_ref(q, k, v)) < bound


def test_quantization_pieces():
    q, k, v = _attn_inputs(1, 20, 300, 2, normed=False)
    qd, kd, vd, k_mean, v_shift = quantize_qkv_ref(q, k, v, k_block=128)
    # per-token INT8 q: error at most half a step of its own scale
    qs = q.float().abs().amax(-1, keepdim=True) / 127
    assert ((qd - q.float()).abs() <= 0.5001 * qs).all()
    # K smoothing is exact for softmax: a constant key offset per head changes nothing
    shifted = k.double() + torch.randn(1, 1, 2, 128, dtype=torch.float64)
    torch.testing.assert_close(attention_ref(q, shifted, v), attention_ref(q, k, v), rtol=1e-9, atol=1e-12)
    # V: e4m3 per channel after smoothing; the shift carries the mean less the mean rounding error
    vc = v.float() - v.float().mean(1, keepdim=True)
    assert rel(vd, vc) < 0.04
    torch.testing.assert_close(v_shift + vd.mean(1, keepdim=True), v.float().mean(1, keepdim=True) + vc.mean(1, keepdim=True),
                               rtol=0, atol=1e-6)


def test_attention_dispatcher_on_cpu():
    q, k, v = _attn_inputs(1, 21, 30, 2)
    ref = attention_ref(q, k, v)
    for impl in ("auto", "sdpa", "cudnn", "math", "triton", "triton-tl"):  # auto and cudnn on CPU: SDPA
        assert rel(attend(q, k, v, impl), ref) < 1e-2, impl
    assert attn_mod.choose("auto", tuple(q.shape), tuple(k.shape), q.dtype, "cpu") == "sdpa"
    assert attn_mod.choose("int8-int8", tuple(q.shape), tuple(k.shape), q.dtype, "cpu") == "int8-int8"
    with pytest.raises(ValueError, match="attention must be one of"):
        attend(q, k, v, impl="nope")
    with pytest.raises(ValueError, match="match"):
        attend(q, k[:, :, :1], v)


# ----------------------------------------------------------------------------- adaLN


@pytest.mark.parametrize("per_token", [False, True], ids=["per-sample", "per-token"])
def test_adaln_modulate(per_token):
    B, L, C = 2, 13, 200
    x = (3 * torch.randn(B, L, C) + 1).bfloat16()
    Ls = L if per_token else 1
    shift, scale = torch.randn(B, Ls, C), 0.3 * torch.randn(B, Ls, C)
    out = adaln_modulate(x, shift, scale)
    assert out.dtype == torch.bfloat16 and out.shape == (B, L, C)
    assert_within_bf16(out, adaln_modulate_ref(x, shift, scale))
    # bf16 modulation works too
    assert_within_bf16(adaln_modulate(x, shift.bfloat16(), scale.bfloat16()),
                       adaln_modulate_ref(x, shift.bfloat16(), scale.bfloat16()))


@pytest.mark.parametrize("xdtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_gated_residual(xdtype):
    B, L, C = 2, 11, 200
    x, y, gate = torch.randn(B, L, C).to(xdtype), torch.randn(B, L, C).bfloat16(), torch.randn(B, 1, C)
    out = gated_residual(x, y, gate)
    assert out.dtype == xdtype
    ref = gated_residual_ref(x, y, gate)
    if xdtype == torch.float32:
        assert ((out.double() - ref).abs() <= 2e-7 * ref.abs() + 1e-7).all()
    else:
        assert_within_bf16(out, ref)
    with pytest.raises(ValueError, match="gate"):
        gated_residual(x, y, torch.randn(B, 2, C))


# ----------------------------------------------------------------------------- torch ops


@pytest.mark.parametrize("mode", sorted(attn_mod.MODES))
def test_attention_torch_fallback_matches_its_fake(monkeypatch, mode):
    """Without the interpreter a CPU tensor takes the torch reference: its output must have the
    kernel's (and the fake's) contiguous layout, or torch.compile breaks on the CPU."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q = torch.randn(1, 20, 2, 128).bfloat16()
    torch.library.opcheck(torch.ops.storymem.flash_attention, (q, q, q, 0.1, mode, "auto"))


def test_ops_are_registered_for_compile_and_export():
    x = torch.randn(2, 5, 64).bfloat16()
    sh, sc = torch.randn(2, 1, 64), torch.randn(2, 1, 64)
    rt = rope_tables([-3.0, 0.0], 2, 3, 128)
    qp, w = torch.randn(1, 12, 256).bfloat16(), torch.ones(256)
    q = torch.randn(1, 20, 2, 128).bfloat16()
    # triton_op: aot-dispatch replays would need the compiled kernel, which the interpreter lacks
    shape_checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.storymem.adaln_modulate, (x, sh, sc, 1e-6, torch.bfloat16), test_utils=shape_checks)
    torch.library.opcheck(torch.ops.storymem.gated_residual, (x, x, sc), test_utils=shape_checks)
    torch.library.opcheck(torch.ops.storymem.qk_norm_rope, (qp, qp, w, w, rt.cos, rt.sin, 2, 2, 3, 2, 1e-6),
                          test_utils=shape_checks)
    torch.library.opcheck(torch.ops.storymem.qk_norm_rope_quant,
                          (qp, qp, w, w, rt.cos, rt.sin, 2, 2, 3, 2, 1e-6, True), test_utils=shape_checks)
    torch.library.opcheck(torch.ops.storymem.flash_attention, (q, q, q, 0.1, "bf16", "auto"))

    class Block(torch.nn.Module):
        def forward(self, x, sh, sc, q):
            return gated_residual(x, adaln_modulate(x, sh, sc), sc), flash_attention(q, q, q)

    code = torch.export.export(Block(), (x, sh, sc, q)).graph_module.code
    for op in ("storymem.adaln_modulate", "storymem.gated_residual", "storymem.flash_attention"):
        assert op in code
