"""Keyframe selection after each shot: which frames enter the memory bank.

Matches StoryMem `extract_keyframes.py` (`extract_keyframe_indices`, `save_keyframes`), but
embeds every frame of the shot once, in batched CLIP forwards on the device, instead of
re-embedding two frames per comparison and re-running the whole scan for every threshold.

The reference, on frames `[N, 3, H, W]` uint8:
  1. resize every frame with Qwen's `smart_resize` (factor 28, 48*28*28 .. 256*28*28 pixels),
     bilinear with antialias;
  2. first keyframe = first frame that passes the quality filter; then for i = 2 .. N-1 (from 2
     whatever the first keyframe was): frame i becomes a keyframe when its CLIP cosine
     similarity to the last keyframe is below `threshold` and it passes the quality filter;
  3. while that gives more than 3 keyframes, `threshold -= 0.01` and redo;
  4. drop keyframes whose similarity to a frame already in memory is above 0.9. This last
     comparison uses the full-size frames (the reference reads `frames[indices]` and the saved
     memory JPEGs), not the resized ones, so we embed the chosen frames again at full size.

Similarities are compared as the reference compares them: a float32 dot product turned into a
Python float, against a Python-float threshold lowered by repeated subtraction, so borderline
frames fall on the same side. `select_keyframes_reference` is the reference loop written out
literally (one `sim_fn` call per pair); the tests prove both pick the same frames.

Quality filter: a `QualityScorer` (frames -> scores, frame passes when `not score < threshold`).
HPSv3 when the `hpsv3` package is installed (the reference's scorer, threshold 3.0); otherwise
`PixelStatsScorer`, a no-learning heuristic that only rejects blank, black, white or clipped
frames; `LinearHeadScorer` for a trained linear aesthetic head on CLIP embeddings given as a
file; `PassAllScorer` for `--no-quality-filter`.
"""
from __future__ import annotations

import importlib.util
import logging
import math
import warnings
import zipfile
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from .errors import CheckpointError, StoryMemError
from .media import float_to_uint8_truncate

log = logging.getLogger("storymem_rt.keyframes")

# extract_keyframes.py constants.
IMAGE_FACTOR = 28
VIDEO_MIN_PIXELS = 48 * IMAGE_FACTOR * IMAGE_FACTOR
KEYFRAME_MAX_PIXELS = 256 * IMAGE_FACTOR * IMAGE_FACTOR
MAX_RATIO = 200
MIN_FRAME_SIMILARITY = 0.9
MAX_KEYFRAME_NUM = 3
ADAPTIVE_ALPHA = 0.01
HPSV3_QUALITY_THRESHOLD = 3.0

# OpenAI CLIP preprocessing as the reference applies it to tensors (`_clip_preprocess_tensor`):
# a plain bilinear squash to 224x224, aspect ratio not preserved, no center crop.
CLIP_SIZE = 224
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Where OpenAI's ViT-B/32 weights live in a user's caches. The reference loads them with the
# `clip` package, which caches `~/.cache/clip/ViT-B-32.pt` (a TorchScript archive); open_clip
# caches the same weights from the Hugging Face repo below.
CLIP_HF_REPO = "timm/vit_base_patch32_clip_224.openai"
CLIP_HF_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
CLIP_OPENAI_FILE = "ViT-B-32.pt"
CLIP_OPENAI_CACHE = Path("~/.cache/clip")


# --------------------------------------------------------------------------- resizing

def smart_resize(height: int, width: int, factor: int = IMAGE_FACTOR,
                 min_pixels: int = VIDEO_MIN_PIXELS,
                 max_pixels: int = KEYFRAME_MAX_PIXELS) -> tuple[int, int]:
    """Qwen2-VL `smart_resize` as extract_keyframes.py has it (Python `round`: half to even)."""
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise ValueError(f"frames of {height}x{width} are too elongated for keyframe selection "
                         f"(aspect ratio above {MAX_RATIO})")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return max(h_bar, factor), max(w_bar, factor)


