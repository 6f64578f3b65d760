"""StoryMem LoRA: parsing, merging while streaming, agreement with the reference and with peft."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import peft
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from conftest import CodePayload, refused, rel_err, run_dit
from storymem_rt.checkpoint import build_on_meta, load_expert, load_module_streaming, read_torch_pth
from storymem_rt.lora import STORYMEM_TARGETS, LoraConfig, LoraWeights, load_lora, merge_lora_into_state

EXPERTS = [("high_noise_model", "high"), ("low_noise_model", "low")]


def lora_path(golden: Path, tag: str) -> Path:
    return golden / "tiny-storymem-lora" / f"backbone_{tag}_noise.pth"


def golden_lora_config(golden: Path, golden_manifest: dict, expert: str) -> LoraConfig:
    """r / alpha / rslora as the reference ran them: metadata of the golden output, which must
    agree with the manifest's lora_r (README: r = lora_alpha, use_rslora)."""
    with safe_open(golden / f"dit-m2v-lora-{expert}.safetensors", "pt") as f:
        meta = f.metadata()
    r = int(meta["lora_r"])
    assert r == golden_manifest["dit_config"]["lora_r"]
    return LoraConfig(r=r, alpha=float(meta["lora_alpha"]), rslora=meta["use_rslora"] == "true")


@pytest.fixture(scope="module")
def base_i2v(golden):
    return {e: load_expert(golden / "tiny-i2v" / e) for e, _ in EXPERTS}


# ----------------------------------------------------------------------------- golden

@pytest.mark.parametrize("expert,tag", EXPERTS)
def test_merged_lora_matches_reference(golden, golden_manifest, base_i2v, expert, tag):
    cfg = golden_lora_config(golden, golden_manifest, expert)
    lora = load_lora(lora_path(golden, tag), cfg)
    assert lora.config.r == next(iter(lora.pairs.values()))[0].shape[0]  # r agrees with shapes
    assert load_lora(lora_path(golden, tag)).config == cfg  # StoryMem default: alpha = r, rslora
    assert {k.split(".", 2)[2].rsplit(".", 1)[0] for k in lora.targets} == set(STORYMEM_TARGETS)

    model = load_expert(golden / "tiny-i2v" / expert, lora=lora)
    case = load_file(golden / f"dit-m2v-lora-{expert}.safetensors")
    err = rel_err(run_dit(model, case), case["out"])
    print(f"m2v-lora/{expert} rel_err {err:.2e}")
    assert err <= 1e-5

    # Only the LoRA targets' weights moved; biases and everything else are bit-identical.
    base = base_i2v[expert].state_dict()
    for k, v in model.state_dict().items():
        if k in lora.pairs:
            a, b = lora.pairs[k]
            assert torch.allclose(v, base[k] + cfg.scale * b @ a, atol=1e-6), k
        else:
            assert torch.equal(v, base[k]), k


def test_scale_rule():
    assert LoraConfig(r=8, alpha=16, rslora=False).scale == 2.0
    assert LoraConfig(r=8, alpha=16, rslora=True).scale == pytest.approx(16 / math.sqrt(8))
    assert LoraConfig().scale == pytest.approx(128 / math.sqrt(128))
    with pytest.raises(ValueError):
        LoraConfig(r=0)


# ----------------------------------------------------------------------------- key formats

def same_pairs(x: LoraWeights, y: LoraWeights) -> None:
    assert x.pairs.keys() == y.pairs.keys() and x.config == y.config
    for k in x.pairs:
        assert all(torch.equal(p, q) for p, q in zip(x.pairs[k], y.pairs[k])), k


def test_safetensors_variant_loads_the_same(golden, tmp_path):
    ref = load_lora(lora_path(golden, "high"))
    st = tmp_path / "backbone_high_noise.safetensors"
    save_file(read_torch_pth(lora_path(golden, "high")), st)
    same_pairs(load_lora(st), ref)


@pytest.mark.parametrize("rename", [
    lambda k: k.removeprefix("base_model.model."),
    lambda k: k.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight"),
    lambda k: k.removeprefix("base_model.model.").replace(".weight", ".default.weight"),
], ids=["no-prefix", "adapter-name", "both"])
def test_key_variants_accepted(golden, tmp_path, rename):
    raw = read_torch_pth(lora_path(golden, "low"))
    path = tmp_path / "renamed.pth"
    torch.save({rename(k): v for k, v in raw.items()}, path)
    same_pairs(load_lora(path), load_lora(lora_path(golden, "low")))


# ----------------------------------------------------------------------------- refusals

def edited_lora(golden: Path, tmp_path: Path, edit, tag: str = "high") -> Path:
    raw = dict(read_torch_pth(lora_path(golden, tag)))
    edit(raw)
    path = tmp_path / f"backbone_{tag}_noise.pth"
    torch.save(raw, path)
    return path


@pytest.mark.parametrize("module", ["blocks.{n}.self_attn.q", "blocks.0.self_attn.qkv"])
def test_unmatched_lora_key_is_refused(golden, tmp_path, module):
    n = json.loads((golden / "tiny-i2v" / "high_noise_model" / "config.json").read_text())["num_layers"]
    module = module.format(n=n)  # {n}: one block past the model's last

    def add(raw):
        a = raw["base_model.model.blocks.0.self_attn.q.lora_A.weight"]
        b = raw["base_model.model.blocks.0.self_attn.q.lora_B.weight"]
        raw[f"base_model.model.{module}.lora_A.weight"] = a.clone()
        raw[f"base_model.model.{module}.lora_B.weight"] = b.clone()

    path = edited_lora(golden, tmp_path, add)
    msg = refused("matches no weight of the model", load_expert, golden / "tiny-i2v" / "high_noise_model",
                  lora=load_lora(path))
    assert str(path) in msg and f"base_model.model.{module}.lora_A.weight" in msg


