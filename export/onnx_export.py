"""One ONNX graph per expert, written node by node from `dit.py`'s math (no tracing).

Why not `torch.onnx.export`: the graph has to carry `dit.py`'s precision policy exactly
(float32 residual stream, norms, modulation, time MLPs and head; bf16/fp16 matmuls and
attention; FP8 weights as Q/DQ) because a strongly typed TensorRT network executes the types
it is given, and it has to be written for a 27-57 GB expert without holding the model twice:
here every initializer is streamed from its source tensor straight into the external data file
(`model.onnx.data`), one tensor in host memory at a time. Parameter names stay upstream's
(`blocks.0.self_attn.q.weight`), so an engine can be refitted by name. No float64 anywhere:
the two float64 computations of `dit.py` (sinusoidal timestep embedding, RoPE angles) happen
outside the graph and come in as float32 inputs, rounded exactly as `dit.py` rounds them.

Contract (`storymem_rt.engines.graph.DiTContract`; every size below is a graph input or a constant
of the config; `OnnxExpert` in `storymem_rt.engines.loaders` runs the graph):
    inputs  tokens   [B, L, in_dim*pt*ph*pw] float32  patchified latent (x then y on channels),
                     per token the channels laid out (c, pt, ph, pw) as Conv3d's weight
            t_emb    [B, freq_dim] float32            timestep_embedding(t).float()
            context  [B, text_len, text_dim] float32  text states zero-padded to text_len
            rope_cos [L, head_dim/2] float32          rope_cos_sin(frame_pos, h, w, head_dim)
            rope_sin [L, head_dim/2] float32
    output  out      [B, L, pt*ph*pw*out_dim] float32 -> WanDiT.unpatchify(out, grid)
B and L are the dynamic axes "batch" and "tokens": L = (memory frames + shot frames) * h * w,
so one graph serves every memory size 0..max. Patchify-as-matmul is exactly Conv3d with
stride = kernel (the patch embedding is a [in_dim*pt*ph*pw, dim] MatMul here).

Precisions: "fp32", "bf16", "fp16" (compute dtype of the matmuls/attention) and "fp8": bf16
compute with every block linear's weight a float8e4m3fn initializer followed by
DequantizeLinear(axis=1, per output channel) - plus, when the FP8 weights carry calibrated
activation scales, a QuantizeLinear -> DequantizeLinear pair on the linear's input, which is
what TensorRT needs to run the GEMM itself in FP8 (without it TensorRT keeps the FP8 weights
and runs the GEMM in bf16, DQ fused as a prologue where it can).
onnxruntime's CPU provider runs the float32 and FP8-Q/DQ-with-float32-compute graphs (CI
compares them with PyTorch); it has no bf16/fp16 MatMul, so those graphs are checked by
onnx.checker + shape inference only.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from storymem_rt.atomic import atomic_dir
from storymem_rt.configs import DiTConfig
from storymem_rt.dit import KEEP_FP32
from storymem_rt.engines.graph import DiTContract

log = logging.getLogger("storymem_rt")

OPSET = 19  # first opset with float8 Q/DQ; TensorRT 10's parser supports it
IR_VERSION = 9  # first IR with float8 types; older readers (TensorRT's parser) accept it
MODEL_NAME = "model.onnx"
DATA_NAME = "model.onnx.data"
_ALIGN = 4096  # page-aligned offsets let readers mmap big initializers

COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.bfloat16}


# --------------------------------------------------------------------------- graph building

def _onnx():
    import onnx  # noqa: F401  (an optional dependency: [dev] / [tensorrt])

    return onnx


def _tp_dtype(dtype: torch.dtype) -> int:
    from onnx import TensorProto as TP

    table = {torch.float32: TP.FLOAT, torch.bfloat16: TP.BFLOAT16, torch.float16: TP.FLOAT16,
             torch.float8_e4m3fn: TP.FLOAT8E4M3FN, torch.int64: TP.INT64}
    if dtype not in table:
        raise ValueError(f"no ONNX type for {dtype}")
    return table[dtype]


def _raw(t: Tensor) -> bytes:
    return t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()


class _Builder:
    """Nodes + initializers; big initializers go straight to the external data file."""

    def __init__(self, data_path: Path, inline_limit: int = 1024):
        from onnx import helper

        self.h = helper
        self.nodes, self.inits = [], []
        self._names: set[str] = set()
        self._n = 0
        self.data_path = data_path
        self._data = open(data_path, "wb")
        self._offset = 0
        self.inline_limit = inline_limit
        self._const_cache: dict = {}

    def close(self):
        self._data.close()

    def fresh(self, base: str) -> str:
        self._n += 1
        return f"{base}_{self._n}"

    def node(self, op: str, inputs: list[str], name: str, n_out: int = 1, **attrs) -> str | list[str]:
        outs = [self.fresh(f"{name}/{op}") for _ in range(n_out)]
        self.nodes.append(self.h.make_node(op, inputs, outs, name=self.fresh(f"{name}/{op}_node"), **attrs))
        return outs[0] if n_out == 1 else outs

    def init(self, name: str, t: Tensor) -> str:
        """An initializer named `name` holding t (dtype kept)."""
        from onnx import TensorProto

        assert name not in self._names, name  # our bug if a parameter is written twice
        self._names.add(name)
        data = _raw(t)
        tp = TensorProto()
        tp.name, tp.data_type = name, _tp_dtype(t.dtype)
        tp.dims.extend(t.shape)
        if len(data) <= self.inline_limit:
            tp.raw_data = data
        else:
            pad = (-self._offset) % _ALIGN
            if pad:
                self._data.write(b"\0" * pad)
                self._offset += pad
            self._data.write(data)
            tp.data_location = TensorProto.EXTERNAL
            for k, v in (("location", self.data_path.name), ("offset", self._offset), ("length", len(data))):
                entry = tp.external_data.add()
                entry.key, entry.value = k, str(v)
            self._offset += len(data)
        self.inits.append(tp)
        return name

    def const(self, value, dtype: torch.dtype = torch.float32) -> str:
        key = (repr(value), dtype)
        if key not in self._const_cache:
            self._const_cache[key] = self.init(self.fresh("const"), torch.tensor(value, dtype=dtype))
        return self._const_cache[key]


class WeightSource:
    """Parameters by name. `get(name)` returns a CPU tensor (any dtype); `has(name)`."""

    def __init__(self, getter: Callable[[str], Tensor], names: set[str]):
        self._get, self.names = getter, names

    def get(self, name: str) -> Tensor:
        return self._get(name)

    def has(self, name: str) -> bool:
        return name in self.names

    @classmethod
    def from_module(cls, module: torch.nn.Module) -> "WeightSource":
        state = module.state_dict()
        return cls(lambda n: state[n].detach().cpu(), set(state))

    @classmethod
    def from_folder(cls, folder: str | Path) -> "WeightSource":
        """Lazy reads from an expert folder's safetensors (one tensor in memory at a time)."""
        from safetensors import safe_open

        from storymem_rt.checkpoint import safetensors_files

        where = {}
        handles = {}
        for f in safetensors_files(folder):
            handles[f] = safe_open(f, framework="pt", device="cpu")
            for k in handles[f].keys():
                where[k] = f
        return cls(lambda n: handles[where[n]].get_tensor(n), set(where))