def frames_to_uint8(frames: torch.Tensor) -> torch.Tensor:
    """`[N, 3, H, W]` uint8, or float in [-1, 1] -> uint8 the way the reference's frames got
    there (Wan2.2 `save_video`: truncation, not rounding), on the frames' device."""
    if frames.ndim != 4 or frames.shape[1] != 3:
        raise ValueError(f"expected frames [N, 3, H, W], got shape {tuple(frames.shape)}")
    if frames.dtype == torch.uint8:
        return frames
    if not frames.is_floating_point():
        raise ValueError(f"frames must be uint8 or float in [-1, 1], got {frames.dtype}")
    return float_to_uint8_truncate(frames)


def resize_for_selection(frames_u8: torch.Tensor) -> torch.Tensor:
    """`[N, 3, H, W]` uint8 -> `[N, 3, h, w]` float holding integer values 0..255, `(h, w)` from
    `smart_resize`. On CPU this is the reference's own uint8 antialiased resize (bit-exact);
    CUDA has no uint8 antialias kernel, so there we resize in float and round, which differs
    from the CPU uint8 kernel by at most 1 level on some pixels."""
    h, w = smart_resize(frames_u8.shape[-2], frames_u8.shape[-1])
    if frames_u8.device.type == "cpu":
        out = F.interpolate(frames_u8, [h, w], mode="bilinear", antialias=True)
        return out.float()
    out = F.interpolate(frames_u8.float(), [h, w], mode="bilinear", antialias=True)
    return out.round_().clamp_(0, 255)


def clip_preprocess(frames: torch.Tensor) -> torch.Tensor:
    """`[N, 3, h, w]` float (0..255 or 0..1) -> `[N, 3, 224, 224]` CLIP input.

    Per frame as the reference's `_ensure_rgb01`: divide by 255 only when the frame's max is
    above 1.5 (a frame whose values are all <= 1 is taken as already in [0, 1]), clamp."""
    x = frames.float()
    big = x.amax(dim=(1, 2, 3), keepdim=True) > 1.5
    x = torch.where(big, x / 255.0, x).clamp(0.0, 1.0)
    x = F.interpolate(x, size=(CLIP_SIZE, CLIP_SIZE), mode="bilinear", align_corners=False)
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


# --------------------------------------------------------------------------- CLIP model

def _open_clip():
    try:
        import open_clip
    except ImportError as e:
        raise StoryMemError("keyframe selection needs open_clip: pip install open_clip_torch") from e
    return open_clip


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())


def _find_clip_file(folder: Path) -> Path | None:
    for name in (*CLIP_HF_FILES, CLIP_OPENAI_FILE):
        if (folder / name).is_file():
            return folder / name
    return None


def resolve_clip_checkpoint(source: str | Path | None = None, cache_dir: str | Path | None = None) -> Path:
    """Find OpenAI ViT-B/32 weights locally; never downloads.

    `source`: a checkpoint file (open_clip state dict `.bin`/`.pth`/`.safetensors`, or OpenAI's
    `ViT-B-32.pt`) or a folder holding one. Without it: `cache_dir`, then the Hugging Face cache
    (`timm/vit_base_patch32_clip_224.openai`), then `~/.cache/clip/ViT-B-32.pt`."""
    hint = (f"download it with: huggingface-cli download {CLIP_HF_REPO} {CLIP_HF_FILES[1]} "
            f"--local-dir DIR, and pass DIR")
    if source is not None:
        p = Path(source).expanduser()
        if p.is_file():
            return p
        if p.is_dir():
            found = _find_clip_file(p)
            if found is None:
                names = ", ".join((*CLIP_HF_FILES, CLIP_OPENAI_FILE))
                raise CheckpointError(f"no CLIP ViT-B/32 checkpoint in {p} (looked for {names}); {hint}")
            return found
        raise CheckpointError(f"CLIP checkpoint {p} does not exist; {hint}")
    if cache_dir is not None and (found := _find_clip_file(Path(cache_dir).expanduser())):
        return found
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        try_to_load_from_cache = None
    if try_to_load_from_cache is not None:
        for name in CLIP_HF_FILES:
            hit = try_to_load_from_cache(CLIP_HF_REPO, name, cache_dir=cache_dir)
            if isinstance(hit, str):
                return Path(hit)
    if (found := _find_clip_file(CLIP_OPENAI_CACHE.expanduser())) is not None:
        return found
    raise CheckpointError(f"OpenAI CLIP ViT-B/32 weights not found in the local caches; {hint}")


