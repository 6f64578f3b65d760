"""Video and image files: round trips, atomic writes, concatenation, clear errors."""
from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image

from storymem_rt import media
from storymem_rt.errors import StoryMemError
from storymem_rt.media import (
    TEMP_MARKER, atomic_path, atomic_write_bytes, concat_videos, float_to_uint8_round,
    float_to_uint8_truncate, load_image, probe_video, read_video, remove_stale_temp_files, save_image,
    video_to_uint8, write_video,
)

FR, H, W = 17, 96, 160


def _smooth_video(frames: int = FR, phase: float = 0.0) -> torch.Tensor:
    """`[3, F, H, W]` float in [-1, 1]: smooth moving gradients (what a decoder produces, roughly)."""
    t = torch.linspace(0, 1, frames).view(frames, 1, 1) + phase
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, H), torch.linspace(-1, 1, W), indexing="ij")
    return torch.stack([torch.sin(3 * xx + 6 * t), torch.cos(2 * yy - 4 * t), torch.sin(4 * xx * yy + t)]) * 0.8


def _no_temp_files(folder) -> bool:
    return not [p for p in folder.iterdir() if TEMP_MARKER in p.name]


# --------------------------------------------------------------------------- conversion

def test_float_conversion_matches_wan_save_video_and_torchvision_save_image():
    tvu = pytest.importorskip("torchvision.utils")
    v = torch.rand(3, 4, 8, 10) * 2.4 - 1.2  # beyond [-1, 1] on purpose: clamped
    # Wan2.2 save_video: clamp, make_grid(normalize, value_range=(-1, 1)) per frame, *255, cast.
    ref = torch.stack([tvu.make_grid(u, nrow=8, normalize=True, value_range=(-1, 1))
                       for u in v.clamp(-1, 1)[None].unbind(2)], dim=1).permute(1, 2, 3, 0)
    ref = (ref * 255).type(torch.uint8)
    assert torch.equal(torch.from_numpy(video_to_uint8(v)), ref)
    assert torch.equal(float_to_uint8_truncate(v).permute(1, 2, 3, 0), ref)
    # torchvision save_image rounds: mul(255).add_(0.5).clamp_(0, 255)
    img = v[:, 0]
    grid = tvu.make_grid(img.clamp(-1, 1)[None], normalize=True, value_range=(-1, 1))
    assert torch.equal(float_to_uint8_round(img), grid.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8))


# --------------------------------------------------------------------------- video

def test_write_read_round_trip(tmp_path):
    v = _smooth_video()
    out = write_video(tmp_path / "shot.mp4", v, fps=16)
    info = probe_video(out)
    assert (info.num_frames, info.fps, info.width, info.height) == (FR, Fraction(16), W, H)
    back = read_video(out)
    assert back.shape == (FR, H, W, 3) and back.dtype == torch.uint8
    err = (back.float() - torch.from_numpy(video_to_uint8(v)).float()).abs()
    assert err.mean() < 3.0, err.mean()  # lossy H.264 (crf 10) + yuv420p chroma subsampling
    # uint8 [F, H, W, 3] input too
    write_video(tmp_path / "u8.mp4", back, fps=8)
    assert probe_video(tmp_path / "u8.mp4").fps == 8
    assert _no_temp_files(tmp_path)


def test_write_video_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="even"):
        write_video(tmp_path / "odd.mp4", torch.zeros(3, 2, 33, 64))
    with pytest.raises(ValueError, match=r"\[3, F, H, W\]"):
        write_video(tmp_path / "bad.mp4", torch.zeros(2, 3, 32, 64))
    assert not list(tmp_path.iterdir())


def test_failed_write_leaves_no_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    path = tmp_path / "shot.mp4"
    calls = {"n": 0}
    real = media._to_video_frame

    def flaky(rgb):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("simulated crash mid-write")
        return real(rgb)

    monkeypatch.setattr(media, "_to_video_frame", flaky)
    with pytest.raises(RuntimeError, match="simulated"):
        write_video(path, _smooth_video())
    assert not path.exists() and _no_temp_files(tmp_path)

    monkeypatch.setattr(media, "_to_video_frame", real)
    write_video(path, _smooth_video(5))
    before = path.read_bytes()
    calls["n"] = 0
    monkeypatch.setattr(media, "_to_video_frame", flaky)
    with pytest.raises(RuntimeError):
        write_video(path, _smooth_video())
    assert path.read_bytes() == before and _no_temp_files(tmp_path)


