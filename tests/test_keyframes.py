"""Keyframe selection: the batched selector picks exactly what the reference loop picks.

CLIP has random weights (fixed seed): the selection logic, not CLIP's judgement, is under test.
With random backgrounds, random-weight CLIP similarities spread over [-0.1, 1], so the real
0.9 threshold, the threshold lowering and the memory dedupe all come into play.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from storymem_rt.errors import CheckpointError
from storymem_rt.keyframes import (
    KeyframeSelector, LinearHeadScorer, PassAllScorer, PixelStatsScorer, adaptive_keyframes,
    clip_preprocess, default_quality_scorer, frames_to_uint8, hpsv3_available, load_clip,
    random_clip, reference_clip_similarity, resize_for_selection, resolve_clip_checkpoint,
    select_keyframes_reference, smart_resize,
)
from storymem_rt.media import float_to_uint8_truncate

H, W = 120, 208


def _library(n: int = 12) -> torch.Tensor:
    """`n` distinct frames `[n, 3, H, W]` uint8: a random background with three colored blocks."""
    out = []
    for k in range(n):
        g = torch.Generator().manual_seed(k)
        f = torch.empty(3, H, W, dtype=torch.uint8)
        f[:] = torch.randint(60, 200, (3, 1, 1), generator=g, dtype=torch.uint8)
        for _ in range(3):
            y = int(torch.randint(0, H - 40, (1,), generator=g))
            x = int(torch.randint(0, W - 60, (1,), generator=g))
            f[:, y:y + 40, x:x + 60] = torch.randint(0, 256, (3, 1, 1), generator=g, dtype=torch.uint8)
        out.append(f)
    return torch.stack(out)


LIB = _library()
BLACK = torch.zeros(3, H, W, dtype=torch.uint8)


def _video(seq) -> torch.Tensor:
    return torch.stack([BLACK if k == "black" else LIB[k] for k in seq])


class _MemoCLIP:
    """The model, with `encode_image` memoised on the exact input bytes.

    The reference embeds both frames again at every comparison (hundreds of batch-1 CLIP
    forwards here, minutes on a small CPU). `prime` fills the cache with one batched forward
    over every distinct input the tests use; a cached row differs from a batch-1 forward only
    by float rounding (~1e-6), far from every threshold in these videos. The reference loop
    itself (its per-pair calls, its scans, its threshold arithmetic) runs unchanged."""

    def __init__(self, model):
        self.model, self.cache, self.calls = model, {}, 0

    def parameters(self):
        return self.model.parameters()

    @staticmethod
    def _key(x):
        return hashlib.sha1(x.contiguous().numpy().tobytes()).hexdigest()

    @torch.inference_mode()
    def prime(self, clip_inputs):
        for x, z in zip(clip_inputs, self.model.encode_image(clip_inputs)):
            self.cache[self._key(x[None])] = z[None].clone()

    def encode_image(self, x):
        self.calls += 1
        key = self._key(x)
        if key not in self.cache:
            self.cache[key] = self.model.encode_image(x)
        return self.cache[key]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Batch-1 CLIP calls and tiny ops are all this module runs; with several OpenMP threads
    on a shared CPU they spend most of their time waiting for each other."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def clip():
    return random_clip(seed=0)


@pytest.fixture(scope="module")
def ref_sim(clip):
    memo = _MemoCLIP(clip)
    frames = torch.cat([LIB, BLACK[None]])
    # what the reference compares: the smart-resized frames, and full frames for the dedupe
    memo.prime(torch.cat([clip_preprocess(resize_for_selection(frames)), clip_preprocess(frames.float())]))
    return reference_clip_similarity(memo)


def _low_quality(scorer):
    return lambda frame: bool(scorer.score(frame[None])[0] < scorer.threshold)


def _reference(frames, ref_sim, scorer, memory=None, **kw):
    return select_keyframes_reference(frames, ref_sim, _low_quality(scorer), memory_frames=memory, **kw)


# --------------------------------------------------------------------------- preprocessing

def test_smart_resize_matches_hand_computed():
    # 832x480: 399360 px > 256*28*28 -> beta = sqrt(399360/200704); floor(480/beta/28)=12, floor(832/beta/28)=21
    assert smart_resize(480, 832) == (336, 588)
    # 120x208 rounds to 112x196 = 21952 px < 48*28*28 -> scaled up, ceil to multiples of 28
    assert smart_resize(120, 208) == (168, 280)
    assert smart_resize(448, 448) == (448, 448)
    with pytest.raises(ValueError, match="elongated"):
        smart_resize(10, 4000)


def _ensure_rgb01_literal(chw):
    x = chw.float()
    if x.max() > 1.5:
        x = x / 255.0
    return x.clamp(0.0, 1.0)


def test_batched_preprocessing_equals_per_frame_reference():
    frames = torch.cat([LIB[:3], torch.ones(1, 3, H, W, dtype=torch.uint8)])  # last: max <= 1.5
    resized = resize_for_selection(frames)
    lit = F.interpolate(frames, list(smart_resize(H, W)), mode="bilinear", antialias=True).float()
    assert torch.equal(resized, lit)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    per_frame = torch.cat([
        (F.interpolate(_ensure_rgb01_literal(f)[None], size=(224, 224), mode="bilinear",
                       align_corners=False) - mean) / std
        for f in resized])
    assert torch.equal(clip_preprocess(resized), per_frame)
    # The all-ones frame is taken as already in [0, 1] (white), as the reference does.
    assert clip_preprocess(resized)[-1].allclose((1 - mean[0]) / std[0])


def test_embeddings_equal_open_clip_encode_image(clip):
    sel = KeyframeSelector(clip, PassAllScorer(), chunk_size=2)
    frames = LIB[:3]
    with torch.inference_mode():
        expected = F.normalize(clip.encode_image(clip_preprocess(resize_for_selection(frames))), dim=-1)
        full = F.normalize(clip.encode_image(clip_preprocess(frames.float())), dim=-1)
    got = sel.embed(frames)
    assert got.shape == (3, 512)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(3), rtol=0, atol=1e-5)
    torch.testing.assert_close(sel.embed(frames, selection_resize=False), full, rtol=0, atol=1e-5)
    # Float frames in [-1, 1] go through the reference's save_video conversion first.
    flt = frames.float() / 127.5 - 1
    assert torch.equal(frames_to_uint8(flt), float_to_uint8_truncate(flt))
    torch.testing.assert_close(sel.embed(flt), sel.embed(float_to_uint8_truncate(flt)), rtol=0, atol=0)


# --------------------------------------------------------------------------- selection == reference

VIDEOS = {
    # two clear changes, no lowering needed
    "basic": [0, 0, 4, 8, 1, 1, 11],
    # every frame differs: > 3 candidates at 0.9, the threshold must come down
    "lowering": [0, 1, 2, 3, 5, 6, 7, 10],
    # three black frames first: the first keyframe is frame 3, the scan still starts at 2
    "black_start": ["black", "black", "black", 0, 1, 2, 3],
}


@pytest.mark.parametrize("name", list(VIDEOS))
def test_select_equals_reference(clip, ref_sim, name):
    frames = _video(VIDEOS[name])
    scorer = PixelStatsScorer()
    ref_idx, ref_thr = _reference(frames, ref_sim, scorer)
    res = KeyframeSelector(clip, scorer).select(frames)
    assert res.indices == ref_idx
    assert res.threshold_used == ref_thr
    assert 1 <= len(res.indices) <= 3
    if name == "lowering":
        assert res.threshold_used < 0.9 and len(res.candidates) == len(res.indices)
    if name == "black_start":
        assert res.indices[0] == 3


def test_memory_dedupe_equals_reference(clip, ref_sim):
    frames = _video([0, 1, 1, 2, 3, 5])
    scorer = PixelStatsScorer()
    sel = KeyframeSelector(clip, scorer)
    no_mem = sel.select(frames)
    assert len(no_mem.indices) >= 2
    memory = [LIB[1], LIB[9]]  # frame 1 is in memory already; 9 is another memory frame
    ref_idx, ref_thr = _reference(frames, ref_sim, scorer, memory=memory)
    mem_emb = sel.embed(torch.stack(memory), selection_resize=False)
    res = sel.select(frames, memory_embeddings=mem_emb)
    assert res.indices == ref_idx and res.threshold_used == ref_thr
    assert res.candidates == no_mem.indices
    assert res.duplicates == [2] and torch.equal(frames[2], LIB[1])  # the frame already in memory
    assert set(res.indices) | set(res.duplicates) == set(res.candidates)
    # the returned embeddings are the full-frame ones, ready to cache in the memory bank
    torch.testing.assert_close(res.embeddings, sel.embed(frames[res.indices], selection_resize=False),
                               rtol=0, atol=1e-5)


def test_quality_filter_skips_black_first_frame_and_no_filter_keeps_it(clip, ref_sim):
    frames = _video(["black", 0, 4, 1])
    filtered = KeyframeSelector(clip, PixelStatsScorer()).select(frames)
    assert filtered.indices[0] == 1
    assert filtered.indices == _reference(frames, ref_sim, PixelStatsScorer())[0]
    unfiltered = KeyframeSelector(clip, default_quality_scorer(enabled=False)).select(frames)
    assert unfiltered.indices[0] == 0
    assert unfiltered.indices == _reference(frames, ref_sim, PassAllScorer())[0]
    all_black = KeyframeSelector(clip, PixelStatsScorer()).select(_video(["black"] * 2))
    assert all_black.indices == [] and all_black.embeddings.shape == (0, 512)


class _LazyCounting:
    """An expensive scorer (like HPSv3): scored one frame at a time, on demand."""

    name, threshold, batched = "lazy", 1.0, False

    def __init__(self):
        self.inner, self.seen = PixelStatsScorer(), []

    def score(self, frames, embeddings=None):
        self.seen.append(frames.shape[0])
        return self.inner.score(frames)


def test_lazy_scorer_same_result_each_frame_scored_once(clip, ref_sim):
    frames = _video(VIDEOS["black_start"])
    lazy = _LazyCounting()
    res = KeyframeSelector(clip, lazy).select(frames)
    assert res.indices == _reference(frames, ref_sim, PixelStatsScorer())[0]
    assert all(n == 1 for n in lazy.seen) and len(lazy.seen) <= frames.shape[0]


# --------------------------------------------------------------------------- threshold arithmetic

def test_threshold_lowering_accumulates_like_the_reference():
    """0.9 - 0.01 nine times is 0.8099999999999999 in floats, not 0.81: a similarity exactly
    there is "not below" for the reference. Frames carry their index as pixel value so the
    reference loop can look similarities up in the same table."""
    border = 0.9 - 0.01 - 0.01 - 0.01 - 0.01 - 0.01 - 0.01 - 0.01 - 0.01 - 0.01
    assert border != 0.81
    n = 5
    table = [[1.0] * n for _ in range(n)]
    for a, b, s in [(0, 2, 0.5), (2, 3, 0.5), (3, 4, border)]:
        table[a][b] = table[b][a] = s
    frames = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 56, 56).contiguous()

    def sim(a, b):
        return table[int(a[0, 0, 0].round())][int(b[0, 0, 0].round())]

    ref_idx, ref_thr = select_keyframes_reference(frames, sim, lambda f: False)
    idx, thr = adaptive_keyframes(table, lambda i: True)
    assert (idx, thr) == (ref_idx, ref_thr) == ([0, 2, 3], border)
    # rounding the threshold (0.9 - k * 0.01, rounded) would have gone one step further
    assert round(thr, 2) == 0.81 and not border < border and border < 0.81


# --------------------------------------------------------------------------- scorers and loading

def test_pixel_stats_scorer_rejects_blank_frames_only():
    s = PixelStatsScorer()
    frames = torch.stack([BLACK, torch.full((3, H, W), 255, dtype=torch.uint8),
                          torch.full((3, H, W), 128, dtype=torch.uint8), *LIB[:4]]).float()
    ok = (~(s.score(frames) < s.threshold)).tolist()
    assert ok == [False, False, False, True, True, True, True]


def test_linear_head_scorer_and_default_choice(tmp_path, clip):
    head = torch.nn.Linear(512, 1)
    torch.save(head.state_dict(), tmp_path / "head.pth")
    scorer = LinearHeadScorer.from_file(tmp_path / "head.pth", threshold=0.0)
    emb = KeyframeSelector(clip, PassAllScorer()).embed(LIB[:3])
    with torch.no_grad():
        torch.testing.assert_close(scorer.score(None, emb), head(emb)[:, 0])
    assert isinstance(default_quality_scorer(enabled=False), PassAllScorer)
    assert isinstance(default_quality_scorer(head=tmp_path / "head.pth", head_threshold=0.0), LinearHeadScorer)
    if not hpsv3_available():
        assert isinstance(default_quality_scorer(), PixelStatsScorer)
    torch.save({"weight": torch.zeros(2, 512)}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="bad.pth"):
        LinearHeadScorer.from_file(tmp_path / "bad.pth", 0.0)


def test_clip_checkpoint_resolution_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_clip_checkpoint(tmp_path / "nope.bin")
    with pytest.raises(CheckpointError, match="huggingface-cli download"):
        resolve_clip_checkpoint(tmp_path)
    (tmp_path / "junk.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.bin"):
        load_clip(tmp_path / "junk.bin")


class _Holder(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _torchscript_archive(state: dict) -> torch.nn.Module:
    """A TorchScript module holding `state` under the same names, like OpenAI's ViT-B-32.pt."""
    root = _Holder()
    for key, value in state.items():
        *parents, leaf = key.split(".")
        mod = root
        for p in parents:
            if not hasattr(mod, p):
                mod.add_module(p, _Holder())
            mod = getattr(mod, p)
        mod.register_buffer(leaf, value)
    with pytest.warns(FutureWarning):
        return torch.jit.script(root)


def test_load_clip_from_state_dict_folder_and_openai_archive(tmp_path: Path, clip):
    """Both checkpoint kinds load as QuickGELU ViT-B/32 with the file's weights (fp16, as OpenAI ships)."""
    src = clip
    state = {k: v.half() for k, v in src.state_dict().items()}
    folder = tmp_path / "hf"
    folder.mkdir()
    torch.save(state, folder / "open_clip_pytorch_model.bin")
    a = load_clip(folder)
    assert all(torch.equal(v.half().float(), a.state_dict()[k]) for k, v in src.state_dict().items())
    assert a.visual.transformer.resblocks[0].mlp.gelu.__class__.__name__ == "QuickGELU"
    _torchscript_archive(state).save(str(tmp_path / "ViT-B-32.pt"))
    b = load_clip(tmp_path / "ViT-B-32.pt")
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        torch.testing.assert_close(a.encode_image(x), b.encode_image(x), rtol=0, atol=1e-5)
