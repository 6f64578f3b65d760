"""FP8 (e4m3) linear layers: the one quantization scheme of the runtime, the export and the kernels.

Scheme (what TensorRT, cuBLASLt rowwise scaling and torch._scaled_mm all accept):
- weights per output channel: scale[o] = amax(|W[o, :]|) / 448, w8 = e4m3(W / scale) with
  round-to-nearest-even and saturation (torch's float8_e4m3fn cast); an all-zero row gets scale 1,
  so dequantization never divides by zero;
- activations, one of:
  "dynamic": per token on the fly, the same row rule (the fast path: torch._scaled_mm on CUDA, the
             product of the dequantized operands on the CPU, so CI checks the numerics);
  "static":  per tensor with a calibrated `input_scale` (amax / 448), quantize-dequantize in front of
             the GEMM, as the Q/DQ pair of a calibrated ONNX graph does;
  "none":    weight-only: the weight is dequantized and the GEMM runs in the compute dtype (what an
             uncalibrated ONNX graph does, and the reference for it).
Only block linears (attention q/k/v/o, FFN) are FP8; embeddings, time MLPs, modulation, norms and
the head keep the DiT's precision policy (`dit.KEEP_FP32`).
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger("storymem_rt")

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448: the one definition (kernels import it)
ACTIVATION_MODES = ("dynamic", "static", "none")
_SCALED_MM_BIAS = [True]  # torch._scaled_mm takes a bias with rowwise scales (False after its first refusal)


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """x [M, K] (any float dtype) -> (e4m3 [M, K], scale [M, 1] float32), x ~= q * scale.

    scale = amax(|row|) / 448 (1 for an all-zero row), saturating cast: weights per output
    channel, activations per token."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    return (xf / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def quantize_weight(w: Tensor) -> tuple[Tensor, Tensor]:
    """W [out, in] -> (w8 [out, in] e4m3, scale [out] float32): `quantize_rows` per output channel."""
    w8, scale = quantize_rows(w)
    return w8, scale.reshape(-1)


def dequantize_weight(w8: Tensor, scale: Tensor) -> Tensor:
    """float32 [out, in] = w8 * scale[:, None] (ONNX DequantizeLinear with axis 0)."""
    return w8.float() * scale.float()[:, None]


def e4m3_spacing(x: Tensor) -> Tensor:
    """Distance between adjacent e4m3 values around |x| (x in units of the scale, |x| <= 448):
    2^(e-3) in the binade [2^e, 2^(e+1)), 2^-9 below the smallest normal 2^-6."""
    ax = x.abs().float().clamp_min(2.0**-6)
    return torch.exp2(torch.floor(torch.log2(ax)) - 3)


def fake_quant_fp8(x: Tensor, scale: Tensor) -> Tensor:
    """Per-tensor quantize-dequantize (ONNX QuantizeLinear -> DequantizeLinear, float8e4m3fn zero
    point, saturate): e4m3(x / s) * s in x's dtype; s is rounded to x's dtype first, as the Q/DQ
    pair of a bf16 graph holds it."""
    s = scale.to(x.dtype).float()
    q = (x.float() / s).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return (q.float() * s).to(x.dtype)


def input_scale_tensor(amax: float) -> Tensor:
    """Static per-tensor activation scale from a calibrated amax (never 0)."""
    return torch.tensor(max(float(amax), 1e-12) / FP8_MAX, dtype=torch.float32)


def fp8_matmul(xq: Tensor, x_scale: Tensor, w8: Tensor, w_scale: Tensor, bias: Tensor | None,
               out_dtype: torch.dtype, fast_accum: bool = False) -> Tensor:
    """(xq * x_scale) @ (w8 * w_scale[:, None]).T + bias: xq [M, K] e4m3, x_scale [M, 1], w8 [N, K]
    e4m3, w_scale [N] float32 -> [M, N] out_dtype.

    CUDA: torch._scaled_mm with rowwise scales (fp32 accumulation, bf16 out). CPU: the same product
    on dequantized operands in float32."""
    if not xq.is_cuda:
        y = (xq.float() * x_scale) @ (w8.float() * w_scale.float()[:, None]).t()
        if bias is not None:
            y = y + bias.float()
        return y.to(out_dtype)
    args = (xq, w8.t())
    kw = dict(scale_a=x_scale, scale_b=w_scale.view(1, -1), out_dtype=torch.bfloat16, use_fast_accum=fast_accum)
    y = None
    if bias is not None and _SCALED_MM_BIAS[0]:
        if torch.compiler.is_compiling():
            y = torch._scaled_mm(*args, bias=bias.to(torch.bfloat16), **kw)
        else:
            try:  # the bias epilogue with rowwise scales needs a recent torch: learnt on the first call
                y = torch._scaled_mm(*args, bias=bias.to(torch.bfloat16), **kw)
            except RuntimeError as e:
                log.info("torch._scaled_mm refuses a bias with rowwise scales (%s); adding it apart", e)
                _SCALED_MM_BIAS[0] = False
    if y is None:
        y = torch._scaled_mm(*args, **kw)
        if bias is not None:
            y = y + bias.to(y.dtype)
    return y if out_dtype == torch.bfloat16 else y.to(out_dtype)


