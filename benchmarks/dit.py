"""`storymem-rt bench`: one real-size Wan2.2 A14B expert with random weights, built directly on
the GPU, checked against float32 and timed against diffusers in the same run (issue 5).

    storymem-rt bench --precision both --memory-frames 10 --size 832*480 --frame-num 81 \\
        --layers 40 --repeats 3 --peer diffusers

Stages (each timed with CUDA events, median of --repeats after a warm-up; first calls, which
include compilation, are reported apart):
1. correctness on a small slice (3 latent frames of 16x16, one memory frame at position -1):
   the same module in float32 (one block upcast at a time) against the plain bf16 WanDiT, the
   fast bf16 path and the fast FP8 path; the diffusers peer against the plain WanDiT; cached
   against uncached text K/V; CFG batched against back to back;
2. one forward at the real shape (832x480, 81 frames, M memory frames: 31 x 30 x 52 tokens
   = 48,360 at M = 10): plain WanDiT (--baseline), diffusers' WanTransformer3DModel eager and
   with regional compilation (--peer diffusers, same weights), ours bf16 (eager, compiled,
   compiled + CUDA graph), ours FP8 (compiled; bf16 attention and the int8 kernels), with the
   FP8 outputs' relative error against ours bf16 on the same input;
3. one CFG step, batched (B=2) and back to back;
4. memory plan: both FP8 experts + the VAE resident, one step of each and a decode, peak GPU
   memory; the real-size Wan2.1 VAE decode (random weights);
5. --full-shot: the whole denoising loop (both experts, CFG, --steps) plus the VAE decode.
Prints one table last; writes JSON to --json (default $OUT/bench.json when $OUT is set).
`correctness_check` is stage 1 alone at any size; CI runs it on the CPU at tiny size.
"""
from __future__ import annotations

import copy
import dataclasses
import gc
import json
import math
import os
import platform
import statistics
import tempfile
import time
import traceback
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from storymem_rt.backends import model_bytes, plan_residency
from storymem_rt.configs import DIT_PRESETS, SAMPLING_PRESETS, DiTConfig, VAEConfig
from storymem_rt.dit import DiTOptions, WanDiT
from storymem_rt.kernels.attention import attention_plan
from storymem_rt.sampling import GuidedStep

GB = 1e9


def prepare_fast(model: WanDiT, precision: str = "bf16", attention: str = "auto", *, options=None, **kw) -> WanDiT:
    """The fast forward in place: `WanDiT.convert_` with `DiTOptions.fast` (or `options`)."""
    return model.convert_(options or DiTOptions.fast(precision, attention=attention, **kw))


@dataclass
class BenchArgs:
    precision: str = "both"  # bf16 | fp8 | both
    memory_frames: int = 10
    size: tuple[int, int] = (832, 480)
    frame_num: int = 81
    layers: int = 40
    repeats: int = 3
    peer: str = "none"  # none | diffusers
    baseline: bool = True  # time the plain WanDiT (the foundation) too
    eager: bool = True  # time the fast path without compile too
    compile: bool = True
    cuda_graph: bool = True
    fp8_attention: tuple[str, ...] = ("auto", "int8-int8", "int8-fp8")
    cfg: tuple[str, ...] = ("batched", "sequential")
    fast_accum: bool = True
    ops: str = "auto"  # FastOptions.ops
    profile: bool = False  # print the top CUDA kernels of one forward of each timed fast path
    gelu_epilogue: bool = True  # bf16: the FFN's GELU in cuBLASLt's GEMM epilogue
    memory_plan: bool = True
    full_shot: bool = False
    steps: int = 40
    preview: bool = False  # --full-shot with render --preview's sampler (4 distilled steps, no CFG)
    seed: int = 0
    json_path: str | None = None
    device: str = "cuda"
    time_budget_s: float = 520.0  # later stages are skipped (and reported) past this
    model: str = "i2v-a14b"  # DiT preset ("tiny-i2v": CPU dry runs of the whole bench in tests)


