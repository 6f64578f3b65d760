"""WanDiT against the reference goldens (CPU, float32).

Every size comes from the fixture files (manifest.json, config.json, tensor shapes), so another
fixture set in the same format passes unchanged.
"""
from __future__ import annotations

import functools
import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import golden_dir, rel_err
from storymem_rt.configs import DiTConfig
from storymem_rt.dit import KEEP_FP32, WanDiT, apply_rope, rope_cos_sin
from storymem_rt.kernels.qk_norm_rope import rope_split

TOL = 1e-5


def _experts() -> list[str]:
    """Expert names ("t2v/high_noise_model", ...) listed by the fixture manifest."""
    manifest = golden_dir() / "manifest.json"
    if not manifest.is_file():
        return ["missing-fixtures"]  # the `golden` fixture then fails with a useful message
    return sorted(json.loads(manifest.read_text())["dit"])


EXPERTS = _experts()
I2V_EXPERTS = [e for e in EXPERTS if e.startswith("i2v/")]


# ---- helpers ---------------------------------------------------------------------------------
def _expert_dir(golden, expert):
    mode, name = expert.split("/")
    return golden / f"tiny-{mode}" / name


def _read_checkpoint(folder) -> dict[str, torch.Tensor]:
    """Every tensor of every *.safetensors file in an expert folder (single file or shards);
    a shard index, when present, must agree with the shards."""
    sd: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        part = load_file(f)
        assert not set(part) & set(sd), f"{f.name} repeats keys"
        sd.update(part)
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():
        assert set(json.loads(index.read_text())["weight_map"]) == set(sd)
    return sd


def _meta_assign(folder) -> WanDiT:
    """Built on the meta device, materialised by `load_state_dict(strict=True, assign=True)`."""
    with torch.device("meta"):
        model = WanDiT(DiTConfig.from_json(folder / "config.json"))
    model.load_state_dict(_read_checkpoint(folder), strict=True, assign=True)
    return model.eval()


@functools.lru_cache(maxsize=None)
def _model(golden_path: str, expert: str) -> WanDiT:
    """The expert through the production loader (`checkpoint.load_expert`) when it exists."""
    from pathlib import Path

    folder = _expert_dir(Path(golden_path), expert)
    try:
        from storymem_rt.checkpoint import load_expert
    except ImportError:
        return _meta_assign(folder)
    model = load_expert(folder, device="cpu", dtype=torch.float32)
    assert isinstance(model, WanDiT)
    return model


def _case(golden, expert) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Golden inputs/outputs with a batch dim added, and the file's metadata."""
    path = golden / f"dit-{expert.replace('/', '-')}.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    io = {k: v[None] if k != "t" else v for k, v in load_file(path).items()}
    return io, meta


