"""Per-shot lengths end to end (issue 16): stories of 17-, 33- and 81-frame shots on the tiny bundle.

Each shot's MP4 has its own frame count (MI2V/MM2V drop their known frames from the shot that
continues, not from the one before), the story video is their concatenation, render.json and
the storyboard say it, and a render killed with SIGKILL and resumed equals the uninterrupted
one byte for byte. Renders are 48x32 with 2 steps; the 81-frame shot is the expensive part.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from storymem_rt import storyboard as sb
from storymem_rt.cli import main
from storymem_rt.media import probe_video, read_video
from conftest import kill_after_shots

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
    kill_after_shots(_cmd(work, out, "--mm2v"), out, 2, 400, work / "killed.log")
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


# --------------------------------------------------------------------------- bad scripts stop `render` before anything


def _scene(**kw):
    return {"story_name": "x", "scenes": [{"scene_num": 1, "video_prompts": ["a boat", "the boat sails"],
                                            "cut": [True, False], **kw}]}


BAD_SCRIPTS = [
    # (id, file bytes, extra render args, words of the one error line)
    ("frames-not-4n1", json.dumps(_scene(frames=[33, 18])).encode(), [], ["scenes[0].frames[1]", "18"]),
    ("frames-too-long", json.dumps(_scene(frames=[201, 17])).encode(), [], ["scenes[0].frames[0]", "5..161"]),
    ("frames-count", json.dumps(_scene(frames=[33])).encode(), [], ["scenes[0].frames", "1 entry for 2"]),
    ("frames-and-seconds", json.dumps(_scene(frames=[33, 17], seconds=[2, 1])).encode(), [],
     ["scenes[0].seconds", "together"]),
    ("seconds-string", json.dumps(_scene(seconds=["2s", 1])).encode(), [], ["scenes[0].seconds[0]", "number"]),
    ("seconds-too-long", json.dumps(_scene(seconds=[60, 1])).encode(), [], ["scenes[0].seconds[0]", "60 s"]),
    ("mm2v-5-frames", json.dumps(_scene(frames=[17, 5])).encode(), ["--mm2v"],
     ["scenes[0].frames[1]", "01_02", "MM2V"]),
    ("mm2v-after-short-mm2v", json.dumps({"scenes": [{"scene_num": 1, "video_prompts": ["a", "b", "c"],
                                                      "cut": [True, False, False], "frames": [17, 9, 17]}]}).encode(),
     ["--mm2v"], ["01_03", "01_02", "keeps only 4", "13 frames"]),
    ("json5-syntax", b"// comment\n{scenes: [{scene_num: 1, video_prompts: ['a'] cut: [true]}]}", [],
     ["line 2 col", "invalid JSON5"]),
    ("utf16", b"\xff\xfe" + json.dumps(_scene()).encode("utf-16-le"), [], ["not UTF-8", "UTF-16"]),
    ("binary", b"\x89PNG\r\n\x1a\n\x00\x00", [], ["not UTF-8"]),
]


@pytest.mark.parametrize("case", BAD_SCRIPTS, ids=[c[0] for c in BAD_SCRIPTS])
def test_bad_scripts_stop_render(case, tmp_path, monkeypatch):
    name, data, extra, words = case
    inp, cwd = tmp_path / "in", tmp_path / "cwd"
    inp.mkdir()
    cwd.mkdir()
    story = inp / "story.json"
    story.write_bytes(data)
    monkeypatch.chdir(cwd)  # the default --out is out/<story> under the working folder
    r = CliRunner().invoke(main, ["render", str(story), *extra, "--no-progress"])
    assert r.exit_code == 2, (r.exit_code, r.output)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"Error: {story}: "), r.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert list(cwd.iterdir()) == [] and [p.name for p in inp.iterdir()] == ["story.json"]


def test_render_warns_about_lengths_without_engines(work, tmp_path):
    """--engines are shaped for --frame-num; other lengths in the story get one warning (then
    this empty engines folder is refused, before anything is written)."""
    eng = tmp_path / "engines"
    eng.mkdir()
    (eng / "manifest.json").write_text("{}")
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["render", str(work / "mixed.json"), "--out", str(out), "--engines", str(eng),
                                  "--frame-num", "33", *ARGS])
    warnings = [ln for ln in r.stderr.splitlines() if ln.startswith("warning: ")]
    assert warnings == [f"warning: --engines {eng}: artifacts are looked up for 33-frame shots (--frame-num); this "
                        "story also has shots of 17, 81 frames, which no prebuilt artifact covers (they run, compiling "
                        "on first use; build-engines --frame-num N adds a length)"], r.stderr
    assert r.exit_code == 1 and not out.exists()


def test_known_frames_agree():
    """script.py keeps its own copy (it must not import torch); the shot generator's is the truth."""
    from storymem_rt import script, shot

    assert script.KNOWN_FRAMES == shot.KNOWN_FRAMES
    assert [script.frames_for_seconds(s) for s in (0.3, 1, 1.2, 2, 2.5, 5, 10)] == [5, 17, 21, 33, 41, 81, 161]


def test_plan_without_a_default_length_is_resolved_by_the_render():
    """A plan made without --frame-num leaves those shots' length to the render, which checks
    the continuations again once the default is known (MM2V after a 9-frame MM2V shot)."""
    import dataclasses

    from storymem_rt.errors import StoryError
    from storymem_rt.script import check_continuations, parse_story, plan_shots

    story = parse_story({"scenes": [{"scene_num": 1, "video_prompts": ["a", "b", "c"], "cut": [True, False, False],
                                     "frames": [33, None, 17]}]}, "s.json")
    shots = plan_shots(story, mm2v=True)
    assert [s.frames for s in shots] == [33, None, 17]
    check_continuations(shots, "s.json")  # nothing to say yet
    with pytest.raises(StoryError, match="shot 01_03 is MM2V and needs the last 5 frames of shot 01_02, which keeps "
                                         "only 4; give shot 01_02 13 frames or more"):
        check_continuations([dataclasses.replace(s, frames=s.frames or 9) for s in shots], "s.json")
    assert [s.frames for s in plan_shots(story, mm2v=True, frame_num=49)] == [33, 49, 17]
