"""Wan2.2 A14B diffusion transformer (one expert), written to match upstream `WanModel`.

The math matches Wan2.2 `wan/modules/model.py` (`WanModel`, `WanAttentionBlock`, `Head`,
`rope_apply`, `sinusoidal_embedding_1d`); parameter names are the upstream ones, so an upstream
`diffusion_pytorch_model*.safetensors` loads with `load_state_dict(strict=True)` unchanged.
Wan2.2 A14B I2V has no CLIP image branch (`img_emb`): I2V differs from T2V only by
`in_dim` 36 (16 noisy latent + 4 mask + 16 condition channels, concatenated on channels).

What we do differently from upstream, without changing the numbers:
- Equal-size batches only ([B, C, F, H, W] tensors, no per-sample lists, no seq_len padding).
- The time embedding and modulation are computed once per sample ([B, dim]), not per token:
  upstream expands `t` to every token, which gives identical rows.
- RoPE is real-valued (cos/sin tables, no complex dtype, so the graph exports to ONNX) and is
  computed per forward from the frame positions, so temporal positions may be arbitrary
  (negative, non-contiguous, fractional: StoryMem puts memory frames at negative positions).
  No buffers at all: a model built on the meta device and loaded with `assign=True` just works.
- Attention goes through `WanDiT.attention_fn` (default: PyTorch SDPA) so a fused kernel can
  be swapped in without touching this file.

Precision policy (mirrors upstream's autocast regions): with a bf16 model the linear layers of
the attention, FFN, patch and text embeddings run in bf16, while
- the sinusoidal timestep embedding is float64 and the time MLPs / modulation are float32
  (upstream: `sinusoidal_embedding_1d` in float64, `torch.amp.autocast(dtype=float32)` around
  `time_embedding`, `time_projection`, every `modulation` add and the `Head`);
- all LayerNorm / RMSNorm statistics are float32 (upstream `WanLayerNorm`/`WanRMSNorm` call
  `.float()`);
- the residual stream is float32: upstream's `x = x + y * e[2]` with float32 `e` promotes the
  residual to float32 after block 0, and every later add stays float32;
- RoPE angles are float64, rotation float32 (upstream rotates in float64 and returns float32;
  the difference is below float32 rounding of the result).
`KEEP_FP32` lists the parameters `WanDiT.cast_` keeps in float32 so that the float32 regions
also use unrounded weights, as upstream does with its float32 checkpoints under autocast.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .configs import DiTConfig

__all__ = [
    "AttentionFn",
    "KEEP_FP32",
    "WanDiT",
    "apply_rope",
    "compute_dtype",
    "rope_cos_sin",
    "rope_inv_freqs",
    "sdpa_attention",
    "timestep_embedding",
]

ROPE_THETA = 10000.0

# q [B, H, Lq, D], k/v [B, H, Lk, D] -> [B, H, Lq, D]; softmax scale 1/sqrt(D), no mask.
AttentionFn = Callable[[Tensor, Tensor, Tensor], Tensor]


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Default attention: `F.scaled_dot_product_attention`, full (unmasked), scale 1/sqrt(D).

    q [B, H, Lq, D], k, v [B, H, Lk, D] -> [B, H, Lq, D]. Upstream `flash_attention` with
    `k_lens=None` / all-valid `seq_lens` computes the same thing.
    """
    return F.scaled_dot_product_attention(q, k, v)


