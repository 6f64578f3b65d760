"""The fast backend of WanDiT (issue 5): FP8 or bf16 GEMMs, our kernels, per-shot caches, CFG
batched or back to back, regional compilation and CUDA-graph capture of the step.

`prepare_fast(model, precision, attention)` converts a loaded `WanDiT` in place into a
`FastWanDiT`; it keeps `WanDiT.forward`'s signature, so `shot.denoise` can drive it unchanged,
and `denoise_fast` is the same loop without host synchronisation. What changes:
- self-attention q, k, v are one GEMM (`qkv` [3C, C]); q/k RMSNorm + 3D RoPE is one pass
  (`kernels.qk_norm_rope`, tables built from the frame-position table, memory frames at
  negative positions); attention reads the projection layout [B, L, H, D] directly (cuDNN or
  our Triton kernel, whichever is faster for the shape, timed once; or low precision `int8-fp8`
  or `int8-int8`);
- adaLN (LayerNorm + (1 + scale) * x + shift) and the gated residual are one kernel each
  (`kernels.adaln`); the cross-attention LayerNorm with affine is the same kernel with
  shift = bias and scale = weight - 1;
- precision "fp8": every block linear is an `FP8Linear` (e4m3 weights per output channel,
  activations e4m3 per token, dynamic, through torch._scaled_mm with rowwise scales; a
  dequantized reference on the CPU); everything else follows WanDiT's policy (float32
  residual stream, modulation, time embedding and head);
- per shot: the cross-attention K/V of the text are computed once per expert and cached (the
  text does not change across steps); per step: the time embedding once (`GuidedStep` shares
  it between the two CFG branches when they run back to back).
Toggles (flux-fast style, each one can be turned off and measured; `FastOptions`):
precision, attention, ops ("kernels": our fused kernels; "torch": plain torch that
torch.compile fuses itself), compile (regional: the repeated block), cache_text, fast_accum
(FP8 GEMMs); per step: cfg ("batched" / "sequential") and cuda_graph (`GuidedStep`). Defaults
follow the H100 measurements in docs/PERF.md: CFG back to back (as fast as batched, less
memory), fast accumulation on, CUDA graphs off (no gain at ~5 s per forward).

Memory plan (one 80 GB GPU, 10 memory frames; numbers in docs/PERF.md): in FP8 both experts
(14.9 GB each) stay resident with the VAE (measured peak 38.7 GB). In bf16 (28.95 GB each)
`plan_residency` compares two experts plus the working set with the budget: resident when they
fit (they do at this shape with CFG back to back, 66.7 GB), else `ExpertSlot` keeps one expert's
weights on the device and both in pinned host memory, swapped at the expert boundary (twice per
shot, never per step).

Shapes: x [B, C, F, H, W]; tokens [B, L, dim] float32; q/k/v [B, L, H, D]; text [B, Lt, dim].
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .dit import WanBlock, WanDiT, rope_cos_sin, rope_inv_freqs
from .kernels.adaln import adaln_modulate, gated_residual
from .kernels.attention import _time_ms, flash_attention  # one CUDA-event timer for both auto-pickers
from .kernels.qk_norm_rope import RopeTables, qk_norm_rope

log = logging.getLogger("storymem_rt")

__all__ = [
    "ExpertSlot",
    "FP8Linear",
    "FastOptions",
    "FastWanDiT",
    "GuidedStep",
    "denoise_fast",
    "model_bytes",
    "plan_residency",
    "prepare_fast",
    "quantize_rows",
    "set_compile",
]

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
PRECISIONS = {"bf16": torch.bfloat16, "fp8": torch.bfloat16, "fp32": torch.float32}
SELF_ATTENTION = ("auto", "cudnn", "triton", "sdpa", "int8-int8", "int8-fp8", "int8")
CROSS_ATTENTION = ("auto", "cudnn", "triton", "sdpa")
OPS = ("auto", "kernels", "torch")
CFG_MODES = ("batched", "sequential")
_TEXT_CACHE_ENTRIES = 4  # cond+uncond as one batch, and each alone (CFG back to back)
_SCALED_MM_BIAS = True  # torch._scaled_mm takes the bias (set False on the first refusal)


@dataclass(frozen=True)
class FastOptions:
    """How `prepare_fast` builds the model. precision "fp32" runs the same code path unrounded
    (tests compare it with WanDiT); "fp8" computes in bf16 around FP8 GEMMs."""

    precision: str = "bf16"
    attention: str = "auto"  # self-attention: auto (faster of cudnn/triton per shape), or one of them
    cross_attention: str = "auto"  # text keys (512): bf16 kernels only
    ops: str = "auto"  # auto: our kernels in eager, plain torch under compile (inductor fuses it)
    compile: bool = False  # regional torch.compile of the repeated block
    cache_text: bool = True  # cross-attention K/V once per text (per shot), not per step
    fast_accum: bool = True  # FP8 GEMMs with Hopper's fast accumulation (docs/PERF.md: ~5% faster, same error)
    # bf16/fp16 on CUDA: the FFN's GELU (tanh) in cuBLASLt's GEMM epilogue, on the fp32 accumulator
    # (bench/gelu_epilogue.py: 9.44 vs 10.14 ms per layer, error vs float32 1.7e-3 vs 2.6e-3)
    gelu_epilogue: bool = True

    def __post_init__(self):
        for name, value, allowed in (("precision", self.precision, tuple(PRECISIONS)),
                                     ("attention", self.attention, SELF_ATTENTION),
                                     ("cross_attention", self.cross_attention, CROSS_ATTENTION),
                                     ("ops", self.ops, OPS)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")

    @property
    def compute_dtype(self) -> torch.dtype:
        return PRECISIONS[self.precision]

    @property
    def resolved_ops(self) -> str:
        if self.ops != "auto":
            return self.ops
        return "torch" if self.compile else "kernels"


# --------------------------------------------------------------------------------------------
# FP8 linear
# --------------------------------------------------------------------------------------------
def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """x [M, K] -> (e4m3 [M, K], scale [M, 1] float32), x ~= q * scale.

    scale = amax(|row|) / 448 (1 for an all-zero row), saturating cast: the scheme of
    export/fp8.py `quantize_weight`, used for weights (per output channel) and for activations
    (per token, dynamic)."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    return (xf / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def fp8_matmul(xq: Tensor, x_scale: Tensor, w8: Tensor, w_scale: Tensor, bias: Tensor | None,
               out_dtype: torch.dtype, fast_accum: bool = False) -> Tensor:
    """(xq * x_scale) @ (w8 * w_scale[:, None]).T + bias: xq [M, K] e4m3, x_scale [M, 1], w8
    [N, K] e4m3, w_scale [N] float32 -> [M, N] out_dtype.

    CUDA: torch._scaled_mm with rowwise scales (fp32 accumulation, bf16 out). CPU: the same
    product on dequantized operands in float32, so CI checks the numerics of the scheme."""
    if xq.is_cuda:
        global _SCALED_MM_BIAS
        args = (xq, w8.t())
        kw = dict(scale_a=x_scale, scale_b=w_scale.view(1, -1), out_dtype=torch.bfloat16, use_fast_accum=fast_accum)
        y = None
        if bias is not None and _SCALED_MM_BIAS:
            if torch.compiler.is_compiling():
                y = torch._scaled_mm(*args, bias=bias.to(torch.bfloat16), **kw)
            else:
                try:  # the bias epilogue with rowwise scales needs a recent torch: learnt on the first call
                    y = torch._scaled_mm(*args, bias=bias.to(torch.bfloat16), **kw)
                except RuntimeError as e:
                    log.info("torch._scaled_mm refuses a bias with rowwise scales (%s); adding it apart", e)
                    _SCALED_MM_BIAS = False
        if y is None:
            y = torch._scaled_mm(*args, **kw)
            if bias is not None:
                y = y + bias.to(y.dtype)
        return y if out_dtype == torch.bfloat16 else y.to(out_dtype)
    y = (xq.float() * x_scale) @ (w8.float() * w_scale.float()[:, None]).t()
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


