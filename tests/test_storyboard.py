"""The storyboard people read (storymem_rt.storyboard): layout, thumbnails, text, cut boundaries."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from storymem_rt import storyboard as sb
from storymem_rt.storyboard import ShotRow, layout, memory_label, render_storyboard, wrap

LONG = ("Dawn at a quiet stone harbor. A young fisherwoman in a red knit cap and a green raincoat coils a rope "
        "on the deck of a small blue wooden boat. Wide shot, soft pink light, mist over the water. " * 3)


def solid(colour, w=96, h=64):
    t = torch.zeros(h, w, 3, dtype=torch.uint8)
    t[...] = torch.tensor(colour, dtype=torch.uint8)
    return t


RED, GREEN, BLUE, YELLOW, CYAN = (250, 0, 0), (0, 250, 0), (0, 0, 250), (250, 250, 0), (0, 250, 250)


def rows():
    return [
        ShotRow.references([("ref:1:a.png", solid(CYAN)), ("ref:2:b.png", Image.new("RGB", (40, 80), YELLOW))]),
        ShotRow("01_01", "m2v", 33, True, "a red boat on the sea at dawn",
                memory=[("ref:1:a.png", solid(CYAN)), ("ref:2:b.png", solid(YELLOW, 40, 80))],
                keyframes=[(0, solid(RED)), (27, solid(GREEN))]),
        ShotRow("01_02", "mi2v", 16, False, LONG, continues="01_01",
                memory=[("ref:1:a.png", solid(CYAN)), ("01_01:0", solid(RED)), ("01_01:27", solid(GREEN))],
                keyframes=[(5, solid(BLUE))]),
        ShotRow("02_01", "m2v", 81, True, "a lighthouse at night", seconds=5.0,
                memory=[("01_01:27", solid(GREEN))], keyframes=[]),
    ]


def _text_image(text: str, size: int, colour, bg=sb.ROW_BACKGROUND, width=400, height=None):
    """The text drawn alone with the storyboard's font, as the storyboard must draw it."""
    im = Image.new("RGB", (width, height or size + 6), bg)
    ImageDraw.Draw(im).text((0, 0), text, fill=colour, font=sb._font(size))
    return np.asarray(im)


def test_layout_sizes_and_boxes():
    r = rows()
    lay = layout(r)
    n = len(r)
    assert lay.height == sb.TITLE_HEIGHT + n * sb.ROW_HEIGHT + (n - 1) * sb.SEPARATOR + sb.PAD
    # Memory column: the widest row is 01_02 (three 96x64 thumbnails at height 48 -> 72 px each).
    mem_w = 3 * 72 + 2 * sb.GAP
    kf_w = max(sb.MIN_KEYFRAME_WIDTH, 2 * 144 + sb.GAP)  # two 96x64 keyframes at height 96
    assert lay.memory_x == sb.PAD + sb.TEXT_WIDTH + sb.PAD
    assert lay.keyframes_x == lay.memory_x + mem_w + 2 * sb.PAD
    assert lay.width == lay.keyframes_x + kf_w + sb.PAD
    assert [len(x.memory) for x in lay.rows] == [0, 2, 3, 1] and [len(x.keyframes) for x in lay.rows] == [2, 2, 1, 0]
    assert lay.rows[0].separator is None and all(x.separator is not None for x in lay.rows[1:])
    assert lay.rows[1].memory[1].w == 24  # a 40x80 image at height 48 keeps its aspect ratio
    with pytest.raises(ValueError):
        layout([])


