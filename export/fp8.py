"""FP8 (e4m3) block weights: quantize once to safetensors, load into a WanDiT with `FP8Linear`s.

Scheme (what TensorRT, cuBLASLt rowwise scaling and torch._scaled_mm all accept):
- every nn.Linear inside `blocks.*` (self/cross-attention q, k, v, o and ffn.0, ffn.2) gets
  per-output-channel weights: scale[o] = amax(|W[o, :]|) / 448, w8 = e4m3(W / scale) with
  round-to-nearest-even and saturation (torch's float8_e4m3fn cast); an all-zero row gets
  scale 1 so dequantization never divides by zero;
- embeddings (patch, text, time), the time projection, modulation, norms and the head stay
  as they are in the source file (float32 upstream): they are ~1.7% of A14B's weights, and
  the float32 regions of `dit.py` need them unrounded.
A14B: 14.05 B block-linear weights -> 14 GB instead of 28 GB in bf16 (the other 0.24 B stay
float32, 1 GB), so both experts of a model (about 30 GB) fit on one 80 GB GPU with room for
activations.

File layout (an upstream expert folder, so shards and the index work as before):
    <dir>/config.json                  the source's, copied
    <dir>/fp8_config.json              {"format": "storymem-fp8", "quantized": [...module names], ...}
    <dir>/diffusion_pytorch_model*.safetensors  `<name>.weight` float8_e4m3fn [out, in] +
                                       `<name>.weight_scale` float32 [out]; other tensors unchanged
    [+ `<name>.input_scale` float32 [] when activation scales were calibrated]

Runtime: `load_fp8_expert` builds a WanDiT whose block linears are `FP8Linear`. The
reference path (CPU, and the default everywhere) dequantizes on the fly,
W = w8.float() * scale[:, None], then runs F.linear in the compute dtype, so it only saves
memory. `FP8Linear.matmul_hook` is the switch for a real FP8 GEMM on Hopper
(`scaled_mm_hook` below: torch._scaled_mm with rowwise scales; the fast path of issue 5 may
install its own); the hook gets the layer and x and returns y or NotImplemented.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Callable, ClassVar

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from storymem_rt.atomic import atomic_dir
from storymem_rt.checkpoint import (INDEX_NAME, SAFETENSORS_NAME, build_on_meta, checkpoint_error, iter_safetensors,
                                    load_module_streaming, read_index, safetensors_files)
from storymem_rt.configs import DiTConfig
from storymem_rt.dit import WanDiT

log = logging.getLogger("storymem_rt")

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
FP8_CONFIG = "fp8_config.json"
FP8_FORMAT = "storymem-fp8"
FP8_VERSION = 1


# --------------------------------------------------------------------------- quantization math

def quantize_weight(w: Tensor) -> tuple[Tensor, Tensor]:
    """W [out, in] (any float dtype) -> (w8 [out, in] float8_e4m3fn, scale [out] float32).

    scale = amax(|W[o]|) / 448 per output row; W ~= w8.float() * scale[:, None]."""
    wf = w.float()
    amax = wf.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    w8 = (wf / scale[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return w8, scale


def dequantize_weight(w8: Tensor, scale: Tensor) -> Tensor:
    """float32 [out, in] = w8 * scale[:, None] (ONNX DequantizeLinear with axis 0)."""
    return w8.float() * scale.float()[:, None]


def e4m3_spacing(x: Tensor) -> Tensor:
    """Distance between adjacent e4m3 values around |x| (x in units of the scale, |x| <= 448):
    2^(e-3) in the binade [2^e, 2^(e+1)), 2^-9 below the smallest normal 2^-6."""
    ax = x.abs().float().clamp_min(2.0**-6)
    return torch.exp2(torch.floor(torch.log2(ax)) - 3)


def fake_quant_fp8(x: Tensor, scale: Tensor) -> Tensor:
    """Per-tensor activation quantize-dequantize (ONNX QuantizeLinear -> DequantizeLinear with
    a float8e4m3fn zero point, saturate=1): e4m3(x / s) * s in x's dtype. The scale is rounded
    to x's dtype first, as the Q/DQ pair in a bf16 graph holds it."""
    s = scale.to(x.dtype).float()
    q = (x.float() / s).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return (q.float() * s).to(x.dtype)


