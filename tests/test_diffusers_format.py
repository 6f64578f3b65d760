"""diffusers-format model folders (issue 16): the key map, our forward = diffusers' forward, the
StoryMem LoRA merged the same way, T5/VAE equal to the upstream files, and the demo story
rendered from a diffusers-layout tiny bundle equal to the same weights in the upstream layout.

The diffusers bundle is written by `tiny.make_tiny_diffusers_models`: diffusers' own
`WanTransformer3DModel.save_pretrained` (keys converted by diffusers' own
`convert_wan_transformer_to_diffusers`, not by our map), `AutoencoderKLWan.save_pretrained`,
transformers' `UMT5EncoderModel` and tokenizer `save_pretrained`.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from safetensors.torch import load_file

from conftest import REPO, rel_err
from storymem_rt import diffusers_format as dfmt
from storymem_rt.checkpoint import load_expert, rename_key
from storymem_rt.cli import main
from storymem_rt.configs import DIT_PRESETS
from storymem_rt.dit import WanDiT
from storymem_rt.errors import CheckpointError
from storymem_rt.lora import load_lora
from storymem_rt.media import read_video
from storymem_rt.models import ModelPaths, ModelSet, expert_dir


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, storymem_cache) -> tuple[Path, Path]:
    """(upstream tiny bundle, the same weights in diffusers' layout, written by the CLI)."""
    from storymem_rt.tiny import ensure_tiny_models

    d = tmp_path_factory.mktemp("diffusers") / "tiny-diffusers"
    r = CliRunner().invoke(main, ["make-tiny-models", str(d), "--layout", "diffusers"], catch_exceptions=False)
    assert r.exit_code == 0 and "diffusers layout" in r.output, r.output
    assert json.loads((d / "storymem_tiny.json").read_text())["layout"] == "diffusers"
    return ensure_tiny_models(), d


def _diffusers_model(cfg):
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        return WanTransformer3DModel(patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads,
                                     attention_head_dim=cfg.head_dim, in_channels=cfg.in_dim,
                                     out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
                                     ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers)


@pytest.mark.parametrize("preset", ["tiny-t2v", "tiny-i2v"])
def test_key_map_is_one_to_one(preset):
    """Every diffusers key maps to a distinct WanDiT key of the same shape, every WanDiT key is
    filled, and every row of the table is used."""
    cfg = DIT_PRESETS[preset]
    src = _diffusers_model(cfg).state_dict()
    with torch.device("meta"):
        dst = WanDiT(cfg).state_dict()
    mapped = {k: rename_key(k, dfmt.DIT_KEY_MAP) for k in src}
    assert sorted(mapped.values()) == sorted(dst)  # onto, and no two sources on one target
    assert all(tuple(src[k].shape) == tuple(dst[v].shape) for k, v in mapped.items())
    used = {i for k in src for i, (pat, _) in enumerate(dfmt.DIT_KEY_MAP) if re.search(pat, k)}
    assert used == set(range(len(dfmt.DIT_KEY_MAP)))


def test_folder_detection(bundles):
    up, dif = bundles
    i2v = dif / "Wan2.2-I2V-A14B-Diffusers"
    assert dfmt.is_diffusers_folder(i2v) and not dfmt.is_diffusers_folder(up / "Wan2.2-I2V-A14B")
    paths = ModelPaths.from_models_dir(dif)
    assert paths.i2v == i2v and paths.t2v == dif / "Wan2.2-T2V-A14B-Diffusers"
    assert expert_dir(i2v, "high") == i2v / "transformer" and expert_dir(i2v, "low") == i2v / "transformer_2"
    assert expert_dir(up / "Wan2.2-I2V-A14B", "low") == up / "Wan2.2-I2V-A14B" / "low_noise_model"
    paths.check(True, True)
    # The high-noise expert is sharded, as the real download is.
    assert len(list((i2v / "transformer").glob("diffusion_pytorch_model-*.safetensors"))) > 1


@pytest.mark.parametrize("kind,sub", [("T2V", "transformer"), ("I2V", "transformer_2")])
def test_forward_equals_diffusers(bundles, kind, sub):
    from diffusers import WanTransformer3DModel

    _, dif = bundles
    folder = dif / f"Wan2.2-{kind}-A14B-Diffusers" / sub
    ours = load_expert(folder)
    ref = WanTransformer3DModel.from_pretrained(str(folder)).eval()
    c = ours.config
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, 3, 8, 12, generator=g)
    y = torch.randn(1, c.in_dim - 16, 3, 8, 12, generator=g) if c.in_dim > 16 else None
    ctx = torch.randn(1, 9, c.text_dim, generator=g)
    t = torch.tensor([730.0])
    with torch.no_grad():
        a = ours(x, t, ctx, y)
        # diffusers' pipeline pads the prompt to 512 rows of zeros before the transformer, as Wan does.
        b = ref(hidden_states=x if y is None else torch.cat([x, y], 1), timestep=t,
                encoder_hidden_states=F.pad(ctx, (0, 0, 0, c.text_len - ctx.shape[1])), return_dict=False)[0]
    # diffusers embeds the timestep in float32, Wan (and we) in float64: ~3e-6 apart.
    assert rel_err(a, b) < 2e-5


