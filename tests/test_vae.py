"""Wan2.1 VAE against the reference's golden tensors (tiny random VAE, CPU float32)."""
from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import CodePayload, rel_err
from storymem_rt.configs import VAEConfig
from storymem_rt.errors import CheckpointError
from storymem_rt.vae import (
    VAE_FILENAME,
    WanVAE,
    build_diffusers_vae,
    infer_vae_config,
    wan_to_diffusers_key,
    wan_vae_state_shapes,
)

TOL = 1e-5


@pytest.fixture(scope="module")
def tensors(golden) -> dict[str, torch.Tensor]:
    return load_file(str(golden / "vae.safetensors"))


@pytest.fixture(scope="module")
def tiny_pth(golden) -> pathlib.Path:
    return golden / "tiny-vae" / VAE_FILENAME


@pytest.fixture(scope="module")
def vae(tiny_pth) -> WanVAE:
    return WanVAE.from_checkpoint(tiny_pth, "cpu", torch.float32)


@pytest.fixture(scope="module")
def golden_vae(vae, tensors) -> WanVAE:
    """The loaded network with the normalisation constants the golden run used, so the network
    math is tested apart from the constants (which `test_latent_constants` pins down)."""
    cfg = dataclasses.replace(vae.config, latent_mean=tuple(tensors["latent_mean"].tolist()),
                              latent_std=tuple(tensors["latent_std"].tolist()))
    return WanVAE(vae.model, cfg)


@pytest.fixture(scope="module")
def video_latent(golden_vae, tensors) -> torch.Tensor:
    return golden_vae.encode(tensors["video"])


@pytest.fixture(scope="module")
def video_decoded(golden_vae, tensors) -> torch.Tensor:
    return golden_vae.decode(tensors["video_latent"])


# ----------------------------------------------------------------------------- layout
def test_state_shapes_match_golden_file(tiny_pth, golden):
    sd = torch.load(tiny_pth, map_location="cpu", weights_only=True, mmap=True)
    cfg = VAEConfig.from_json(golden / "tiny-vae" / "config.json")
    shapes = wan_vae_state_shapes(cfg)
    assert shapes == {k: tuple(v.shape) for k, v in sd.items()}
    assert list(shapes) == list(sd)  # upstream order too


def test_infer_config_matches_json(tiny_pth, golden):
    sd = torch.load(tiny_pth, map_location="cpu", weights_only=True, mmap=True)
    want = VAEConfig.from_json(golden / "tiny-vae" / "config.json")
    got = infer_vae_config(sd, tiny_pth)
    for f in ("dim", "z_dim", "dim_mult", "num_res_blocks", "attn_scales", "temperal_downsample"):
        assert getattr(got, f) == getattr(want, f), f
    assert got.stride == (4, 8, 8)


@pytest.mark.parametrize("name", ["tiny", "a14b"])
def test_key_map_uses_every_source_and_fills_every_target(golden, name):
    cfg = VAEConfig.from_json(golden / "tiny-vae" / "config.json") if name == "tiny" else VAEConfig()
    src = wan_vae_state_shapes(cfg)
    target = {k: tuple(v.shape) for k, v in build_diffusers_vae(cfg).state_dict().items()}
    mapped = {wan_to_diffusers_key(k, cfg): s for k, s in src.items()}
    assert len(mapped) == len(src)  # injective
    assert mapped == target


def test_a14b_layout_is_diffusers_default():
    # diffusers' AutoencoderKLWan defaults are the released Wan2.1 VAE: 126.9M parameters.
    n = sum(torch.Size(s).numel() for s in wan_vae_state_shapes(VAEConfig()).values())
    assert n == sum(p.numel() for p in build_diffusers_vae(VAEConfig()).parameters())


def test_latent_constants(vae, tensors):
    """The 16 mean/std constants of vae2_1.py `Wan2_1_VAE` (configs.VAE_LATENT_MEAN/STD)."""
    for name in ("latent_mean", "latent_std"):
        torch.testing.assert_close(
            torch.tensor(getattr(vae.config, name)), tensors[name], rtol=0, atol=1e-6,
            msg=lambda m, name=name: f"configs.VAE_{name.upper()} differs from vae2_1.py: {m}")


# ----------------------------------------------------------------------------- golden math
def test_encode_video(video_latent, tensors):
    assert video_latent.shape == tensors["video_latent"].shape
    assert video_latent.dtype == torch.float32
    assert rel_err(video_latent, tensors["video_latent"]) <= TOL


def test_decode_video(video_decoded, tensors):
    ref = tensors["video_decoded"]
    assert video_decoded.shape == ref.shape
    assert video_decoded.abs().max() <= 1.0
    assert rel_err(video_decoded, ref) <= TOL
    free = ref.abs() < 1.0  # saturated pixels match trivially: check the rest on its own
    assert free.float().mean() > 0.25
    assert rel_err(video_decoded[free], ref[free]) <= TOL


def test_encode_decode_image(golden_vae, tensors):
    lat = golden_vae.encode(tensors["image"])
    assert lat.shape == tensors["image_latent"].shape
    assert rel_err(lat, tensors["image_latent"]) <= TOL
    dec = golden_vae.decode(tensors["image_latent"])
    ref = tensors["image_decoded"]
    assert dec.shape == ref.shape
    assert rel_err(dec, ref) <= TOL
    free = ref.abs() < 1.0
    assert rel_err(dec[free], ref[free]) <= TOL