# --------------------------------------------------------------------------- the module

class FP8Linear(nn.Module):
    """A linear layer with e4m3 weights and per-output-channel float32 scales.

    x [..., in] (compute dtype) -> [..., out] (compute dtype). Parameters: `weight`
    float8_e4m3fn [out, in], `weight_scale` float32 [out], `bias` [out] (compute dtype),
    optional `input_scale` float32 [] (static activation scale: x is quantize-dequantized to
    e4m3 first, as the Q/DQ pair in front of the MatMul of a calibrated ONNX graph does).
    `compute_dtype` is what the surrounding block casts activations to (`dit.py` asks for it).
    """

    # Fast-path hook: fn(layer, x) -> y or NotImplemented. Called for CUDA inputs only; None
    # means the reference dequantize path. See `scaled_mm_hook`.
    matmul_hook: ClassVar[Callable[["FP8Linear", Tensor], Tensor] | None] = None

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 compute_dtype: torch.dtype = torch.bfloat16, input_scale: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8_DTYPE), requires_grad=False)
        self.weight_scale = nn.Parameter(torch.ones(out_features, dtype=torch.float32), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=compute_dtype), requires_grad=False) if bias else None
        self.input_scale = nn.Parameter(torch.ones((), dtype=torch.float32), requires_grad=False) if input_scale else None

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"compute_dtype={self.compute_dtype}, input_scale={self.input_scale is not None}")

    @classmethod
    def from_linear(cls, layer: nn.Linear, compute_dtype: torch.dtype | None = None) -> "FP8Linear":
        dt = compute_dtype or layer.weight.dtype
        out = cls(layer.in_features, layer.out_features, layer.bias is not None, dt)
        w8, scale = quantize_weight(layer.weight.detach())
        out.weight.data, out.weight_scale.data = w8, scale
        if layer.bias is not None:
            out.bias.data = layer.bias.detach().to(dt)
        return out

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """W in `dtype` (default compute_dtype). The scale is rounded to that dtype first, as
        the DequantizeLinear of a bf16/fp16 ONNX graph holds it (no-op for float32)."""
        dtype = dtype or self.compute_dtype
        return dequantize_weight(self.weight, self.weight_scale.to(dtype)).to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        hook = FP8Linear.matmul_hook
        if hook is not None and x.is_cuda:
            y = hook(self, x)
            if y is not NotImplemented:
                return y
        if self.input_scale is not None:
            x = fake_quant_fp8(x, self.input_scale)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)