def _finish(model: torch.nn.Module, device) -> torch.nn.Module:
    # fp32 as the reference (its CLIP runs on CPU in float32).
    return model.float().eval().requires_grad_(False).to(device)


def load_clip(source: str | Path | None = None, *, cache_dir: str | Path | None = None,
              device: str | torch.device = "cpu") -> torch.nn.Module:
    """OpenAI CLIP ViT-B/32 as an open_clip model with QuickGELU (OpenAI's activation; the
    plain `ViT-B-32` config would silently use GELU with these weights)."""
    open_clip = _open_clip()
    path = resolve_clip_checkpoint(source, cache_dir)
    try:
        if _is_torchscript(path):
            # The `clip` package's archive: take its tensors, build the eager model from them.
            from open_clip.model import build_model_from_openai_state_dict
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit deprecation notice
                state = torch.jit.load(str(path), map_location="cpu").state_dict()
            model = build_model_from_openai_state_dict(dict(state))
        else:
            model = open_clip.create_model("ViT-B-32", pretrained=str(path), force_quick_gelu=True,
                                           weights_only=True)
    except StoryMemError:
        raise
    except Exception as e:
        raise CheckpointError(f"could not load CLIP ViT-B/32 weights from {path}: {e}") from e
    return _finish(model, device)


def random_clip(seed: int = 0, device: str | torch.device = "cpu") -> torch.nn.Module:
    """ViT-B/32 (QuickGELU) with random weights from `seed`: tests and the tiny bundle."""
    open_clip = _open_clip()
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # open_clip warns "No pretrained weights loaded": random is the point here
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = open_clip.create_model("ViT-B-32", pretrained=None, force_quick_gelu=True)
    finally:
        root.setLevel(level)
    return _finish(model, device)


@contextmanager
def _ieee_fp32_matmul():
    """The reference's CLIP runs in true fp32; a render may have enabled TF32 for the DiT."""
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(prev)


# --------------------------------------------------------------------------- quality scorers

@runtime_checkable
class QualityScorer(Protocol):
    """Scores frames; a frame passes when `not score < threshold` (the reference rejects
    `score < threshold`). `batched`: cheap enough to score every frame of a shot at once;
    otherwise frames are scored one by one, only those the selection asks about."""

    name: str
    threshold: float
    batched: bool

    def score(self, frames: torch.Tensor, embeddings: torch.Tensor | None = None) -> torch.Tensor:
        """`frames` `[n, 3, h, w]` float 0..255 (the smart-resized frames the reference scores),
        `embeddings` `[n, E]` their CLIP embeddings -> `[n]` scores."""
        ...


@dataclass
class PassAllScorer:
    """`--no-quality-filter`: every frame passes."""

    name: str = "none"
    threshold: float = 0.0
    batched: bool = True

    def score(self, frames, embeddings=None):
        return torch.ones(frames.shape[0], device=frames.device)


@dataclass
class PixelStatsScorer:
    """A no-learning heuristic from pixel statistics, NOT an aesthetic model: it rejects frames
    that are nearly constant (luma std below `min_contrast` levels) or mostly clipped (fewer
    than `min_exposed_fraction` of pixels with luma inside `[dark, bright]`): blank, black,
    white, blown-out frames. It cannot tell a good frame from a bad one beyond that.
    score = min(std / min_contrast, exposed_fraction / min_exposed_fraction); passes at >= 1."""

    min_contrast: float = 2.0
    min_exposed_fraction: float = 0.1
    dark: float = 10.0
    bright: float = 245.0
    name: str = "pixel-stats"
    threshold: float = 1.0
    batched: bool = True

    def score(self, frames, embeddings=None):
        x = frames.float()
        luma = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]  # BT.601, [n, h, w]
        std = luma.flatten(1).std(dim=1, unbiased=False)
        exposed = ((luma >= self.dark) & (luma <= self.bright)).flatten(1).float().mean(dim=1)
        return torch.minimum(std / self.min_contrast, exposed / self.min_exposed_fraction)


