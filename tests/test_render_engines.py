"""`render --engines`: the artifacts of `build-engines` feed the renderer, and stale ones are refused."""
from __future__ import annotations


import pytest
import torch

from conftest import cli
from storymem_rt.media import read_video

REPO_STORY = "story/harbor_morning.json"
SMALL = ["--size", "96*64", "--frame-num", "9", "--max-memory-size", "4"]


@pytest.fixture(scope="module")
def engines(bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("eng") / "engines"
    r = cli("build-engines", "--models", bundle, "--precision", "fp32", "--backend", "onnx", "--out", out, *SMALL,
            catch_exceptions=True)
    assert r.exit_code == 0, r.output
    return out


def _render(bundle, out, extra=()):
    from storymem_rt.configs import DiTConfig  # noqa: F401  (import torch-heavy modules once)

    return cli("render", REPO_STORY, "--models", bundle, "--mi2v", "--sample-steps", "2", "--no-progress",
               "--out", out, *SMALL, *extra, catch_exceptions=True)


def test_render_with_engines_equals_render_without(bundle, engines, tmp_path, monkeypatch):
    monkeypatch.chdir(__import__("pathlib").Path(__file__).resolve().parents[1])
    a = _render(bundle, tmp_path / "a", ["--engines", str(engines)])
    assert a.exit_code == 0, a.output
    b = _render(bundle, tmp_path / "b")
    assert b.exit_code == 0, b.output
    fa, fb = read_video(tmp_path / "a" / "Harbor_Morning.mp4"), read_video(tmp_path / "b" / "Harbor_Morning.mp4")
    assert torch.equal(fa, fb)


def test_stale_engine_refused_before_anything_is_written(bundle, engines, tmp_path, monkeypatch):
    monkeypatch.chdir(__import__("pathlib").Path(__file__).resolve().parents[1])
    lora = bundle / "StoryMem" / "Wan2.2-MI2V-A14B" / "backbone_high_noise.pth"
    saved = lora.read_bytes()
    try:
        sd = torch.load(lora, weights_only=True)
        k = next(k for k in sd if "lora_B" in k)
        sd[k] = sd[k] * 2
        torch.save(sd, lora)
        r = _render(bundle, tmp_path / "stale", ["--engines", str(engines)])
        assert r.exit_code == 1, r.output
        msg = r.output.strip().splitlines()[-1]
        assert "stale" in msg and "backbone_high_noise" in msg and "storymem-rt build-engines" in msg, msg
        assert not (tmp_path / "stale").exists()
    finally:
        lora.write_bytes(saved)


def test_engine_options_need_engines(bundle, tmp_path):
    r = _render(bundle, tmp_path / "x", ["--precision", "fp8"])
    assert r.exit_code == 2 and "--engines" in r.output
    r = _render(bundle, tmp_path / "y", ["--engines", str(tmp_path / "nothing")])
    assert r.exit_code == 2 and "manifest.json" in r.output
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
