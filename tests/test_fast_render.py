"""The fast backend inside the story engine: a shot through a fast `BackendConfig` equals the plain one."""
from __future__ import annotations

import torch

from storymem_rt.backends import BackendConfig, resolve
from storymem_rt.configs import SamplingConfig
from storymem_rt.models import ModelPaths, ModelSet
from storymem_rt.shot import ShotSpec, generate_shot, pad_context

from conftest import rel_err


def _shot(ms: ModelSet, mode: str):
    te = ms.text_encoder
    ctx, null = te.encode(["an old keeper walks to the lighthouse", "blurry"])
    spec = ShotSpec(mode=mode, prompt="p", seed=3, size=(64, 48),
                    sampling=SamplingConfig(shift=4.0, boundary=0.9, sample_steps=3, frame_num=9))
    mem = None
    known = None
    g = torch.Generator().manual_seed(0)  # the same memory and first frame for both model sets
    if mode != "t2v":
        mem = ms.vae.encode_images(torch.rand(2, 3, 48, 64, generator=g) * 2 - 1)
        known = torch.rand(1, 3, 48, 64, generator=g) * 2 - 1 if mode == "mi2v" else None
    kind = "t2v" if mode == "t2v" else "m2v"
    return generate_shot(ms.experts(kind), ms.vae, spec, pad_context([ctx], 512), pad_context([null], 512),
                         memory_latents=mem, known=known, device="cpu", cfg=ms.backend.cfg).latent


def test_fast_shots_equal_plain_shots(storymem_cache):
    from storymem_rt.tiny import ensure_tiny_models

    paths = ModelPaths.from_models_dir(ensure_tiny_models())
    plain = ModelSet(paths)
    cfg = resolve(backend="fast-bf16", dtype="float32")  # the fast code path, unrounded
    assert (cfg.name, cfg.precision, cfg.cfg) == ("fast-bf16", "fp32", "sequential")
    fast = ModelSet(paths, backend=cfg)
    for mode in ("t2v", "mi2v"):
        a, b = _shot(fast, mode), _shot(plain, mode)
        assert rel_err(a, b) < 1e-5, mode
    assert all(m.options.fuse_qkv and m.options.cache_text for m in fast.experts("m2v").values())


def test_render_attention_option_reaches_the_fast_model_and_needs_a_bf16_fast_backend(storymem_cache, tmp_path):
    from click.testing import CliRunner

    from storymem_rt.cli import main
    from storymem_rt.tiny import ensure_tiny_models

    paths = ModelPaths.from_models_dir(ensure_tiny_models())
    ms = ModelSet(paths, backend=BackendConfig(name="fast-bf16", precision="fp32", attention="sdpa"))
    assert {m.options.attention for m in ms.experts("t2v").values()} == {"sdpa"}
    # on the CPU --fast auto is off (and float32 makes bf16 fp32): the 8-bit kernel has no model to run in
    for extra in ([], ["--fast", "bf16"]):
        out = tmp_path / f"x{len(extra)}"
        r = CliRunner().invoke(main, ["render", "story/harbor_morning.json", "--attention", "int8-int8",
                                      "--out", str(out), "--no-progress", *extra])
        assert r.exit_code == 2, r.output
        assert "--attention" in r.output and "--fast bf16" in r.output, r.output
        assert not out.exists()
