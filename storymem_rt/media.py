"""Video and image files: one stack (PyAV for video, Pillow for images), every write atomic.

Every file is written to a hidden temporary name in its destination folder and renamed over
the final name (`os.replace`), so an interrupted render never leaves a half-written file where
a finished one is expected. `atomic_path` / `atomic_write_bytes` are for every other writer
too (JSON manifests, safetensors).

Pixel conversion follows the reference: videos as Wan2.2 `wan/utils/utils.py save_video`
(clamp to [-1, 1], `(x + 1) / 2`, `* 255`, cast to uint8: truncation), images as torchvision
`save_image` (`* 255 + 0.5`, clamp: rounding), loaded images as `TF.to_tensor(img).sub_(0.5)
.div_(0.5)`.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .errors import StoryMemError

log = logging.getLogger("storymem_rt.media")

DEFAULT_FPS = 16
# The reference writes with imageio(codec='libx264', quality=8), which imageio-ffmpeg turns
# into `-crf int((1 - 8/10) * 51)` = 10, pixel format yuv420p.
DEFAULT_CRF = 10


from .atomic import (TEMP_MARKER, atomic_path, atomic_write_bytes, atomic_write_text,  # noqa: F401,E402
                     remove_stale_temp_files, temp_name)


# --------------------------------------------------------------------------- pixel conversion

def float_to_uint8_truncate(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> uint8 as Wan2.2 `save_video` (make_grid normalise, `* 255`, cast truncates).
    Elementwise, on the tensor's device."""
    x = x.float().clamp(-1, 1)
    x = (x - (-1)) / 2  # make_grid(normalize=True, value_range=(-1, 1)): sub_(low).div_(high - low)
    return (x * 255).to(torch.uint8)


