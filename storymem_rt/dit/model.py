"""Wan2.2 A14B diffusion transformer (one expert): one model class, its fast forms as options.

The math matches Wan2.2 `wan/modules/model.py` (`WanModel`, `WanAttentionBlock`, `Head`, `rope_apply`,
`sinusoidal_embedding_1d`); parameter names are upstream's, so an upstream
`diffusion_pytorch_model*.safetensors` loads with `load_state_dict(strict=True)` unchanged. Wan2.2 A14B
I2V has no CLIP image branch: I2V differs from T2V only by `in_dim` 36 (16 noisy latent + 4 mask +
16 condition channels, concatenated on channels).

`DiTOptions` (construction options, or `convert_` on a loaded model) select, without a second class:
- precision: the compute dtype, and for "fp8" e4m3 block linears (`storymem_rt.fp8.FP8Linear`);
- fuse_qkv: self-attention q, k, v as one GEMM (`self_attn.qkv` [3C, C]; `fuse_qkv_()` builds it from
  upstream weights, and `load_state_dict` maps upstream keys into it);
- ops: "reference" (upstream's roundings; the goldens), "torch" (one rounding per op, what
  torch.compile fuses), "kernels" (our Triton kernels), "auto" (kernels eager, torch when compiled);
- attention / cross_attention: an implementation name of `kernels.attention.attend` ("auto" resolved
  there, per shape, by timing);
- cache_text: the cross-attention K/V of a text computed once and kept (the text does not change
  across the steps of a shot);
- fp8_activations, fast_accum, gelu_epilogue, compile (regional: the repeated block).

Differences from upstream that keep its numbers: equal-size batches; the time embedding and
modulation once per sample, not per token; RoPE from a frame-position table (memory frames at
negative positions), real-valued (no complex dtype); no buffers (meta-device construction with
`assign=True` just works).
Precision policy (upstream's autocast regions): float64 sinusoidal embedding; float32 time MLPs,
modulation, head, LayerNorm/RMSNorm statistics and the residual stream; linears, attention and the
text embedding in the compute dtype. `KEEP_FP32` names the parameters kept float32.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..configs import DiTConfig
from ..fp8 import ACTIVATION_MODES, FP8_DTYPE, FP8Linear, fuse_linears
from ..kernels.attention import IMPLS, attend, choose
from . import ops as O

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.bfloat16}
# Parameter-name fragments kept in float32 (upstream's float32 regions).
KEEP_FP32: tuple[str, ...] = ("time_embedding.", "time_projection.", "modulation", "head.head.", "norm3.")
_CACHE_ENTRIES = 4  # text K/V and RoPE entries kept: cond+uncond as one batch, and each alone

# q, k, v [B, L, H, D] -> [B, Lq, H, D]: an attention override (tests, experiments)
AttentionFn = Callable[[Tensor, Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class DiTOptions:
    """How a WanDiT computes. Defaults: the plain model (upstream's math, float32)."""

    precision: str = "fp32"
    ops: str = "reference"
    attention: str = "sdpa"
    cross_attention: str = "sdpa"
    fuse_qkv: bool = False
    cache_text: bool = False
    fp8_activations: str = "dynamic"  # FP8 only: per-token dynamic, calibrated static, or weight-only
    fast_accum: bool = True  # FP8 GEMMs with Hopper's fast accumulation (~5% faster, same error)
    gelu_epilogue: bool = False
    compile: bool = False

    def __post_init__(self):
        for name, value, allowed in (("precision", self.precision, tuple(PRECISIONS)),
                                     ("ops", self.ops, (*O.OPS, "auto")),
                                     ("attention", self.attention, IMPLS),
                                     ("cross_attention", self.cross_attention, IMPLS),
                                     ("fp8_activations", self.fp8_activations, ACTIVATION_MODES)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")

    @classmethod
    def plain(cls, precision: str = "fp32") -> "DiTOptions":
        """Upstream's math in `precision` (FP8: weight-only dequantization, the ONNX graphs' meaning)."""
        return cls(precision=precision, fp8_activations="none")

    @classmethod
    def fast(cls, precision: str = "bf16", attention: str = "auto", **kw) -> "DiTOptions":
        """The fast forward: fused qkv, our kernels, cached text K/V, FP8 GEMMs with dynamic activations."""
        base = dict(precision=precision, ops="auto", attention=attention, cross_attention="auto", fuse_qkv=True,
                    cache_text=True, gelu_epilogue=True)
        return cls(**{**base, **kw})

    @property
    def compute_dtype(self) -> torch.dtype:
        return PRECISIONS[self.precision]

    @property
    def resolved_ops(self) -> str:
        if self.ops != "auto":
            return self.ops
        return "torch" if self.compile else "kernels"

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def compute_dtype(layer: nn.Module) -> torch.dtype:
    """dtype a linear layer computes in: FP8Linear says so, nn.Linear computes in its weight's."""
    return getattr(layer, "compute_dtype", None) or layer.weight.dtype


# --------------------------------------------------------------------------- layers

class WanRMSNorm(nn.Module):
    """RMSNorm over the whole hidden dim (upstream `WanRMSNorm`); the model applies it through `ops`."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return O.rms_norm_reference(x, self.weight, self.eps)


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm in float32, returning float32 (upstream `WanLayerNorm`: `super().forward(x.float())`).
    norm1/norm2/head.norm have no affine parameters; norm3 (cross_attn_norm) has weight and bias."""

    def forward(self, x: Tensor) -> Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps)


def _linear(dim_in: int, dim_out: int, fp8: bool, opts: DiTOptions) -> nn.Module:
    if fp8:
        return FP8Linear(dim_in, dim_out, compute_dtype=opts.compute_dtype, activations=opts.fp8_activations,
                         fast_accum=opts.fast_accum)
    return nn.Linear(dim_in, dim_out)


class WanAttention(nn.Module):
    """Projections of upstream `WanSelfAttention` / `WanCrossAttention` (q, k, v, o, norm_q, norm_k);
    with `fused`, q/k/v live in one `qkv` layer."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, eps: float, opts: DiTOptions, fused: bool = False):
        super().__init__()
        if not qk_norm:
            raise ValueError("Wan2.2 experts have qk_norm=True; qk_norm=False is not supported")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        fp8 = opts.precision == "fp8"
        self.fused = fused
        if fused:
            self.qkv = _linear(dim, 3 * dim, fp8, opts)
        else:
            self.q, self.k, self.v = (_linear(dim, dim, fp8, opts) for _ in range(3))
        self.o = _linear(dim, dim, fp8, opts)
        self.norm_q = WanRMSNorm(dim, eps)
        self.norm_k = WanRMSNorm(dim, eps)

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x [B, L, C] -> q, k, v [B, L, C] (views of one GEMM's output when fused)."""
        if self.fused:
            return self.qkv(x).chunk(3, dim=-1)
        return self.q(x), self.k(x), self.v(x)

    def fuse_(self) -> None:
        """q, k, v -> qkv (weights concatenated along out; FP8 scales too)."""
        if not self.fused:
            self.qkv = fuse_linears([self.q, self.k, self.v])
            del self.q, self.k, self.v
            self.fused = True


class WanBlock(nn.Module):
    """One transformer block (upstream `WanAttentionBlock`): modulated self-attention,
    cross-attention to the text, modulated FFN."""

    def __init__(self, cfg: DiTConfig, opts: DiTOptions):
        super().__init__()
        dim, eps, fp8 = cfg.dim, cfg.eps, opts.precision == "fp8"
        self.eps = eps
        self.norm1 = FP32LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.self_attn = WanAttention(dim, cfg.num_heads, cfg.qk_norm, eps, opts, fused=opts.fuse_qkv)
        self.norm3 = FP32LayerNorm(dim, eps=eps, elementwise_affine=True) if cfg.cross_attn_norm else nn.Identity()
        self.cross_attn = WanAttention(dim, cfg.num_heads, cfg.qk_norm, eps, opts)
        self.norm2 = FP32LayerNorm(dim, eps=eps, elementwise_affine=False)
        # nn.Sequential so the parameter names are upstream's ffn.0 / ffn.2.
        self.ffn = nn.Sequential(_linear(dim, cfg.ffn_dim, fp8, opts), nn.GELU(approximate="tanh"),
                                 _linear(cfg.ffn_dim, dim, fp8, opts))
        # [1, 6, dim]: shift/scale/gate for self-attention, then for the FFN (upstream order).
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def text_kv(self, ctx: Tensor, ops: str) -> tuple[Tensor, Tensor]:
        """Cross-attention k, v [B, Lt, H, D] of the embedded text ctx [B, Lt, C]."""
        ca = self.cross_attn
        return (O.rms_heads(ca.k(ctx), ca.norm_k.weight, ca.num_heads, self.eps, ops),
                ca.v(ctx).unflatten(-1, (ca.num_heads, -1)))

    def forward(self, x: Tensor, e6: Tensor, text_kv: tuple[Tensor, Tensor], rp: O.Rope, attn_self, attn_cross,
                ops: str, gelu_epilogue: bool = False) -> Tensor:
        """x [B, L, C] float32 residual; e6 [B, 6, C] float32 time projection; text_kv (k, v)
        [B, Lt, H, D]; rp the grid's RoPE; attn_* an `attend` implementation name or an AttentionFn.
        -> [B, L, C] float32."""
        sa, ca = self.self_attn, self.cross_attn
        dt, eps, heads = compute_dtype(sa.o), self.eps, sa.num_heads
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = (
            (self.modulation.float() + e6).unsqueeze(2).unbind(1))

        q, k, v = sa.project(O.modulate(x, shift_sa, scale_sa, eps, dt, ops))
        q, k = O.qk_norm_rope(q, k, sa.norm_q.weight, sa.norm_k.weight, rp, heads, eps, ops)
        o = _attend(q, k, v.unflatten(-1, (heads, -1)), attn_self)
        x = O.gated_add(x, sa.o(o.flatten(2)), gate_sa, ops)

        if isinstance(self.norm3, nn.LayerNorm):
            w, b = self.norm3.weight.float(), self.norm3.bias.float()
            if ops == "kernels":  # affine LayerNorm = modulation with scale w - 1, shift b
                h = O.modulate(x, b.view(1, 1, -1), (w - 1).view(1, 1, -1), eps, dt, ops)
            else:
                h = F.layer_norm(x, x.shape[-1:], w, b, self.norm3.eps).to(dt)
        else:
            h = x.to(dt)
        o = _attend(O.rms_heads(ca.q(h), ca.norm_q.weight, heads, eps, ops), text_kv[0], text_kv[1], attn_cross)
        x = x + ca.o(o.flatten(2)).float()  # upstream: no gate on cross-attention

        h = O.modulate(x, shift_ff, scale_ff, eps, dt, ops)
        return O.gated_add(x, self.ffn[2](O.gelu_linear(self.ffn[0], h, gelu_epilogue)), gate_ff, ops)


def _attend(q: Tensor, k: Tensor, v: Tensor, impl) -> Tensor:
    return impl(q, k, v) if callable(impl) else attend(q, k, v, impl)


class WanHead(nn.Module):
    """Output head (upstream `Head`): modulated LayerNorm then a linear layer to prod(patch) * out_dim
    channels per token, all in float32 as upstream."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.norm = FP32LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(cfg.dim, math.prod(cfg.patch_size) * cfg.out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        """x [B, L, dim] float32; e [B, dim] float32 time embedding (before time_projection, as
        upstream). -> [B, L, prod(patch) * out_dim] float32."""
        shift, scale = (self.modulation.float() + e[:, None, :]).unsqueeze(2).unbind(1)
        return O.linear_fp32(self.head, self.norm(x) * (1 + scale) + shift)


def _tensor_key(t: Tensor) -> tuple:
    try:
        version = t._version
    except RuntimeError:  # inference tensors have no version counter (and cannot change outside it)
        version = -1
    return (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, str(t.device), version)


# --------------------------------------------------------------------------- the model

class WanDiT(nn.Module):
    """One Wan2.2 expert (upstream `WanModel`), T2V (in_dim 16) or I2V/M2V (in_dim 36).

    Construct on any device, including meta:
        with torch.device("meta"):
            model = WanDiT(cfg)
        model.load_state_dict(sd, strict=True, assign=True)
    then `convert_(DiTOptions.fast("bf16"))` for the fast forward, or construct with the options.
    """

    def __init__(self, cfg: DiTConfig, options: DiTOptions | None = None, attention_fn: AttentionFn | None = None):
        super().__init__()
        opts = options or DiTOptions()
        self.config = cfg
        self.options = opts
        self.attention_fn = attention_fn  # overrides both attention implementations when given
        dim = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList(WanBlock(cfg, opts) for _ in range(cfg.num_layers))
        self.head = WanHead(cfg)
        self._text_cache: dict[tuple, tuple] = {}
        self._rope_cache: dict[tuple, tuple] = {}
        if opts.fuse_qkv:
            self._register_load_state_dict_pre_hook(_fuse_qkv_keys)

    # ---- precision and layout -------------------------------------------------------------
    def param_dtype(self, name: str, dtype: torch.dtype) -> torch.dtype:
        """dtype parameter `name` should have in a model computing in `dtype` (read by the streaming
        loader): KEEP_FP32 ones float32, FP8 weights float8 with float32 scales, the rest `dtype`."""
        mod, _, leaf = name.rpartition(".")
        if leaf in ("weight", "weight_scale", "input_scale") and isinstance(self._owner(mod), FP8Linear):
            return FP8_DTYPE if leaf == "weight" else torch.float32
        return torch.float32 if any(k in name for k in KEEP_FP32) else dtype

    def _owner(self, name: str) -> nn.Module | None:
        try:
            return self.get_submodule(name)
        except AttributeError:
            return None

    def cast_(self, dtype: torch.dtype) -> "WanDiT":
        """Cast parameters to `dtype` in place, by `param_dtype` (FP8 weights and KEEP_FP32 ones stay)."""
        for name, p in self.named_parameters():
            p.data = p.data.to(self.param_dtype(name, dtype))
        for m in self.modules():
            if isinstance(m, FP8Linear):
                m.set_compute_dtype(dtype)
        return self

    @torch.no_grad()
    def convert_(self, options: DiTOptions) -> "WanDiT":
        """Make a loaded model compute as `options` say, in place: quantize block linears to FP8 (an
        FP8 model cannot go back), fuse q/k/v, cast by the precision policy, compile or not."""
        old = self.options
        fp8_now = any(isinstance(m, FP8Linear) for m in self.modules())
        if fp8_now and options.precision != "fp8":
            raise ValueError(f"the model has FP8 weights: use precision 'fp8', not {options.precision!r}")
        if old.fuse_qkv and not options.fuse_qkv:
            raise ValueError("a model with fused q/k/v cannot be unfused: load the weights again")
        cdt = options.compute_dtype
        for blk in self.blocks:
            for owner in (blk.self_attn, blk.cross_attn, blk.ffn):
                for name, layer in list(owner._modules.items()):
                    if options.precision == "fp8" and isinstance(layer, nn.Linear):
                        owner._modules[name] = FP8Linear.from_linear(layer, cdt, activations=options.fp8_activations,
                                                                     fast_accum=options.fast_accum)
                    elif isinstance(layer, FP8Linear):
                        layer.fast_accum = options.fast_accum
                        if layer.activations != "static":
                            layer.activations = options.fp8_activations
            if options.fuse_qkv:
                blk.self_attn.fuse_()
        self.cast_(cdt)
        self.options = options
        self.clear_caches()
        self.set_compile(options.compile)
        return self

    def fuse_qkv_(self) -> "WanDiT":
        return self.convert_(dataclasses.replace(self.options, fuse_qkv=True))

    def set_compile(self, on: bool) -> None:
        """Regional compilation: each block through torch.compile (one graph serves every block, whose
        parameters are graph inputs). Off restores eager blocks."""
        if on:
            import torch._dynamo.config as dcfg

            # precisions, batch 1/2 and attention choices each add a specialisation of the one block graph
            for limit in ("cache_size_limit", "recompile_limit"):
                if hasattr(dcfg, limit):
                    setattr(dcfg, limit, max(getattr(dcfg, limit), 64))
        for blk in self.blocks:
            if on and getattr(blk, "_compiled_call_impl", None) is None:
                blk.compile(dynamic=False)
            elif not on:
                blk._compiled_call_impl = None
        if self.options.compile != on:
            self.options = dataclasses.replace(self.options, compile=on)

    def clear_caches(self) -> None:
        """Drop cached text K/V and RoPE tables (after the weights change, e.g. an expert swap)."""
        self._text_cache.clear()
        self._rope_cache.clear()

    @property
    def compute_dtype(self) -> torch.dtype:
        return compute_dtype(self.blocks[0].self_attn.o) if len(self.blocks) else torch.float32

    # ---- pieces of the forward ------------------------------------------------------------
    def embed_time(self, t: Tensor, batch: int) -> tuple[Tensor, Tensor]:
        """t [B], [1] or scalar timesteps -> e [B, dim], e6 [B, 6, dim], both float32; once per sample
        (upstream computes the same rows once per token)."""
        t = t.reshape(-1)
        if t.numel() == 1:
            t = t.expand(batch)
        elif t.numel() != batch:
            raise ValueError(f"t has {t.numel()} timesteps for a batch of {batch}; pass one per sample or one in all")
        sin_emb = O.timestep_embedding(t, self.config.freq_dim).float()
        e = O.linear_fp32(self.time_embedding[2], F.silu(O.linear_fp32(self.time_embedding[0], sin_emb)))
        e6 = O.linear_fp32(self.time_projection[1], F.silu(e)).unflatten(1, (6, self.config.dim))
        return e, e6

    def embed_text(self, context: Tensor) -> Tensor:
        """context [B, Lc, text_dim], Lc <= text_len -> [B, text_len, dim] (compute dtype). Zero-pads to
        text_len *before* the MLP, as upstream, so every sample cross-attends to all text_len rows."""
        cfg = self.config
        if context.ndim != 3 or context.shape[-1] != cfg.text_dim:
            raise ValueError(f"context must be [B, L, {cfg.text_dim}], got {list(context.shape)}")
        if context.shape[1] > cfg.text_len:
            raise ValueError(f"context has {context.shape[1]} tokens, more than text_len {cfg.text_len}; truncate it")
        w = self.text_embedding[0].weight
        context = F.pad(context.to(w.dtype), (0, 0, 0, cfg.text_len - context.shape[1]))
        return self.text_embedding(context)

    def text_kv(self, context: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Per block (k, v) [B, text_len, H, D] of `context` [B, Lc, text_dim]. With cache_text, kept
        per tensor (storage, shape, version): the entry holds `context`, so its storage is not reused
        by another tensor while the entry lives."""
        key = _tensor_key(context) if self.options.cache_text else None
        if key is not None and key in self._text_cache:
            return self._text_cache[key][1]
        ctx = self.embed_text(context)
        ops = self.options.resolved_ops
        kv = [blk.text_kv(ctx, ops) for blk in self.blocks]
        if key is not None:
            while len(self._text_cache) >= _CACHE_ENTRIES:
                self._text_cache.pop(next(iter(self._text_cache)))
            self._text_cache[key] = (context, kv)
        return kv

    def embed_video(self, x: Tensor, y: Tensor | None) -> tuple[Tensor, tuple[int, int, int]]:
        """x [B, C, F, H, W] (+ y [B, in_dim - C, F, H, W] for I2V) -> tokens [B, f*h*w, dim] float32
        (contiguous rows) and the patched grid (f, h, w); tokens flattened frame-major."""
        cfg = self.config
        if x.ndim != 5:
            raise ValueError(f"x must be [B, C, F, H, W], got {list(x.shape)}")
        if y is not None:
            if y.shape[0] != x.shape[0] or y.shape[2:] != x.shape[2:]:
                raise ValueError(f"y {list(y.shape)} must match x {list(x.shape)} except in channels")
            x = torch.cat([x, y.to(x.dtype)], dim=1)
        if x.shape[1] != cfg.in_dim:
            hint = " (I2V models need y: 4 mask + 16 condition channels)" if y is None else ""
            raise ValueError(f"model expects {cfg.in_dim} input channels, got {x.shape[1]}{hint}")
        if any(s % p for s, p in zip(x.shape[2:], cfg.patch_size)):
            raise ValueError(f"latent size {list(x.shape[2:])} is not divisible by patch_size {cfg.patch_size}")
        x = self.patch_embedding(x.to(self.patch_embedding.weight.dtype))  # [B, dim, f, h, w]
        grid = tuple(x.shape[2:])
        return x.flatten(2).transpose(1, 2).float().contiguous(), grid

    def unpatchify(self, x: Tensor, grid: tuple[int, int, int]) -> Tensor:
        """x [B, f*h*w, pt*ph*pw*out_dim] -> [B, out_dim, f*pt, h*ph, w*pw]; per token the channels
        are laid out (pt, ph, pw, c), as upstream `unpatchify`."""
        (f, h, w), (pt, ph, pw), c = grid, self.config.patch_size, self.config.out_dim
        x = x.reshape(x.shape[0], f, h, w, pt, ph, pw, c)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(x.shape[0], c, f * pt, h * ph, w * pw)

    def rope(self, frame_pos: Tensor | Sequence[float] | None, grid: tuple[int, int, int], device) -> O.Rope:
        """RoPE of the patched grid; frame_pos defaults to 0..f-1. Cached per position table (built
        on the host once: the only host read of a shot's inputs)."""
        f, h, w = grid
        if frame_pos is None:
            key = ("default", grid, str(device))
        elif isinstance(frame_pos, Tensor):
            key = (_tensor_key(frame_pos), grid, str(device))
        else:
            key = (tuple(float(p) for p in frame_pos), grid, str(device))
        hit = self._rope_cache.get(key)
        if hit is not None:
            return hit[1]
        pos = torch.arange(f) if frame_pos is None else torch.as_tensor(frame_pos)
        if pos.ndim != 1 or pos.numel() != f:
            raise ValueError(f"frame_pos must hold one position per patched frame ({f}), got shape {list(pos.shape)}")
        value = O.rope(pos.to("cpu", torch.float64), h, w, self.config.head_dim, device)
        while len(self._rope_cache) >= _CACHE_ENTRIES:
            self._rope_cache.pop(next(iter(self._rope_cache)))
        self._rope_cache[key] = (frame_pos, value)
        return value

    def attention_impls(self, q_shape: tuple, text_shape: tuple, device) -> tuple:
        """(self, cross) attention implementations for this call (resolved by the kernels' dispatcher)."""
        if self.attention_fn is not None:
            return self.attention_fn, self.attention_fn
        dt = self.compute_dtype
        return (choose(self.options.attention, q_shape, q_shape, dt, device),
                choose(self.options.cross_attention, q_shape, text_shape, dt, device))

    # ---- forward ------------------------------------------------------------------------
    def forward(self, x: Tensor, t: Tensor, context: Tensor, y: Tensor | None = None,
                frame_pos: Tensor | Sequence[float] | None = None, *, rope: tuple[Tensor, Tensor] | None = None,
                time_emb: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Predict the flow-matching velocity.

        x [B, C, F, H, W] noisy latent; y [B, in_dim - C, F, H, W] I2V conditioning (mask then condition
        latent); t [B] (or [1]) timesteps in [0, 1000]; context [B, Lc, text_dim] text states,
        zero-padded to text_len inside; frame_pos [F / patch_t] temporal RoPE positions (default
        0..F-1; memory frames negative); rope: per-token (cos, sin) tables overriding frame_pos (what
        exported graphs take as inputs); time_emb: `embed_time`'s result, computed once per step by a
        caller that runs the two CFG branches back to back. Returns [B, out_dim, F, H, W] float32.
        """
        tokens, grid = self.embed_video(x, y)
        b, n = tokens.shape[:2]
        if context.shape[0] != b:
            raise ValueError(f"context batch {context.shape[0]} does not match x batch {b}")
        e, e6 = time_emb if time_emb is not None else self.embed_time(t.to(tokens.device), b)
        kv = self.text_kv(context)
        rp = O.Rope(None, *rope) if rope is not None else self.rope(frame_pos, grid, tokens.device)
        heads, hd = self.config.num_heads, self.config.head_dim
        attn_self, attn_cross = self.attention_impls((b, n, heads, hd), tuple(kv[0][0].shape) if kv else (), tokens.device)
        ops, epilogue = self.options.resolved_ops, self.options.gelu_epilogue
        for blk, kv_i in zip(self.blocks, kv):
            tokens = blk(tokens, e6, kv_i, rp, attn_self, attn_cross, ops, epilogue)
        return self.unpatchify(self.head(tokens, e), grid)


def _fuse_qkv_keys(module: WanDiT, state_dict: dict, prefix: str, *args) -> None:
    """load_state_dict pre-hook of a model built with fuse_qkv: upstream `blocks.N.self_attn.{q,k,v}.*`
    keys become one `qkv.*` (concatenated along out), so upstream checkpoints load unchanged."""
    for i in range(len(module.blocks)):
        base = f"{prefix}blocks.{i}.self_attn."
        for leaf in ("weight", "bias", "weight_scale"):
            keys = [f"{base}{p}.{leaf}" for p in ("q", "k", "v")]
            if all(k in state_dict for k in keys):
                state_dict[f"{base}qkv.{leaf}"] = torch.cat([state_dict.pop(k) for k in keys])
