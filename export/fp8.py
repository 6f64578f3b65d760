"""FP8 (e4m3) block weights written once to safetensors: the build side of `storymem_rt.fp8`.

The scheme and the layer live in the runtime (`storymem_rt/fp8.py`: per-output-channel weight
scales amax/448, `FP8Linear`); `checkpoint.load_expert` reads the folders written here. A14B: 14.05 B
block-linear weights -> 14 GB instead of 28 GB in bf16 (the other 0.24 B stay float32, 1 GB), so
both experts of a model (about 30 GB) fit on one 80 GB GPU with room for activations.

File layout (an upstream expert folder, so shards and the index work as before):
    <dir>/config.json                  the source's, copied
    <dir>/fp8_config.json              {"format": "storymem-fp8", "quantized": [...module names], ...}
    <dir>/diffusion_pytorch_model*.safetensors  `<name>.weight` float8_e4m3fn [out, in] +
                                       `<name>.weight_scale` float32 [out]; other tensors unchanged
    [+ `<name>.input_scale` float32 [] when activation scales were calibrated]
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file
from torch import Tensor

from storymem_rt.atomic import atomic_dir
from storymem_rt.checkpoint import (FP8_CONFIG, FP8_FORMAT, FP8_VERSION, INDEX_NAME, SAFETENSORS_NAME, build_on_meta,
                                    checkpoint_error, iter_safetensors, load_expert, load_module_streaming, read_index,
                                    safetensors_files)
from storymem_rt.configs import DiTConfig
from storymem_rt.dit import DiTOptions, WanDiT
from storymem_rt.fp8 import (FP8_DTYPE, FP8_MAX, FP8Linear, block_linear_names, dequantize_weight,  # noqa: F401
                             e4m3_spacing, fake_quant_fp8, input_scale_tensor, quantize_weight)

log = logging.getLogger("storymem_rt")


def quantize_model(model: WanDiT, compute_dtype: torch.dtype | None = None,
                   input_amax: dict[str, float] | None = None) -> WanDiT:
    """A WanDiT with FP8 block linears from a loaded WanDiT (in memory; tests and small models), as
    `quantize_expert` would write it; `input_amax` (from `calibrate_input_amax`) adds static
    activation scales. Activations: static when calibrated, else weight-only (the ONNX graphs' meaning)."""
    cdt = compute_dtype or model.patch_embedding.weight.dtype
    opts = DiTOptions(precision="fp8", fp8_activations="static" if input_amax is not None else "none")
    q = build_on_meta(lambda: WanDiT(model.config, opts))
    names = set(block_linear_names(q))
    state = {}
    for k, v in model.state_dict().items():
        mod, _, leaf = k.rpartition(".")
        if mod in names and leaf == "weight":
            state[k], state[mod + ".weight_scale"] = quantize_weight(v)
            if input_amax is not None:
                state[mod + ".input_scale"] = input_scale_tensor(input_amax[mod])
        else:
            state[k] = v
    device = model.patch_embedding.weight.device
    load_module_streaming(q, state.items(), device=device, dtype=cdt, source="<memory>")
    return q.cast_(cdt).eval().requires_grad_(False)


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


def load_fp8_expert(folder: str | Path, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.bfloat16) -> WanDiT:
    """A WanDiT with e4m3 block linears from a `quantize_expert` folder (`checkpoint.load_expert`
    reads the FP8 layout from its fp8_config.json)."""
    return load_expert(folder, device=device, dtype=dtype)


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