def float_to_uint8_round(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> uint8 as torchvision `save_image` (`mul(255).add_(0.5).clamp_(0, 255)`)."""
    x = x.float().clamp(-1, 1)
    x = (x - (-1)) / 2
    return (x * 255 + 0.5).clamp(0, 255).to(torch.uint8)


def video_to_uint8(video: torch.Tensor | np.ndarray) -> np.ndarray:
    """`[3, F, H, W]` float in [-1, 1] or `[F, H, W, 3]` uint8 -> contiguous `[F, H, W, 3]` uint8."""
    if isinstance(video, np.ndarray):
        video = torch.from_numpy(video)
    if video.dtype == torch.uint8:
        if video.ndim != 4 or video.shape[-1] != 3:
            raise ValueError(f"uint8 video must be [F, H, W, 3], got shape {tuple(video.shape)}")
        return np.ascontiguousarray(video.cpu().numpy())
    if not video.is_floating_point() or video.ndim != 4 or video.shape[0] != 3:
        raise ValueError(f"float video must be [3, F, H, W] in [-1, 1], got {video.dtype} {tuple(video.shape)}")
    # Convert on the video's device: 4x less to copy back than float32.
    return np.ascontiguousarray(float_to_uint8_truncate(video).permute(1, 2, 3, 0).cpu().numpy())


def frames_to_float(frames: torch.Tensor, device=None) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] in [-1, 1] on `device` (what the reference reads
    back from its MP4s and JPEGs)."""
    return frames.to(device).permute(0, 3, 1, 2).float().div(255.0).sub(0.5).div(0.5)


def image_to_uint8(image) -> np.ndarray:
    """PIL image, `[H, W, 3]` uint8, `[3, H, W]` uint8, or `[3, H, W]` float in [-1, 1]
    -> `[H, W, 3]` uint8 numpy."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(image)
    if not isinstance(image, torch.Tensor) or image.ndim != 3:
        raise ValueError(f"expected an image [H, W, 3] uint8 or [3, H, W], got {getattr(image, 'shape', type(image))}")
    if image.dtype == torch.uint8:
        if image.shape[-1] == 3:
            return np.ascontiguousarray(image.cpu().numpy())
        if image.shape[0] == 3:
            return np.ascontiguousarray(image.permute(1, 2, 0).cpu().numpy())
    elif image.is_floating_point() and image.shape[0] == 3:
        return np.ascontiguousarray(float_to_uint8_round(image).permute(1, 2, 0).cpu().numpy())
    raise ValueError(f"expected an image [H, W, 3] uint8 or [3, H, W] float, got {image.dtype} {tuple(image.shape)}")


# --------------------------------------------------------------------------- video

@dataclass(frozen=True)
class VideoInfo:
    num_frames: int
    fps: Fraction
    width: int
    height: int


def _to_video_frame(rgb: np.ndarray) -> av.VideoFrame:
    return av.VideoFrame.from_ndarray(rgb, format="rgb24")


def _add_h264_stream(container, fps, width: int, height: int, crf: int, preset: str):
    stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1_000_000))
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    # mbtree off: with it, libx264's AVX-512 code (PyAV 18 wheels, seen on AVX-512 EPYC) gives
    # different bitstreams, and decoded pixels up to 11 levels apart, for the same frames in
    # different processes (asm=AVX2 or mbtree=0 make it reproducible), so a resumed render
    # would not equal an uninterrupted one. At CRF 10 mbtree buys little.
    stream.options = {"crf": str(crf), "preset": preset, "x264-params": "mbtree=0"}
    return stream


def write_video(path: str | os.PathLike, video, fps: float = DEFAULT_FPS, *, crf: int = DEFAULT_CRF,
                preset: str = "medium") -> Path:
    """H.264 MP4 (libx264, yuv420p). `video`: `[3, F, H, W]` float in [-1, 1] (the decoder's
    output; converted as the reference's save_video) or `[F, H, W, 3]` uint8."""
    frames = video_to_uint8(video)
    n, h, w, _ = frames.shape
    if n == 0:
        raise ValueError("cannot write a video with no frames")
    if h % 2 or w % 2:
        raise ValueError(f"H.264 yuv420p needs even width and height, got {w}x{h}")
    with atomic_path(path) as tmp:
        with av.open(str(tmp), mode="w", format="mp4") as out:
            stream = _add_h264_stream(out, fps, w, h, crf, preset)
            for rgb in frames:
                out.mux(stream.encode(_to_video_frame(rgb)))
            out.mux(stream.encode(None))
    return Path(path)


def _open_input(path):
    try:
        return av.open(str(path))
    except (av.FFmpegError, OSError) as e:
        raise StoryMemError(f"cannot read video {path}: {e}") from e


def read_video(path: str | os.PathLike) -> torch.Tensor:
    """All frames of the first video stream -> `[F, H, W, 3]` uint8."""
    with _open_input(path) as c:
        if not c.streams.video:
            raise StoryMemError(f"{path} has no video stream")
        stream = c.streams.video[0]
        stream.thread_type = "AUTO"
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(stream)]
    if not frames:
        raise StoryMemError(f"{path} holds no decodable frames")
    return torch.from_numpy(np.stack(frames))


def probe_video(path: str | os.PathLike) -> VideoInfo:
    """Frame count (from demuxed packets, not container metadata), fps and size."""
    with _open_input(path) as c:
        if not c.streams.video:
            raise StoryMemError(f"{path} has no video stream")
        s = c.streams.video[0]
        n = sum(1 for p in c.demux(s) if p.size > 0)
        return VideoInfo(n, Fraction(s.average_rate), s.codec_context.width, s.codec_context.height)


def _stream_signature(path) -> tuple:
    with _open_input(path) as c:
        if len(c.streams.video) != 1:
            return ("not-one-video-stream", str(path))
        s = c.streams.video[0]
        cc = s.codec_context
        return (cc.name, cc.width, cc.height, cc.pix_fmt, bytes(cc.extradata or b""),
                Fraction(s.average_rate), Fraction(s.time_base))


def concat_videos(paths: Sequence[str | os.PathLike], out_path: str | os.PathLike, fps: float = DEFAULT_FPS,
                  *, mode: str = "auto", crf: int = DEFAULT_CRF, preset: str = "medium") -> Path:
    """Concatenate exactly `paths`, in order, into one MP4.

    `mode="remux"` copies the H.264 packets (lossless, fast); it needs every input encoded the
    same way (codec, size, pixel format, codec headers, frame rate = `fps`), which holds for
    shots written by `write_video` with one setting. `"reencode"` decodes and encodes again.
    `"auto"` remuxes when it can."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("concat_videos needs at least one input video")
    if mode not in ("auto", "remux", "reencode"):
        raise ValueError(f"mode must be auto, remux or reencode, got {mode!r}")
    sigs = [_stream_signature(p) for p in paths]
    sizes = {s[1:3] for s in sigs if s[0] != "not-one-video-stream"}
    if len(sizes) > 1:
        raise ValueError(f"cannot concatenate videos of different sizes: {sorted(sizes)}")
    rate = Fraction(fps).limit_denominator(1_000_000)
    can_remux = len(set(sigs)) == 1 and sigs[0][0] == "h264" and sigs[0][5] == rate
    if mode == "remux" and not can_remux:
        raise ValueError("these videos were not encoded identically (codec, size, headers, fps); use mode='reencode'")
    if mode == "reencode" or not can_remux:
        return _concat_reencode(paths, out_path, rate, crf, preset)
    return _concat_remux(paths, out_path, rate)


def _concat_remux(paths: list[Path], out_path, rate: Fraction) -> Path:
    with atomic_path(out_path) as tmp:
        with av.open(str(tmp), mode="w", format="mp4") as out:
            ostream = None
            start = Fraction(0)  # seconds: where the next input begins
            for p in paths:
                with _open_input(p) as c:
                    s = c.streams.video[0]
                    if ostream is None:
                        ostream = out.add_stream_from_template(s)
                    shift = start / s.time_base
                    if shift.denominator != 1:
                        raise ValueError(f"{p}: time base {s.time_base} cannot place frames at {start}s exactly")
                    count = 0
                    for pkt in c.demux(s):
                        if pkt.dts is None:  # the demuxer's empty end-of-stream packet
                            continue
                        pkt.pts += int(shift)
                        pkt.dts += int(shift)
                        pkt.stream = ostream
                        out.mux(pkt)
                        count += 1
                    start += Fraction(count) / rate
    return Path(out_path)


def _concat_reencode(paths: list[Path], out_path, rate: Fraction, crf: int, preset: str) -> Path:
    with atomic_path(out_path) as tmp:
        with av.open(str(tmp), mode="w", format="mp4") as out:
            ostream = None
            for p in paths:
                with _open_input(p) as c:
                    s = c.streams.video[0]
                    s.thread_type = "AUTO"
                    for frame in c.decode(s):
                        rgb = frame.to_ndarray(format="rgb24")
                        if ostream is None:
                            ostream = _add_h264_stream(out, rate, rgb.shape[1], rgb.shape[0], crf, preset)
                        out.mux(ostream.encode(_to_video_frame(rgb)))
            if ostream is not None:
                out.mux(ostream.encode(None))
    return Path(out_path)


# --------------------------------------------------------------------------- images

def save_image(path: str | os.PathLike, image) -> Path:
    """PNG (or the format the suffix names). `image`: `[H, W, 3]` uint8, `[3, H, W]` float in
    [-1, 1] (rounded as torchvision save_image), or a PIL image."""
    rgb = image_to_uint8(image)
    with atomic_path(path) as tmp:
        Image.fromarray(rgb).save(tmp)
    return Path(path)


def load_image(path: str | os.PathLike) -> torch.Tensor:
    """An image file -> `[3, H, W]` float32 in [-1, 1] (RGB; alpha and palettes dropped)."""
    path = Path(path)
    if not path.is_file():
        raise StoryMemError(f"image {path} does not exist")
    try:
        with Image.open(path) as im:
            im.load()
            rgb = np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise StoryMemError(f"cannot read image {path}: not a readable image file ({e})") from e
    x = torch.from_numpy(rgb.copy()).permute(2, 0, 1).contiguous()
    return x.float().div(255).sub_(0.5).div_(0.5)
