"""Export stage, step 3: one ONNX graph per expert (export/onnx_export.py), run by onnxruntime
on the CPU against the PyTorch module: float32, FP8 Q/DQ (float32 compute), and bf16 through
onnx's reference evaluator (onnxruntime's CPU provider has no bf16 MatMul)."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto
from safetensors.torch import load_file

from conftest import rel_err
from storymem_rt.checkpoint import load_expert
from storymem_rt.export.fp8 import calibrate_input_amax, quantize_model
from storymem_rt.engines.graph import DiTContract, graph_inputs, patchify, unpatchify
from storymem_rt.engines.loaders import OnnxExpert
from storymem_rt.export.onnx_export import DATA_NAME, OPSET, export_onnx, graph_summary
from storymem_rt.lora import load_lora

EXPERT = "high_noise_model"


@pytest.fixture(scope="module")
def model(golden):
    return load_expert(golden / "tiny-i2v" / EXPERT)


@pytest.fixture(scope="module")
def case(golden):
    c = load_file(golden / f"dit-i2v-{EXPERT}.safetensors")
    return c["x"][None], c["t"], c["context"][None], c["y"][None]


@pytest.fixture(scope="module")
def fp32_graph(model, tmp_path_factory):
    return export_onnx(model.config, model, tmp_path_factory.mktemp("onnx") / "fp32", "fp32")


def shot_with_memory(case, memory: int, total_memory: int = 2):
    """The golden i2v input with `memory` of its `total_memory` memory frames kept (RoPE -M..T-1)."""
    x, t, ctx, y = case
    keep = slice(total_memory - memory, None)
    x, y = x[:, :, keep].contiguous(), y[:, :, keep].contiguous()
    frames = x.shape[2]
    return (x, t, ctx, y), torch.arange(-memory, frames - memory)


def test_patchify_is_the_conv(model, case):
    x, _, _, y = case
    tokens, grid = patchify(x, y, model.config.patch_size)
    emb, grid2 = model.embed_video(x, y)
    w = model.patch_embedding.weight
    assert grid == grid2
    assert torch.allclose(tokens @ w.flatten(1).t() + model.patch_embedding.bias, emb, atol=1e-5)
    out = torch.randn(1, tokens.shape[1], model.config.out_dim * 4)
    assert torch.equal(unpatchify(out, grid, model.config), model.unpatchify(out, grid))


def test_fp32_graph_matches_pytorch_at_two_memory_sizes(model, case, fp32_graph):
    runner = OnnxExpert(fp32_graph, model.config)  # one graph, one session, both sizes
    seen = set()
    for memory in (0, 2):
        args, frame_pos = shot_with_memory(case, memory)
        with torch.no_grad():
            ref = model(*args, frame_pos)
        out = runner(*args, frame_pos)
        err = rel_err(out, ref)
        feeds, _ = graph_inputs(model.config, *args, frame_pos)
        seen.add(feeds["tokens"].shape[1])
        print(f"onnx fp32 memory {memory} ({feeds['tokens'].shape[1]} tokens): rel err {err:.2e}")
        assert err <= 1e-4
    assert len(seen) == 2


def test_graph_contract_and_external_data(model, fp32_graph):
    m = onnx.load(str(fp32_graph), load_external_data=False)
    assert m.ir_version == 9 and max(o.version for o in m.opset_import if o.domain == "") >= OPSET >= 19
    s = graph_summary(fp32_graph)
    c = DiTContract(model.config)
    assert list(s["inputs"]) == list(c.input_names) and list(s["outputs"]) == list(c.output_names)
    assert s["inputs"]["tokens"] == ["batch", "tokens", 144] and s["inputs"]["rope_cos"] == ["tokens", 32]
    assert s["inputs"]["context"] == ["batch", 512, 64] and s["outputs"]["out"] == ["batch", "tokens", 64]
    # no float64 anywhere, every big initializer outside the protobuf, names are upstream's
    types = {t.data_type for t in m.graph.initializer}
    assert TensorProto.DOUBLE not in types
    for n in m.graph.node:
        for a in n.attribute:
            if a.name == "to":
                assert a.i != TensorProto.DOUBLE
    big = [t for t in m.graph.initializer if np.prod(t.dims) * 4 > 1024]
    assert big and all(t.data_location == TensorProto.EXTERNAL and not t.raw_data for t in big)
    assert {e.value for t in big for e in t.external_data if e.key == "location"} == {DATA_NAME}
    names = {t.name for t in m.graph.initializer}
    assert {"blocks.0.self_attn.q.weight", "blocks.1.ffn.2.weight", "head.head.weight"} <= names
    assert fp32_graph.with_name(DATA_NAME).stat().st_size > 1 << 20
    assert fp32_graph.stat().st_size < 200_000


def test_merged_m2v_graph_matches_golden(golden, tmp_path):
    lora = load_lora(golden / "tiny-storymem-lora" / "backbone_high_noise.pth")
    merged = load_expert(golden / "tiny-i2v" / EXPERT, lora=lora)
    path = export_onnx(merged.config, merged, tmp_path / "m2v", "fp32")
    c = load_file(golden / f"dit-m2v-lora-{EXPERT}.safetensors")
    out = OnnxExpert(path, merged.config)(c["x"][None], c["t"], c["context"][None], c["y"][None])[0]
    err = rel_err(out, c["out"])
    print(f"onnx m2v (merged LoRA) vs golden: rel err {err:.2e}")
    assert err <= 1e-4


def qdq_structure(path: Path) -> dict:
    m = onnx.load(str(path), load_external_data=False)
    inits = {t.name: t for t in m.graph.initializer}
    consumers = {}
    for n in m.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    weight_dq = [n for n in m.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    act_q = [n for n in m.graph.node if n.op_type == "QuantizeLinear"]
    for n in weight_dq:
        w = inits[n.input[0]]
        assert w.data_type == TensorProto.FLOAT8E4M3FN and n.input[0].endswith(".weight")
        assert inits[n.input[1]].dims == [w.dims[1]]  # one scale per output channel ([in, out] layout)
        assert [a.i for a in n.attribute if a.name == "axis"] == [1]
        assert [c.op_type for c in consumers[n.output[0]]] == ["MatMul"]
    for q in act_q:  # Q -> DQ pair in front of the same MatMul
        (dq,) = consumers[q.output[0]]
        assert dq.op_type == "DequantizeLinear" and [c.op_type for c in consumers[dq.output[0]]] == ["MatMul"]
        assert inits[q.input[2]].data_type == TensorProto.FLOAT8E4M3FN
    return {"weight_dq": len(weight_dq), "act_q": len(act_q)}


@pytest.mark.parametrize("calibrated", [False, True], ids=["weight-only", "weights+activations"])
def test_fp8_qdq_graph_matches_fp8_pytorch(model, case, tmp_path, calibrated):
    amax = calibrate_input_amax(model, lambda m: m(*case)) if calibrated else None
    q = quantize_model(model, torch.float32, amax)
    path = export_onnx(model.config, q, tmp_path / "fp8", "fp8", compute_dtype=torch.float32)
    st = qdq_structure(path)
    assert st == {"weight_dq": 20, "act_q": 20 if calibrated else 0}
    onnx.checker.check_model(str(path), full_check=True)
    runner = OnnxExpert(path, model.config)
    for memory in (0, 2):
        args, frame_pos = shot_with_memory(case, memory)
        with torch.no_grad():
            ref = q(*args, frame_pos)
        err = rel_err(runner(*args, frame_pos), ref)
        print(f"onnx fp8 Q/DQ ({'w8a8' if calibrated else 'w8'}) memory {memory} vs FP8 PyTorch: rel err {err:.2e}")
        assert err <= 1e-4


def test_bf16_and_fp8_bf16_graphs(model, case, tmp_path):
    """bf16 graphs: valid ONNX (checker + shape inference in export_onnx); evaluated with onnx's
    reference evaluator, MatMul/Softmax accumulating in float32 as GPU kernels do. Bound: twice
    the error of PyTorch's own bf16 model against float32 (measured 3.3e-3 vs 2.9e-3)."""
    from onnx.reference import ReferenceEvaluator
    from onnx.reference.ops.op_matmul import MatMul as _MatMul
    from onnx.reference.ops.op_softmax import Softmax as _Softmax

    class MatMul(_MatMul):
        def _run(self, a, b):
            return (np.matmul(a.astype(np.float32), b.astype(np.float32)).astype(a.dtype),)

    class Softmax(_Softmax):
        def _run(self, x, axis=None):
            return (super()._run(x.astype(np.float32), axis)[0].astype(x.dtype),)

    path = export_onnx(model.config, model, tmp_path / "bf16", "bf16")
    feeds, grid = graph_inputs(model.config, *case)
    out = ReferenceEvaluator(onnx.load(str(path)), new_ops=[MatMul, Softmax]).run(None, feeds)[0]
    out = unpatchify(torch.from_numpy(np.asarray(out, dtype=np.float32)), grid, model.config)
    bf16 = load_expert_bf16(model)
    with torch.no_grad():
        ref, ref_bf16 = model(*case), bf16(*case)
    err, err_torch = rel_err(out, ref), rel_err(ref_bf16, ref)
    print(f"onnx bf16 vs fp32: {err:.2e} (PyTorch bf16 vs fp32: {err_torch:.2e})")
    assert err <= 2 * err_torch
    s = graph_summary(path)
    assert s["ops"]["Cast"] > 0 and s["fp8_initializers"] == []
    # fp8 weights, bf16 compute (the TensorRT configuration): DQ outputs bf16 via bf16 scales
    p8 = export_onnx(model.config, quantize_model(model, torch.bfloat16), tmp_path / "fp8-bf16", "fp8")
    m = onnx.load(str(p8), load_external_data=False)
    scales = {t.name: t.data_type for t in m.graph.initializer if t.name.endswith(".weight_scale")}
    assert len(scales) == 20 and set(scales.values()) == {TensorProto.BFLOAT16}
    assert len(graph_summary(p8)["fp8_initializers"]) == 20


def load_expert_bf16(model):
    return copy.deepcopy(model).cast_(torch.bfloat16)


def test_refusals(model, tmp_path, fp32_graph):
    with pytest.raises(ValueError, match="needs FP8 weights"):
        export_onnx(model.config, model, tmp_path / "x", "fp8")
    with pytest.raises(ValueError, match="export them with precision 'fp8'"):
        export_onnx(model.config, quantize_model(model), tmp_path / "y", "bf16")
    with pytest.raises(FileExistsError):
        export_onnx(model.config, model, fp32_graph.parent, "fp32")