class FP8Linear(nn.Module):
    """Linear layer with e4m3 weights [out, in] and float32 per-output-channel scales [out];
    activations are quantized per token on the fly. x [..., in] -> [..., out] in compute_dtype.

    Parameter names and layout are export/fp8.py's (`weight`, `weight_scale`, `bias`), so an
    expert loaded from an FP8 checkpoint converts without re-quantizing."""

    def __init__(self, weight: Tensor, weight_scale: Tensor, bias: Tensor | None,
                 compute_dtype: torch.dtype = torch.bfloat16, fast_accum: bool = False):
        super().__init__()
        if weight.dtype != FP8_DTYPE or weight.ndim != 2:
            raise ValueError(f"weight must be [out, in] {FP8_DTYPE}, got {weight.dtype} {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self.compute_dtype = compute_dtype
        self.fast_accum = fast_accum
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.weight_scale = nn.Parameter(weight_scale.float().reshape(-1), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.to(compute_dtype), requires_grad=False)

    @classmethod
    def from_linear(cls, layer: nn.Module, compute_dtype: torch.dtype = torch.bfloat16,
                    fast_accum: bool = False) -> "FP8Linear":
        """From an nn.Linear (quantized here) or an already-FP8 layer (weights reused)."""
        bias = None if layer.bias is None else layer.bias.detach()
        if layer.weight.dtype == FP8_DTYPE:
            return cls(layer.weight.detach(), layer.weight_scale.detach(), bias, compute_dtype, fast_accum)
        w8, scale = quantize_rows(layer.weight.detach())
        return cls(w8, scale, bias, compute_dtype, fast_accum)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, fast_accum={self.fast_accum}")

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        xq, xs = quantize_rows(x.reshape(-1, shape[-1]))
        y = fp8_matmul(xq, xs, self.weight, self.weight_scale, self.bias, self.compute_dtype, self.fast_accum)
        return y.reshape(*shape[:-1], self.out_features)


def _fuse_linears(layers: Sequence[nn.Module]) -> nn.Module:
    """One layer computing [l0(x), l1(x), ...] (weights concatenated along out)."""
    bias = torch.cat([l.bias.detach() for l in layers])
    if all(l.weight.dtype == FP8_DTYPE for l in layers):
        first = layers[0]
        return FP8Linear(torch.cat([l.weight.detach() for l in layers]),
                         torch.cat([l.weight_scale.detach().reshape(-1) for l in layers]),
                         bias, getattr(first, "compute_dtype", torch.bfloat16), getattr(first, "fast_accum", False))
    w = torch.cat([l.weight.detach() for l in layers])
    with torch.device("meta"):
        out = nn.Linear(w.shape[1], w.shape[0])
    out.weight = nn.Parameter(w, requires_grad=False)
    out.bias = nn.Parameter(bias, requires_grad=False)
    return out


# --------------------------------------------------------------------------------------------
# Block pieces: each has a kernel form and a plain-torch form with the same meaning
# --------------------------------------------------------------------------------------------
def _modulate(x: Tensor, shift: Tensor, scale: Tensor, eps: float, dtype: torch.dtype, ops: str) -> Tensor:
    """LayerNorm(x) * (1 + scale) + shift, float32 math, `dtype` out. x [B, L, C] float32,
    shift/scale [B, 1, C] (or [1, 1, C])."""
    if ops == "kernels":
        b = x.shape[0]
        return adaln_modulate(x, shift.expand(b, -1, -1), scale.expand(b, -1, -1), eps, dtype)
    return (F.layer_norm(x, x.shape[-1:], eps=eps) * (1 + scale) + shift).to(dtype)


def _gated_add(x: Tensor, y: Tensor, gate: Tensor, ops: str) -> Tensor:
    """x + gate * y in float32 (x float32 [B, L, C], y compute dtype, gate [B, 1, C])."""
    if ops == "kernels":
        return gated_residual(x, y, gate)
    return x + y.float() * gate


def _rms_heads(x: Tensor, weight: Tensor, heads: int, eps: float) -> Tensor:
    """Wan RMSNorm over the whole row, one rounding to x's dtype. [B, L, H*D] -> [B, L, H, D]."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps) * weight.float()
    return xf.to(x.dtype).unflatten(-1, (heads, -1))


def _rope_torch(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, L, H, D] float32 rotated by cos/sin [L, D/2] (pairs (2i, 2i+1), as dit.apply_rope)."""
    x0, x1 = x.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1).flatten(-2)