class FP8Linear(nn.Module):
    """A linear layer with e4m3 weights [out, in], float32 per-output-channel scales [out], a bias in
    the compute dtype and, for "static" activations, a calibrated float32 `input_scale` [].

    x [..., in] -> [..., out] in `compute_dtype`. `activations` picks the scheme (module docstring).
    Parameter names are the FP8 artifacts' (`weight`, `weight_scale`, `bias`, `input_scale`), so an
    expert loaded from `build-engines --precision fp8` needs no re-quantization."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 compute_dtype: torch.dtype = torch.bfloat16, activations: str = "dynamic",
                 fast_accum: bool = False):
        super().__init__()
        if activations not in ACTIVATION_MODES:
            raise ValueError(f"activations must be one of {', '.join(ACTIVATION_MODES)}; got {activations!r}")
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype
        self.activations = activations
        self.fast_accum = fast_accum
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8_DTYPE), requires_grad=False)
        self.weight_scale = nn.Parameter(torch.ones(out_features, dtype=torch.float32), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=compute_dtype), requires_grad=False) if bias else None
        self.input_scale = (nn.Parameter(torch.ones((), dtype=torch.float32), requires_grad=False)
                            if activations == "static" else None)

    @classmethod
    def from_weights(cls, weight: Tensor, weight_scale: Tensor, bias: Tensor | None, **kw) -> "FP8Linear":
        """From e4m3 weights [out, in] and scales [out] (taken, not copied)."""
        if weight.dtype != FP8_DTYPE or weight.ndim != 2:
            raise ValueError(f"weight must be [out, in] {FP8_DTYPE}, got {weight.dtype} {tuple(weight.shape)}")
        out = cls(weight.shape[1], weight.shape[0], bias is not None, **kw)
        out.weight.data = weight
        out.weight_scale.data = weight_scale.float().reshape(-1)
        if bias is not None:
            out.bias.data = bias.detach().to(out.compute_dtype)
        return out

    @classmethod
    def from_linear(cls, layer: nn.Module, compute_dtype: torch.dtype | None = None, **kw) -> "FP8Linear":
        """From an nn.Linear (quantized here) or an FP8Linear (its weights reused)."""
        cdt = compute_dtype or getattr(layer, "compute_dtype", None) or layer.weight.dtype
        bias = None if layer.bias is None else layer.bias.detach()
        if layer.weight.dtype == FP8_DTYPE:
            w8, scale = layer.weight.detach(), layer.weight_scale.detach()
        else:
            w8, scale = quantize_weight(layer.weight.detach())
        return cls.from_weights(w8, scale, bias, compute_dtype=cdt, **kw)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"compute_dtype={self.compute_dtype}, activations={self.activations}, fast_accum={self.fast_accum}")

    def set_compute_dtype(self, dtype: torch.dtype) -> None:
        self.compute_dtype = dtype
        if self.bias is not None:
            self.bias.data = self.bias.data.to(dtype)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """W in `dtype` (default compute_dtype); the scale rounded to that dtype first, as the
        DequantizeLinear of a bf16/fp16 ONNX graph holds it (a no-op for float32)."""
        dtype = dtype or self.compute_dtype
        return dequantize_weight(self.weight, self.weight_scale.to(dtype)).to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        if self.activations == "dynamic":
            shape = x.shape
            xq, xs = quantize_rows(x.reshape(-1, shape[-1]))
            y = fp8_matmul(xq, xs, self.weight, self.weight_scale, self.bias, self.compute_dtype, self.fast_accum)
            return y.reshape(*shape[:-1], self.out_features)
        x = x.to(self.compute_dtype)
        if self.activations == "static":
            x = fake_quant_fp8(x, self.input_scale)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)


def block_linear_names(model: nn.Module) -> list[str]:
    """Module names of every nn.Linear / FP8Linear inside `blocks` (what FP8 quantizes)."""
    return [name for name, m in model.named_modules()
            if name.startswith("blocks.") and isinstance(m, (nn.Linear, FP8Linear))]


def fuse_linears(layers: list[nn.Module]) -> nn.Module:
    """One layer computing cat([l(x) for l in layers], -1): weights (and FP8 scales) concatenated
    along the output dim. nn.Linear in, nn.Linear out; FP8Linear in, FP8Linear out."""
    bias = torch.cat([l.bias.detach() for l in layers])
    first = layers[0]
    if isinstance(first, FP8Linear):
        if first.activations == "static":
            raise ValueError("linears with static activation scales cannot be fused (one input scale each)")
        return FP8Linear.from_weights(torch.cat([l.weight.detach() for l in layers]),
                                      torch.cat([l.weight_scale.detach().reshape(-1) for l in layers]), bias,
                                      compute_dtype=first.compute_dtype, activations=first.activations,
                                      fast_accum=first.fast_accum)
    w = torch.cat([l.weight.detach() for l in layers])
    with torch.device("meta"):
        out = nn.Linear(w.shape[1], w.shape[0])
    out.weight = nn.Parameter(w, requires_grad=False)
    out.bias = nn.Parameter(bias, requires_grad=False)
    return out
