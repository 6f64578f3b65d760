"""Preview mode on the CPU: the step-distill sampler against a float64 transcription of its formulas,
distill LoRAs in every naming users share (same merged weights), the stack against peft with two
adapters, and `render --preview` end to end on the tiny bundle (4 DiT calls per shot in every mode)."""
from __future__ import annotations

import copy
import json

import numpy as np
import peft
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from conftest import REPO, rel_err
from storymem_rt.checkpoint import load_expert
from storymem_rt.cli import main
from storymem_rt.errors import CheckpointError
from storymem_rt.schedulers import StepDistillScheduler, make_scheduler
from storymem_rt.tiny import LORA_TARGETS, ensure_tiny_distill

STORY = str(REPO / "story" / "harbor_morning.json")


# ----------------------------------------------------------------------------- the sampler

@pytest.mark.parametrize("steps,shift", [((1000, 750, 500, 250), 5.0), ((1000, 500), 3.0), ((999, 600, 40), 8.0)])
def test_step_distill_sampler_matches_float64_formulas(steps, shift):
    # LightX2V's rule, written out again in float64: s = linspace(1, 0, 1001)[:-1],
    # sigma = shift*s / (1 + (shift-1)*s), taken at 1000 - t; x0 = x - sigma_i v; x = x0 + sigma_{i+1} v.
    s = np.linspace(1.0, 0.0, 1001)[:-1]
    sig = [shift * s[1000 - t] / (1 + (shift - 1) * s[1000 - t]) for t in steps] + [0.0]
    sched = make_scheduler("distill", len(steps), shift, step_list=steps)
    assert torch.equal(sched.timesteps, torch.tensor([1000 * x for x in sig[:-1]], dtype=torch.float32))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    ref = x.clone()
    for i in range(len(steps)):
        v = torch.tanh(x) * (i + 1)  # any velocity field; the same one drives both
        x = sched.step(v, sched.timesteps[i], x)
        x0 = ref - sig[i] * (torch.tanh(ref) * (i + 1))
        ref = x0 if i + 1 == len(steps) else x0 + sig[i + 1] * (torch.tanh(ref) * (i + 1))
    assert torch.allclose(x, ref, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="already taken"):
        sched.step(x, 0, x)


@pytest.mark.parametrize("bad", [(1000, 1000), (750, 1000), (0,), (1001,), ()])
def test_step_distill_sampler_refuses_bad_step_lists(bad):
    with pytest.raises(ValueError, match="step list"):
        StepDistillScheduler(bad, 5.0)


# ----------------------------------------------------------------------------- LoRA formats

def _expert_dir(bundle):
    return bundle / "Wan2.2-I2V-A14B" / "high_noise_model"


