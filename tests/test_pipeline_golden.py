"""Whole shots against the reference: every case in $STORYMEM_GOLDEN_DIR/pipeline/*.json.

Each case carries all its settings (mode, prompt, seed, size or max_area, frame count, steps,
solver, shift, boundary, guide scales, LoRA r/alpha/rslora, memory images, first frame or
motion frames, `reference_mi2v_bug`), so another case set in the same format runs unchanged.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from storymem_rt.configs import DEFAULT_NEGATIVE_PROMPT, SamplingConfig
from storymem_rt.media import load_image
from storymem_rt.models import ModelPaths, ModelSet
from storymem_rt.shot import ShotSpec, generate_shot, m2v_size, pad_context

from conftest import golden_dir, rel_err


def _cases():
    d = golden_dir() / "pipeline"
    return sorted(p.stem for p in d.glob("*.json")) if d.is_dir() else []


def _bundle_paths(root: Path) -> ModelPaths:
    b = root / "bundle"
    lora = b / "StoryMem" / "Wan2.2-MI2V-A14B"
    return ModelPaths(t2v=b / "Wan2.2-T2V-A14B", i2v=b / "Wan2.2-I2V-A14B", lora=lora)


def _frames(root: Path, names) -> torch.Tensor:
    if isinstance(names, str):
        names = [names]
    return torch.stack([load_image(root / n) for n in names])


@pytest.fixture(scope="module")
def models_by_lora():
    cache = {}

    def get(root: Path, lora: dict | None) -> ModelSet:
        key = json.dumps(lora, sort_keys=True)
        if key not in cache:
            r = lora.get("r") if lora else None
            a = lora.get("alpha") if lora else None
            if lora and not lora.get("rslora", True):
                pytest.skip("non-rslora LoRA cases are not produced by StoryMem")
            cache[key] = ModelSet(_bundle_paths(root), device="cpu", dtype=torch.float32, lora_rank=r, lora_alpha=a)
        return cache[key]

    return get


@pytest.mark.parametrize("case", _cases())
def test_pipeline_shot_matches_reference(case, models_by_lora):
    root = golden_dir() / "pipeline"
    cfg = json.loads((root / f"{case}.json").read_text())
    want = load_file(str(root / f"{case}.safetensors"))
    mode = cfg["mode"]
    gs = cfg.get("guide_scale", 3.5)
    gs = tuple(gs) if isinstance(gs, (list, tuple)) else (float(gs), float(gs))
    sampling = SamplingConfig(shift=cfg["shift"], boundary=cfg["boundary"], sample_steps=cfg["sampling_steps"],
                              guide_scale=gs, frame_num=cfg["frame_num"], solver=cfg["solver"])
    ms = models_by_lora(root, cfg.get("lora") if mode != "t2v" else None)

    memory = known = None
    if mode == "t2v":
        size = tuple(cfg["size"])
    else:
        memory = _frames(root, cfg.get("memory", []))
        if mode == "mi2v":
            known = _frames(root, cfg["first_frame"])
        elif mode == "mm2v":
            known = _frames(root, cfg["motion_frames"])
        # memory2video.py: the aspect ratio comes from the first memory image, then the first
        # frame / motion frames when given; the pixel budget from max_area.
        ref = known if known is not None else memory
        if "max_area" in cfg:
            h, w = ref.shape[-2:]
            size = m2v_size(cfg["max_area"], h / w)
        else:
            size = tuple(cfg["size"])
    spec = ShotSpec(mode=mode, prompt=cfg["prompt"], seed=cfg["seed"], size=size, sampling=sampling,
                    reference_mi2v_bug=bool(cfg.get("reference_mi2v_bug", False)))

    te = ms.text_encoder
    n_prompt = cfg.get("n_prompt", "default")
    n_prompt = DEFAULT_NEGATIVE_PROMPT if n_prompt in ("default", "") else n_prompt
    ctx, ctx_null = te.encode([cfg["prompt"], n_prompt])
    text_len = 512
    experts = ms.experts("t2v" if mode == "t2v" else "m2v")
    memory_latents = None
    if memory is not None:
        from storymem_rt.shot import resize_frames

        memory_latents = ms.vae.encode_images(resize_frames(memory, size))
    res = generate_shot(experts, ms.vae, spec, pad_context([ctx], text_len), pad_context([ctx_null], text_len),
                        memory_latents=memory_latents, known=known, device="cpu")
    e_lat = rel_err(res.latent, want["latent"])
    e_vid = rel_err(res.video, want["video"])
    print(f"{case}: latent rel err {e_lat:.2e}, video rel err {e_vid:.2e}")
    assert res.latent.shape == want["latent"].shape
    assert e_lat <= 1e-4, f"{case}: latent rel err {e_lat:.3e}"
    assert res.video.shape == want["video"].shape
    assert e_vid <= 1e-3, f"{case}: video rel err {e_vid:.3e}"