def test_lora_shape_mismatch_is_refused(golden, tmp_path):
    key = "base_model.model.blocks.1.ffn.2.lora_A.weight"
    path = edited_lora(golden, tmp_path, lambda raw: raw.__setitem__(key, raw[key][:, :-1].clone()))
    msg = refused("implies weight shape", load_expert, golden / "tiny-i2v" / "high_noise_model", lora=path)
    assert str(path) in msg and key in msg


def test_wrong_rank_is_refused(golden):
    path = lora_path(golden, "high")
    r = load_lora(path).config.r
    msg = refused(f"the LoRA has rank {r}", load_lora, path, LoraConfig(r=2 * r, alpha=2 * r))
    assert str(path) in msg and "lora_A.weight" in msg and f"--lora-rank {2 * r} was given" in msg
    # The file is fine, the option is not: no download hint (issue 15).
    assert f"pass --lora-rank {r}" in msg and "download" not in msg


def test_unpaired_and_foreign_keys_are_refused(golden, tmp_path):
    key = "base_model.model.blocks.0.ffn.0.lora_B.weight"
    path = edited_lora(golden, tmp_path, lambda raw: raw.pop(key))
    msg = refused("has no matching lora_B", load_lora, path)
    assert str(path) in msg and "blocks.0.ffn.0.lora_A.weight" in msg

    key = "base_model.model.blocks.0.self_attn.q.lora_magnitude_vector"
    path = edited_lora(golden, tmp_path, lambda raw: raw.__setitem__(key, torch.ones(4)), tag="low")
    msg = refused("is not a LoRA", load_lora, path)
    assert str(path) in msg and key in msg


def test_two_adapters_are_refused(golden, tmp_path):
    def add(raw):
        for k in list(raw):
            raw[k.replace(".weight", ".other.weight")] = raw.pop(k)
        raw["base_model.model.blocks.0.self_attn.k.lora_A.default.weight"] = torch.zeros(1, 1)
    path = edited_lora(golden, tmp_path, add)
    assert str(path) in refused("several adapters", load_lora, path)


def test_lora_pickle_with_code_is_refused(golden, tmp_path):
    marker = tmp_path / "pwned"
    path = edited_lora(golden, tmp_path, lambda raw: raw.__setitem__("evil", CodePayload(marker)))
    msg = refused("refused: file contains code/objects; only plain tensors are allowed", load_lora, path)
    assert str(path) in msg and "Kevin-thu/StoryMem" in msg
    assert not marker.exists()


# ----------------------------------------------------------------------------- peft

class _Block(nn.Module):
    """Wan block's LoRA-targeted linears, with Wan's names (self_attn.q, ffn.0, ...)."""

    def __init__(self, dim: int, ffn: int):
        super().__init__()
        self.self_attn = nn.ModuleDict({n: nn.Linear(dim, dim) for n in "qkvo"})
        self.cross_attn = nn.ModuleDict({n: nn.Linear(dim, dim) for n in "qkvo"})
        self.ffn = nn.Sequential(nn.Linear(dim, ffn), nn.GELU(approximate="tanh"), nn.Linear(ffn, dim))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        for attn in (self.self_attn, self.cross_attn):
            q, k, v = attn["q"](x), attn["k"](x), attn["v"](x)
            w = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
            x = x + attn["o"](w @ v)
        return x + self.ffn(self.norm(x))


class _Small(nn.Module):
    def __init__(self, dim: int = 24, ffn: int = 40, layers: int = 2):
        super().__init__()
        self.blocks = nn.ModuleList(_Block(dim, ffn) for _ in range(layers))

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


@pytest.mark.parametrize("rslora", [True, False])
def test_merge_matches_unmerged_peft(tmp_path, rslora):
    torch.manual_seed(1)
    r, alpha = 4, 12.0  # alpha != r so the scaling rule matters
    base = _Small()
    peft_model = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, lora_dropout=0.0,
                        target_modules=list(STORYMEM_TARGETS)),
    )
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(std=0.3)
    peft_model.eval()
    path = tmp_path / "adapter.pth"
    torch.save(peft.get_peft_model_state_dict(peft_model), path)

    lora = load_lora(path, LoraConfig(r=r, alpha=alpha, rslora=rslora))
    assert len(lora.pairs) == 2 * len(STORYMEM_TARGETS)

    # Merge while streaming into a meta-built module, as load_expert does.
    merged = build_on_meta(_Small)
    lora.reset_used()
    load_module_streaming(merged, base.state_dict().items(), source="base", transform=lora.merge)
    lora.assert_all_used()
    # ... and the functional form on a plain state dict.
    functional = _Small()
    functional.load_state_dict(merge_lora_into_state(base.state_dict(), lora))

    x = torch.randn(3, 7, 24)
    with torch.no_grad():
        want = peft_model(x)  # unmerged: base(x) + B(A(x)) * scaling
        assert rel_err(base(x), want) > 1e-2  # the adapter does something
        assert rel_err(merged(x), want) <= 1e-6
        assert rel_err(functional(x), want) <= 1e-6
    peft_weights = peft_model.merge_and_unload().state_dict()
    for k, v in merged.state_dict().items():
        assert torch.allclose(v, peft_weights[k], atol=1e-6), k