def _qk_norm_rope(q: Tensor, k: Tensor, wq: Tensor, wk: Tensor, rope: tuple, heads: int, eps: float,
                  ops: str) -> tuple[Tensor, Tensor]:
    """q, k [B, L, H*D] (rows may be strided views of qkv) -> [B, L, H, D] in q's dtype."""
    tables, cos, sin = rope
    if ops == "kernels" and tables is not None:
        return qk_norm_rope(q, k, wq, wk, tables, heads, eps)

    def one(x, w):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps) * w.float()
        return _rope_torch(xf.unflatten(-1, (heads, -1)), cos, sin).to(x.dtype)

    return one(q, wq), one(k, wk)


def _attend(q: Tensor, k: Tensor, v: Tensor, impl: str) -> Tensor:
    """softmax(q k^T / sqrt(D)) v on [B, L, H, D] tensors (no transposes in memory) -> [B, Lq, H, D]."""
    if impl == "cudnn":
        out = torch.ops.aten._scaled_dot_product_cudnn_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, False)[0]
        return out.transpose(1, 2)
    if impl == "sdpa":
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    return flash_attention(q, k, v, None, "bf16" if impl == "triton" else impl)


class FastBlock(WanBlock):
    """WanBlock with the fast forward (same parameters, q/k/v fused into `self_attn.qkv`)."""

    _fast_dtype: torch.dtype
    _fast_eps: float
    _fast_gelu_epilogue: bool = False

    def forward(self, x: Tensor, e6: Tensor, text_kv: tuple[Tensor, Tensor], rope: tuple,
                attn_self: str, attn_cross: str, ops: str) -> Tensor:
        """x [B, L, C] float32 residual; e6 [B, 6, C] float32; text_kv (k, v) [B, Lt, H, D] cached
        per shot; rope (RopeTables | None, cos [L, D/2], sin [L, D/2]). -> [B, L, C] float32."""
        sa, ca = self.self_attn, self.cross_attn
        dt, eps, heads = self._fast_dtype, self._fast_eps, sa.num_heads
        c = x.shape[-1]
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = (
            (self.modulation.float() + e6).unsqueeze(2).unbind(1))

        q, k, v = sa.qkv(_modulate(x, shift_sa, scale_sa, eps, dt, ops)).split(c, dim=-1)
        q, k = _qk_norm_rope(q, k, sa.norm_q.weight, sa.norm_k.weight, rope, heads, eps, ops)
        o = _attend(q, k, v.unflatten(-1, (heads, -1)), attn_self)
        x = _gated_add(x, sa.o(o.flatten(2)), gate_sa, ops)

        if isinstance(self.norm3, nn.LayerNorm):
            w, b = self.norm3.weight.float(), self.norm3.bias.float()
            if ops == "kernels":  # affine LayerNorm = modulation with scale w - 1, shift b
                h = _modulate(x, b.view(1, 1, -1), (w - 1).view(1, 1, -1), eps, dt, ops)
            else:
                h = F.layer_norm(x, x.shape[-1:], w, b, self.norm3.eps).to(dt)
        else:
            h = x.to(dt)
        o = _attend(_rms_heads(ca.q(h), ca.norm_q.weight, heads, eps), text_kv[0], text_kv[1], attn_cross)
        x = x + ca.o(o.flatten(2)).float()  # upstream: no gate on cross-attention

        h = _modulate(x, shift_ff, scale_ff, eps, dt, ops)
        return _gated_add(x, self.ffn[2](self._ffn_in(h)), gate_ff, ops)

    def _ffn_in(self, h: Tensor) -> Tensor:
        """gelu_tanh(ffn[0](h)); on CUDA in bf16/fp16 with the GELU in the GEMM's epilogue (cuBLASLt's
        GELU is the tanh form; on the CPU `_addmm_activation` would use erf, so not there)."""
        f0 = self.ffn[0]
        if self._fast_gelu_epilogue and h.is_cuda and isinstance(f0, nn.Linear) and f0.bias is not None:
            return torch._addmm_activation(f0.bias, h.flatten(0, 1), f0.weight.t(), use_gelu=True).unflatten(
                0, h.shape[:2])
        return F.gelu(f0(h), approximate="tanh")


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------
def _tensor_key(t: Tensor) -> tuple:
    try:
        version = t._version
    except RuntimeError:  # inference tensors have no version counter (and cannot change outside it)
        version = -1
    return (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, str(t.device), version)


