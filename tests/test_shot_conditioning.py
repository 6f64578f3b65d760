"""The conditioning of one shot: the mask, y = [mask; memory latents; condition latent], the
noise and positions the experts receive, and what the story loop feeds an MI2V shot.

Expectations are computed here by hand, not with the functions under test: the mask entry by
entry from the reference's construction, condition latents by encoding pixel clips built
here with the tiny bundle's VAE. The experts are wrapped with recorders, so the test sees
exactly the tensors a DiT forward receives.
"""
from __future__ import annotations

import json

import pytest
import torch

from storymem_rt.configs import SamplingConfig
from storymem_rt.keyframes import SelectionResult
from storymem_rt.models import ModelPaths, ModelSet
from storymem_rt.script import PlanSettings, parse_story
from storymem_rt.shot import ShotSpec, build_mask, generate_shot
from storymem_rt.story import RenderSettings, StoryRenderer

W, H = 48, 32  # latent 6 x 4
LAT_H, LAT_W = H // 8, W // 8


# --------------------------------------------------------------------------- the mask, by hand


def hand_mask(memory: int, frame_num: int, known: int, lat_h: int = 2, lat_w: int = 3) -> torch.Tensor:
    """[4, M + T, h, w] entry by entry.

    The reference lays out one entry per memory frame and per video pixel frame (1 = known),
    repeats the first M + 1 entries x4 (each memory frame and video frame 0 own a whole latent
    frame, the VAE's temporal stride being 4), then reads the run as [M + T, 4]. So latent
    frame j, channel c is:
      j < M: a memory frame: 1;
      j = M: video frame 0 (x4): 1 iff known >= 1;
      j > M: video frame 1 + 4 (j - M - 1) + c: 1 iff that frame is known.
    """
    t = (frame_num - 1) // 4 + 1
    out = torch.zeros(4, memory + t, lat_h, lat_w)
    for j in range(memory + t):
        for c in range(4):
            if j < memory:
                one = True
            elif j == memory:
                one = known >= 1
            else:
                one = 1 + 4 * (j - memory - 1) + c < known
            out[c, j] = float(one)
    return out


MASK_CASES = [(m, k, f) for m in range(4) for k in (0, 1, 5) for f in (5, 9, 13, 17) if k < f]


@pytest.mark.parametrize("memory,known,frame_num", MASK_CASES)
def test_build_mask_by_hand(memory, known, frame_num):
    got = build_mask(memory, frame_num, known, 2, 3)
    assert got.shape == (4, memory + (frame_num - 1) // 4 + 1, 2, 3)
    assert got.dtype == torch.float32
    assert torch.equal(got, hand_mask(memory, frame_num, known))


def test_mask_spot_values():
    """A few entries spelled out: I2V (M = 0, 1 known frame), MM2V (5 known frames = latent
    frames M and M + 1 entirely), M2V (only memory)."""
    i2v = build_mask(0, 9, 1, 1, 1)[:, :, 0, 0]
    assert i2v.tolist() == [[1, 0, 0]] * 4
    mm2v = build_mask(2, 9, 5, 1, 1)[:, :, 0, 0]
    assert mm2v.tolist() == [[1, 1, 1, 1, 0]] * 4
    m2v = build_mask(3, 5, 0, 1, 1)[:, :, 0, 0]
    assert m2v.tolist() == [[1, 1, 1, 0, 0]] * 4
    partial = build_mask(1, 9, 2, 1, 1)[:, :, 0, 0]  # frames 0 and 1 known: channel 0 of latent frame 2
    assert partial.T.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]]


# --------------------------------------------------------------------------- y in generate_shot


@pytest.fixture(scope="module")
def models(storymem_cache) -> ModelSet:
    from storymem_rt.tiny import ensure_tiny_models

    return ModelSet(ModelPaths.from_models_dir(ensure_tiny_models()), device="cpu", dtype=torch.float32)