def _run(model, io, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(io["x"], io["t"], io["context"], io.get("y"), **kw)


def _memory_frames(golden_manifest, meta) -> int:
    m = int(golden_manifest["memory_frames"])
    if "memory_frames" in meta:
        assert int(meta["memory_frames"]) == m
    return m


# ---- goldens ---------------------------------------------------------------------------------
@pytest.mark.parametrize("expert", EXPERTS)
def test_golden_output(golden, expert):
    model = _model(str(golden), expert)
    io, meta = _case(golden, expert)
    out = _run(model, io)
    assert out.shape == io["out"].shape and out.dtype == torch.float32
    if "seq_len" in meta:  # the reference ran without sequence padding
        f, h, w = (s // p for s, p in zip(io["x"].shape[2:], model.config.patch_size))
        assert int(meta["seq_len"]) == f * h * w
    err = rel_err(out, io["out"])
    print(f"{expert}: rel_err {err:.3e}")
    assert err <= TOL


@pytest.mark.parametrize("expert", EXPERTS)
def test_state_dict_matches_checkpoint(golden, expert):
    folder = _expert_dir(golden, expert)
    ckpt = _read_checkpoint(folder)
    cfg = DiTConfig.from_json(folder / "config.json")
    with torch.device("meta"):
        model = WanDiT(cfg)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in ckpt.items()}
    assert sorted(set(theirs) - set(ours)) == [], "checkpoint keys the model does not use"
    assert sorted(set(ours) - set(theirs)) == [], "model keys the checkpoint does not fill"
    assert ours == theirs
    assert list(model.buffers()) == []  # RoPE tables are computed per forward, never stored
    assert not any("img_emb" in k for k in theirs)  # Wan2.2 A14B I2V has no CLIP branch


@pytest.mark.parametrize("expert", EXPERTS)
def test_meta_load_matches_regular_construction(golden, expert):
    folder = _expert_dir(golden, expert)
    regular = WanDiT(DiTConfig.from_json(folder / "config.json"))
    regular.load_state_dict(_read_checkpoint(folder), strict=True)
    meta_built = _meta_assign(folder)
    assert all(p.device.type == "cpu" for p in meta_built.parameters())
    io, _ = _case(golden, expert)
    out = _run(meta_built, io)
    # Not bit-exact: assigned tensors keep the file's storage alignment, which can change the
    # CPU matmul kernel's summation order.
    assert rel_err(out, _run(regular, io)) <= 1e-6
    assert rel_err(out, io["out"]) <= TOL
    assert rel_err(out, _run(_model(str(golden), expert), io)) <= 1e-6  # production loader


# ---- RoPE ------------------------------------------------------------------------------------
@pytest.mark.parametrize("expert", I2V_EXPERTS)
def test_rope_memory_at_negative_positions_is_relative(golden, golden_manifest, expert):
    model = _model(str(golden), expert)
    io, meta = _case(golden, expert)
    m = _memory_frames(golden_manifest, meta)
    n_frames = io["x"].shape[2] // model.config.patch_size[0]
    assert 0 < m < n_frames
    shifted = _run(model, io, frame_pos=torch.arange(n_frames) - m)  # memory at -M..-1
    assert rel_err(shifted, _run(model, io)) <= TOL
    assert rel_err(shifted, io["out"]) <= TOL


@pytest.mark.parametrize("expert", EXPERTS)
def test_rope_global_shift_invariant_but_relative_change_detected(golden, expert):
    model = _model(str(golden), expert)
    io, _ = _case(golden, expert)
    n_frames = io["x"].shape[2] // model.config.patch_size[0]
    base = _run(model, io)
    pos = torch.arange(n_frames, dtype=torch.float64)
    assert rel_err(_run(model, io, frame_pos=pos + 37.25), base) <= TOL
    assert rel_err(_run(model, io, frame_pos=(pos - 11).long()), base) <= TOL
    moved = pos.clone()
    moved[0] -= 3  # one frame further from the others: attention must see it
    # Measured ~1.5e-3 on the tiny goldens, against ~2e-7 for the invariant shifts above.
    assert rel_err(_run(model, io, frame_pos=moved), base) > 10 * TOL


def _rope_complex_reference(x, frame_pos, h, w):
    """Upstream rope_apply in float64 complex arithmetic, built independently of dit.py:
    per-axis tables theta^(-2i/d_axis), split d - 4(d//6) / 2(d//6) / 2(d//6)."""
    d = x.shape[-1]
    dims = (d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6))

    def table(pos, n):
        inv = 1.0 / torch.pow(10000.0, torch.arange(0, n, 2, dtype=torch.float64) / n)
        return torch.polar(torch.ones(len(pos), n // 2, dtype=torch.float64), torch.outer(pos, inv))

    ft = table(frame_pos.double(), dims[0])
    fh = table(torch.arange(h, dtype=torch.float64), dims[1])
    fw = table(torch.arange(w, dtype=torch.float64), dims[2])
    f = len(frame_pos)
    freqs = torch.cat([
        ft[:, None, None].expand(f, h, w, -1),
        fh[None, :, None].expand(f, h, w, -1),
        fw[None, None, :].expand(f, h, w, -1),
    ], dim=-1).reshape(f * h * w, 1, -1)
    xc = torch.view_as_complex(x.double().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * freqs).flatten(-2)


def test_apply_rope_matches_complex_reference(golden, golden_manifest):
    cfg = DiTConfig.from_json(_expert_dir(golden, EXPERTS[0]) / "config.json")
    h, w = (s // p for s, p in zip(golden_manifest["latent_hw"], cfg.patch_size[1:]))
    frame_pos = torch.tensor([-4.0, -1.0, 0.0, 1.0, 2.5, 40.0])
    x = torch.randn(2, len(frame_pos) * h * w, cfg.num_heads, cfg.head_dim)
    cos, sin = rope_cos_sin(frame_pos, h, w, cfg.head_dim)
    assert cos.shape == sin.shape == (len(frame_pos) * h * w, cfg.head_dim // 2)
    assert cos.dtype == torch.float32
    got = apply_rope(x, cos, sin)
    assert got.dtype == x.dtype
    assert rel_err(got, _rope_complex_reference(x, frame_pos, h, w)) <= 1e-6


def test_rope_split_follows_upstream():
    # Wan2.2 A14B has head_dim 128: 22/21/21 rotation pairs for frame/height/width.
    assert list(rope_split(128)) == [22, 21, 21]
    for d in (64, 96, 128, 130):
        assert rope_split(d) == ((d - 4 * (d // 6)) // 2, d // 6, d // 6)


# ---- batching and inputs ---------------------------------------------------------------------
@pytest.mark.parametrize("expert", EXPERTS)
def test_batch_equals_single_runs(golden, expert):
    model = _model(str(golden), expert)
    io, _ = _case(golden, expert)
    other = {k: torch.randn_like(v) for k, v in io.items() if k not in ("t", "out")}
    t = torch.cat([io["t"], io["t"] * 0.5])
    batch = {k: torch.cat([io[k], other[k]]) for k in other}
    with torch.no_grad():
        out = model(batch["x"], t, batch["context"], batch.get("y"))
        singles = [model(s["x"], tt[None], s["context"], s.get("y")) for s, tt in zip((io, other), t)]
    assert rel_err(out[:1], io["out"]) <= TOL
    for i, single in enumerate(singles):
        assert rel_err(out[i : i + 1], single) <= TOL


@pytest.mark.parametrize("expert", EXPERTS[:1])
def test_context_zero_padding_is_what_the_model_does(golden, expert):
    model = _model(str(golden), expert)
    io, _ = _case(golden, expert)
    padded = dict(io, context=torch.nn.functional.pad(io["context"], (0, 0, 0, 5)))
    assert rel_err(_run(model, padded), io["out"]) <= TOL
    n_pad = model.config.text_len - io["context"].shape[1]
    full = dict(io, context=torch.nn.functional.pad(io["context"], (0, 0, 0, n_pad)))
    assert rel_err(_run(model, full), io["out"]) <= TOL


@pytest.mark.parametrize("expert", EXPERTS)
def test_input_errors_are_value_errors(golden, expert):
    model = _model(str(golden), expert)
    io, _ = _case(golden, expert)
    cfg = model.config
    too_long = torch.zeros(1, cfg.text_len + 1, cfg.text_dim)
    with pytest.raises(ValueError, match="text_len"):
        _run(model, dict(io, context=too_long))
    with pytest.raises(ValueError, match="frame_pos"):
        _run(model, io, frame_pos=torch.arange(io["x"].shape[2] + 1))
    with pytest.raises(ValueError, match="input channels"):
        _run(model, dict(io, x=io["x"][:, :-1]))
    if "y" in io:
        with pytest.raises(ValueError, match="need y"):
            _run(model, {k: v for k, v in io.items() if k != "y"})


@pytest.mark.parametrize("expert", EXPERTS[:1])
def test_attention_fn_is_pluggable(golden, expert):
    folder = _expert_dir(golden, expert)
    calls = []

    def naive(q, k, v):  # [B, L, H, D], the layout the projections write
        calls.append(q.shape)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        return (p @ v).transpose(1, 2)

    model = WanDiT(DiTConfig.from_json(folder / "config.json"), attention_fn=naive)
    model.load_state_dict(_read_checkpoint(folder), strict=True)
    io, _ = _case(golden, expert)
    assert rel_err(_run(model, io), io["out"]) <= TOL
    assert len(calls) == 2 * model.config.num_layers  # self + cross attention per block


@pytest.mark.parametrize("expert", EXPERTS)
def test_bf16_keeps_fp32_regions(golden, expert):
    folder = _expert_dir(golden, expert)
    model = WanDiT(DiTConfig.from_json(folder / "config.json"))
    model.load_state_dict(_read_checkpoint(folder), strict=True)
    model.cast_(torch.bfloat16)
    for name, p in model.named_parameters():
        want = torch.float32 if any(k in name for k in KEEP_FP32) else torch.bfloat16
        assert p.dtype == want, name
    io, _ = _case(golden, expert)
    out = _run(model, io)
    assert out.dtype == torch.float32
    assert rel_err(out, io["out"]) <= 1e-2  # measured ~3e-3