# --------------------------------------------------------------------------------------------
# Embedding math shared with upstream
# --------------------------------------------------------------------------------------------
def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal timestep embedding, float64. t [B] -> [B, dim] as [cos | sin].

    Matches Wan2.2 `sinusoidal_embedding_1d`: frequencies 10000^(-i/half), i < half, in float64.
    """
    if dim % 2:
        raise ValueError(f"freq_dim must be even, got {dim}")
    half = dim // 2
    t = t.to(torch.float64)
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = t[:, None] * freqs[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


def rope_inv_freqs(head_dim: int, theta: float = ROPE_THETA) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse frequencies (float64, CPU) of the (frame, height, width) RoPE axes.

    Matches Wan2.2 `WanModel.__init__` + `rope_params`: the head dim d is split into
    d - 4*(d//6) temporal dims and 2*(d//6) each for height and width (d=128: 44/42/42, i.e.
    22/21/21 rotation pairs), and each axis has its own frequencies theta^(-2i/d_axis).
    """
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for RoPE, got {head_dim}")
    d_hw = 2 * (head_dim // 6)
    dims = (head_dim - 2 * d_hw, d_hw, d_hw)
    return tuple(
        1.0 / torch.pow(theta, torch.arange(0, n, 2, dtype=torch.float64) / n) for n in dims
    )


def rope_cos_sin(
    frame_pos: Tensor | Sequence[float],
    h: int,
    w: int,
    head_dim: int,
    device: torch.device | str | None = None,
    theta: float = ROPE_THETA,
) -> tuple[Tensor, Tensor]:
    """RoPE tables for a (frames, h, w) token grid in the order tokens are flattened (f, h, w).

    frame_pos: [F] temporal position of each (patched) frame: any real numbers, e.g. -M..-1
    for memory frames followed by 0..T-1 for the shot. Height/width positions are 0..h-1, 0..w-1.
    Returns cos, sin: [F*h*w, head_dim//2] float32, pair i rotating channels (2i, 2i+1).
    Angles and cos/sin are evaluated in float64 (as upstream `rope_params`) and then rounded.
    """
    pos_t = torch.as_tensor(frame_pos).to(device="cpu", dtype=torch.float64).reshape(-1)
    inv_t, inv_h, inv_w = rope_inv_freqs(head_dim, theta)
    n_f = pos_t.numel()
    ang_t = (pos_t[:, None] * inv_t[None, :])[:, None, None, :].expand(n_f, h, w, -1)
    ang_h = (torch.arange(h, dtype=torch.float64)[:, None] * inv_h)[None, :, None, :]
    ang_w = (torch.arange(w, dtype=torch.float64)[:, None] * inv_w)[None, None, :, :]
    angles = torch.cat(
        [ang_t, ang_h.expand(n_f, h, w, -1), ang_w.expand(n_f, h, w, -1)], dim=-1
    ).reshape(n_f * h * w, head_dim // 2)
    # Computed on the CPU: float64 is slow or missing on accelerators, and the table is small.
    return (
        torch.cos(angles).to(device=device, dtype=torch.float32),
        torch.sin(angles).to(device=device, dtype=torch.float32),
    )


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x [B, L, H, D] by the tables cos, sin [L, D/2]; returns x's dtype.

    Reference meaning of upstream `rope_apply`: consecutive channels (2i, 2i+1) form the complex
    number x_{2i} + i x_{2i+1}, multiplied by cos_i + i sin_i. Computed in float32.
    """
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    c, s = cos[:, None, :], sin[:, None, :]  # broadcast over heads
    out = torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1).flatten(-2)
    return out.to(x.dtype)


def compute_dtype(layer: nn.Module) -> torch.dtype:
    """dtype a linear layer computes in: its weight's, unless the layer says otherwise
    (quantized layers such as export/fp8.py `FP8Linear` store float8 weights but compute in
    bf16/fp32 and expose `compute_dtype`)."""
    return getattr(layer, "compute_dtype", None) or layer.weight.dtype


def _linear_fp32(layer: nn.Linear, x: Tensor) -> Tensor:
    """A linear layer evaluated in float32 whatever its parameter dtype (upstream's float32
    autocast regions); a no-op cast when the parameters are already float32."""
    bias = None if layer.bias is None else layer.bias.float()
    return F.linear(x.float(), layer.weight.float(), bias)


# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------
class WanRMSNorm(nn.Module):
    """RMSNorm over the whole hidden dim (all heads together), statistics in float32.

    Matches Wan2.2 `WanRMSNorm`: `norm(x.float()).type_as(x) * weight`. x [..., dim].
    """

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return xf.to(x.dtype) * self.weight.to(x.dtype)


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32, returning float32 (our residual stream's dtype).

    Matches Wan2.2 `WanLayerNorm` (`super().forward(x.float())`). Upstream norm1/norm2/head.norm
    have no affine parameters; norm3 (cross_attn_norm) has weight and bias.
    """

    def forward(self, x: Tensor) -> Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps)


class WanAttention(nn.Module):
    """Multi-head attention with q/k RMSNorm over the full dim (upstream `WanSelfAttention` /
    `WanCrossAttention`). Self-attention applies RoPE to q and k after the norm."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = WanRMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.norm_k = WanRMSNorm(dim, eps) if qk_norm else nn.Identity()

    def forward(
        self,
        x: Tensor,
        context: Tensor | None,
        rope: tuple[Tensor, Tensor] | None,
        attention_fn: AttentionFn,
    ) -> Tensor:
        """x [B, Lq, dim] (compute dtype); context [B, Lk, dim] for cross-attention, None for
        self-attention; rope (cos, sin) [Lq, head_dim/2] for self-attention. -> [B, Lq, dim]."""
        kv = x if context is None else context
        b, n, d = x.shape[0], self.num_heads, self.head_dim
        q = self.norm_q(self.q(x)).unflatten(-1, (n, d))  # [B, Lq, H, D]
        k = self.norm_k(self.k(kv)).unflatten(-1, (n, d))
        v = self.v(kv).unflatten(-1, (n, d))
        if rope is not None:
            q = apply_rope(q, *rope)
            k = apply_rope(k, *rope)
        out = attention_fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.o(out.transpose(1, 2).reshape(b, -1, n * d))


class WanBlock(nn.Module):
    """One transformer block (upstream `WanAttentionBlock`): modulated self-attention,
    cross-attention to the text, modulated FFN."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        dim, eps = cfg.dim, cfg.eps
        self.norm1 = FP32LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.self_attn = WanAttention(dim, cfg.num_heads, cfg.qk_norm, eps)
        self.norm3 = (
            FP32LayerNorm(dim, eps=eps, elementwise_affine=True) if cfg.cross_attn_norm else nn.Identity()
        )
        self.cross_attn = WanAttention(dim, cfg.num_heads, cfg.qk_norm, eps)
        self.norm2 = FP32LayerNorm(dim, eps=eps, elementwise_affine=False)
        # nn.Sequential so the parameter names are upstream's ffn.0 / ffn.2.
        self.ffn = nn.Sequential(
            nn.Linear(dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, dim)
        )
        # [1, 6, dim]: shift/scale/gate for self-attention, then for the FFN (upstream order).
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(
        self,
        x: Tensor,
        e6: Tensor,
        context: Tensor,
        rope: tuple[Tensor, Tensor],
        attention_fn: AttentionFn,
    ) -> Tensor:
        """x [B, L, dim] float32 residual; e6 [B, 6, dim] float32 time projection;
        context [B, text_len, dim] embedded text (compute dtype). -> [B, L, dim] float32."""
        cdt = compute_dtype(self.self_attn.q)
        # float32 like upstream's autocast(float32) region; [B, 1, dim] each, broadcast over L.
        mod = (self.modulation.float() + e6).unsqueeze(2).unbind(1)
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = mod

        h = self.norm1(x) * (1 + scale_sa) + shift_sa
        x = x + self.self_attn(h.to(cdt), None, rope, attention_fn).float() * gate_sa
        # Upstream adds the cross-attention output without a gate.
        x = x + self.cross_attn(self.norm3(x).to(cdt), context, None, attention_fn).float()
        h = self.norm2(x) * (1 + scale_ff) + shift_ff
        x = x + self.ffn(h.to(cdt)).float() * gate_ff
        return x


class WanHead(nn.Module):
    """Output head (upstream `Head`): modulated LayerNorm then a linear layer to
    prod(patch_size) * out_dim channels per token, all in float32 as upstream."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.norm = FP32LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(cfg.dim, math.prod(cfg.patch_size) * cfg.out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        """x [B, L, dim] float32; e [B, dim] float32 time embedding (before time_projection,
        as upstream). -> [B, L, prod(patch) * out_dim] float32."""
        shift, scale = (self.modulation.float() + e[:, None, :]).unsqueeze(2).unbind(1)
        return _linear_fp32(self.head, self.norm(x) * (1 + scale) + shift)


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------
# Parameter-name fragments kept in float32 by `WanDiT.cast_` (upstream's float32 regions).
KEEP_FP32: tuple[str, ...] = ("time_embedding.", "time_projection.", "modulation", "head.head.", "norm3.")


class WanDiT(nn.Module):
    """One Wan2.2 expert (upstream `WanModel`), T2V (in_dim 16) or I2V/M2V (in_dim 36).

    Construct on any device, including meta:
        with torch.device("meta"):
            model = WanDiT(cfg)
        model.load_state_dict(sd, strict=True, assign=True)
    The model has no buffers; RoPE tables are computed per forward (or passed in).
    """

    def __init__(self, cfg: DiTConfig, attention_fn: AttentionFn | None = None):
        super().__init__()
        self.config = cfg
        self.attention_fn: AttentionFn = attention_fn or sdpa_attention
        dim = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(
            nn.Linear(cfg.text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim)
        )
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList(WanBlock(cfg) for _ in range(cfg.num_layers))
        self.head = WanHead(cfg)

    # ---- precision ------------------------------------------------------------------------
    @staticmethod
    def param_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
        """dtype a parameter called `name` should have in a model running in `dtype`
        (for loaders that convert a state dict before `load_state_dict(assign=True)`)."""
        return torch.float32 if any(k in name for k in KEEP_FP32) else dtype

    def cast_(self, dtype: torch.dtype) -> "WanDiT":
        """Cast parameters to `dtype` in place, keeping `KEEP_FP32` ones in float32."""
        for name, p in self.named_parameters():
            p.data = p.data.to(self.param_dtype(name, dtype))
        return self

    # ---- pieces of the forward (separate so export and caching can reuse them) --------------
    def embed_time(self, t: Tensor, batch: int) -> tuple[Tensor, Tensor]:
        """t [B] or [1] or scalar timesteps -> e [B, dim], e6 [B, 6, dim], both float32.

        Once per sample: upstream computes the same rows once per token."""
        t = t.reshape(-1)
        if t.numel() == 1:
            t = t.expand(batch)
        elif t.numel() != batch:
            raise ValueError(f"t has {t.numel()} timesteps for a batch of {batch}; pass one per sample or one in all")
        sin_emb = timestep_embedding(t, self.config.freq_dim).float()
        e = _linear_fp32(self.time_embedding[2], F.silu(_linear_fp32(self.time_embedding[0], sin_emb)))
        e6 = _linear_fp32(self.time_projection[1], F.silu(e)).unflatten(1, (6, self.config.dim))
        return e, e6

    def embed_text(self, context: Tensor) -> Tensor:
        """context [B, Lc, text_dim], Lc <= text_len -> [B, text_len, dim] (compute dtype).

        Zero-pads to text_len *before* the MLP, as upstream, so the padded rows are
        text_embedding(0) and every sample cross-attends to all text_len rows."""
        cfg = self.config
        if context.ndim != 3 or context.shape[-1] != cfg.text_dim:
            raise ValueError(f"context must be [B, L, {cfg.text_dim}], got {list(context.shape)}")
        if context.shape[1] > cfg.text_len:
            raise ValueError(f"context has {context.shape[1]} tokens, more than text_len {cfg.text_len}; truncate it")
        w = self.text_embedding[0].weight
        context = F.pad(context.to(w.dtype), (0, 0, 0, cfg.text_len - context.shape[1]))
        return self.text_embedding(context)

    def embed_video(self, x: Tensor, y: Tensor | None) -> tuple[Tensor, tuple[int, int, int]]:
        """x [B, C, F, H, W] (+ y [B, in_dim - C, F, H, W] for I2V) -> tokens [B, f*h*w, dim]
        float32 and the patched grid (f, h, w). Tokens are flattened frame-major (f, h, w)."""
        cfg = self.config
        if x.ndim != 5:
            raise ValueError(f"x must be [B, C, F, H, W], got {list(x.shape)}")
        if y is not None:
            if y.shape[0] != x.shape[0] or y.shape[2:] != x.shape[2:]:
                raise ValueError(f"y {list(y.shape)} must match x {list(x.shape)} except in channels")
            x = torch.cat([x, y], dim=1)
        if x.shape[1] != cfg.in_dim:
            hint = " (I2V models need y: 4 mask + 16 condition channels)" if y is None else ""
            raise ValueError(f"model expects {cfg.in_dim} input channels, got {x.shape[1]}{hint}")
        if any(s % p for s, p in zip(x.shape[2:], cfg.patch_size)):
            raise ValueError(f"latent size {list(x.shape[2:])} is not divisible by patch_size {cfg.patch_size}")
        x = self.patch_embedding(x.to(self.patch_embedding.weight.dtype))  # [B, dim, f, h, w]
        grid = tuple(x.shape[2:])
        return x.flatten(2).transpose(1, 2).float(), grid

    def unpatchify(self, x: Tensor, grid: tuple[int, int, int]) -> Tensor:
        """x [B, f*h*w, pt*ph*pw*out_dim] -> [B, out_dim, f*pt, h*ph, w*pw].

        Matches upstream `unpatchify`: per token the channels are laid out (pt, ph, pw, c)."""
        (f, h, w), (pt, ph, pw), c = grid, self.config.patch_size, self.config.out_dim
        x = x.reshape(x.shape[0], f, h, w, pt, ph, pw, c)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(x.shape[0], c, f * pt, h * ph, w * pw)

    def rope(
        self, frame_pos: Tensor | Sequence[float] | None, grid: tuple[int, int, int], device
    ) -> tuple[Tensor, Tensor]:
        """(cos, sin) [f*h*w, head_dim/2] for the patched grid; frame_pos defaults to 0..f-1."""
        f, h, w = grid
        if frame_pos is None:
            frame_pos = torch.arange(f)
        frame_pos = torch.as_tensor(frame_pos)
        if frame_pos.ndim != 1 or frame_pos.numel() != f:
            raise ValueError(
                f"frame_pos must hold one position per patched frame ({f}), got shape {list(frame_pos.shape)}"
            )
        return rope_cos_sin(frame_pos, h, w, self.config.head_dim, device)

    # ---- forward --------------------------------------------------------------------------
    def forward(
        self,
        x: Tensor,
        t: Tensor,
        context: Tensor,
        y: Tensor | None = None,
        frame_pos: Tensor | Sequence[float] | None = None,
        *,
        rope: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """Predict the flow-matching velocity.

        x [B, C, F, H, W] noisy latent; y [B, in_dim - C, F, H, W] I2V conditioning (mask then
        condition latent), concatenated after x; t [B] (or [1]) timesteps in [0, 1000];
        context [B, Lc, text_dim] text states, zero-padded to text_len inside;
        frame_pos [F / patch_t] temporal RoPE position of each frame (default 0..F-1; memory
        frames at negative positions); rope: precomputed `rope_cos_sin` tables, overriding
        frame_pos (lets exported graphs take them as inputs).
        Returns [B, out_dim, F, H, W] float32.
        """
        tokens, grid = self.embed_video(x, y)
        b = tokens.shape[0]
        if context.shape[0] != b:
            raise ValueError(f"context batch {context.shape[0]} does not match x batch {b}")
        e, e6 = self.embed_time(t.to(tokens.device), b)
        ctx = self.embed_text(context)
        if rope is None:
            rope = self.rope(frame_pos, grid, tokens.device)
        for block in self.blocks:
            tokens = block(tokens, e6, ctx, rope, self.attention_fn)
        return self.unpatchify(self.head(tokens, e), grid)