@dataclass
class LinearHeadScorer:
    """A trained linear head on L2-normalised CLIP ViT-B/32 image embeddings (e.g. LAION's
    `sa_0_4_vit_b_32_linear.pth`, a `Linear(512, 1)` state dict). We ship no head: the file
    and its threshold come from the user. Our embeddings use the reference's 224x224 squash,
    not the center crop such heads were trained with, so scores shift somewhat."""

    weight: torch.Tensor  # [1, E]
    bias: torch.Tensor  # [1]
    threshold: float
    name: str = "clip-linear-head"
    batched: bool = True

    @classmethod
    def from_file(cls, path: str | Path, threshold: float) -> "LinearHeadScorer":
        try:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
            weight, bias = sd["weight"].float(), sd["bias"].float()
        except Exception as e:
            raise CheckpointError(f"could not read a linear aesthetic head from {path}: {e}") from e
        if weight.ndim != 2 or weight.shape[0] != 1 or bias.numel() != 1:
            raise CheckpointError(f"{path} is not a Linear(E, 1) state dict "
                                  f"(weight {tuple(weight.shape)}, bias {tuple(bias.shape)})")
        return cls(weight=weight, bias=bias.reshape(1), threshold=float(threshold))

    def score(self, frames, embeddings=None):
        if embeddings is None:
            raise ValueError("LinearHeadScorer scores CLIP embeddings; none were given")
        w = self.weight.to(embeddings.device)
        return embeddings.float() @ w[0] + self.bias.to(embeddings.device)


class HPSv3Scorer:
    """HPSv3 reward, the reference's filter (threshold 3.0); needs the `hpsv3` package.
    Expensive (a VLM per frame), so frames are scored lazily, one at a time, as the reference."""

    name = "hpsv3"
    batched = False

    def __init__(self, device: str | torch.device = "cuda", threshold: float = HPSV3_QUALITY_THRESHOLD):
        from hpsv3 import HPSv3RewardInferencer
        self.model = HPSv3RewardInferencer(device=str(device))
        self.threshold = threshold

    def score(self, frames, embeddings=None):
        import numpy as np
        from PIL import Image
        images = [Image.fromarray(f.permute(1, 2, 0).cpu().numpy().astype(np.uint8).clip(0, 255))
                  for f in frames]
        rewards = self.model.reward(image_paths=images, prompts=[""] * len(images))
        return torch.tensor([float(r[0]) for r in rewards])


def hpsv3_available() -> bool:
    return importlib.util.find_spec("hpsv3") is not None


def default_quality_scorer(enabled: bool = True, *, device: str | torch.device = "cpu",
                           head: str | Path | None = None, head_threshold: float | None = None) -> QualityScorer:
    """`--no-quality-filter` -> PassAll; a given linear head -> it; HPSv3 when installed;
    else the pixel-statistics heuristic (logged, so nobody mistakes it for an aesthetic model)."""
    if not enabled:
        return PassAllScorer()
    if head is not None:
        if head_threshold is None:
            raise StoryMemError("a linear aesthetic head needs its threshold (the score below which a frame is rejected)")
        return LinearHeadScorer.from_file(head, head_threshold)
    if hpsv3_available():
        return HPSv3Scorer(device=device)
    log.info("hpsv3 is not installed: keyframe quality filter = pixel statistics "
             "(rejects blank/black/white/clipped frames only)")
    return PixelStatsScorer()


# --------------------------------------------------------------------------- selection

def _scan(sims: Sequence[Sequence[float]], passes: Callable[[int], bool], threshold: float) -> list[int]:
    """One pass of extract_keyframe_indices on precomputed similarities."""
    n = len(sims)
    first = 0
    while not passes(first):
        first += 1
        if first >= n:
            return []
    chosen, last = [first], first
    for i in range(2, n):
        if sims[last][i] < threshold and passes(i):
            chosen.append(i)
            last = i
    return chosen


def adaptive_keyframes(sims: Sequence[Sequence[float]], passes: Callable[[int], bool],
                       threshold: float = MIN_FRAME_SIMILARITY, max_keyframes: int = MAX_KEYFRAME_NUM,
                       alpha: float = ADAPTIVE_ALPHA) -> tuple[list[int], float]:
    """The reference's threshold loop on an `[N][N]` table of Python floats.

    `threshold -= alpha` accumulates exactly as the reference's loop does. Each pass is O(N)
    over host floats, so even ~200 passes for N = 81 cost well under a millisecond."""
    if max_keyframes < 1 or not alpha > 0:
        raise ValueError(f"need max_keyframes >= 1 and alpha > 0, got {max_keyframes}, {alpha}")
    while True:
        chosen = _scan(sims, passes, threshold)
        if len(chosen) > max_keyframes:
            threshold -= alpha
        else:
            return chosen, threshold


