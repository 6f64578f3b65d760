"""Per-shot lengths end to end (issue 16): stories of 17-, 33- and 81-frame shots on the tiny bundle.

Each shot's MP4 has its own frame count (MI2V/MM2V drop their known frames from the shot that
continues, not from the one before), the story video is their concatenation, render.json and
the storyboard say it, and a render killed with SIGKILL and resumed equals the uninterrupted
one byte for byte. Renders are 48x32 with 2 steps; the 81-frame shot is the expensive part.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from storymem_rt import storyboard as sb
from storymem_rt.cli import main
from storymem_rt.media import probe_video, read_video

MIXED = {
    "story_name": "Mixed Lengths",
    "story_overview": "A 2-second shot, a 1-second continuation, a 5-second shot after a cut.",
    "scenes": [
        {"scene_num": 1, "video_prompts": ["a red boat on the sea at dawn", "the boat sails into the harbor"],
         "cut": [True, False], "frames": [33, 17]},
        # seconds: 5 s at 16 fps = 80 frames, the nearest 4n+1 count is 81
        {"scene_num": 2, "video_prompts": ["a lighthouse tower at night in the rain"], "cut": [True], "seconds": [5]},
    ],
}
# The MI2V render skips the expensive 81-frame shot: a 17-frame shot, a 33-frame continuation,
# then 1 second (17 frames) after a cut.
MIXED_SHORT = {**MIXED, "scenes": [{**MIXED["scenes"][0], "frames": [17, 33]},
                                   {**MIXED["scenes"][1], "seconds": [1]}]}
ARGS = ["--size", "48*32", "--sample-steps", "2", "--no-quality-filter", "--no-progress"]
GENERATED = {"01_01": 33, "01_02": 17, "02_01": 81}
GENERATED_SHORT = {"01_01": 17, "01_02": 33, "02_01": 17}
KNOWN = {"t2v": 0, "m2v": 0, "mi2v": 1, "mm2v": 5}


@pytest.fixture(scope="module")
def work(tmp_path_factory, storymem_cache) -> Path:
    d = tmp_path_factory.mktemp("story_lengths")
    (d / "mixed.json").write_text(json.dumps(MIXED))
    (d / "mixed_short.json").write_text(json.dumps(MIXED_SHORT))
    return d


def _cmd(work: Path, out: Path, flag: str) -> list[str]:
    return [sys.executable, "-m", "storymem_rt.cli", "render", str(work / "mixed.json"), "--out", str(out), flag, *ARGS]


def check_lengths(out: Path, continuation: str, generated_frames: dict[str, int] = GENERATED) -> dict:
    """Every shot's MP4 holds its own length minus what its own mode drops; the story video is
    the shots in order; render.json and the storyboard agree."""
    m = json.loads((out / "render.json").read_text())
    modes = {"01_01": "t2v", "01_02": continuation, "02_01": "m2v"}
    decoded = []
    for sid, generated in generated_frames.items():
        shot = m["shots"][sid]
        n = generated - KNOWN[modes[sid]]
        assert shot["mode"] == modes[sid]
        assert probe_video(out / f"{sid}.mp4").num_frames == n, sid
        frames = read_video(out / f"{sid}.mp4")
        assert frames.shape == (n, 32, 48, 3) and shot["frames"] == n, sid
        for key in shot["keyframes"]:
            assert key.startswith(sid + ":") and 0 <= int(key.rsplit(":", 1)[1]) < n
        decoded.append(frames)
    assert [p["frames"] for p in m["plan"]] == list(generated_frames.values())
    assert [p.get("seconds") for p in m["plan"]] == [None, None, 5.0 if generated_frames["02_01"] == 81 else 1.0]
    total = sum(len(f) for f in decoded)
    assert m["final"]["frames"] == total == sum(generated_frames.values()) - KNOWN[continuation]
    final = out / m["final"]["video"]
    assert probe_video(final).num_frames == total
    assert torch.equal(read_video(final), torch.cat(decoded))
    with Image.open(out / "storyboard.png") as im:
        assert im.height == sb.TITLE_HEIGHT + 3 * sb.ROW_HEIGHT + 2 * sb.SEPARATOR + sb.PAD
    return m


@pytest.fixture(scope="module")
def mm2v_baseline(work) -> Path:
    out = work / "mm2v"
    r = subprocess.run(_cmd(work, out, "--mm2v"), capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert r.returncode == 0, r.stderr
    return out


def test_mixed_lengths_mm2v(mm2v_baseline):
    m = check_lengths(mm2v_baseline, "mm2v")
    assert m["shots"]["01_02"]["memory"] == m["shots"]["01_01"]["keyframes"] != []


def test_mixed_lengths_mi2v(work):
    out = work / "mi2v"
    r = CliRunner().invoke(main, ["render", str(work / "mixed_short.json"), "--out", str(out), "--mi2v", *ARGS],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    m = check_lengths(out, "mi2v", GENERATED_SHORT)
    assert m["shots"]["01_02"]["frames"] == 32


def test_mixed_lengths_resume_after_sigkill(work, mm2v_baseline):
    out = work / "killed"
    out.mkdir()
    with open(work / "killed.log", "w") as log:
        proc = subprocess.Popen(_cmd(work, out, "--mm2v"), stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
        try:
            deadline = time.monotonic() + 400
            while True:
                assert proc.poll() is None, "the render ended before shot 2 was recorded"
                assert time.monotonic() < deadline, "shot 2 was not recorded in time"
                p = out / "render.json"
                if p.is_file() and len(json.loads(p.read_text())["shots"]) >= 2:
                    os.kill(proc.pid, signal.SIGKILL)
                    break
                time.sleep(0.02)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "02_01.mp4").exists()
    r = subprocess.run(_cmd(work, out, "--mm2v"), capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert r.returncode == 0, r.stderr
    m = check_lengths(out, "mm2v")
    ref = json.loads((mm2v_baseline / "render.json").read_text())
    for sid in GENERATED:
        assert {k: v for k, v in m["shots"][sid].items() if k != "timings"} == \
               {k: v for k, v in ref["shots"][sid].items() if k != "timings"}
    for name in ("01_01.mp4", "01_02.mp4", "02_01.mp4", "Mixed_Lengths.mp4", "state/memory.safetensors"):
        assert (out / name).read_bytes() == (mm2v_baseline / name).read_bytes(), name