class Recorder:
    """Wraps an expert; keeps a copy of every call's inputs."""

    def __init__(self, name, model, calls):
        self.name, self.model, self.calls = name, model, calls

    def __call__(self, x, t, context, y, frame_pos):
        self.calls.append({"expert": self.name, "x": x.clone(), "t": t.clone(), "context": context.clone(),
                           "y": None if y is None else y.clone(),
                           "frame_pos": None if frame_pos is None else frame_pos.clone()})
        return self.model(x, t, context, y, frame_pos)


def recording(experts: dict, calls: list) -> dict:
    return {k: Recorder(k, m, calls) for k, m in experts.items()}


def sampling(frame_num: int, boundary: float = 0.9, shift: float = 4.0) -> SamplingConfig:
    return SamplingConfig(shift=shift, boundary=boundary, sample_steps=2, guide_scale=(3.0, 5.0),
                          frame_num=frame_num, solver="unipc", negative_prompt="n")


def encode_clip(vae, frames: torch.Tensor | None, frame_num: int) -> torch.Tensor:
    """Latent [16, T, h, w] of a clip whose first frames are `frames` [K, 3, H, W], then zeros."""
    clip = torch.zeros(1, 3, frame_num, H, W)
    if frames is not None:
        for i, f in enumerate(frames):
            clip[0, :, i] = f
    return vae.encode(clip)[0]


CASES = [  # mode, frame_num, known frames, reference_mi2v_bug
    ("m2v", 5, 0, False),
    ("mi2v", 5, 1, False),
    ("mi2v", 5, 1, True),
    ("mm2v", 9, 5, False),
    ("mm2v", 9, 5, True),  # the flag is about MI2V only
]


@pytest.mark.parametrize("mode,frame_num,k,bug", CASES, ids=[f"{c[0]}{'-bug' if c[3] else ''}" for c in CASES])
def test_y_reaches_the_experts(models, mode, frame_num, k, bug):
    vae = models.vae
    g = torch.Generator().manual_seed(123)
    memory = torch.randn(16, 2, LAT_H, LAT_W, generator=g)
    known = torch.rand(k, 3, H, W, generator=g) * 2 - 1 if k else None
    ctx, ctx_null = torch.randn(1, 512, 64, generator=g), torch.randn(1, 512, 64, generator=g)
    zeros_cond = encode_clip(vae, None, frame_num)
    spec = ShotSpec(mode=mode, prompt="p", seed=7, size=(W, H), sampling=sampling(frame_num), reference_mi2v_bug=bug)
    calls = []
    res = generate_shot(recording(models.experts("m2v"), calls), vae, spec, ctx, ctx_null, memory_latents=memory,
                        known=known, cond_latent=zeros_cond, device="cpu")

    t_lat = (frame_num - 1) // 4 + 1
    real_frames = known is not None and not (mode == "mi2v" and bug)
    cond = encode_clip(vae, known, frame_num) if real_frames else zeros_cond
    y = torch.cat([hand_mask(2, frame_num, k, LAT_H, LAT_W), torch.cat([memory, cond], dim=1)], dim=0)
    assert y.shape == (4 + 16, 2 + t_lat, LAT_H, LAT_W)
    noise = torch.randn(16, 2 + t_lat, LAT_H, LAT_W, generator=torch.Generator().manual_seed(7))

    assert len(calls) == 2  # 2 steps, CFG as one batch of 2
    for i, c in enumerate(calls):
        assert c["y"].shape == (2, *y.shape)
        assert torch.equal(c["y"][0], y) and torch.equal(c["y"][1], y)
        assert torch.equal(c["frame_pos"], torch.arange(-2, t_lat))
        assert torch.equal(c["context"], torch.cat([ctx, ctx_null]))
        assert c["expert"] == ("high" if float(c["t"][0]) >= 900 else "low")
    assert torch.equal(calls[0]["x"][0], noise) and torch.equal(calls[0]["x"][1], noise)
    if k:  # the condition is the frames, or (MI2V with the flag) the all-zeros clip
        assert torch.equal(cond, zeros_cond) == (mode == "mi2v" and bug)
    assert res.latent.shape == (16, 2 + t_lat, LAT_H, LAT_W)
    assert res.video.shape == (3, frame_num, H, W)