def test_encode_images_batch_equals_single(golden_vae, tensors):
    a = tensors["image"][:, :, 0]  # [1, 3, H, W]
    b = tensors["video"][:, :, 0]
    both = golden_vae.encode_images(torch.cat([a, b]))
    z, h, w = tensors["image_latent"].shape[1], *tensors["image_latent"].shape[3:]
    assert both.shape == (z, 2, h, w)
    single = torch.stack([golden_vae.encode_images(a)[:, 0], golden_vae.encode_images(b)[:, 0]], dim=1)
    assert rel_err(both, single) <= TOL  # batch 2 vs 1 may pick another conv algorithm: ~1e-6
    assert rel_err(both[:, 0], tensors["image_latent"][0, :, 0]) <= TOL
    # the encoder is causal: a video's first latent frame is its first frame encoded alone
    assert rel_err(both[:, 1], tensors["video_latent"][0, :, 0]) <= TOL


def test_bundle_copy_with_vae_config(golden, golden_vae, tensors):
    folder = golden / "pipeline" / "bundle" / "Wan2.2-T2V-A14B"
    bundle = WanVAE.from_checkpoint(folder, "cpu", torch.float32)
    want = VAEConfig.from_json(folder / "vae_config.json")
    assert (bundle.config.dim, bundle.config.dim_mult, bundle.config.temperal_downsample) == (
        want.dim, want.dim_mult, want.temperal_downsample)
    assert bundle.stride == (4, 8, 8)
    b = WanVAE(bundle.model, golden_vae.config)
    assert rel_err(b.encode(tensors["image"]), tensors["image_latent"]) <= TOL


def test_input_checks(golden_vae, tensors):
    v = tensors["video"]
    with pytest.raises(ValueError, match="4n\\+1"):
        golden_vae.encode(v[:, :, :8])
    with pytest.raises(ValueError, match="multiples of 8"):
        golden_vae.encode(v[:, :, :1, :30])
    with pytest.raises(ValueError, match=r"\[B, 3, F, H, W\]"):
        golden_vae.encode(v[0])
    with pytest.raises(ValueError, match="latent must be"):
        golden_vae.decode(tensors["video_latent"][:, :8])
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        golden_vae.encode_images(v)


# ----------------------------------------------------------------------------- errors
def _hint_ok(msg: str) -> bool:
    return "huggingface-cli download Wan-AI/Wan2.2-I2V-A14B" in msg


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="missing") as e:
        WanVAE.from_checkpoint(tmp_path / VAE_FILENAME)
    assert VAE_FILENAME in str(e.value) and _hint_ok(str(e.value))
    with pytest.raises(CheckpointError, match="missing"):
        WanVAE.from_checkpoint(tmp_path)  # a folder without the file


def test_truncated_file(tmp_path, tiny_pth):
    data = tiny_pth.read_bytes()
    bad = tmp_path / VAE_FILENAME
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as e:
        WanVAE.from_checkpoint(bad)
    assert str(bad) in str(e.value) and _hint_ok(str(e.value))


def test_pickle_with_code_is_refused(tmp_path):
    marker = tmp_path / "ran"
    bad = tmp_path / VAE_FILENAME
    torch.save({"encoder.conv1.weight": torch.zeros(1), "x": CodePayload(marker)}, bad)
    with pytest.raises(CheckpointError, match="refused"):
        WanVAE.from_checkpoint(bad)
    assert not marker.exists()


def test_not_a_state_dict(tmp_path):
    bad = tmp_path / VAE_FILENAME
    torch.save([torch.zeros(3)], bad)
    with pytest.raises(CheckpointError, match="state dict"):
        WanVAE.from_checkpoint(bad)


def test_missing_and_misshapen_keys(tmp_path, tiny_pth):
    sd = dict(torch.load(tiny_pth, map_location="cpu", weights_only=True))
    del sd["decoder.head.2.bias"]
    sd["decoder.conv1.bias"] = torch.zeros(7)
    bad = tmp_path / VAE_FILENAME
    torch.save(sd, bad)
    with pytest.raises(CheckpointError) as e:
        WanVAE.from_checkpoint(bad)
    assert "missing decoder.head.2.bias" in str(e.value)
    assert "decoder.conv1.bias has shape (7,)" in str(e.value)


def test_sidecar_config_mismatch(tmp_path, tiny_pth, golden):
    shutil.copy(tiny_pth, tmp_path / VAE_FILENAME)
    raw = json.loads((golden / "tiny-vae" / "config.json").read_text())
    raw["dim"] = raw["dim"] * 2
    (tmp_path / "vae_config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="do not belong together"):
        WanVAE.from_checkpoint(tmp_path)
    # an unrelated config.json (no VAE keys) beside the file is ignored
    (tmp_path / "vae_config.json").unlink()
    (tmp_path / "config.json").write_text(json.dumps({"framework": "Pytorch"}))
    assert WanVAE.from_checkpoint(tmp_path).config.dim == raw["dim"] // 2
