"""The storyboard: one PNG that tells what a render did, for people (render.json is for programs).

One row per shot, in render order:

    | 01_02  MI2V  32 frames (2.0 s)   | memory (3)               | keyframes (2)            |
    | continues 01_01                  | [..] [..] [..]           | [=====]  [=====]         |
    | the prompt, wrapped over the     | 01_01#0 01_01#12 ref 1   | frame 3  frame 27        |
    | lines the row has room for...    |                          |                          |

The memory column shows the frames the shot was conditioned on, small and in the order the
model saw them; the keyframe column the frames it gave to the memory, with their frame numbers
in the shot's MP4. A shot that starts with a cut gets an orange bar above its row; a shot that
continues the one before (MI2V/MM2V, or M2V without a cut) a thin grey line, so scene and cut
boundaries show at a glance. Reference images (MR2V) get a row of their own at the top.

`layout()` computes every box first (pixels, see `Layout`); `render_storyboard()` draws into
them. Tests check the boxes against the pixels, so the geometry is part of the contract.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from .atomic import atomic_path
from .media import image_to_uint8

FPS = 16
PAD = 10
TEXT_WIDTH = 380  # the left column: header, continuity note, prompt
TITLE_HEIGHT = 34
SEPARATOR = 6  # band between rows: orange for a cut, a grey line for a continuation
KEYFRAME_HEIGHT = 96
MEMORY_HEIGHT = 48
GAP = 6  # between thumbnails
FONT_SIZE = 13
SMALL_FONT_SIZE = 11
LINE = FONT_SIZE + 4
SMALL_LINE = SMALL_FONT_SIZE + 3
# A row: section headers, thumbnails, their captions; the text column wraps into the same height.
ROW_HEIGHT = PAD + LINE + KEYFRAME_HEIGHT + SMALL_LINE + PAD
MIN_MEMORY_WIDTH = 120  # room for "memory (none)" when no row has memory
MIN_KEYFRAME_WIDTH = 140

BACKGROUND = (24, 24, 24)
ROW_BACKGROUND = (34, 34, 36)
TEXT = (235, 235, 235)
DIM = (160, 160, 165)
CUT = (235, 125, 35)
CONTINUE = (90, 90, 96)
MODE_COLOURS = {"t2v": (120, 190, 255), "m2v": (140, 220, 140), "mi2v": (240, 200, 90), "mm2v": (240, 150, 200),
                "ref": (200, 200, 200)}


@dataclass(frozen=True)
class ShotRow:
    """What one row shows. Thumbnails: `[H, W, 3]` uint8 (tensor or array) or PIL images.

    frames: the frames in the shot's MP4 (after MI2V/MM2V drop their known frames);
    memory: (source, thumbnail) in the order the shot saw them, sources as in render.json
    ("01_01:12", "ref:1:a.png"); keyframes: (frame number in the MP4, thumbnail)."""

    shot_id: str
    mode: str
    frames: int
    cut: bool
    prompt: str
    memory: Sequence[tuple[str, object]] = ()
    keyframes: Sequence[tuple[int, object]] = ()
    seconds: float | None = None  # what the script asked for, when it gave seconds
    continues: str | None = None  # the shot this one continues (cut false)

    @classmethod
    def references(cls, images: Sequence[tuple[str, object]]) -> "ShotRow":
        """The MR2V reference images, shown as a row before the first shot."""
        return cls(shot_id="references", mode="ref", frames=0, cut=True,
                   prompt="Reference images: the first shot's memory (MR2V).", keyframes=tuple(
                       (i, img) for i, (_, img) in enumerate(images)), memory=())


@dataclass(frozen=True)
class Box:
    x: int
    y: int
    w: int
    h: int


@dataclass
class RowLayout:
    top: int  # first pixel row of the row (below its separator)
    separator: Box | None  # the band above the row (None for the first row)
    text: Box
    memory: list[Box] = field(default_factory=list)
    keyframes: list[Box] = field(default_factory=list)


@dataclass
class Layout:
    width: int
    height: int
    memory_x: int
    keyframes_x: int
    rows: list[RowLayout]


def _size(img) -> tuple[int, int]:
    if isinstance(img, Image.Image):
        return img.size
    h, w = image_to_uint8(img).shape[:2]
    return w, h


def _scaled(img, height: int) -> int:
    w, h = _size(img)
    return max(1, round(w * height / h))


def layout(rows: Sequence[ShotRow]) -> Layout:
    """Every box of the storyboard, in pixels.

    width  = PAD + TEXT_WIDTH + PAD + memory column + 2*PAD + keyframe column + PAD, each column
             as wide as its widest row (thumbnails at MEMORY_HEIGHT / KEYFRAME_HEIGHT, keeping
             their aspect ratio, GAP apart), at least MIN_MEMORY_WIDTH / MIN_KEYFRAME_WIDTH;
    height = TITLE_HEIGHT + rows * ROW_HEIGHT + (rows - 1) * SEPARATOR + PAD.
    Row r starts at TITLE_HEIGHT + r * (ROW_HEIGHT + SEPARATOR); its thumbnails sit one LINE
    (the section header) below its top + PAD."""
    if not rows:
        raise ValueError("a storyboard needs at least one row")

    def widths(items, height):
        return [_scaled(img, height) for _, img in items]

    mem_w = max([MIN_MEMORY_WIDTH] + [sum(w + GAP for w in widths(r.memory, MEMORY_HEIGHT)) - GAP for r in rows])
    kf_w = max([MIN_KEYFRAME_WIDTH] + [sum(w + GAP for w in widths(r.keyframes, KEYFRAME_HEIGHT)) - GAP for r in rows])
    memory_x = PAD + TEXT_WIDTH + PAD
    keyframes_x = memory_x + mem_w + 2 * PAD
    width = keyframes_x + kf_w + PAD
    out = []
    for r, row in enumerate(rows):
        top = TITLE_HEIGHT + r * (ROW_HEIGHT + SEPARATOR)
        sep = None if r == 0 else Box(0, top - SEPARATOR, width, SEPARATOR)
        rl = RowLayout(top=top, separator=sep, text=Box(PAD, top + PAD, TEXT_WIDTH, ROW_HEIGHT - 2 * PAD))
        x = memory_x
        for w in widths(row.memory, MEMORY_HEIGHT):
            rl.memory.append(Box(x, top + PAD + LINE, w, MEMORY_HEIGHT))
            x += w + GAP
        x = keyframes_x
        for w in widths(row.keyframes, KEYFRAME_HEIGHT):
            rl.keyframes.append(Box(x, top + PAD + LINE, w, KEYFRAME_HEIGHT))
            x += w + GAP
        out.append(rl)
    height = TITLE_HEIGHT + len(rows) * ROW_HEIGHT + (len(rows) - 1) * SEPARATOR + PAD
    return Layout(width=width, height=height, memory_x=memory_x, keyframes_x=keyframes_x, rows=out)


# --------------------------------------------------------------------------- drawing

def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap to `width` pixels; the last line ends in "..." when text is left over.
    A word longer than the width is cut."""
    words = " ".join(text.split()).split(" ") if text.strip() else []
    lines: list[str] = []
    line = ""
    for word in words:
        trial = f"{line} {word}" if line else word
        if draw.textlength(trial, font=font) <= width:
            line = trial
            continue
        if line:
            lines.append(line)
        line = word
        while draw.textlength(line, font=font) > width and len(line) > 1:  # a word wider than the column
            cut = len(line)
            while cut > 1 and draw.textlength(line[:cut], font=font) > width:
                cut -= 1
            lines.append(line[:cut])
            line = line[cut:]
    if line:
        lines.append(line)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        last = lines[-1]
        while last and draw.textlength(last + " ...", font=font) > width:
            last = last[:-1]
        lines[-1] = last.rstrip() + " ..."
    return lines


