"""The StoryMem LoRA as other tools save it (issue 16): ComfyUI / Kijai safetensors repacks
(`diffusion_model.<module>.lora_down/lora_up.weight` + `.alpha`, or `lora_A/lora_B`) and diffusers
module names merge into exactly the weights the `.pth` gives."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from storymem_rt.checkpoint import load_expert
from storymem_rt.errors import CheckpointError
from storymem_rt.lora import LoraConfig, load_lora
from storymem_rt.models import find_lora_file

DIFFUSERS_MODULE = {"self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
                    "self_attn.o": "attn1.to_out.0", "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k",
                    "cross_attn.v": "attn2.to_v", "cross_attn.o": "attn2.to_out.0", "ffn.0": "ffn.net.0.proj",
                    "ffn.2": "ffn.net.2"}


@pytest.fixture(scope="module")
def tiny(storymem_cache) -> Path:
    from storymem_rt.tiny import ensure_tiny_models

    return ensure_tiny_models()


@pytest.fixture(scope="module")
def pth_pairs(tiny) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module -> (A, B) of the tiny StoryMem LoRA (.pth, peft layout)."""
    raw = torch.load(tiny / "StoryMem" / "Wan2.2-MI2V-A14B" / "backbone_high_noise.pth", weights_only=True)
    mods = {k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in raw}
    return {m: (raw[f"base_model.model.{m}.lora_A.weight"], raw[f"base_model.model.{m}.lora_B.weight"]) for m in mods}


def _merged(tiny: Path, lora_file: Path) -> dict[str, torch.Tensor]:
    return load_expert(tiny / "Wan2.2-I2V-A14B" / "high_noise_model", lora=load_lora(lora_file)).state_dict()


def _kijai(pairs, alpha=None, names=("lora_down", "lora_up"), prefix="diffusion_model.", module=lambda m: m,
           dtype=torch.float32) -> dict[str, torch.Tensor]:
    out = {}
    for m, (a, b) in pairs.items():
        out[f"{prefix}{module(m)}.{names[0]}.weight"] = a.to(dtype).contiguous()
        out[f"{prefix}{module(m)}.{names[1]}.weight"] = b.to(dtype).contiguous()
        if alpha is not None:
            out[f"{prefix}{module(m)}.alpha"] = torch.tensor(float(alpha))
    return out


def _diffusers_name(m: str) -> str:
    block, rest = m.split(".", 2)[1], m.split(".", 2)[2]
    return f"blocks.{block}.{DIFFUSERS_MODULE[rest]}"


def test_repacks_merge_like_the_pth(tiny, pth_pairs, tmp_path):
    ref = _merged(tiny, tiny / "StoryMem" / "Wan2.2-MI2V-A14B" / "backbone_high_noise.pth")
    r = next(iter(pth_pairs.values()))[0].shape[0]
    files = {
        # Kijai naming with an alpha that gives StoryMem's rslora scale: alpha / r = sqrt(r)
        "kijai_alpha": _kijai(pth_pairs, alpha=r * math.sqrt(r)),
        "kijai_no_alpha": _kijai(pth_pairs),  # no alpha: StoryMem's convention, as for the .pth
        "comfy_lora_AB": _kijai(pth_pairs, names=("lora_A", "lora_B")),
        "diffusers_names": _kijai(pth_pairs, names=("lora_A", "lora_B"), prefix="transformer.", module=_diffusers_name),
    }
    for name, state in files.items():
        p = tmp_path / f"{name}.safetensors"
        save_file(state, str(p))
        got = _merged(tiny, p)
        assert got.keys() == ref.keys()
        assert all(torch.equal(got[k], ref[k]) for k in ref), name


def test_alpha_is_alpha_over_rank(tiny, pth_pairs, tmp_path):
    """ComfyUI's rule: W += alpha / r * up @ down; alpha = r is scale 1."""
    r = next(iter(pth_pairs.values()))[0].shape[0]
    p = tmp_path / "alpha_r.safetensors"
    save_file(_kijai(pth_pairs, alpha=r), str(p))
    lora = load_lora(p)
    m = "blocks.1.cross_attn.v"
    a, b = pth_pairs[m]
    w = torch.randn(b.shape[0], a.shape[1])
    assert torch.allclose(lora.merge(m + ".weight", w), w + b @ a, atol=1e-6)
    pth = load_lora(tiny / "StoryMem" / "Wan2.2-MI2V-A14B" / "backbone_high_noise.pth")
    assert torch.allclose(pth.merge(m + ".weight", w), w + math.sqrt(r) * (b @ a), atol=1e-5)
    # --lora-rank still checks the rank of a repack
    with pytest.raises(CheckpointError, match="--lora-rank 4 was given"):
        load_lora(p, LoraConfig(r=4, alpha=4.0))


@pytest.mark.parametrize("mutate,words", [
    (lambda s: {**s, "diffusion_model.blocks.0.ffn.0.diff": torch.zeros(3)}, ["blocks.0.ffn.0.diff", "not a LoRA"]),
    (lambda s: {**s, "diffusion_model.blocks.0.norm3.alpha": torch.tensor(8.0)}, ["norm3.alpha", "without"]),
    (lambda s: {k: v for k, v in s.items() if not k.endswith("blocks.0.self_attn.q.lora_up.weight")},
     ["blocks.0.self_attn.q.lora_down.weight", "no matching lora_B"]),
    (lambda s: {**s, "diffusion_model.blocks.0.self_attn.q.alpha": torch.ones(2)}, ["one number"]),
    (lambda s: {**s, "diffusion_model.blocks.9.self_attn.q.lora_down.weight": torch.zeros(8, 128),
                "diffusion_model.blocks.9.self_attn.q.lora_up.weight": torch.zeros(128, 8)},
     ["blocks.9.self_attn.q.lora_down.weight", "matches no weight"]),
], ids=["diff-key", "orphan-alpha", "half-pair", "alpha-not-scalar", "no-such-module"])
def test_bad_repacks(tiny, pth_pairs, tmp_path, mutate, words):
    p = tmp_path / "bad.safetensors"
    save_file(mutate(_kijai(pth_pairs, alpha=8.0)), str(p))
    with pytest.raises(CheckpointError) as e:
        load_expert(tiny / "Wan2.2-I2V-A14B" / "high_noise_model", lora=load_lora(p))
    msg = str(e.value)
    assert "\n" not in msg and str(p) in msg
    for w in words:
        assert w in msg, (w, msg)


def test_lora_folder_with_repack_file_names(pth_pairs, tmp_path):
    """A folder of ComfyUI-named files (one *high* and one *low* safetensors) is found as the LoRA."""
    d = tmp_path / "loras"
    d.mkdir()
    for tag in ("HIGH", "LOW"):
        save_file(_kijai(pth_pairs), str(d / f"Wan2_2-StoryMem-MI2V-A14B_{tag}_lora_rank8_fp32.safetensors"))
    assert find_lora_file(d, "high").name.endswith("_HIGH_lora_rank8_fp32.safetensors")
    assert find_lora_file(d, "low").name.endswith("_LOW_lora_rank8_fp32.safetensors")
    (d / "flow_matching_notes.safetensors").write_bytes(b"")  # "low" inside a word is not the low expert
    assert find_lora_file(d, "low").name.endswith("_LOW_lora_rank8_fp32.safetensors")
    (d / "another_high_noise.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="several"):
        find_lora_file(d, "high")