def test_atomic_helpers(tmp_path):
    p = atomic_write_bytes(tmp_path / "sub" / "a.json", b"{}")
    assert p.read_bytes() == b"{}" and _no_temp_files(p.parent)
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(tmp_path / "b.bin") as tmp:
            assert tmp.parent == tmp_path and tmp.suffix == ".bin" and TEMP_MARKER in tmp.name
            tmp.write_bytes(b"half")
            raise KeyboardInterrupt
    assert not (tmp_path / "b.bin").exists() and _no_temp_files(tmp_path)
    # what a SIGKILL leaves behind is recognisable and removable
    stale = tmp_path / f".c{TEMP_MARKER}123-abcd.mp4"
    stale.write_bytes(b"x")
    assert remove_stale_temp_files(tmp_path) == [stale] and not stale.exists()


def test_concat_remux_is_lossless_and_in_order(tmp_path):
    a = write_video(tmp_path / "a.mp4", _smooth_video(FR))
    b = write_video(tmp_path / "b.mp4", _smooth_video(9, phase=0.5))
    out = concat_videos([a, b, a], tmp_path / "story.mp4", fps=16, mode="remux")
    ra, rb = read_video(a), read_video(b)
    got = read_video(out)
    assert got.shape[0] == 2 * FR + 9 == probe_video(out).num_frames
    assert torch.equal(got, torch.cat([ra, rb, ra]))  # packets copied: frames bit-identical
    assert probe_video(out).fps == 16 and _no_temp_files(tmp_path)


def test_concat_reencode_and_auto_fallback(tmp_path):
    a = write_video(tmp_path / "a.mp4", _smooth_video(FR))
    b = write_video(tmp_path / "b.mp4", _smooth_video(9, phase=0.5), fps=8)  # other fps: no remux
    with pytest.raises(ValueError, match="reencode"):
        concat_videos([a, b], tmp_path / "x.mp4", fps=16, mode="remux")
    out = concat_videos([a, b], tmp_path / "story.mp4", fps=16)  # auto -> re-encode
    got = read_video(out)
    ref = torch.cat([read_video(a), read_video(b)])
    assert got.shape == ref.shape and probe_video(out).fps == 16
    assert (got.float() - ref.float()).abs().mean() < 3.0
    small = write_video(tmp_path / "small.mp4", torch.zeros(3, 2, 32, 32))
    with pytest.raises(ValueError, match="different sizes"):
        concat_videos([a, small], tmp_path / "y.mp4")
    assert not (tmp_path / "x.mp4").exists() and not (tmp_path / "y.mp4").exists()


def test_read_video_errors_name_the_file(tmp_path):
    with pytest.raises(StoryMemError, match="nope.mp4"):
        read_video(tmp_path / "nope.mp4")
    (tmp_path / "junk.mp4").write_bytes(b"not a video at all")
    with pytest.raises(StoryMemError, match="junk.mp4"):
        read_video(tmp_path / "junk.mp4")


# --------------------------------------------------------------------------- images

def test_image_round_trip_and_errors(tmp_path):
    img = torch.rand(3, 20, 30) * 2 - 1
    p = save_image(tmp_path / "k.png", img)
    assert Image.open(p).format == "PNG" and _no_temp_files(tmp_path)
    back = load_image(p)
    assert back.shape == (3, 20, 30) and back.dtype == torch.float32
    # PNG is lossless: back equals the rounded uint8 image mapped as to_tensor().sub(0.5).div(0.5)
    u8 = float_to_uint8_round(img)
    assert torch.equal(back, u8.float().div(255).sub(0.5).div(0.5))
    assert (back - img).abs().max() <= 1 / 255 + 1e-6
    hwc = (torch.rand(20, 30, 3) * 255).to(torch.uint8)
    assert torch.equal(torch.from_numpy(np.array(Image.open(save_image(tmp_path / "u.png", hwc)))), hwc)

    (tmp_path / "notes.png").write_text("this is not an image")
    with pytest.raises(StoryMemError, match="notes.png"):
        load_image(tmp_path / "notes.png")
    with pytest.raises(StoryMemError, match="missing.png"):
        load_image(tmp_path / "missing.png")
    full = tmp_path / "trunc.png"
    save_image(full, (torch.rand(64, 64, 3) * 255).to(torch.uint8))
    full.write_bytes(full.read_bytes()[:200])
    with pytest.raises(StoryMemError, match="trunc.png"):
        load_image(full)
