"""Preview shots (a few-step distill LoRA stacked on StoryMem's, the step-distill sampler, no CFG) against
the reference: every case in $STORYMEM_GOLDEN_DIR/pipeline-preview/*.json, each taking every setting from
the case (step list, shift, boundary, strength, LoRA files, bundle path), so other case sets of the same
format run unchanged (`pytest -k preview_golden`)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import golden_dir, rel_err
from storymem_rt.configs import DEFAULT_NEGATIVE_PROMPT, SamplingConfig
from storymem_rt.media import load_image
from storymem_rt.models import ModelPaths, ModelSet
from storymem_rt.shot import ShotSpec, generate_shot, m2v_size, pad_context, resize_frames

ROOT = golden_dir() / "pipeline-preview"


def _cases():
    return sorted(p.stem for p in ROOT.glob("*.json")) if ROOT.is_dir() else []


def _frames(root: Path, names) -> torch.Tensor:
    return torch.stack([load_image(root / n) for n in ([names] if isinstance(names, str) else names)])


@pytest.mark.parametrize("case", _cases())
def test_preview_golden(case):
    cfg = json.loads((ROOT / f"{case}.json").read_text())
    want = load_file(str(ROOT / f"{case}.safetensors"))
    mode = cfg["mode"]
    kind = "t2v" if mode == "t2v" else "m2v"
    bundle = (ROOT / cfg["bundle"]).resolve()
    paths = ModelPaths(t2v=bundle / "Wan2.2-T2V-A14B", i2v=bundle / "Wan2.2-I2V-A14B",
                       lora=bundle / "StoryMem" / "Wan2.2-MI2V-A14B")
    lora = cfg.get("lora") or {}
    if lora and not lora.get("rslora", True):
        pytest.skip("non-rslora LoRA cases are not produced by StoryMem")
    dl = cfg["distill_lora"]
    distill = {kind: {e: ROOT / dl[e] for e in ("high", "low")}}
    ms = ModelSet(paths, device="cpu", dtype=torch.float32, lora_rank=lora.get("r"), lora_alpha=lora.get("alpha"),
                  distill=distill, distill_strength=float(dl.get("strength", 1.0)))
    gs = cfg.get("guide_scale", 1.0)
    gs = tuple(gs) if isinstance(gs, (list, tuple)) else (float(gs), float(gs))
    steps = tuple(cfg["denoising_step_list"])
    sampling = SamplingConfig(shift=cfg["shift"], boundary=cfg["boundary"], sample_steps=len(steps), guide_scale=gs,
                              frame_num=cfg["frame_num"], solver=cfg.get("solver", "distill"), step_list=steps,
                              boundary_step=cfg.get("boundary_step_index"),
                              guided=("high", "low") if cfg.get("cfg", False) else ())
    memory = known = None
    if mode == "t2v":
        size = tuple(cfg["size"])
    else:
        memory = _frames(ROOT, cfg.get("memory", []))
        if mode == "mi2v":
            known = _frames(ROOT, cfg["first_frame"])
        elif mode == "mm2v":
            known = _frames(ROOT, cfg["motion_frames"])
        ref = known if known is not None else memory
        size = m2v_size(cfg["max_area"], ref.shape[-2] / ref.shape[-1]) if "max_area" in cfg else tuple(cfg["size"])
    spec = ShotSpec(mode=mode, prompt=cfg["prompt"], seed=cfg["seed"], size=size, sampling=sampling,
                    reference_mi2v_bug=bool(cfg.get("reference_mi2v_bug", False)))
    n_prompt = cfg.get("n_prompt", "default")
    ctx, null = ms.text_encoder.encode([cfg["prompt"], DEFAULT_NEGATIVE_PROMPT if n_prompt in ("default", "") else
                                        n_prompt])
    mem = None if memory is None else ms.vae.encode_images(resize_frames(memory, size))
    res = generate_shot(ms.experts(kind), ms.vae, spec, pad_context([ctx], 512), pad_context([null], 512),
                        memory_latents=mem, known=known, device="cpu")
    e_lat, e_vid = rel_err(res.latent, want["latent"]), rel_err(res.video, want["video"])
    print(f"{case}: latent rel err {e_lat:.2e}, video rel err {e_vid:.2e}, counts {res.counts}")
    assert res.latent.shape == want["latent"].shape and e_lat <= 1e-4, f"{case}: latent rel err {e_lat:.3e}"
    assert res.video.shape == want["video"].shape and e_vid <= 1e-3, f"{case}: video rel err {e_vid:.3e}"
    assert res.counts == {"steps": len(steps), "dit_forwards": len(steps) * (2 if cfg.get("cfg", False) else 1)}