def _factors(base_state, r=3, seed=0):
    """Random distill factors per target (down [r, in], up [out, r]), alpha, and two full deltas."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, w in base_state.items():
        module = k.rsplit(".", 1)[0]
        if k.endswith(".weight") and any(module.endswith(t) for t in LORA_TARGETS) and module.startswith("blocks."):
            out[module] = (torch.randn(r, w.shape[1], generator=g), torch.randn(w.shape[0], r, generator=g) * 0.1)
    return out, 6.0, {"blocks.0.norm3.weight": torch.randn(128, generator=g) * 0.1,
                      "blocks.1.self_attn.o.bias": torch.randn(128, generator=g) * 0.1}


_DIFFUSERS = {"self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
              "self_attn.o": "attn1.to_out.0", "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k",
              "cross_attn.v": "attn2.to_v", "cross_attn.o": "attn2.to_out.0", "ffn.0": "ffn.net.0.proj",
              "ffn.2": "ffn.net.2"}


def _write(path, factors, alpha, diffs, naming):
    state = {}
    for module, (down, up) in factors.items():
        if naming == "wan":
            base = f"diffusion_model.{module}"
            state.update({f"{base}.lora_down.weight": down, f"{base}.lora_up.weight": up,
                          f"{base}.alpha": torch.tensor(alpha)})
        elif naming == "kohya":
            base = "lora_unet_" + module.replace(".", "_")
            state.update({f"{base}.lora_down.weight": down, f"{base}.lora_up.weight": up,
                          f"{base}.alpha": torch.tensor(alpha)})
        else:  # diffusers/peft: diffusers module names, lora_A/lora_B, alpha folded into the scale by the caller
            blk, rest = module.split(".", 2)[:2], module.split(".", 2)[2]
            base = f"transformer.{'.'.join(blk)}.{_DIFFUSERS[rest]}"
            state.update({f"{base}.lora_A.weight": down * (alpha / down.shape[0]), f"{base}.lora_B.weight": up})
    if naming == "wan":
        for k, d in diffs.items():
            module, leaf = k.rsplit(".", 1)
            state[f"diffusion_model.{module}.{'diff' if leaf == 'weight' else 'diff_b'}"] = d
    save_file(state, str(path))


def test_distill_lora_namings_merge_the_same(bundle, tmp_path):
    folder = _expert_dir(bundle)
    base = load_expert(folder).state_dict()
    factors, alpha, diffs = _factors(base)
    strength = 0.7
    want = {k: v.clone() for k, v in base.items()}
    for module, (down, up) in factors.items():
        want[module + ".weight"] += strength * alpha / down.shape[0] * (up @ down)
    for k, d in diffs.items():
        want[k] += strength * d
    for naming in ("wan", "kohya", "diffusers"):
        f = tmp_path / f"{naming}_high_noise.safetensors"
        _write(f, factors, alpha, diffs if naming == "wan" else {}, naming)
        got = load_expert(folder, distill=(f, strength)).state_dict()
        ref = want if naming == "wan" else {k: v - (strength * diffs[k] if k in diffs else 0) for k, v in want.items()}
        worst = max(float((got[k] - ref[k]).abs().max()) for k in ref)
        assert worst < 1e-5, (naming, worst)


def test_distill_lora_key_that_matches_no_weight_is_named(bundle, tmp_path):
    f = tmp_path / "x_high_noise.safetensors"
    save_file({"diffusion_model.blocks.7.self_attn.q.lora_down.weight": torch.zeros(2, 128),
               "diffusion_model.blocks.7.self_attn.q.lora_up.weight": torch.zeros(128, 2)}, str(f))
    with pytest.raises(CheckpointError, match=r"blocks\.7\.self_attn\.q\.lora_down"):
        load_expert(_expert_dir(bundle), distill=(f, 1.0))
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(2, 128)}, str(f))
    with pytest.raises(CheckpointError, match="no matching down/up"):
        load_expert(_expert_dir(bundle), distill=(f, 1.0))


def test_stack_equals_peft_with_two_adapters(bundle):
    """W + s_storymem B1 A1 + s_distill B2 A2 merged at load = peft running both adapters unmerged."""
    from storymem_rt.lora import load_lora

    folder = _expert_dir(bundle)
    distill = ensure_tiny_distill(bundle)["m2v"]
    dfile = next(distill.glob("*high_noise*.safetensors"))
    sm = load_lora(bundle / "StoryMem" / "Wan2.2-MI2V-A14B" / "backbone_high_noise.pth")
    strength = 1.5
    merged = load_expert(folder, lora=sm, distill=(dfile, strength))
    base = load_expert(folder)
    from safetensors.torch import load_file

    draw = load_file(str(dfile))
    model = copy.deepcopy(base)
    cfg_sm = peft.LoraConfig(r=sm.config.r, lora_alpha=sm.config.alpha, use_rslora=True, lora_dropout=0.0,
                             target_modules=list(LORA_TARGETS))
    cfg_d = peft.LoraConfig(r=4, lora_alpha=4.0 * strength, lora_dropout=0.0, target_modules=list(LORA_TARGETS))
    model = peft.inject_adapter_in_model(cfg_sm, model, adapter_name="storymem")
    model = peft.inject_adapter_in_model(cfg_d, model, adapter_name="distill")
    from peft.tuners.lora import LoraLayer

    with torch.no_grad():
        for name, m in model.named_modules():
            if not isinstance(m, LoraLayer):
                continue
            a, b = sm.pairs[name + ".weight"]
            m.lora_A["storymem"].weight.copy_(a)
            m.lora_B["storymem"].weight.copy_(b)
            m.lora_A["distill"].weight.copy_(draw[f"diffusion_model.{name}.lora_down.weight"])
            m.lora_B["distill"].weight.copy_(draw[f"diffusion_model.{name}.lora_up.weight"])
            m.set_adapter(["storymem", "distill"])
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(1, 16, 3, 8, 8, generator=g), torch.randn(1, 20, 3, 8, 8, generator=g)
    ctx, t = torch.randn(1, 7, 64, generator=g), torch.tensor([900.0])
    with torch.no_grad():
        want = model(x, t, ctx, y, torch.arange(-1, 2))
        got = merged(x, t, ctx, y, torch.arange(-1, 2))
        plain = base(x, t, ctx, y, torch.arange(-1, 2))
    assert rel_err(got, want) < 1e-5
    assert rel_err(plain, want) > 1e-3  # both adapters really change the output


# ----------------------------------------------------------------------------- render --preview

def _render(bundle, out, *extra):
    return CliRunner().invoke(main, ["render", STORY, "--models", str(bundle), "--out", str(out), "--no-progress",
                                     "--size", "96*64", "--frame-num", "9", *extra])


@pytest.mark.parametrize("variant", ["t2v-mi2v", "mr2v-mm2v"])
def test_preview_renders_every_mode_with_four_dit_calls_per_shot(variant, bundle, tmp_path):
    extra, modes = ["--mi2v"], ["t2v", "mi2v", "m2v"]
    if variant == "mr2v-mm2v":  # MR2V first shot (reference images as memory) + MM2V
        from PIL import Image

        imgs = []
        for i in range(2):
            p = tmp_path / f"ref{i}.png"
            Image.fromarray(np.full((64, 96, 3), 60 + 80 * i, np.uint8)).save(p)
            imgs.append(str(p))
        extra, modes = ["--mm2v", "--reference-images", *imgs], ["m2v", "mm2v", "m2v"]
    out = tmp_path / "out"
    r = _render(bundle, out, "--preview", *extra)
    assert r.exit_code == 0, r.output
    m = json.loads((out / "render.json").read_text())
    p = m["settings"]["preview"]
    assert p["step_list"] == [1000, 750, 500, 250] and p["boundary_step"] == 2 and p["guided"] == []
    assert all(len(e["sha256"]) == 64 for k in p["loras"].values() for e in k.values())
    assert [s["mode"] for s in m["shots"].values()] == modes
    assert all(s["steps"] == 4 and s["dit_forwards"] == 4 for s in m["shots"].values()), m["shots"]
    # a full render refuses the preview's folder (and the other way round), naming the difference
    r = _render(bundle, out, *extra)
    assert r.exit_code != 0 and "different settings" in r.output and "preview" in r.output, r.output


def test_preview_keeps_cfg_on_the_high_noise_expert_when_asked(bundle, tmp_path):
    out = tmp_path / "out"
    r = _render(bundle, out, "--preview", "--preview-cfg", "high")
    assert r.exit_code == 0, r.output
    m = json.loads((out / "render.json").read_text())
    assert all(s["dit_forwards"] == 6 for s in m["shots"].values())  # 2 guided high steps, 2 plain low ones


@pytest.mark.parametrize("extra,needle", [
    (["--distill-strength", "2"], "--distill-strength goes with --preview"),
    (["--preview", "--distill-strength", "nan"], "--distill-strength"),
    (["--preview", "--distill-steps", "1000,1000"], "--distill-steps"),
    (["--preview", "--distill-steps", "a,b"], "--distill-steps"),
    (["--preview", "--sample-steps", "8"], "--sample-steps"),
    (["--preview", "--distill-boundary-step", "5"], "--distill-boundary-step"),
    (["--preview", "--distill-lora-t2v", "/nonexistent/distill"], "does not exist"),
])
def test_preview_option_errors_are_one_line(extra, needle, bundle, tmp_path):
    out = tmp_path / "out"
    r = _render(bundle, out, *extra)
    assert r.exit_code in (1, 2) and needle in r.output and "Traceback" not in r.output, r.output
    assert not out.exists()