def memory_label(source: str) -> str:
    """`01_01:12` -> `01_01 #12`; `ref:2:b.png` -> `ref 2`."""
    if source.startswith("ref:"):
        return "ref " + source.split(":")[1]
    shot, _, frame = source.rpartition(":")
    return f"{shot} #{frame}" if shot else source


def _header(row: ShotRow) -> str:
    if row.mode == "ref":
        return f"references  {len(row.keyframes)} image{'s' * (len(row.keyframes) != 1)}"
    length = f"{row.frames} frames ({row.frames / FPS:.1f} s)"
    if row.seconds is not None:
        length += f", asked {row.seconds:g} s"
    return f"{row.shot_id}  {row.mode.upper()}  {length}"


def _continuity(row: ShotRow) -> str:
    if row.mode == "ref":
        return ""
    if row.cut:
        return "cut"
    known = {"mi2v": " from its last frame", "mm2v": " from its last 5 frames"}.get(row.mode, "")
    return f"continues {row.continues}{known}" if row.continues else "continues"


def render_storyboard(rows: Sequence[ShotRow], path: str | os.PathLike, title: str = "") -> Path:
    """Draw `rows` (see `layout`) into a PNG at `path`, written atomically."""
    lay = layout(rows)
    canvas = Image.new("RGB", (lay.width, lay.height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font, small = _font(FONT_SIZE), _font(SMALL_FONT_SIZE)
    draw.text((PAD, (TITLE_HEIGHT - FONT_SIZE) // 2 - 2), title, fill=TEXT, font=_font(FONT_SIZE + 3))
    for row, rl in zip(rows, lay.rows):
        draw.rectangle((0, rl.top, lay.width - 1, rl.top + ROW_HEIGHT - 1), fill=ROW_BACKGROUND)
        if rl.separator is not None:
            s = rl.separator
            if row.cut:
                draw.rectangle((s.x, s.y, s.x + s.w - 1, s.y + s.h - 1), fill=CUT)
            else:
                mid = s.y + s.h // 2
                draw.line((s.x, mid, s.x + s.w - 1, mid), fill=CONTINUE, width=1)
        # The mode's colour as a stripe at the left edge: runs of one mode are easy to follow.
        draw.rectangle((0, rl.top, 3, rl.top + ROW_HEIGHT - 1), fill=MODE_COLOURS.get(row.mode, TEXT))
        t = rl.text
        draw.text((t.x, t.y), _header(row), fill=MODE_COLOURS.get(row.mode, TEXT), font=font)
        note = _continuity(row)
        y = t.y + LINE
        if note:
            draw.text((t.x, y), note, fill=CUT if row.cut else DIM, font=small)
            y += SMALL_LINE
        for line in wrap(draw, row.prompt, font, t.w, max(1, (t.y + t.h - y) // LINE)):
            draw.text((t.x, y), line, fill=TEXT, font=font)
            y += LINE
        head_y = rl.top + PAD
        if row.mode != "ref":
            draw.text((lay.memory_x, head_y), f"memory ({len(row.memory) or 'none'})", fill=DIM, font=small)
        draw.text((lay.keyframes_x, head_y), "images" if row.mode == "ref" else
                  f"keyframes ({len(row.keyframes) or 'none'})", fill=DIM, font=small)
        for (source, img), box in zip(row.memory, rl.memory):
            _paste(canvas, img, box)
            _caption(draw, memory_label(source), box, small)
        for (frame, img), box in zip(row.keyframes, rl.keyframes):
            _paste(canvas, img, box)
            _caption(draw, f"ref {frame + 1}" if row.mode == "ref" else f"frame {frame}", box, small)
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
    return Path(path)


def _paste(canvas: Image.Image, img, box: Box) -> None:
    im = img if isinstance(img, Image.Image) else Image.fromarray(image_to_uint8(img))
    canvas.paste(im.convert("RGB").resize((box.w, box.h), Image.Resampling.LANCZOS), (box.x, box.y))


def _caption(draw: ImageDraw.ImageDraw, text: str, box: Box, font) -> None:
    while len(text) > 1 and draw.textlength(text, font=font) > box.w:
        text = text[:-1]
    draw.text((box.x, box.y + box.h + 2), text, fill=DIM, font=font)