def test_rendered_pixels(tmp_path):
    r = rows()
    p = render_storyboard(r, tmp_path / "storyboard.png", title="Test Story: 3 shots")
    assert [x.name for x in tmp_path.iterdir()] == ["storyboard.png"]  # written atomically, no temp left
    im = np.asarray(Image.open(p).convert("RGB"))
    lay = layout(r)
    assert im.shape == (lay.height, lay.width, 3)

    def centre(box):
        return tuple(int(v) for v in im[box.y + box.h // 2, box.x + box.w // 2])

    # Thumbnails in their boxes, in order: references, memory in the order the shot saw it, keyframes.
    assert [centre(b) for b in lay.rows[0].keyframes] == [CYAN, YELLOW]
    assert [centre(b) for b in lay.rows[1].memory] == [CYAN, YELLOW]
    assert [centre(b) for b in lay.rows[1].keyframes] == [RED, GREEN]
    assert [centre(b) for b in lay.rows[2].memory] == [CYAN, RED, GREEN]
    assert [centre(b) for b in lay.rows[2].keyframes] == [BLUE]
    assert [centre(b) for b in lay.rows[3].memory] == [GREEN]

    # Cut boundaries: an orange band above a row that starts with a cut, a grey line above a continuation.
    for row, rl in zip(r[1:], lay.rows[1:]):
        s = rl.separator
        band = im[s.y: s.y + s.h, 50]
        if row.cut:
            assert (band == sb.CUT).all(), row.shot_id
        else:
            assert not (band == sb.CUT).all(-1).any() and (band == sb.CONTINUE).all(-1).sum() == 1, row.shot_id

    # Text: the header line of each row exactly as the font draws it alone.
    for row, rl in zip(r, lay.rows):
        colour = sb.MODE_COLOURS[row.mode]
        want = _text_image(sb._header(row), sb.FONT_SIZE, colour, width=rl.text.w, height=sb.LINE)
        got = im[rl.text.y: rl.text.y + sb.LINE, rl.text.x: rl.text.x + rl.text.w]
        assert np.array_equal(got, want), row.shot_id
    assert sb._header(r[2]) == "01_02  MI2V  16 frames (1.0 s)"
    assert sb._header(r[3]) == "02_01  M2V  81 frames (5.1 s), asked 5 s"
    # Frame numbers under the keyframes, memory sources under the memory thumbnails.
    b = lay.rows[1].keyframes[1]
    want = _text_image("frame 27", sb.SMALL_FONT_SIZE, sb.DIM, width=b.w, height=sb.SMALL_LINE - 2)
    assert np.array_equal(im[b.y + b.h + 2: b.y + b.h + sb.SMALL_LINE, b.x: b.x + b.w], want)
    b = lay.rows[2].memory[2]
    want = _text_image("01_01 #27", sb.SMALL_FONT_SIZE, sb.DIM, width=b.w, height=sb.SMALL_LINE - 2)
    assert np.array_equal(im[b.y + b.h + 2: b.y + b.h + sb.SMALL_LINE, b.x: b.x + b.w], want)

    # The long prompt is wrapped into lines of text inside the row: count the bands of text pixels.
    rl = lay.rows[2]
    box = im[rl.text.y: rl.text.y + rl.text.h, rl.text.x: rl.text.x + rl.text.w].astype(int)
    inked = (np.abs(box - np.array(sb.ROW_BACKGROUND)).sum(-1) > 60).any(1)
    bands = int(inked[0]) + int(np.sum(inked[1:] & ~inked[:-1]))
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines = wrap(draw, LONG, sb._font(sb.FONT_SIZE), rl.text.w, 99)
    assert len(lines) > 6  # the prompt does not fit: it is cut with "..."
    assert bands == 2 + (rl.text.h - sb.LINE - sb.SMALL_LINE) // sb.LINE  # header, "continues ...", prompt lines


def test_wrap_and_labels():
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    font = sb._font(sb.FONT_SIZE)
    lines = wrap(draw, LONG, font, 200, 4)
    assert len(lines) == 4 and lines[-1].endswith(" ...")
    assert all(draw.textlength(x, font=font) <= 200 for x in lines)
    assert " ".join(lines[:3]).split() == LONG.split()[: len(" ".join(lines[:3]).split())]
    short = wrap(draw, "a red boat", font, 200, 4)
    assert short == ["a red boat"]
    assert all(draw.textlength(x, font=font) <= 50 for x in wrap(draw, "x" * 80, font, 50, 10))
    assert memory_label("01_02:17") == "01_02 #17" and memory_label("ref:2:b.png") == "ref 2"