# --------------------------------------------------------------------------------------------
# Models and inputs
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def random_expert(cfg: DiTConfig, device, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> WanDiT:
    """A WanDiT with random weights made directly on `device` in WanDiT's precision policy
    (no host copy): linear/conv weights and biases U(-1/sqrt(fan_in), 1/sqrt(fan_in)) as
    torch's default init, modulation N(0, 1/dim) as the module's, norm weights N(1, 0.1) and
    biases N(0, 0.1) (not ones and zeros, so a norm weight that is dropped shows up)."""
    with torch.device("meta"):
        model = WanDiT(cfg)
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    for mname, mod in model.named_modules():
        for pname, p in list(mod.named_parameters(recurse=False)):
            full = f"{mname}.{pname}" if mname else pname
            t = torch.empty(p.shape, dtype=model.param_dtype(full, dtype), device=device)
            if isinstance(mod, (nn.Linear, nn.Conv3d)):
                bound = 1.0 / math.sqrt(mod.weight[0].numel())
                t.uniform_(-bound, bound, generator=g)
            elif pname == "modulation":
                t.normal_(0.0, cfg.dim ** -0.5, generator=g)
            elif pname == "weight":
                t.normal_(1.0, 0.1, generator=g)
            else:
                t.normal_(0.0, 0.1, generator=g)
            setattr(mod, pname, nn.Parameter(t, requires_grad=False))
    return model.eval()


@dataclass
class Inputs:
    x: Tensor  # [B, 16, T, h, w]
    t: Tensor  # [B]
    context: Tensor  # [B, Lc, text_dim]
    y: Tensor | None  # [B, 20, T, h, w]
    frame_pos: Tensor  # [T]

    def args(self):
        return self.x, self.t, self.context, self.y, self.frame_pos


def make_inputs(cfg: DiTConfig, device, frames: int, h: int, w: int, memory: int, dtype, seed: int = 0,
                text_tokens: int = 120) -> Inputs:
    """One M2V forward's inputs: memory latents first (positions -M..-1), then the shot; the
    mask marks memory frames known; the prompt has `text_tokens` tokens (padded inside)."""
    g = torch.Generator(device=device)
    g.manual_seed(seed + 1)
    x = torch.randn(1, cfg.out_dim, frames, h, w, device=device, generator=g).to(dtype)
    y = None
    if cfg.in_dim > cfg.out_dim:
        mask = torch.zeros(1, 4, frames, h, w, device=device)
        mask[:, :, :memory] = 1
        cond = torch.randn(1, cfg.in_dim - cfg.out_dim - 4, frames, h, w, device=device, generator=g)
        y = torch.cat([mask, cond], dim=1).to(dtype)
    ctx = torch.randn(1, min(text_tokens, cfg.text_len), cfg.text_dim, device=device, generator=g).to(dtype)
    t = torch.full((1,), 900.0, device=device)
    pos = torch.arange(-memory, frames - memory, device=device)
    return Inputs(x, t, ctx, y, pos)


@torch.no_grad()
def float32_forward(model: WanDiT, x, t, context, y=None, frame_pos=None) -> Tensor:
    """`WanDiT.forward` of `model` in float32, one block upcast at a time (a float32 copy of a
    whole A14B expert would be 57 GB). Must run before `prepare_fast` converts the blocks."""
    cfg = model.config
    with torch.device("meta"):
        outer = WanDiT(dataclasses.replace(cfg, num_layers=0))
    sd = {k: v.float() for k, v in model.state_dict().items() if not k.startswith("blocks.")}
    outer.load_state_dict(sd, strict=True, assign=True)
    x, context = x.float(), context.float()
    y = None if y is None else y.float()
    tokens, grid = outer.embed_video(x, y)
    e, e6 = outer.embed_time(t.to(tokens.device), tokens.shape[0])
    ctx = outer.embed_text(context)
    rope = outer.rope(frame_pos, grid, tokens.device)
    for blk in model.blocks:
        b32 = copy.deepcopy(blk).float()
        tokens = b32(tokens, e6, b32.text_kv(ctx, "reference"), rope, "sdpa", "sdpa", "reference")
    return outer.unpatchify(outer.head(tokens, e), grid)


def rel_err(a: Tensor, b: Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    if not torch.isfinite(a).all():
        return float("nan")
    return float((a - b).norm() / b.norm())


# diffusers' WanTransformer3DModel names (diffusers scripts/convert_wan_to_diffusers.py), longest first.
_DIFFUSERS_KEYS = (
    ("text_embedding.0.", "condition_embedder.text_embedder.linear_1."),
    ("text_embedding.2.", "condition_embedder.text_embedder.linear_2."),
    ("time_embedding.0.", "condition_embedder.time_embedder.linear_1."),
    ("time_embedding.2.", "condition_embedder.time_embedder.linear_2."),
    ("time_projection.1.", "condition_embedder.time_proj."),
    ("head.modulation", "scale_shift_table"),
    ("head.head.", "proj_out."),
    (".self_attn.o.", ".attn1.to_out.0."),
    (".cross_attn.o.", ".attn2.to_out.0."),
    (".self_attn.", ".attn1."),
    (".cross_attn.", ".attn2."),
    (".norm3.", ".norm2."),
    (".ffn.0.", ".ffn.net.0.proj."),
    (".ffn.2.", ".ffn.net.2."),
    (".modulation", ".scale_shift_table"),
)


def diffusers_key(key: str) -> str:
    for src, dst in _DIFFUSERS_KEYS:
        if src in key:
            key = key.replace(src, dst)
            if src.startswith(("text_", "time_", "head.")):
                return key
    if ".attn1." in key or ".attn2." in key:
        for a in ("q", "k", "v"):
            key = key.replace(f".{a}.", f".to_{a}.")
    return key


def diffusers_peer(model: WanDiT, dtype: torch.dtype):
    """diffusers' WanTransformer3DModel holding `model`'s weights (shared where the dtype
    agrees: every block linear), in diffusers' own precision policy (`_keep_in_fp32_modules`)."""
    from diffusers import WanTransformer3DModel
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    cfg = model.config
    kw = dict(patch_size=tuple(cfg.patch_size), num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
              in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
              ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=cfg.cross_attn_norm,
              qk_norm="rms_norm_across_heads" if cfg.qk_norm else None, eps=cfg.eps)
    with torch.device("meta"):
        peer = WanTransformer3DModel(**kw)
    keep = tuple(WanTransformer3DModel._keep_in_fp32_modules)
    sd = {}
    for k, v in model.state_dict().items():
        dk = diffusers_key(k)
        sd[dk] = v.to(torch.float32 if any(n in dk.split(".") for n in keep) else dtype)
    peer.load_state_dict(sd, strict=True, assign=True)
    dev = next(model.parameters()).device
    # Non-persistent RoPE buffers are not in the state dict: build them for real.
    peer.rope = WanRotaryPosEmbed(cfg.head_dim, tuple(cfg.patch_size), 1024).to(dev)
    return peer.eval()


def peer_forward(peer, inp: Inputs, text_len: int = 512) -> Tensor:
    """The peer on our inputs: x and y concatenated, the text zero-padded to text_len before
    the embedding (as WanDiT.embed_text and the diffusers pipeline do)."""
    x = inp.x if inp.y is None else torch.cat([inp.x, inp.y], dim=1)
    ctx = torch.nn.functional.pad(inp.context, (0, 0, 0, text_len - inp.context.shape[1]))
    return peer(x, inp.t, ctx, return_dict=False)[0]


# --------------------------------------------------------------------------------------------
# Correctness (stage 1): CI runs this at tiny size on the CPU
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def correctness_check(cfg: DiTConfig, device="cpu", dtype=torch.bfloat16, seed: int = 0, peer: bool = False,
                      model: WanDiT | None = None, fp8: bool = True) -> dict:
    """Errors of every path against float32 on a small slice (3 latent frames of 16x16, one
    memory frame). Returns {name: value}. Leaves `model` (built here when None) as a fast FP8
    model if fp8 else fast bf16."""
    model = model if model is not None else random_expert(cfg, device, dtype, seed)
    inp = make_inputs(cfg, device, frames=3, h=16, w=16, memory=1, dtype=dtype, seed=seed, text_tokens=20)
    ref = float32_forward(model, *inp.args())
    out = {"plain_bf16_vs_fp32": rel_err(model(*inp.args()), ref)}
    if peer:
        p = diffusers_peer(model, dtype)
        zero_pos = dataclasses.replace(inp, frame_pos=None)  # diffusers puts frames at 0..F-1
        out["diffusers_vs_plain"] = rel_err(peer_forward(p, zero_pos), model(*zero_pos.args()))
        del p
    prepare_fast(model, "bf16")
    out.update(fast_checks(model, inp, ref, "bf16"))
    if fp8:
        prepare_fast(model, "fp8")
        out.update(fast_checks(model, inp, ref, "fp8"))
    return out


@torch.no_grad()
def fast_checks(model, inp: Inputs, ref: Tensor, tag: str) -> dict:
    """fast vs float32; cached text K/V vs recomputed (must be identical); CFG batched vs back to back."""
    res = {f"fast_{tag}_vs_fp32": rel_err(model(*inp.args()), ref)}
    cached = model(*inp.args())  # second call: text K/V from the cache
    opts = model.options
    prepare_fast(model, options=dataclasses.replace(opts, cache_text=False))
    uncached = model(*inp.args())
    prepare_fast(model, options=opts)
    res[f"fast_{tag}_text_cache_max_abs_diff"] = float((cached - uncached).abs().max())
    null = torch.zeros_like(inp.context)
    lat, y = inp.x[0].float(), None if inp.y is None else inp.y[0]
    outs = {}
    for mode in ("batched", "sequential"):
        outs[mode] = GuidedStep(model, inp.context, null, y, inp.frame_pos, 3.5, cfg=mode)(lat, inp.t)
    res[f"fast_{tag}_cfg_batched_vs_sequential"] = rel_err(outs["batched"], outs["sequential"])
    return res


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------
def _cuda() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def _sync():
    if _cuda():
        torch.cuda.synchronize()


def time_fn(fn, repeats: int) -> dict:
    """First call (wall clock: the warm-up, including any compilation), then `repeats` calls
    timed with CUDA events; median seconds. Returns the last output too."""
    _sync()
    t0 = time.perf_counter()
    out = fn()
    _sync()
    first = time.perf_counter() - t0
    if repeats < 1:
        return {"s": None, "all_s": [], "first_s": first, "out": out}
    times = []
    for _ in range(repeats):
        del out
        if _cuda():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:  # CPU dry runs (tests)
            t0 = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t0)
    return {"s": statistics.median(times), "all_s": times, "first_s": first, "out": out}


def _free():
    gc.collect()
    if _cuda():
        torch.cuda.empty_cache()


def _peak_reset():
    _sync()
    if _cuda():
        torch.cuda.reset_peak_memory_stats()


def _peak() -> float | None:
    return torch.cuda.max_memory_allocated() / GB if _cuda() else None


class Report:
    def __init__(self, args: BenchArgs):
        self.args = args
        self.rows: list[dict] = []
        self.info: dict = {}
        self.checks: dict = {}
        self.t0 = time.perf_counter()

    def row(self, name: str, kind: str, s: float | None, **kw) -> dict:
        r = {"name": name, "kind": kind, "s": s, **kw}
        self.rows.append(r)
        extra = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in kw.items()
                         if k not in ("all_s",))
        print(f"[bench] {name}: {'-' if s is None else f'{s:.3f} s'} {extra}", flush=True)
        return r

    def get(self, name: str) -> float | None:
        for r in self.rows:
            if r["name"] == name:
                return r["s"]
        return None


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------
def run(args: BenchArgs) -> dict:
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("storymem-rt bench needs a CUDA GPU (the correctness check alone runs on the "
                           "CPU: pytest tests/test_fast.py)")
    if dev.type == "cuda":
        torch.cuda.init()
    torch.backends.cuda.matmul.allow_tf32 = False
    rep = Report(args)
    w, h = args.size
    cfg = dataclasses.replace(DIT_PRESETS[args.model], num_layers=args.layers)
    lat_t = (args.frame_num - 1) // 4 + 1 + args.memory_frames
    lat_h, lat_w = h // 8, w // 8
    tokens = lat_t * (lat_h // 2) * (lat_w // 2)
    name = torch.cuda.get_device_properties(dev).name if dev.type == "cuda" else platform.processor() or "cpu"
    rep.info = {"device": name, "torch": torch.__version__, "python": platform.python_version(),
                "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "layers": args.layers, "size": f"{w}x{h}",
                "frame_num": args.frame_num, "memory_frames": args.memory_frames, "tokens": tokens,
                "latent": [16, lat_t, lat_h, lat_w], "repeats": args.repeats, "args": dataclasses.asdict(args)}
    try:
        import triton
        rep.info["triton"] = triton.__version__
    except ImportError:
        pass
    print(f"[bench] {name}, torch {torch.__version__}; A14B i2v expert x{args.layers} layers; "
          f"{w}x{h}x{args.frame_num}, {args.memory_frames} memory frames -> latent {lat_t}x{lat_h}x{lat_w}, "
          f"{tokens} tokens", flush=True)
    bf16 = torch.bfloat16
    want_bf16 = args.precision in ("bf16", "both")
    want_fp8 = args.precision in ("fp8", "both")
    label = "compiled" if args.compile else "eager"

    t0 = time.perf_counter()
    model = random_expert(cfg, dev, bf16, args.seed)
    _sync()
    rep.info["init_s"] = time.perf_counter() - t0
    rep.info["expert_bf16_gb"] = model_bytes(model) / GB
    print(f"[bench] random bf16 expert on the GPU in {rep.info['init_s']:.1f} s, "
          f"{rep.info['expert_bf16_gb']:.2f} GB", flush=True)
    st = {"model": model}

    # stage 1 on the slice, before anything converts the blocks
    sl = make_inputs(cfg, dev, frames=3, h=16, w=16, memory=1, dtype=bf16, seed=args.seed, text_tokens=20)
    ref32 = float32_forward(model, *sl.args())
    rep.checks["plain_bf16_vs_fp32"] = rel_err(model(*sl.args()), ref32)
    inp = make_inputs(cfg, dev, lat_t, lat_h, lat_w, args.memory_frames, bf16, args.seed)

    def baseline():
        _forward_row(rep, "ours plain WanDiT bf16 (foundation, SDPA)", model, inp, args)

    def fast_bf16():
        prepare_fast(model, "bf16", **_kw(args))
        rep.checks.update(fast_checks(model, sl, ref32, "bf16"))
        if args.eager:
            st["out_bf16"] = _forward_row(rep, "ours fast bf16, eager (kernels)", model, inp, args)
        if args.compile:
            model.set_compile(True)
            out = _forward_row(rep, "ours fast bf16, compiled", model, inp, args, ref=st.get("out_bf16"),
                               ref_name="rel_err_vs_eager")
            st.setdefault("out_bf16", out)
        if args.cuda_graph and dev.type == "cuda":
            _bench_graph(model, inp, rep, f"ours fast bf16, {label} + CUDA graph", args, st["out_bf16"])
        if not want_fp8:
            _bench_cfg(model, inp, rep, args, "bf16")

    def bf16_reference_only():  # FP8 alone: one bf16 forward for the FP8 error
        prepare_fast(model, "bf16", **_kw(args))
        rep.checks.update(fast_checks(model, sl, ref32, "bf16"))
        st["out_bf16"] = model(*inp.args())

    def fast_fp8():
        model.set_compile(False)
        prepare_fast(model, "fp8", **_kw(args))
        rep.info["expert_fp8_gb"] = model_bytes(model) / GB
        rep.checks.update(fast_checks(model, sl, ref32, "fp8"))
        for attn in args.fp8_attention:  # slice errors in eager: no compilation at the slice's shape
            prepare_fast(model, "fp8", attn, **_kw(args))
            rep.checks[f"fast_fp8_attn_{attn}_vs_fp32"] = rel_err(model(*sl.args()), ref32)
        if args.eager:
            _forward_row(rep, f"ours fast fp8, eager (kernels), attention {args.fp8_attention[-1]}", model, inp,
                         args, ref=st.get("out_bf16"), ref_name="rel_err_vs_bf16")
        for attn in args.fp8_attention:
            prepare_fast(model, "fp8", attn, **_kw(args), compile=args.compile)
            _forward_row(rep, f"ours fast fp8, {label}, attention {attn}", model, inp, args,
                         ref=st.get("out_bf16"), ref_name="rel_err_vs_bf16")
        timed = [a for a in args.fp8_attention if rep.get(f"ours fast fp8, {label}, attention {a}") is not None]
        best = min(timed, key=lambda a: rep.get(f"ours fast fp8, {label}, attention {a}"))
        rep.info["fp8_attention_best"] = st["attn"] = best
        prepare_fast(model, "fp8", best, **_kw(args), compile=args.compile)
        if args.cuda_graph and dev.type == "cuda":
            _bench_graph(model, inp, rep, f"ours fast fp8, {label} + CUDA graph, attention {best}", args,
                         st.get("out_bf16"))
        _bench_cfg(model, inp, rep, args, "fp8")

    with torch.no_grad():
        if args.baseline:
            _stage(rep, "baseline", baseline)
        if args.peer == "diffusers":
            _stage(rep, "diffusers", lambda: _bench_diffusers(model, sl, inp, rep, args))
        _stage(rep, "fast bf16", fast_bf16 if want_bf16 else bf16_reference_only)
        if want_fp8:
            _stage(rep, "fast fp8", fast_fp8)
            if (args.memory_plan or args.full_shot) and "attn" in st:
                _stage(rep, "memory plan / shot",
                       lambda: _bench_memory_and_shot(model, cfg, inp, rep, args, st["attn"]))
    return _finish(rep, args)


def _kw(args: BenchArgs) -> dict:
    return {"fast_accum": args.fast_accum, "ops": args.ops, "gelu_epilogue": args.gelu_epilogue}


def _stage(rep: Report, name: str, fn) -> None:
    """Run one stage; a failure or the time budget skips it (reported), the run goes on."""
    spent = time.perf_counter() - rep.t0
    if spent > rep.args.time_budget_s:
        rep.row(f"{name}: skipped", "skipped", None, error=f"time budget ({spent:.0f} s spent)")
        return
    t0 = time.perf_counter()
    try:
        fn()
    except Exception as e:
        traceback.print_exc()
        rep.row(f"{name}: failed", "error", None, error=f"{type(e).__name__}: {e}"[:400])
    finally:
        _free()
        print(f"[bench] stage {name}: {time.perf_counter() - t0:.1f} s (total {time.perf_counter() - rep.t0:.0f} s)",
              flush=True)


def _forward_row(rep: Report, name: str, model, inp: Inputs, args: BenchArgs, ref: Tensor | None = None,
                 ref_name: str = "rel_err_vs_bf16") -> Tensor:
    _peak_reset()
    r = time_fn(lambda: model(*inp.args()), args.repeats)
    out = r.pop("out")
    extra = {ref_name: rel_err(out, ref)} if ref is not None else {}
    rep.row(name, "forward", r["s"], first_s=r["first_s"], peak_gb=_peak(), all_s=r["all_s"], **extra)
    if args.profile and _cuda():
        profile_forward(lambda: model(*inp.args()), name)
    return out


def profile_forward(fn, name: str, rows: int = 32) -> None:
    """CUDA time per kernel of one call (torch.profiler), top `rows`; then the host-side ops
    (aten, Inductor's graphs) with their input shapes, by the CUDA time under them."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        fn()
        _sync()
    print(f"[profile] {name}")
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=rows, max_name_column_width=70))
    print(f"[profile] {name}: host ops by input shape")
    print(prof.key_averages(group_by_input_shape=True).table(sort_by="cuda_time_total", row_limit=rows,
                                                             max_name_column_width=50, max_shapes_column_width=90))


def _bench_diffusers(model, sl: Inputs, inp: Inputs, rep: Report, args: BenchArgs) -> None:
    import diffusers

    rep.info["diffusers"] = diffusers.__version__
    peer = diffusers_peer(model, torch.bfloat16)
    zero = dataclasses.replace(sl, frame_pos=None)
    rep.checks["diffusers_vs_plain_bf16"] = rel_err(peer_forward(peer, zero), model(*zero.args()))
    _peak_reset()
    r = time_fn(lambda: peer_forward(peer, inp), args.repeats)
    rep.row(f"diffusers {diffusers.__version__} WanTransformer3DModel bf16, eager", "forward", r["s"],
            first_s=r["first_s"], peak_gb=_peak(), all_s=r["all_s"])
    del r
    peer.compile_repeated_blocks(fullgraph=True)
    _peak_reset()
    r = time_fn(lambda: peer_forward(peer, inp), args.repeats)
    rep.row(f"diffusers {diffusers.__version__} bf16, regional compile", "forward", r["s"], first_s=r["first_s"],
            peak_gb=_peak(), all_s=r["all_s"])
    del r, peer
    torch._dynamo.reset()
    _free()


def _bench_graph(model, inp: Inputs, rep: Report, name: str, args: BenchArgs, ref: Tensor) -> None:
    """One forward captured in a CUDA graph (static inputs), replays timed."""
    x, t, ctx, y, fp = inp.args()
    s = torch.cuda.Stream()  # warm-up on the capture stream (the model ran this shape already)
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        model(*inp.args())
    torch.cuda.current_stream().wait_stream(s)
    _peak_reset()
    g = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(g, stream=s):
            out = model(x, t, ctx, y, fp)
    except Exception as e:  # report and go on: graphs are a toggle
        rep.row(name, "forward", None, error=f"{type(e).__name__}: {e}"[:300])
        return
    r = time_fn(lambda: g.replay(), args.repeats)
    rep.row(name, "forward", r["s"], peak_gb=_peak(), all_s=r["all_s"], rel_err_vs_bf16=rel_err(out, ref))
    del g, out
    _free()


def _bench_cfg(model, inp: Inputs, rep: Report, args: BenchArgs, tag: str) -> None:
    null = torch.zeros_like(inp.context)
    lat, y = inp.x[0].float(), inp.y[0]
    outs = {}
    for mode in args.cfg:
        step = GuidedStep(model, inp.context, null, y, inp.frame_pos, 3.5, cfg=mode)
        _peak_reset()
        r = time_fn(lambda: step(lat, inp.t), args.repeats)
        outs[mode] = r.pop("out")
        rep.row(f"ours fast {tag}, one CFG step, {mode}", "cfg_step", r["s"], first_s=r["first_s"],
                peak_gb=_peak(), all_s=r["all_s"])
        del r, step
        _free()
    if len(outs) == 2:
        rep.checks[f"cfg_{tag}_batched_vs_sequential_real"] = rel_err(outs["batched"], outs["sequential"])
        a, b = (rep.get(f"ours fast {tag}, one CFG step, {m}") for m in ("batched", "sequential"))
        rep.info[f"cfg_{tag}_faster"] = "batched" if a <= b else "sequential"


def _bench_memory_and_shot(model, cfg, inp: Inputs, rep: Report, args: BenchArgs, attn: str) -> None:
    """Both FP8 experts + VAE resident: one CFG step of each, one decode; peak memory. Then the
    VAE decode alone in bf16 and float32, and (--full-shot) the whole shot."""
    from storymem_rt.shot import ShotSpec, denoise, draw_noise
    from storymem_rt.vae import WanVAE, build_diffusers_vae

    cfg_mode = rep.info.get("cfg_fp8_faster", args.cfg[0] if len(args.cfg) == 1 else "sequential")
    low = random_expert(cfg, inp.x.device, torch.bfloat16, args.seed + 1)
    prepare_fast(low, "fp8", attn, **_kw(args), compile=args.compile)
    _free()
    vcfg = VAEConfig()
    vae_model = build_diffusers_vae(vcfg, device=inp.x.device)
    vae = WanVAE(nn.Module.to(vae_model, dtype=torch.bfloat16), vcfg)
    experts = {"high": model, "low": low}
    null = torch.zeros_like(inp.context)
    lat, y = inp.x[0].float(), inp.y[0]
    shot_lat = torch.randn(1, 16, lat.shape[1] - args.memory_frames, lat.shape[2], lat.shape[3], device=lat.device)
    _peak_reset()
    for name in ("high", "low"):
        GuidedStep(experts[name], inp.context, null, y, inp.frame_pos, 3.5, cfg=cfg_mode)(lat, inp.t)
    vae.decode(shot_lat)
    _sync()
    total = (_peak() or 0.0) * GB
    reserved = torch.cuda.max_memory_reserved() / GB if _cuda() else None
    experts_b = model_bytes(model) + model_bytes(low)
    rep.info["memory_plan"] = {
        "experts_fp8_gb": experts_b / GB, "vae_gb": model_bytes(vae_model) / GB,
        "peak_allocated_gb": total / GB, "peak_reserved_gb": reserved, "cfg": cfg_mode,
        # bf16: two experts of expert_bf16_gb plus the same working set (activations, VAE, caches)
        "working_set_gb": (total - experts_b) / GB,
        "bf16_plan": plan_residency(int(rep.info["expert_bf16_gb"] * GB), int(total - experts_b)),
    }
    rep.row("memory: both FP8 experts + VAE resident, one CFG step each + decode", "memory", None,
            peak_gb=total / GB, reserved_gb=reserved)
    for dt in (torch.bfloat16, torch.float32):
        nn.Module.to(vae_model, dtype=dt)
        vae = WanVAE(vae_model, vcfg)
        r = time_fn(lambda: vae.decode(shot_lat), 1)
        rep.row(f"VAE decode {shot_lat.shape[2]} latent frames, {str(dt).split('.')[-1]}", "vae", r["s"],
                first_s=r["first_s"])
        del r
    nn.Module.to(vae_model, dtype=torch.bfloat16)
    vae = WanVAE(vae_model, vcfg)
    _free()
    if args.full_shot:
        from storymem_rt.keyframes import KeyframeSelector, default_quality_scorer, random_clip
        from storymem_rt.media import frames_to_float, video_to_uint8, write_video

        dev = inp.x.device
        # what the story engine does after the DiT (story.py): decode, the shot's mp4, keyframe selection
        # with CLIP ViT-B/32 (random weights: the architecture the render loads) and the quality filter the
        # render would pick on this machine, and the VAE encode of the picked keyframes into memory. The
        # selector is built once per story, so here before the clock starts.
        selector = KeyframeSelector(random_clip(args.seed, dev), default_quality_scorer(True, device=dev), device=dev)
        rep.info["full_shot_quality_filter"] = type(selector.scorer).__name__
        s = dataclasses.replace(SAMPLING_PRESETS["m2v-a14b"], sample_steps=args.steps, frame_num=args.frame_num)
        if args.preview:  # render --preview's sampler: the distilled steps, 2 high + 2 low, no CFG
            from storymem_rt.schedulers import DISTILL_STEPS

            s = dataclasses.replace(s, solver="distill", shift=5.0, sample_steps=len(DISTILL_STEPS),
                                    step_list=DISTILL_STEPS, boundary_step=2, guided=())
        spec = ShotSpec(mode="m2v", prompt="", seed=args.seed, size=args.size, sampling=s)
        noise, g = draw_noise(args.seed, tuple(inp.x.shape[1:]), dev)
        _peak_reset()
        t0 = time.perf_counter()
        counts: dict = {}
        latent = denoise(experts, spec, noise, g, inp.context, null, y, inp.frame_pos, torch.bfloat16,
                         cfg=cfg_mode, cuda_graph=args.cuda_graph, check_sync=True, counts=counts)
        _sync()
        t_dit = time.perf_counter() - t0
        video = vae.decode(latent[None, :, args.memory_frames:])
        _sync()
        t_dec = time.perf_counter() - t0
        frames_u8 = torch.from_numpy(video_to_uint8(video[0]))
        with tempfile.TemporaryDirectory() as d:
            write_video(os.path.join(d, "shot.mp4"), frames_u8)
        t_write = time.perf_counter() - t0
        frames = frames_to_float(frames_u8, dev)
        picked = list(selector.select(frames).indices)
        if picked:
            vae.encode_images(frames[picked].to(torch.bfloat16))
        _sync()
        t_all = time.perf_counter() - t0
        what = (f"preview: {counts['steps']} distill steps, no CFG" if args.preview else
                f"{args.steps} steps x CFG ({cfg_mode})")
        rep.row(f"full shot: {what} + decode, mp4, keyframes", "shot", t_all, dit_forwards=counts["dit_forwards"],
                dit_s=t_dit, decode_s=t_dec - t_dit, write_s=t_write - t_dec, keyframes_s=t_all - t_write,
                keyframes=picked, shot_over_dit=t_all / t_dit, peak_gb=_peak(),
                finite=bool(torch.isfinite(video).all()))
        del latent, video, frames


def _ratio(a, b):
    return None if a is None or b is None else b / a


def _finish(rep: Report, args: BenchArgs) -> dict:
    d_eager = next((r["s"] for r in rep.rows if r["name"].startswith("diffusers") and "eager" in r["name"]), None)
    d_comp = next((r["s"] for r in rep.rows if r["name"].startswith("diffusers") and "compile" in r["name"]), None)
    plain = next((r["s"] for r in rep.rows if r["name"].startswith("ours plain")), None)
    for r in rep.rows:
        if r["kind"] == "forward" and r["s"] is not None:
            r["x_plain"] = _ratio(r["s"], plain)
            r["x_diffusers"] = _ratio(r["s"], d_eager)
            r["x_diffusers_compiled"] = _ratio(r["s"], d_comp)

    rep.info["attention_auto"] = {f"q {list(k[0])} k {list(k[1])}": {"chosen": impl, "ms": ms}
                                  for k, (impl, ms) in attention_plan().items()}
    result = {"info": rep.info, "checks": rep.checks, "rows": rep.rows}
    path = args.json_path or (os.path.join(os.environ["OUT"], "bench.json") if os.environ.get("OUT") else None)
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=1, default=str)
    print_table(result)
    return result


def _fmt(v, spec=".3f"):
    return "-" if v is None else format(v, spec)


def print_table(result: dict) -> None:
    info, checks, rows = result["info"], result["checks"], result["rows"]
    print()
    print(f"storymem-rt bench: {info['device']}, torch {info['torch']}, {info['date']}")
    print(f"A14B i2v expert, {info['layers']} layers, random weights; {info['size']} x {info['frame_num']} frames, "
          f"{info['memory_frames']} memory frames -> {info['tokens']} tokens; median of {info['repeats']}")
    print("correctness (rel. err.): " + ", ".join(f"{k} {v:.2e}" for k, v in checks.items()))
    for shape, a in info.get("attention_auto", {}).items():
        print(f"attention auto, {shape}: {a['chosen']} ("
              + ", ".join(f"{k} {v:.2f} ms" for k, v in a["ms"].items()) + ")")
    hdr = f"| {'what':<68} | {'s':>7} | {'first s':>7} | {'x plain':>11} | {'x diffusers':>11} | " \
          f"{'x diff. compiled':>16} | {'rel err vs bf16':>15} | {'peak GB':>7} |"
    print(hdr)
    print("|" + "|".join("-" * (len(c)) for c in hdr.split("|")[1:-1]) + "|")
    for r in rows:
        err = r.get("rel_err_vs_bf16")
        print(f"| {r['name'][:68]:<68} | {_fmt(r['s']):>7} | {_fmt(r.get('first_s'), '.1f'):>7} | "
              f"{_fmt(r.get('x_plain'), '.2f'):>11} | {_fmt(r.get('x_diffusers'), '.2f'):>11} | "
              f"{_fmt(r.get('x_diffusers_compiled'), '.2f'):>16} | {_fmt(err, '.2e'):>15} | "
              f"{_fmt(r.get('peak_gb'), '.1f'):>7} |")
    mp = info.get("memory_plan")
    if mp:
        print(f"memory plan: FP8 experts {mp['experts_fp8_gb']:.1f} GB + VAE {mp['vae_gb']:.2f} GB resident, "
              f"peak allocated {mp['peak_allocated_gb']:.1f} GB (reserved {_fmt(mp['peak_reserved_gb'], '.1f')}), "
              f"working set {mp['working_set_gb']:.1f} GB; bf16 plan: {mp['bf16_plan']}")
    print("Every ratio compares two rows of this run (plain: our plain WanDiT in bf16, --baseline).")