def _pair_sims(a: torch.Tensor, b: torch.Tensor) -> list[list[float]]:
    """`[n, E] x [m, E]` -> Python floats of the float32 `(a_i * b_j).sum()`, the reference's
    reduction (not a matmul, which TF32 settings could round differently)."""
    return (a[:, None, :] * b[None, :, :]).sum(dim=-1).cpu().tolist()


@dataclass(frozen=True)
class SelectionResult:
    indices: list[int]  # keyframes kept, in the reference's order (not always increasing)
    embeddings: torch.Tensor  # [k, E] full-frame embeddings of `indices`: cache in the memory bank
    threshold_used: float
    candidates: list[int] = field(default_factory=list)  # before the memory dedupe
    duplicates: list[int] = field(default_factory=list)  # candidates dropped as already in memory


class KeyframeSelector:
    """Batched keyframe selection on one device. `clip_model`: from `load_clip` / `random_clip`."""

    def __init__(self, clip_model: torch.nn.Module, scorer: QualityScorer | None = None, *,
                 threshold: float = MIN_FRAME_SIMILARITY, max_keyframes: int = MAX_KEYFRAME_NUM,
                 alpha: float = ADAPTIVE_ALPHA, dedupe_threshold: float = MIN_FRAME_SIMILARITY,
                 device: str | torch.device | None = None, chunk_size: int = 64):
        if max_keyframes < 1 or not alpha > 0 or chunk_size < 1:
            raise ValueError("need max_keyframes >= 1, alpha > 0 and chunk_size >= 1")
        self.device = torch.device(device) if device is not None else next(clip_model.parameters()).device
        self.clip = clip_model.to(self.device)
        self.scorer = scorer if scorer is not None else PixelStatsScorer()
        self.threshold = threshold
        self.max_keyframes = max_keyframes
        self.alpha = alpha
        self.dedupe_threshold = dedupe_threshold
        self.chunk_size = chunk_size

    @torch.inference_mode()
    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        with _ieee_fp32_matmul():
            return F.normalize(self.clip.encode_image(x).float(), dim=-1)

    def embed(self, frames: torch.Tensor, *, selection_resize: bool = True) -> torch.Tensor:
        """`[N, 3, H, W]` uint8 or float in [-1, 1] -> `[N, E]` L2-normalised embeddings.

        `selection_resize=True`: of the smart-resized frames (what the selection compares);
        False: of the full frames (what the memory dedupe compares: keyframes, reference
        images). Chunks of `chunk_size` frames bound device memory."""
        return self._embed(frames, selection_resize, None)

    @torch.inference_mode()
    def _embed(self, frames: torch.Tensor, selection_resize: bool, keep: list | None) -> torch.Tensor:
        if frames.ndim != 4 or frames.shape[1] != 3 or frames.shape[0] == 0:
            raise ValueError(f"expected frames [N>0, 3, H, W], got shape {tuple(frames.shape)}")
        out = []
        for chunk in frames.split(self.chunk_size):
            u8 = frames_to_uint8(chunk.to(self.device))
            x = resize_for_selection(u8) if selection_resize else u8.float()
            if keep is not None:  # the quality scorer sees the resized frames, as in the reference
                keep.append(x)
            out.append(self._encode(clip_preprocess(x)))
        return torch.cat(out)

    def select(self, frames: torch.Tensor, memory_embeddings: torch.Tensor | None = None) -> SelectionResult:
        """Keyframes of one shot. `memory_embeddings` `[K, E]`: full-frame embeddings of the
        frames already in memory (the reference compares against every keyframe saved so far
        in the story folder, not only the current memory window)."""
        resized: list[torch.Tensor] = []
        emb = self._embed(frames, True, resized)
        sims = _pair_sims(emb, emb)
        passes = self._quality(resized, emb)
        candidates, used = adaptive_keyframes(sims, passes, self.threshold, self.max_keyframes, self.alpha)
        if not candidates:
            e = emb.new_zeros((0, emb.shape[1]))
            return SelectionResult([], e, used, [], [])
        full = self.embed(frames[candidates], selection_resize=False)
        kept = list(range(len(candidates)))
        if memory_embeddings is not None and memory_embeddings.shape[0] > 0:
            if memory_embeddings.ndim != 2 or memory_embeddings.shape[1] != full.shape[1]:
                raise ValueError(f"memory embeddings must be [K, {full.shape[1]}], "
                                 f"got {tuple(memory_embeddings.shape)}")
            mem = memory_embeddings.to(self.device, torch.float32)
            rows = _pair_sims(full, mem)
            kept = [j for j, row in enumerate(rows) if not any(s > self.dedupe_threshold for s in row)]
        indices = [candidates[j] for j in kept]
        dups = [c for j, c in enumerate(candidates) if j not in kept]
        return SelectionResult(indices, full[kept], used, candidates, dups)

    def _quality(self, resized: list[torch.Tensor], emb: torch.Tensor) -> Callable[[int], bool]:
        scorer, thr = self.scorer, self.scorer.threshold
        if scorer.batched:
            scores = torch.cat([scorer.score(r, e) for r, e in zip(resized, emb.split(self.chunk_size))])
            ok = (~(scores < thr)).tolist()
            return lambda i: ok[i]
        frames = torch.cat(resized)
        memo: dict[int, bool] = {}

        def passes(i: int) -> bool:
            if i not in memo:
                memo[i] = not float(scorer.score(frames[i:i + 1], emb[i:i + 1])[0]) < thr
            return memo[i]
        return passes