def scaled_mm_hook(layer: FP8Linear, x: Tensor) -> Tensor:
    """Real FP8 GEMM through torch._scaled_mm (sm_89+): x quantized per row (dynamic, amax/448),
    w8 with its per-channel scales, bf16 out. Not run in CI (no GPU here); install with
    `FP8Linear.matmul_hook = scaled_mm_hook`. Returns NotImplemented where it does not apply."""
    if not hasattr(torch, "_scaled_mm") or torch.cuda.get_device_capability(x.device) < (8, 9):
        return NotImplemented
    if layer.in_features % 16 or layer.out_features % 16:
        return NotImplemented
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    xf = x2.float()
    if layer.input_scale is not None:
        sx = layer.input_scale.float().expand(x2.shape[0], 1).contiguous()
    else:
        sx = (xf.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp_min(1e-12)
    x8 = (xf / sx).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
    y = torch._scaled_mm(x8, layer.weight.t(), scale_a=sx, scale_b=layer.weight_scale[None, :].float(),
                         bias=None if layer.bias is None else layer.bias.to(out_dtype), out_dtype=out_dtype)
    return y.reshape(*shape[:-1], layer.out_features).to(x.dtype)


def block_linear_names(model: nn.Module) -> list[str]:
    """Module names of every nn.Linear / FP8Linear inside `blocks` (what FP8 quantizes)."""
    return [name for name, m in model.named_modules()
            if name.startswith("blocks.") and isinstance(m, (nn.Linear, FP8Linear))]


class FP8WanDiT(WanDiT):
    """WanDiT with every block linear an FP8Linear (compute in `compute_dtype`).

    Its precision policy (`param_dtype`, read by the streaming loader) keeps float8 weights and
    float32 scales as they are and applies WanDiT's policy to everything else."""

    def __init__(self, cfg: DiTConfig, compute_dtype: torch.dtype = torch.bfloat16, input_scales: bool = False,
                 attention_fn=None):
        super().__init__(cfg, attention_fn)
        self.fp8_names = block_linear_names(self)
        for name in self.fp8_names:
            parent, _, leaf = name.rpartition(".")
            old = self.get_submodule(name)
            self.get_submodule(parent)._modules[leaf] = FP8Linear(
                old.in_features, old.out_features, old.bias is not None, compute_dtype, input_scales)
        self._fp8_set = frozenset(self.fp8_names)

    def param_dtype(self, name: str, dtype: torch.dtype) -> torch.dtype:  # type: ignore[override]
        mod, _, leaf = name.rpartition(".")
        if mod in self._fp8_set:
            if leaf == "weight":
                return FP8_DTYPE
            if leaf in ("weight_scale", "input_scale"):
                return torch.float32
        return WanDiT.param_dtype(name, dtype)

    def set_compute_dtype(self, dtype: torch.dtype) -> "FP8WanDiT":
        for name in self.fp8_names:
            layer = self.get_submodule(name)
            layer.compute_dtype = dtype
            if layer.bias is not None:
                layer.bias.data = layer.bias.data.to(dtype)
        return self


def input_scale_tensor(amax: float) -> Tensor:
    """Static per-tensor activation scale from a calibrated amax (never 0)."""
    return torch.tensor(max(float(amax), 1e-12) / FP8_MAX, dtype=torch.float32)


def quantize_model(model: WanDiT, compute_dtype: torch.dtype | None = None,
                   input_amax: dict[str, float] | None = None) -> FP8WanDiT:
    """An FP8WanDiT from a loaded WanDiT (in memory; for tests and small models).
    `input_amax` (from `calibrate_input_amax`) adds static activation scales."""
    cdt = compute_dtype or model.patch_embedding.weight.dtype
    q = build_on_meta(lambda: FP8WanDiT(model.config, cdt, input_scales=input_amax is not None))
    state = {}
    for k, v in model.state_dict().items():
        mod, _, leaf = k.rpartition(".")
        if mod in q._fp8_set and leaf == "weight":
            state[k], state[mod + ".weight_scale"] = quantize_weight(v)
            if input_amax is not None:
                state[mod + ".input_scale"] = input_scale_tensor(input_amax[mod])
        else:
            state[k] = v
    device = model.patch_embedding.weight.device
    load_module_streaming(q, state.items(), device=device, dtype=cdt, source="<memory>")
    return q.set_compute_dtype(cdt).eval().requires_grad_(False)


# --------------------------------------------------------------------------- files

def quantize_expert(src: str | Path, dst: str | Path, input_scales: dict[str, float] | None = None) -> list[Path]:
    """Write the FP8 form of an expert folder `src` (merged or plain) into a new folder `dst`,
    shard by shard (host memory: about one input shard). `input_scales` (module name -> amax of
    its input, from `calibrate_input_amax`) adds static activation scales (amax / 448)."""
    src, dst = Path(src), Path(dst)
    config = DiTConfig.from_json(src / "config.json")
    files = safetensors_files(src)
    sharded = files[0].name != SAFETENSORS_NAME
    index = read_index(src / INDEX_NAME) if sharded else None
    names = set(block_linear_names(build_on_meta(lambda: WanDiT(config))))
    if input_scales is not None and set(input_scales) != names:
        missing = sorted(names - set(input_scales))
        raise ValueError(f"input_scales must cover every block linear; missing {missing[:3]}")
    if dst.exists():
        raise FileExistsError(f"{dst} exists; quantize into a new folder")
    with atomic_dir(dst) as tmp:
        weight_map, total, seen = {}, 0, set()
        for shard in files:
            out: dict[str, Tensor] = {}
            for key, t in iter_safetensors([shard], index=index):
                mod, _, leaf = key.rpartition(".")
                if mod in names and leaf == "weight":
                    if t.ndim != 2:
                        raise checkpoint_error(f"{shard}: key {key!r} should be a 2-D linear weight, has shape "
                                               f"{list(t.shape)}", None)
                    w8, scale = quantize_weight(t)
                    out[key], out[mod + ".weight_scale"] = w8, scale
                    if input_scales is not None:
                        out[mod + ".input_scale"] = input_scale_tensor(input_scales[mod])
                    seen.add(mod)
                else:
                    out[key] = t
            for k, v in out.items():
                weight_map[k] = shard.name
                total += v.numel() * v.element_size()
            save_file(out, str(tmp / shard.name), metadata={"format": "pt"})
            del out
        if seen != names:
            raise checkpoint_error(f"{src}: weights of {sorted(names - seen)[:3]} are missing", None)
        shutil.copyfile(src / "config.json", tmp / "config.json")
        if sharded:
            (tmp / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                     indent=2))
        (tmp / FP8_CONFIG).write_text(json.dumps({
            "format": FP8_FORMAT, "version": FP8_VERSION, "dtype": "float8_e4m3fn", "max": FP8_MAX,
            "weight_scale": "per_output_channel", "input_scale": "per_tensor" if input_scales is not None else None,
            "quantized": sorted(names)}, indent=2))
    return sorted(p for p in dst.iterdir() if p.is_file())


