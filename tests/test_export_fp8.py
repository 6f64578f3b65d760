"""Export stage, step 2: FP8 (e4m3) block weights, per-output-channel float32 scales (export/fp8.py)."""
from __future__ import annotations

import math

import torch
from safetensors.torch import load_file

from conftest import rel_err
from storymem_rt.checkpoint import load_expert
from storymem_rt.export.fp8 import (FP8_DTYPE, FP8_MAX, FP8Linear, block_linear_names, dequantize_weight,
                                    e4m3_spacing, load_fp8_expert, quantize_expert, quantize_model, quantize_weight)

EXPERT = "high_noise_model"


def test_quantize_error_within_half_e4m3_spacing_per_channel():
    g = torch.Generator().manual_seed(0)
    # rows of very different magnitudes, a zero row, a row with one outlier, subnormal-range values
    w = torch.randn(64, 96, generator=g) * torch.logspace(-4, 2, 64)[:, None]
    w[3] = 0.0
    w[5, 7] = 1e3
    w[6] = torch.linspace(-1, 1, 96) * 1e-3
    w8, scale = quantize_weight(w)
    assert w8.dtype == FP8_DTYPE and scale.dtype == torch.float32 and scale.shape == (64,)
    amax = w.abs().amax(dim=1)
    assert torch.equal(scale[amax > 0], amax[amax > 0] / FP8_MAX) and scale[3] == 1.0
    # each row's largest element lands exactly on +-448
    assert torch.all(w8.float().abs().amax(dim=1)[amax > 0] == FP8_MAX)
    err = (dequantize_weight(w8, scale) - w).abs()
    x = w / scale[:, None]  # in units of the scale, |x| <= 448
    bound = scale[:, None] * e4m3_spacing(x) / 2
    # round-to-nearest: at most half the spacing of e4m3 around x (plus float32 rounding of x / scale)
    assert torch.all(err <= bound * (1 + 1e-5) + 1e-12), (err / bound).max()
    assert torch.all(dequantize_weight(w8, scale)[3] == 0)
    # relative error of a normal-range value is at most 2^-4 (3 mantissa bits)
    normal = x.abs() >= 2.0**-6
    assert float((err / w.abs())[normal].max()) <= 2.0**-4 + 1e-6


def test_fp8_files_and_loader(golden, tmp_path):
    src = golden / "tiny-i2v" / EXPERT
    files = quantize_expert(src, tmp_path / "fp8")
    model = load_expert(src)
    names = block_linear_names(model)
    assert len(names) == 2 * 10 and all(n.startswith("blocks.") for n in names)
    tensors = {}
    for f in files:
        if f.suffix == ".safetensors":
            tensors.update(load_file(f))
    ref = model.state_dict()
    for k, v in tensors.items():
        mod, _, leaf = k.rpartition(".")
        if mod in names:
            assert (leaf, v.dtype) in (("weight", FP8_DTYPE), ("weight_scale", torch.float32), ("bias", torch.float32))
        else:  # embeddings, time MLPs, modulation, norms, head: unchanged
            assert torch.equal(v, ref[k]), k
    assert set(tensors) == set(ref) | {n + ".weight_scale" for n in names}
    fp8 = load_fp8_expert(tmp_path / "fp8", dtype=torch.float32)
    assert all(isinstance(fp8.get_submodule(n), FP8Linear) for n in names)
    assert fp8.blocks[0].self_attn.q.weight.dtype == FP8_DTYPE
    same = quantize_model(model, torch.float32).state_dict()
    for k, v in fp8.state_dict().items():
        assert torch.equal(v.float(), same[k].float()), k


def test_fp8_model_output_vs_fp32(golden):
    model = load_expert(golden / "tiny-i2v" / EXPERT)
    case = load_file(golden / f"dit-i2v-{EXPERT}.safetensors")
    args = (case["x"][None], case["t"], case["context"][None], case["y"][None])
    q = quantize_model(model, torch.float32)
    with torch.no_grad():
        ref, out = model(*args), q(*args)
    err = rel_err(out, ref)
    # The only change is W -> e4m3(W / s) * s in the 20 block linears. Their RMS relative
    # weight error eps_w is bounded by round-to-nearest with 3 mantissa bits: relative spacing
    # <= 2^-3, error uniform in +-half of it -> RMS <= 2^-4 / sqrt(3) = 0.036. A linear
    # layer's output error relative to its output is about eps_w (errors uncorrelated with x),
    # and the model output mixes these with the unquantized paths (embeddings, modulation,
    # residual, head), so its error stays below eps_w: measured 3.0e-3 against eps_w 2.6e-2
    # (bf16 weights give 2.9e-3 on the same inputs).
    num = sum(float((q.get_submodule(n).dequantized_weight(torch.float32) - model.get_submodule(n).weight)
                    .pow(2).sum()) for n in block_linear_names(q))
    den = sum(float(model.get_submodule(n).weight.pow(2).sum()) for n in block_linear_names(q))
    eps_w = math.sqrt(num / den)
    print(f"fp8 model vs fp32: rel err {err:.2e}; RMS relative weight error {eps_w:.2e}")
    assert eps_w <= 2.0**-4 / math.sqrt(3)
    assert 0 < err <= eps_w
    # bf16 compute with FP8 weights (the GPU configuration) runs too, and stays close
    qb = quantize_model(model, torch.bfloat16)
    assert qb.blocks[0].ffn[0].compute_dtype == torch.bfloat16
    with torch.no_grad():
        outb = qb(*args)
    assert outb.dtype == torch.float32 and rel_err(outb, ref) <= 2 * eps_w


def test_fp8_linear_matches_dequantized_linear():
    lin = torch.nn.Linear(32, 48)
    f = FP8Linear.from_linear(lin, torch.float32, activations="none")  # weight-only: what the graphs run
    x = torch.randn(3, 5, 32)
    w = dequantize_weight(f.weight, f.weight_scale)
    assert torch.allclose(f(x), torch.nn.functional.linear(x, w, lin.bias), atol=1e-6)
    assert f.weight.dtype == FP8_DTYPE and not f.weight.requires_grad