def test_t2v_gets_no_y(models):
    ctx, ctx_null = torch.randn(1, 512, 64), torch.randn(1, 512, 64)
    spec = ShotSpec(mode="t2v", prompt="p", seed=3, size=(W, H), sampling=sampling(5, boundary=0.875, shift=12.0))
    calls = []
    generate_shot(recording(models.experts("t2v"), calls), models.vae, spec, ctx, ctx_null, device="cpu")
    assert [c["y"] for c in calls] == [None, None] and [c["frame_pos"] for c in calls] == [None, None]
    noise = torch.randn(16, 2, LAT_H, LAT_W, generator=torch.Generator().manual_seed(3))
    assert torch.equal(calls[0]["x"][0], noise)


# --------------------------------------------------------------------------- the story loop feeds MI2V


class FirstFrameSelector:
    """Keyframe stub: frame 0 of every shot, no CLIP (the test is about conditioning)."""

    def select(self, frames, memory_embeddings=None):
        return SelectionResult([0], torch.zeros(1, 4), 0.9, [0], [])

    def embed(self, frames, selection_resize=True):
        return torch.zeros(frames.shape[0], 4)


STORY = {"story_name": "Cond", "story_overview": "o",
         "scenes": [{"scene_num": 1, "video_prompts": ["a red boat at sea", "the boat reaches the shore"],
                     "cut": [True, False]}]}


@pytest.mark.parametrize("bug", [False, True], ids=["real-frame", "reference-bug"])
def test_story_mi2v_conditions_on_previous_last_frame(models, tmp_path, monkeypatch, bug):
    import storymem_rt.shot as shot_mod

    story = parse_story(json.loads(json.dumps(STORY)))
    plan = PlanSettings(mi2v=True)
    settings = RenderSettings(plan=plan, size=(W, H), frame_num=5, sample_steps=1, quality_filter="none",
                              reference_mi2v_bug=bug, models="tiny-test")
    seen = []
    real = shot_mod.generate_shot

    def spy(experts, vae, spec, context, context_null, **kw):
        calls = []
        res = real(recording(experts, calls), vae, spec, context, context_null, **kw)
        seen.append({"spec": spec, "kw": kw, "calls": calls, "video": res.video.clone()})
        return res

    monkeypatch.setattr(shot_mod, "generate_shot", spy)
    manifest = StoryRenderer(models, FirstFrameSelector(), settings, tmp_path / "out", progress=False).render(
        story, plan.plan(story))
    assert [s["spec"].mode for s in seen] == ["t2v", "mi2v"]
    assert manifest["shots"]["01_02"]["memory"] == ["01_01:0"]
    shot1, shot2 = seen

    # What an MI2V shot starts from: shot 1's last frame as written to its MP4 (uint8, truncated
    # as the reference's save_video), read back to [-1, 1].
    u8 = ((shot1["video"][:, -1].clamp(-1, 1) + 1) / 2 * 255).to(torch.uint8)
    last = u8.float().div(255).sub(0.5).div(0.5)
    assert torch.equal(shot2["kw"]["known"], last[None])
    first = ((shot1["video"][:, 0].clamp(-1, 1) + 1) / 2 * 255).to(torch.uint8).float().div(255).sub(0.5).div(0.5)
    # The memory: shot 1's keyframe (frame 0), encoded once as a one-frame clip.
    mem = models.vae.encode(first[None, :, None])[0]
    assert torch.allclose(shot2["kw"]["memory_latents"], mem, atol=1e-6, rtol=0)

    zeros_cond = encode_clip(models.vae, None, 5)
    frame_cond = encode_clip(models.vae, last[None], 5)
    y = shot2["calls"][0]["y"][0]
    assert torch.equal(y[:4], hand_mask(1, 5, 1, LAT_H, LAT_W))  # the flag leaves the mask as is
    cond = y[4:, 1:]  # after the memory frame
    if bug:
        assert torch.equal(cond, zeros_cond)
    else:
        assert torch.equal(cond, frame_cond) and not torch.allclose(cond, zeros_cond, atol=1e-3)