def read_fp8_config(folder: str | Path) -> dict:
    p = Path(folder) / FP8_CONFIG
    try:
        cfg = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise checkpoint_error(f"{p}: missing or unreadable FP8 config ({e}); rebuild with storymem-rt build-engines "
                               f"--precision fp8", None) from None
    if cfg.get("format") != FP8_FORMAT or cfg.get("version") != FP8_VERSION:
        raise checkpoint_error(f"{p}: not a {FP8_FORMAT} v{FP8_VERSION} folder; rebuild with storymem-rt build-engines "
                               f"--precision fp8", None)
    return cfg


def load_fp8_expert(folder: str | Path, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.bfloat16) -> FP8WanDiT:
    """An FP8WanDiT (eval mode) from a `quantize_expert` folder; non-FP8 parameters follow
    WanDiT's policy for `dtype` (the compute dtype), FP8 weights stay float8 on `device`."""
    folder = Path(folder)
    fcfg = read_fp8_config(folder)
    config = DiTConfig.from_json(folder / "config.json")
    files = safetensors_files(folder)
    index = read_index(folder / INDEX_NAME) if files[0].name != SAFETENSORS_NAME else None
    model = build_on_meta(lambda: FP8WanDiT(config, dtype, input_scales=fcfg.get("input_scale") is not None))
    if sorted(model.fp8_names) != sorted(fcfg["quantized"]):
        raise checkpoint_error(f"{folder / FP8_CONFIG}: quantized layers do not match the model's block linears", None)
    origins: dict[str, Path] = {}
    load_module_streaming(model, iter_safetensors(files, origins=origins, index=index), device=device, dtype=dtype,
                          source=folder, origins=origins)
    return model.set_compute_dtype(dtype).eval().requires_grad_(False)


@torch.no_grad()
def calibrate_input_amax(model: WanDiT, run: Callable[[WanDiT], None]) -> dict[str, float]:
    """amax of the input of every block linear over whatever `run(model)` feeds the model
    (static per-tensor activation scales for FP8 Q/DQ: scale = amax / 448)."""
    amax: dict[str, float] = {}
    hooks = []
    for name in block_linear_names(model):
        def hook(_m, args, name=name):
            amax[name] = max(amax.get(name, 0.0), float(args[0].detach().abs().amax()))
        hooks.append(model.get_submodule(name).register_forward_pre_hook(hook))
    try:
        run(model)
    finally:
        for h in hooks:
            h.remove()
    return amax