def _param_dtype(name: str, cdt: torch.dtype) -> torch.dtype:
    # dit.py's policy: KEEP_FP32 parameters stay float32, the rest run in the compute dtype.
    return torch.float32 if any(k in name for k in KEEP_FP32) else cdt


class _DiTGraph:
    """Writes WanDiT's forward (dit.py) as ONNX nodes, top to bottom in the same order."""

    def __init__(self, b: _Builder, cfg: DiTConfig, src: WeightSource, cdt: torch.dtype, fp8: set[str],
                 act_qdq: bool):
        self.b, self.cfg, self.src, self.cdt, self.fp8, self.act_qdq = b, cfg, src, cdt, fp8, act_qdq
        self.tcdt = _tp_dtype(cdt)

    # -- small helpers ------------------------------------------------------------------------
    def cast(self, x: str, dtype: torch.dtype, name: str, current: torch.dtype) -> str:
        return x if dtype == current else self.b.node("Cast", [x], name, to=_tp_dtype(dtype))

    def param(self, name: str, dtype: torch.dtype | None = None, transform=None) -> str:
        t = self.src.get(name)
        if transform is not None:
            t = transform(t)
        return self.b.init(name, t.to(dtype or _param_dtype(name, self.cdt)))

    def linear(self, x: str, mod: str, dtype: torch.dtype) -> str:
        """x [..., in] (dtype) @ W^T + b -> [..., out] (dtype). W stored transposed [in, out]."""
        b = self.b
        if mod in self.fp8:
            w8 = b.init(mod + ".weight", self.src.get(mod + ".weight").t().contiguous())
            scale = b.init(mod + ".weight_scale", self.src.get(mod + ".weight_scale").float().to(dtype))
            w = b.node("DequantizeLinear", [w8, scale], mod, axis=1)
            if self.act_qdq:
                s = b.init(mod + ".input_scale", self.src.get(mod + ".input_scale").float().to(dtype).reshape(()))
                zp = b.const(0.0, torch.float8_e4m3fn)
                q = b.node("QuantizeLinear", [x, s, zp], mod + "/input")
                x = b.node("DequantizeLinear", [q, s, zp], mod + "/input")
        else:
            w = self.param(mod + ".weight", dtype, transform=lambda t: t.t().contiguous())
        y = b.node("MatMul", [x, w], mod)
        if self.src.has(mod + ".bias"):
            y = b.node("Add", [y, self.param(mod + ".bias", dtype)], mod)
        return y

    def layer_norm(self, x: str, name: str, affine: bool) -> str:
        """float32 LayerNorm over the last dim (FP32LayerNorm)."""
        b, dim = self.b, self.cfg.dim
        if affine:
            w, bias = self.param(name + ".weight", torch.float32), self.param(name + ".bias", torch.float32)
            return b.node("LayerNormalization", [x, w, bias], name, axis=-1, epsilon=self.cfg.eps)
        ones = b.init(b.fresh(name + ".ones"), torch.ones(dim))
        return b.node("LayerNormalization", [x, ones], name, axis=-1, epsilon=self.cfg.eps)

    def rms_norm(self, x: str, name: str) -> str:
        """WanRMSNorm: float32 statistics, result rounded to the compute dtype, times weight."""
        b = self.b
        xf = self.cast(x, torch.float32, name, self.cdt)
        ms = b.node("ReduceMean", [b.node("Mul", [xf, xf], name), b.const([-1], torch.int64)], name, keepdims=1)
        r = b.node("Reciprocal", [b.node("Sqrt", [b.node("Add", [ms, b.const(self.cfg.eps)], name)], name)], name)
        y = self.cast(b.node("Mul", [xf, r], name), self.cdt, name, torch.float32)
        return b.node("Mul", [y, self.param(name + ".weight", self.cdt)], name)

    def gelu_tanh(self, x: str, name: str) -> str:
        """GELU(approximate='tanh') evaluated in float32 (as torch does for bf16 inputs)."""
        b = self.b
        xf = self.cast(x, torch.float32, name, self.cdt)
        x3 = b.node("Mul", [b.node("Mul", [xf, xf], name), xf], name)
        inner = b.node("Mul", [b.node("Add", [xf, b.node("Mul", [x3, b.const(0.044715)], name)], name),
                               b.const(math.sqrt(2.0 / math.pi))], name)
        y = b.node("Mul", [b.node("Mul", [xf, b.const(0.5)], name),
                           b.node("Add", [b.node("Tanh", [inner], name), b.const(1.0)], name)], name)
        return self.cast(y, self.cdt, name, torch.float32)

    def silu(self, x: str, name: str) -> str:
        return self.b.node("Mul", [x, self.b.node("Sigmoid", [x], name)], name)

    def rope(self, x: str, cos4: str, sin4: str, name: str) -> str:
        """apply_rope on x [B, L, H, D] (compute dtype): pairs (2i, 2i+1) rotated in float32."""
        b, c = self.b, self.cfg
        xf = self.cast(x, torch.float32, name, self.cdt)
        x5 = b.node("Reshape", [xf, b.const([0, 0, c.num_heads, c.head_dim // 2, 2], torch.int64)], name)
        x0, x1 = b.node("Split", [x5, b.const([1, 1], torch.int64)], name, n_out=2, axis=4)
        r0 = b.node("Sub", [b.node("Mul", [x0, cos4], name), b.node("Mul", [x1, sin4], name)], name)
        r1 = b.node("Add", [b.node("Mul", [x0, sin4], name), b.node("Mul", [x1, cos4], name)], name)
        y = b.node("Reshape", [b.node("Concat", [r0, r1], name, axis=4),
                               b.const([0, 0, c.num_heads, c.head_dim], torch.int64)], name)
        return self.cast(y, self.cdt, name, torch.float32)

    def attention(self, x: str, kv: str, name: str, rope: tuple[str, str] | None) -> str:
        """WanAttention: q/k RMSNorm, RoPE (self-attention), softmax(q k^T / sqrt(D)) v, o.

        Written as MatMul -> Mul -> Softmax -> MatMul, the pattern TensorRT fuses into its
        flash-attention (MHA) kernels."""
        b, c = self.b, self.cfg
        heads = b.const([0, 0, c.num_heads, c.head_dim], torch.int64)
        q = b.node("Reshape", [self.rms_norm(self.linear(x, name + ".q", self.cdt), name + ".norm_q"), heads], name)
        k = b.node("Reshape", [self.rms_norm(self.linear(kv, name + ".k", self.cdt), name + ".norm_k"), heads], name)
        v = b.node("Reshape", [self.linear(kv, name + ".v", self.cdt), heads], name)
        if rope is not None:
            q, k = self.rope(q, *rope, name + "/rope_q"), self.rope(k, *rope, name + "/rope_k")
        qt = b.node("Transpose", [q], name, perm=[0, 2, 1, 3])  # [B, H, Lq, D]
        kt = b.node("Transpose", [k], name, perm=[0, 2, 3, 1])  # [B, H, D, Lk]
        vt = b.node("Transpose", [v], name, perm=[0, 2, 1, 3])  # [B, H, Lk, D]
        s = b.node("Mul", [b.node("MatMul", [qt, kt], name + "/qk"), b.const(1.0 / math.sqrt(c.head_dim), self.cdt)],
                   name)
        o = b.node("MatMul", [b.node("Softmax", [s], name, axis=-1), vt], name + "/pv")
        o = b.node("Reshape", [b.node("Transpose", [o], name, perm=[0, 2, 1, 3]),
                               b.const([0, 0, c.dim], torch.int64)], name)
        return self.linear(o, name + ".o", self.cdt)

    def block(self, i: int, x: str, e6: str, ctx: str, rope: tuple[str, str]) -> str:
        """WanBlock.forward: x [B, L, dim] float32 -> float32."""
        b, p = self.b, f"blocks.{i}"
        mod = b.node("Add", [self.param(p + ".modulation", torch.float32), e6], p + ".modulation")
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = b.node(
            "Split", [mod, b.const([1] * 6, torch.int64)], p + ".modulation", n_out=6, axis=1)

        def modulate(h, scale, shift, name):
            return b.node("Add", [b.node("Mul", [h, b.node("Add", [scale, b.const(1.0)], name)], name), shift], name)

        h = self.cast(modulate(self.layer_norm(x, p + ".norm1", False), scale_sa, shift_sa, p + ".norm1"),
                      self.cdt, p, torch.float32)
        y = self.cast(self.attention(h, h, p + ".self_attn", rope), torch.float32, p, self.cdt)
        x = b.node("Add", [x, b.node("Mul", [y, gate_sa], p)], p)
        h = self.layer_norm(x, p + ".norm3", True) if self.cfg.cross_attn_norm else x
        y = self.attention(self.cast(h, self.cdt, p, torch.float32), ctx, p + ".cross_attn", None)
        x = b.node("Add", [x, self.cast(y, torch.float32, p, self.cdt)], p)
        h = self.cast(modulate(self.layer_norm(x, p + ".norm2", False), scale_ff, shift_ff, p + ".norm2"),
                      self.cdt, p, torch.float32)
        y = self.linear(self.gelu_tanh(self.linear(h, p + ".ffn.0", self.cdt), p + ".ffn"), p + ".ffn.2", self.cdt)
        return b.node("Add", [x, b.node("Mul", [self.cast(y, torch.float32, p, self.cdt), gate_ff], p)], p)

    def forward(self) -> None:
        b, c = self.b, self.cfg
        # patch embedding: Conv3d(stride = kernel) == MatMul over patchified tokens
        w = self.param("patch_embedding.weight", transform=lambda t: t.flatten(1).t().contiguous())
        x = b.node("MatMul", [self.cast("tokens", self.cdt, "patch_embedding", torch.float32), w], "patch_embedding")
        x = b.node("Add", [x, self.param("patch_embedding.bias")], "patch_embedding")
        x = self.cast(x, torch.float32, "patch_embedding", self.cdt)
        # time: float32 MLPs on the float32 sinusoidal embedding (computed outside in float64)
        e = self.linear("t_emb", "time_embedding.0", torch.float32)
        e = self.linear(self.silu(e, "time_embedding"), "time_embedding.2", torch.float32)
        e6 = self.linear(self.silu(e, "time_projection"), "time_projection.1", torch.float32)
        e6 = b.node("Reshape", [e6, b.const([0, 6, c.dim], torch.int64)], "time_projection")
        # text
        ctx = self.cast("context", self.cdt, "text_embedding", torch.float32)
        ctx = self.linear(ctx, "text_embedding.0", self.cdt)
        ctx = self.linear(self.gelu_tanh(ctx, "text_embedding"), "text_embedding.2", self.cdt)
        # RoPE tables [L, D/2] -> [L, 1, D/2, 1], broadcast over batch and heads
        axes = b.const([1, 3], torch.int64)
        rope = (b.node("Unsqueeze", ["rope_cos", axes], "rope"), b.node("Unsqueeze", ["rope_sin", axes], "rope"))
        for i in range(c.num_layers):
            x = self.block(i, x, e6, ctx, rope)
        # head (float32)
        mod = b.node("Add", [self.param("head.modulation", torch.float32),
                             b.node("Unsqueeze", [e, b.const([1], torch.int64)], "head")], "head.modulation")
        shift, scale = b.node("Split", [mod, b.const([1, 1], torch.int64)], "head.modulation", n_out=2, axis=1)
        h = self.layer_norm(x, "head.norm", False)
        h = b.node("Add", [b.node("Mul", [h, b.node("Add", [scale, b.const(1.0)], "head")], "head"), shift], "head")
        y = self.linear(h, "head.head", torch.float32)
        b.nodes.append(b.h.make_node("Identity", [y], ["out"], name="out"))


# --------------------------------------------------------------------------- entry points

def fp8_layers(src: WeightSource) -> set[str]:
    return {n[: -len(".weight_scale")] for n in src.names if n.endswith(".weight_scale")}


def export_onnx(config: DiTConfig, src: WeightSource | torch.nn.Module, out_dir: str | Path,
                precision: str = "bf16", compute_dtype: torch.dtype | None = None) -> Path:
    """Write `out_dir/model.onnx` + `model.onnx.data` for one expert; returns the model path.

    src: the expert's weights (a loaded WanDiT (plain or FP8), or `WeightSource.from_folder` over
    a merged or FP8 folder). precision: fp32 | bf16 | fp16 | fp8 (fp8 needs FP8 weights in
    src). compute_dtype overrides the matmul dtype (fp8 with float32 compute is what the
    CPU test runs). `out_dir` must not exist; it is written beside and renamed when complete.
    """
    onnx = _onnx()
    from onnx import TensorProto, helper

    if precision not in COMPUTE_DTYPES:
        raise ValueError(f"precision must be one of {sorted(COMPUTE_DTYPES)}, got {precision!r}")
    if isinstance(src, torch.nn.Module):
        src = WeightSource.from_module(src)
    fp8 = fp8_layers(src)
    if precision == "fp8" and not fp8:
        raise ValueError("precision fp8 needs FP8 weights (export/fp8.py quantize_expert or quantize_model)")
    if precision != "fp8" and fp8:
        raise ValueError(f"these weights are FP8; export them with precision 'fp8', not {precision!r}")
    act_qdq = any(src.has(n + ".input_scale") for n in fp8)
    cdt = compute_dtype or COMPUTE_DTYPES[precision]
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists; export into a new folder")
    with atomic_dir(out_dir) as tmp:
        b = _Builder(tmp / DATA_NAME)
        try:
            _DiTGraph(b, config, src, cdt, fp8, act_qdq).forward()
        finally:
            b.close()
        contract = DiTContract(config)
        dyn = contract.dynamic_axes()

        def vi(name, dtype=TensorProto.FLOAT):
            shape = contract.shapes(1, 1)[name]
            dims = [dyn.get(name, {}).get(i, d) for i, d in enumerate(shape)]
            return helper.make_tensor_value_info(name, dtype, dims)

        graph = helper.make_graph(b.nodes, f"wan-dit-{config.model_type}", [vi(n) for n in contract.input_names],
                                  [vi(n) for n in contract.output_names], b.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  producer_name="storymem-rt", doc_string=f"WanDiT expert, precision {precision}, "
                                  f"compute {str(cdt).removeprefix('torch.')}")
        model.ir_version = IR_VERSION
        # Always external data (real experts are far over protobuf's 2 GB limit); the streamed
        # initializers are already there, this appends the remaining small ones above 1 KB.
        onnx.save_model(model, str(tmp / MODEL_NAME), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=DATA_NAME, size_threshold=1024)
        onnx.checker.check_model(str(tmp / MODEL_NAME), full_check=True)
    log.info("wrote %s (%d nodes, precision %s)", out_dir / MODEL_NAME, len(b.nodes), precision)
    return out_dir / MODEL_NAME


def graph_summary(path: str | Path) -> dict:
    """Op counts, FP8 initializers and input/output shapes of a written graph (no weights read)."""
    onnx = _onnx()
    from onnx import TensorProto

    m = onnx.load(str(path), load_external_data=False)
    ops: dict[str, int] = {}
    for n in m.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1

    def dims(v):
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    return {"opset": max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), "ops": ops,
            "fp8_initializers": sorted(t.name for t in m.graph.initializer if t.data_type == TensorProto.FLOAT8E4M3FN),
            "inputs": {v.name: dims(v) for v in m.graph.input}, "outputs": {v.name: dims(v) for v in m.graph.output}}


def export_expert_onnx(folder: str | Path, out_dir: str | Path, precision: str,
                       compute_dtype: torch.dtype | None = None) -> Path:
    """`export_onnx` reading an expert folder (merged, plain or FP8) lazily."""
    config = DiTConfig.from_json(Path(folder) / "config.json")
    return export_onnx(config, WeightSource.from_folder(folder), out_dir, precision, compute_dtype)
