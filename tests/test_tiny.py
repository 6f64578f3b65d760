"""The tiny model bundle: upstream layouts, deterministic, and loadable by every loader."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch

from conftest import cli
from storymem_rt.checkpoint import load_expert
from storymem_rt.lora import load_lora
from storymem_rt.text_encoder import TextEncoder
from storymem_rt.tiny import make_tiny_models
from storymem_rt.vae import WanVAE


def _digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_tiny_models(tmp_path_factory.mktemp("tiny") / "models")


def test_bundle_layout_matches_upstream(bundle, golden):
    """Same file names as the golden bundle assembled by the reference (upstream layout)."""
    want = sorted(str(p.relative_to(golden / "pipeline" / "bundle")) for p in (golden / "pipeline" / "bundle").rglob("*")
                  if p.is_file())
    have = sorted(str(p.relative_to(bundle)) for p in bundle.rglob("*") if p.is_file() and p.name != "storymem_tiny.json")
    assert have == want


def test_bundle_is_deterministic(bundle, tmp_path):
    again = make_tiny_models(tmp_path / "again")
    assert _digest(again) == _digest(bundle)


def test_every_checkpoint_loads(bundle):
    for name, kind in (("Wan2.2-T2V-A14B", "t2v"), ("Wan2.2-I2V-A14B", "i2v")):
        for expert, tag in (("high_noise_model", "high"), ("low_noise_model", "low")):
            lora = None
            if kind == "i2v":
                lora = load_lora(bundle / "StoryMem" / "Wan2.2-MI2V-A14B" / f"backbone_{tag}_noise.pth")
            m = load_expert(bundle / name / expert, lora=lora)
            assert m.config.model_type == kind
            in_dim = m.config.in_dim
            x = torch.randn(1, 16, 2, 4, 4)
            y = torch.randn(1, in_dim - 16, 2, 4, 4) if in_dim > 16 else None
            out = m(x, torch.tensor([500.0]), torch.randn(1, 5, m.config.text_dim), y=y)
            assert out.shape == (1, 16, 2, 4, 4) and torch.isfinite(out).all()
    te = TextEncoder.from_checkpoint(bundle / "Wan2.2-T2V-A14B", dtype=torch.float32)
    ctx = te.encode(["an old keeper walks to the lighthouse at dusk", "unknownword"])
    assert ctx[0].shape[0] == 10 and ctx[1].shape[0] == 2  # 9 words + </s>; <unk> + </s>
    assert len(set(te.tokenize(["the sea the sky"])[0][0, :4].tolist())) == 3
    vae = WanVAE.from_checkpoint(bundle / "Wan2.2-I2V-A14B" / "Wan2.1_VAE.pth")
    lat = vae.encode(torch.rand(1, 3, 5, 32, 48) * 2 - 1)
    assert lat.shape == (1, 16, 2, 4, 6) and torch.isfinite(lat).all()


def test_cli_make_tiny_models(tmp_path):
    r = cli("make-tiny-models", tmp_path / "m", catch_exceptions=True)
    assert r.exit_code == 0, r.output
    meta = json.loads((tmp_path / "m" / "storymem_tiny.json").read_text())
    assert meta["render_defaults"]["frame_num"] % 4 == 1
    r = cli("make-tiny-models", tmp_path / "m", catch_exceptions=True)
    assert r.exit_code == 2 and "--overwrite" in r.output