# --------------------------------------------------------------------------- the reference, literally

def reference_clip_similarity(clip_model: torch.nn.Module) -> Callable[[torch.Tensor, torch.Tensor], float]:
    """`get_frame_sim_clip` of extract_keyframes.py: embeds both `[3, H, W]` frames (batch 1)
    at every call and returns their cosine similarity as a Python float."""
    dev = next(clip_model.parameters()).device

    @torch.inference_mode()
    def sim(a: torch.Tensor, b: torch.Tensor) -> float:
        za = F.normalize(clip_model.encode_image(clip_preprocess(a[None].to(dev))), dim=-1)
        zb = F.normalize(clip_model.encode_image(clip_preprocess(b[None].to(dev))), dim=-1)
        return (za * zb).sum(dim=-1).item()
    return sim


def select_keyframes_reference(frames: torch.Tensor, sim_fn: Callable[[torch.Tensor, torch.Tensor], float],
                               is_low_quality_fn: Callable[[torch.Tensor], bool], *,
                               threshold: float = MIN_FRAME_SIMILARITY, max_keyframes: int = MAX_KEYFRAME_NUM,
                               alpha: float = ADAPTIVE_ALPHA, memory_frames: Sequence[torch.Tensor] | None = None,
                               dedupe_threshold: float = MIN_FRAME_SIMILARITY) -> tuple[list[int], float]:
    """extract_keyframes.py `save_keyframes` as written: the whole scan re-run per threshold,
    `sim_fn` and `is_low_quality_fn` called per frame / pair. `frames` `[N, 3, H, W]` uint8
    on CPU; `memory_frames`: full-size `[3, H', W']` frames. Returns (kept indices, threshold)."""
    def extract(thr: float) -> list[int]:
        n, _, h, w = frames.shape
        rh, rw = smart_resize(h, w)
        resized = F.interpolate(frames, [rh, rw], mode="bilinear", antialias=True).float()
        first = 0
        while is_low_quality_fn(resized[first]):
            first += 1
            if first >= n:
                return []
        chosen, last = [first], resized[first]
        for i in range(2, n):
            cur = resized[i]
            if sim_fn(last, cur) < thr and not is_low_quality_fn(cur):
                chosen.append(i)
                last = cur
        return chosen

    while True:
        indices = extract(threshold)
        if len(indices) > max_keyframes:
            threshold -= alpha
        else:
            break
    kept = []
    for i in indices:
        if memory_frames is not None and any(sim_fn(frames[i], m) > dedupe_threshold for m in memory_frames):
            continue
        kept.append(i)
    return kept, threshold