def test_weights_and_lora_merge_equal_upstream(bundles):
    """The same expert from either layout has identical weights, with or without the StoryMem LoRA."""
    up, dif = bundles
    lora_file = up / "StoryMem" / "Wan2.2-MI2V-A14B" / "backbone_high_noise.pth"
    a = load_expert(dif / "Wan2.2-I2V-A14B-Diffusers" / "transformer", lora=load_lora(lora_file)).state_dict()
    b = load_expert(up / "Wan2.2-I2V-A14B" / "high_noise_model", lora=load_lora(lora_file)).state_dict()
    plain = load_expert(dif / "Wan2.2-I2V-A14B-Diffusers" / "transformer").state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["blocks.0.self_attn.q.weight"], plain["blocks.0.self_attn.q.weight"])  # merged


def test_text_encoder_and_vae_equal_upstream(bundles):
    up, dif = bundles
    a = ModelSet(ModelPaths.from_models_dir(dif))
    b = ModelSet(ModelPaths.from_models_dir(up))
    prompts = ["a red boat on the sea at dawn", "the old keeper climbs the stairs"]
    for x, y in zip(a.text_encoder.encode(prompts), b.text_encoder.encode(prompts)):
        assert torch.equal(x, y)
    video = torch.rand(1, 3, 5, 32, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    la, lb = a.vae.encode(video), b.vae.encode(video)
    assert torch.equal(la, lb) and torch.equal(a.vae.decode(la), b.vae.decode(lb))
    assert a.vae.config == b.vae.config


def test_demo_story_renders_equal_in_both_layouts(bundles, tmp_path):
    up, dif = bundles
    args = ["--mi2v", "--size", "48*32", "--sample-steps", "2", "--frame-num", "5", "--no-quality-filter",
            "--no-progress"]
    outs = {}
    for name, models in (("upstream", up), ("diffusers", dif)):
        outs[name] = tmp_path / name
        r = CliRunner().invoke(main, ["render", str(REPO / "story" / "harbor_morning.json"), "--models", str(models),
                                      "--out", str(outs[name]), *args], catch_exceptions=False)
        assert r.exit_code == 0, r.output
    ma, mb = (json.loads((outs[n] / "render.json").read_text()) for n in ("upstream", "diffusers"))
    assert [s["mode"] for s in ma["plan"]] == ["t2v", "mi2v", "m2v"]
    for sid in ma["shots"]:
        assert {k: v for k, v in ma["shots"][sid].items() if k != "timings"} == \
               {k: v for k, v in mb["shots"][sid].items() if k != "timings"}
    final = ma["final"]["video"]
    va, vb = read_video(outs["upstream"] / final).float(), read_video(outs["diffusers"] / final).float()
    assert va.shape == vb.shape and (va - vb).abs().max() <= 1  # uint8 frames: at most a rounding apart
    sa, sb = load_file(outs["upstream"] / "state" / "memory.safetensors"), \
        load_file(outs["diffusers"] / "state" / "memory.safetensors")
    assert sa.keys() == sb.keys()
    for k in sa:
        if k.startswith("latent."):
            assert rel_err(sb[k], sa[k]) < 1e-5, k


def test_broken_diffusers_folders(bundles, tmp_path):
    """A missing piece is refused before any weight is read, naming the folder."""
    _, dif = bundles
    cases = {"transformer_2/config.json": "transformer_2", "text_encoder/model.safetensors": "text_encoder",
             "tokenizer/tokenizer.json": "tokenizer", "vae/config.json": "vae"}
    for rel, word in cases.items():
        d = tmp_path / rel.replace("/", "_")
        shutil.copytree(dif / "Wan2.2-T2V-A14B-Diffusers", d)
        (d / rel).unlink()
        with pytest.raises(CheckpointError, match=word):
            ModelPaths(t2v=d, i2v=None, lora=None).check(True, False)
    d = tmp_path / "no_text_encoder"
    shutil.copytree(dif / "Wan2.2-T2V-A14B-Diffusers", d)
    shutil.rmtree(d / "text_encoder")
    with pytest.raises(CheckpointError, match="text_encoder/ is missing"):
        ModelPaths(t2v=d, i2v=None, lora=None).check(True, False)
    # A transformer config that is not Wan2.2 A14B's (a CLIP image branch: Wan2.1 I2V).
    d = tmp_path / "wan21"
    shutil.copytree(dif / "Wan2.2-I2V-A14B-Diffusers" / "transformer_2", d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "image_dim": 1280}))
    with pytest.raises(CheckpointError, match="image branch"):
        load_expert(d)


def test_render_refuses_a_broken_diffusers_bundle(bundles, tmp_path):
    """One line naming what is missing, exit 1, nothing written (the bundle untouched)."""
    _, dif = bundles
    d = tmp_path / "bundle"
    shutil.copytree(dif, d)
    shutil.rmtree(d / "Wan2.2-I2V-A14B-Diffusers" / "transformer_2")
    before = sorted(str(p.relative_to(d)) for p in d.rglob("*"))
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["render", str(REPO / "story" / "harbor_morning.json"), "--models", str(d),
                                  "--out", str(out), "--no-progress"])
    assert r.exit_code == 1, r.output
    errors = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(errors) == 1 and errors[0].startswith("Error: ") and "transformer_2" in errors[0], r.stderr
    assert not out.exists() and sorted(str(p.relative_to(d)) for p in d.rglob("*")) == before