def _rope_tables(pos: Tensor, h: int, w: int, head_dim: int, device):
    """`kernels.qk_norm_rope.RopeTables` for frame positions `pos` (any values: memory frames at
    negative positions) and an h x w grid. Angles in float64 as dit.rope_cos_sin (same split and
    frequencies: dit.rope_inv_freqs)."""
    inv_t, inv_h, inv_w = rope_inv_freqs(head_dim)
    nt, nh = inv_t.numel(), inv_h.numel()
    f = pos.numel()
    ang = torch.zeros(f + h + w, head_dim // 2, dtype=torch.float64)
    ang[:f, :nt] = torch.outer(pos, inv_t)
    ang[f:f + h, nt:nt + nh] = torch.outer(torch.arange(h, dtype=torch.float64), inv_h)
    ang[f + h:, nt + nh:] = torch.outer(torch.arange(w, dtype=torch.float64), inv_w)
    return RopeTables(torch.cos(ang).float().to(device), torch.sin(ang).float().to(device), f, h, w)


# (q shape, k shape, device) -> (impl, {candidate: ms measured}); timed once per process
_ATTENTION_PLAN: dict[tuple, tuple[str, dict[str, float]]] = {}


def attention_plan() -> dict[tuple, tuple[str, dict[str, float]]]:
    """What `attention="auto"` chose so far, per (q shape, k shape, device), with the times it measured."""
    return dict(_ATTENTION_PLAN)


def resolve_attention(choice: str, q_shape: tuple, k_shape: tuple, dtype: torch.dtype, device) -> str:
    """The attention implementation for one shape. "auto" on a CUDA bf16 model: cuDNN and our
    Triton kernel are timed once on random data of this shape and the faster is kept."""
    device = torch.device(device)
    if device.type != "cuda":
        return "sdpa" if choice in ("auto", "cudnn") else choice
    if choice != "auto":
        return choice
    if dtype != torch.bfloat16 or q_shape[-1] not in (64, 128):
        return "sdpa"
    key = (tuple(q_shape), tuple(k_shape), device.index)
    if key not in _ATTENTION_PLAN:
        q = torch.randn(q_shape, dtype=dtype, device=device)
        k, v = torch.randn(k_shape, dtype=dtype, device=device), torch.randn(k_shape, dtype=dtype, device=device)
        times = {}
        for impl in ("cudnn", "triton"):
            try:
                times[impl] = _time_ms(lambda: _attend(q, k, v, impl))
            except Exception as e:  # no Hopper, old Triton, cuDNN refuses the layout: not a candidate
                log.info("attention %s unavailable for %s: %s", impl, q_shape, e)
        _ATTENTION_PLAN[key] = (min(times, key=times.get) if times else "sdpa", times)
        log.info("attention %s x %s: %s -> %s", q_shape, k_shape,
                 {k_: round(t, 3) for k_, t in times.items()}, _ATTENTION_PLAN[key][0])
    return _ATTENTION_PLAN[key][0]


class _FastState:
    def __init__(self, options: FastOptions):
        self.options = options
        self.text: dict[tuple, tuple] = {}
        self.rope: dict[tuple, tuple] = {}


class FastWanDiT(WanDiT):
    """A WanDiT converted by `prepare_fast` (never constructed directly). Same forward
    signature; `time_emb` lets a caller pass `embed_time`'s result computed once per step."""

    _fast: _FastState

    @property
    def options(self) -> FastOptions:
        return self._fast.options

    def clear_shot_cache(self) -> None:
        """Drop the cached text K/V and RoPE tables (after the weights change, e.g. a swap)."""
        self._fast.text.clear()
        self._fast.rope.clear()

    def text_kv(self, context: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Per block (k, v) [B, Lt, H, D] of the text `context` [B, Lc, text_dim]: computed once
        and cached, keyed by the tensor (storage, shape, version). The cache holds `context`, so
        its storage cannot be reused by another tensor while the entry lives."""
        st = self._fast
        key = _tensor_key(context)
        if st.options.cache_text and key in st.text:
            return st.text[key][1]
        ctx = self.embed_text(context)
        kv = []
        for blk in self.blocks:
            ca = blk.cross_attn
            kv.append((_rms_heads(ca.k(ctx), ca.norm_k.weight, ca.num_heads, blk._fast_eps),
                       ca.v(ctx).unflatten(-1, (ca.num_heads, -1))))
        if st.options.cache_text:
            while len(st.text) >= _TEXT_CACHE_ENTRIES:
                st.text.pop(next(iter(st.text)))
            st.text[key] = (context, kv)
        return kv

    def rope_for(self, frame_pos, grid: tuple[int, int, int], device) -> tuple:
        """(RopeTables, cos [L, D/2], sin [L, D/2]) for a patched grid; cached per position table
        (built on the host once: the only host read of the shot's inputs)."""
        st = self._fast
        if frame_pos is None:
            key = ("default", grid, str(device))
        elif isinstance(frame_pos, Tensor):
            key = (_tensor_key(frame_pos), grid, str(device))
        else:
            key = (tuple(float(p) for p in frame_pos), grid, str(device))
        hit = st.rope.get(key)
        if hit is not None:
            return hit[1]
        f, h, w = grid
        pos = torch.arange(f) if frame_pos is None else torch.as_tensor(frame_pos)
        pos = pos.to("cpu", torch.float64).reshape(-1)
        if pos.numel() != f:
            raise ValueError(f"frame_pos must hold one position per patched frame ({f}), got {pos.numel()}")
        cos, sin = rope_cos_sin(pos, h, w, self.config.head_dim, device)
        value = (_rope_tables(pos, h, w, self.config.head_dim, device), cos, sin)
        if len(st.rope) >= _TEXT_CACHE_ENTRIES:
            st.rope.pop(next(iter(st.rope)))
        st.rope[key] = (frame_pos, value)
        return value

    def forward(self, x: Tensor, t: Tensor, context: Tensor, y: Tensor | None = None,
                frame_pos: Tensor | Sequence[float] | None = None, *,
                rope: tuple[Tensor, Tensor] | None = None,
                time_emb: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """As `WanDiT.forward`; x [B, C, F, H, W] -> [B, out_dim, F, H, W] float32."""
        opts = self._fast.options
        tokens, grid = self.embed_video(x, y)
        tokens = tokens.contiguous()  # the patch embedding leaves [B, L, C] transposed; kernels read rows
        b, n = tokens.shape[:2]
        if context.shape[0] != b:
            raise ValueError(f"context batch {context.shape[0]} does not match x batch {b}")
        e, e6 = time_emb if time_emb is not None else self.embed_time(t.to(tokens.device), b)
        kv = self.text_kv(context)
        rp = (None, *rope) if rope is not None else self.rope_for(frame_pos, grid, tokens.device)
        heads, hd = self.config.num_heads, self.config.head_dim
        dt = opts.compute_dtype
        attn_self = resolve_attention(opts.attention, (b, n, heads, hd), (b, n, heads, hd), dt, tokens.device)
        attn_cross = resolve_attention(opts.cross_attention, (b, n, heads, hd), tuple(kv[0][0].shape), dt,
                                       tokens.device)
        ops = opts.resolved_ops
        for blk, kv_i in zip(self.blocks, kv):
            tokens = blk(tokens, e6, kv_i, rp, attn_self, attn_cross, ops)
        return self.unpatchify(self.head(tokens, e), grid)


_BLOCK_LINEARS = (("self_attn", "qkv"), ("self_attn", "o"), ("cross_attn", "q"), ("cross_attn", "k"),
                  ("cross_attn", "v"), ("cross_attn", "o"), ("ffn", "0"), ("ffn", "2"))


@torch.no_grad()
def prepare_fast(model: WanDiT, precision: str = "bf16", attention: str = "auto", *,
                 options: FastOptions | None = None, **kwargs) -> FastWanDiT:
    """Convert a loaded WanDiT in place (and return it). Call again to change options or to go
    from bf16 to FP8 (weights are quantized then, and the bf16 ones freed); FP8 cannot go back.

    kwargs are `FastOptions` fields (compile, ops, cache_text, fast_accum, cross_attention)."""
    opts = options or FastOptions(precision=precision, attention=attention, **kwargs)
    if not isinstance(model, WanDiT):
        raise TypeError(f"prepare_fast converts a WanDiT, got {type(model).__name__}")
    old = getattr(model, "_fast", None)
    if old is not None and old.options.precision != opts.precision and opts.precision != "fp8":
        raise ValueError(f"a {old.options.precision} fast model cannot become {opts.precision}: "
                         "load the weights again")
    if opts.precision != "fp8" and any(p.dtype == FP8_DTYPE for p in model.parameters()):
        raise ValueError("the model has FP8 weights (an FP8 checkpoint or an FP8 fast model): use precision='fp8'")
    cdt = opts.compute_dtype
    for blk in model.blocks:
        sa = blk.self_attn
        if not hasattr(sa, "qkv"):
            sa.qkv = _fuse_linears([sa.q, sa.k, sa.v])
            del sa.q, sa.k, sa.v
        for parent, name in _BLOCK_LINEARS:
            mod = getattr(blk, parent)
            layer = mod._modules[name]
            if opts.precision == "fp8" and not isinstance(layer, FP8Linear):
                mod._modules[name] = FP8Linear.from_linear(layer, cdt, opts.fast_accum)
            elif isinstance(layer, FP8Linear):
                layer.fast_accum = opts.fast_accum
        blk.__class__ = FastBlock
        blk._fast_dtype, blk._fast_eps = cdt, blk.norm1.eps
        blk._fast_gelu_epilogue = opts.gelu_epilogue and cdt in (torch.bfloat16, torch.float16)
    # Everything else follows WanDiT's precision policy in the compute dtype.
    for name, p in model.named_parameters():
        if p.dtype != FP8_DTYPE and not name.endswith("weight_scale"):
            p.data = p.data.to(WanDiT.param_dtype(name, cdt))
    model.__class__ = FastWanDiT
    model._fast = _FastState(opts)
    set_compile(model, opts.compile)
    return model


def set_compile(model: FastWanDiT, on: bool) -> None:
    """Regional compilation: each block through torch.compile (one graph serves all blocks,
    whose parameters are graph inputs). Off restores eager blocks."""
    if on:
        import torch._dynamo.config as dcfg

        # bf16/fp8, batch 1/2 and attention choices each add a specialisation of the one block graph.
        for limit in ("cache_size_limit", "recompile_limit"):
            if hasattr(dcfg, limit):
                setattr(dcfg, limit, max(getattr(dcfg, limit), 64))
    for blk in model.blocks:
        if on and getattr(blk, "_compiled_call_impl", None) is None:
            blk.compile(dynamic=False)
        elif not on:
            blk._compiled_call_impl = None
    opts = model._fast.options
    if opts.compile != on:
        model._fast.options = dataclasses.replace(opts, compile=on)


def model_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


# --------------------------------------------------------------------------------------------
# The denoising step and loop
# --------------------------------------------------------------------------------------------
class GuidedStep:
    """The model side of one denoising step for one expert and one shot:
    v = uncond + scale * (cond - uncond), latent [C, T, h, w] float32 -> [C, T, h, w] float32.

    cfg "batched": one forward of batch 2 (cond, uncond); "sequential": two forwards of batch 1
    sharing the time embedding. cuda_graph: the first call runs eagerly on a side stream (it
    compiles, fills the caches and picks kernels, and its result is used); the second captures
    the step into a CUDA graph; every later call copies the inputs in and replays it."""

    def __init__(self, model: nn.Module, context: Tensor, context_null: Tensor, y: Tensor | None,
                 frame_pos, guide_scale: float, *, cfg: str = "sequential", cuda_graph: bool = False,
                 dtype: torch.dtype | None = None, pool=None):
        if cfg not in CFG_MODES:
            raise ValueError(f"cfg must be one of {', '.join(CFG_MODES)}; got {cfg!r}")
        self.model, self.cfg, self.scale = model, cfg, float(guide_scale)
        if dtype is None:
            dtype = model.options.compute_dtype if isinstance(model, FastWanDiT) else torch.float32
        self.dtype = dtype
        self.ctx2 = torch.cat([context, context_null]).to(dtype)
        self.ctx_c, self.ctx_u = self.ctx2[:1], self.ctx2[1:]
        self.y2 = None if y is None else y.to(dtype)[None].expand(2, *y.shape)
        self.y1 = None if y is None else self.y2[:1]
        self.frame_pos = frame_pos
        self.cuda_graph, self.pool = cuda_graph, pool
        self.calls = 0
        self._graph = None
        self._stream = None

    @property
    def steady(self) -> bool:
        """True once calls do no first-time work (compile, kernel timing, capture, cache fills)."""
        return self.calls >= (2 if self.cuda_graph else 1)

    def _eval(self, latent: Tensor, t: Tensor) -> Tensor:
        m, x = self.model, latent.to(self.dtype)
        if self.cfg == "batched":
            out = m(x[None].expand(2, *x.shape), t.expand(2), self.ctx2, self.y2, self.frame_pos).float()
            cond, uncond = out[0], out[1]
        else:
            kw = {"time_emb": m.embed_time(t, 1)} if isinstance(m, FastWanDiT) else {}
            cond = m(x[None], t, self.ctx_c, self.y1, self.frame_pos, **kw).float()[0]
            uncond = m(x[None], t, self.ctx_u, self.y1, self.frame_pos, **kw).float()[0]
        return uncond + self.scale * (cond - uncond)

    def __call__(self, latent: Tensor, t: Tensor) -> Tensor:
        """latent [C, T, h, w] float32, t [1] float32 (device) -> guided velocity."""
        self.calls += 1
        if not (self.cuda_graph and latent.is_cuda):
            return self._eval(latent, t)
        if self._stream is None:
            self._stream = torch.cuda.Stream(latent.device)
        if self.calls == 1:  # warm-up on the capture stream, result used
            self._stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self._stream):
                out = self._eval(latent, t)
            torch.cuda.current_stream().wait_stream(self._stream)
            return out
        if self._graph is None:
            self._x, self._t = latent.clone(), t.clone()
            self._graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self._graph, pool=self.pool, stream=self._stream):
                self._out = self._eval(self._x, self._t)
        self._x.copy_(latent)
        self._t.copy_(t)
        self._graph.replay()
        return self._out.clone()


@contextlib.contextmanager
def _no_host_sync(on: bool):
    """Inside, any CUDA host synchronisation (item(), .cpu(), nonzero) raises."""
    if not on:
        yield
        return
    old = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(old)


@torch.no_grad()
def denoise_fast(experts, spec, noise: Tensor, generator, context: Tensor, context_null: Tensor,
                 y: Tensor | None, frame_pos, dtype: torch.dtype | None = None, *, cfg: str = "sequential",
                 cuda_graph: bool = False, progress=None, slot: "ExpertSlot | None" = None,
                 check_sync: bool = False) -> Tensor:
    """`shot.denoise` without host synchronisation in the step loop.

    experts: {'high', 'low'} models (or `slot`, whose `activate` swaps them at the boundary).
    The schedule is read to the host once, before the loop; the model is fed timesteps sliced
    from a device copy. check_sync: raise if a steady step (past each expert's first-time work)
    synchronises with the host (CUDA only). Returns the final latent [C, T, h, w] float32."""
    from .schedulers import make_scheduler

    s = spec.sampling
    sched = make_scheduler(s.solver, s.sample_steps, s.shift, s.num_train_timesteps, device=noise.device)
    boundary = s.boundary * s.num_train_timesteps
    ts_host = sched.timesteps.cpu()
    ts_dev = sched.timesteps.to(torch.float32)
    pool = torch.cuda.graph_pool_handle() if cuda_graph and noise.is_cuda else None
    steps: dict[str, GuidedStep] = {}
    latent = noise
    for i in range(len(ts_host)):
        high = float(ts_host[i]) >= boundary
        name = "high" if high else "low"
        if name not in steps:
            model = slot.activate(name) if slot is not None else experts[name]
            steps[name] = GuidedStep(model, context, context_null, y, frame_pos,
                                     s.guide_scale[1] if high else s.guide_scale[0], cfg=cfg,
                                     cuda_graph=cuda_graph, dtype=dtype, pool=pool)
        step = steps[name]
        with _no_host_sync(check_sync and noise.is_cuda and step.steady):
            pred = step(latent, ts_dev[i:i + 1])
            latent = sched.step(pred[None], ts_host[i], latent[None], generator=generator)[0]
        if progress is not None:
            progress.update(1)
    return latent


# --------------------------------------------------------------------------------------------
# Residency
# --------------------------------------------------------------------------------------------
def plan_residency(expert_bytes: int, working_bytes: int, budget_bytes: float = 75e9) -> str:
    """"resident" if both experts plus the working set (activations of one step, VAE, text
    cache, CUDA-graph pool) fit the budget, else "swap" (`ExpertSlot`)."""
    return "resident" if 2 * expert_bytes + working_bytes <= budget_bytes else "swap"


class ExpertSlot:
    """Both experts' weights in (pinned) host memory, one set of device tensors holding the
    active one. `activate(name)` copies that expert's tensors into the slot (host->device at
    PCIe speed: ~28.6 GB for a bf16 A14B expert) when another one is there, and drops the
    slot's shot caches. The story calls it at the expert boundary: twice per shot."""

    def __init__(self, slot: nn.Module, host_states: dict[str, dict[str, Tensor]], active: str):
        self.model, self.host, self.active = slot, host_states, active
        self._tensors = {k: v for k, v in slot.state_dict(keep_vars=True).items()}
        for name, sd in host_states.items():
            if set(sd) != set(self._tensors):
                raise ValueError(f"expert {name!r} does not have the slot's tensors")

    @classmethod
    def from_experts(cls, experts: dict[str, nn.Module], slot_name: str) -> "ExpertSlot":
        """Host copies of every expert (pinned when CUDA is there); `experts[slot_name]`,
        already on the device, becomes the slot. The other experts can then be freed."""
        pin = torch.cuda.is_available()
        host = {}
        for name, m in experts.items():
            host[name] = {k: (v.detach().to("cpu", copy=True).pin_memory() if pin else
                              v.detach().to("cpu", copy=True)) for k, v in m.state_dict().items()}
        return cls(experts[slot_name], host, slot_name)

    @torch.no_grad()
    def activate(self, name: str) -> nn.Module:
        if name not in self.host:
            raise KeyError(f"no expert {name!r}; have {sorted(self.host)}")
        if name != self.active:
            src = self.host[name]
            for k, t in self._tensors.items():
                t.data.copy_(src[k], non_blocking=True)
            if isinstance(self.model, FastWanDiT):
                self.model.clear_shot_cache()
            self.active = name
        return self.model
