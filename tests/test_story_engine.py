"""The story engine end to end on the tiny bundle, on CPU: `storymem-rt render`.

Renders are small (96x64, 5 or 9 frames, 3 steps) so the whole module runs in a couple of
minutes on 2 cores. The tiny bundle is built once per test session into a temporary
STORYMEM_CACHE (conftest.py `storymem_cache`). Renders whose output is compared across
processes (the resume test) run as subprocesses, the others in-process (click's CliRunner).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import cli, inline_story, kill_after_shots, write_story
from storymem_rt import storyboard as sb
from storymem_rt.media import probe_video, read_video
from storymem_rt.story import MemoryBank, MemoryEntry

SMALL = ["--size", "96*64", "--sample-steps", "3", "--no-quality-filter", "--no-progress"]
# The 3-shot story: --max-memory-size 1 --fix 0 forces the sliding window as soon as shot 1
# yields 2 keyframes (it does on the tiny bundle; the test asserts it, so a change of the tiny
# models that stops exercising the window fails loudly instead of passing vacuously).
STORY3_ARGS = ["--mi2v", "--frame-num", "5", "--max-memory-size", "1", "--fix", "0", *SMALL]

STORY3 = inline_story(
    (["a red boat on the sea at dawn", "the old man walks on the beach toward the boat"], [True, False]),
    (["a lighthouse tower at night in the rain"], [True]),
    name="Three Shots", overview="T2V, MI2V without a cut, M2V with a cut.")
STORY2_CONT = inline_story(  # shot 2 continues shot 1 (MM2V / MI2V)
    (["a red boat on the sea at dawn", "the boat sails into the harbor"], [True, False]),
    name="Two Shots", overview="A shot and its continuation.")
STORY3_CUTS = inline_story(
    (["the keeper climbs the stairs", "the lamp glows", "a boat in the harbor"], [True, True, True]),
    name="Reference Story", overview="Three shots with cuts.")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def work(tmp_path_factory, storymem_cache) -> Path:
    d = tmp_path_factory.mktemp("story_engine")
    for name, data in (("story3.json", STORY3), ("story2_cont.json", STORY2_CONT), ("story3_cuts.json", STORY3_CUTS)):
        write_story(d, data, name)
    return d


def _cli_cmd(story: Path, out: Path, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "storymem_rt.cli", "render", str(story), "--out", str(out), *args]


def _run_cli_subprocess(story: Path, out: Path, args: list[str]) -> subprocess.CompletedProcess:
    r = subprocess.run(_cli_cmd(story, out, args), cwd=out.parent, capture_output=True, text=True,
                       timeout=300, env=dict(os.environ))
    assert r.returncode == 0, f"render failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    return r


@pytest.fixture(scope="module")
def baseline(work) -> Path:
    """The uninterrupted 3-shot render (a subprocess, so the resume test compares like with like).

    The folder holds a stale `00_00.mp4` before the render starts: the reference globs `*.mp4`
    for its final video and would pick it up; we must not."""
    out = work / "baseline"
    out.mkdir()
    (out / "00_00.mp4").write_bytes(b"stale file from another render")
    _run_cli_subprocess(work / "story3.json", out, STORY3_ARGS)
    return out


def _manifest(out: Path) -> dict:
    return json.loads((out / "render.json").read_text())


def _expected_memory(bank: list[str], fix: int, max_size: int) -> list[str]:
    """The bank policy, written independently of MemoryBank.active: chronological, the first
    `fix` entries always, the rest of the `max_size` slots to the most recent entries."""
    if len(bank) <= max_size:
        return list(bank)
    recent = max_size - fix
    return bank[:fix] + bank[len(bank) - recent:]


def _check_memory_policy(m: dict) -> int:
    """Replays the bank from the manifest (reference images, then every shot's keyframes in
    plan order) and checks each shot's memory. Returns the largest bank a shot saw."""
    s = m["settings"]
    bank = [f"ref:{i + 1}:{Path(p).name}" for i, p in enumerate(s["plan"]["reference_images"])]
    largest = 0
    for p in m["plan"]:
        sid = f"{p['scene']:02d}_{p['shot']:02d}"
        shot = m["shots"][sid]
        if shot["mode"] == "t2v":
            assert shot["memory"] == [], sid
        else:
            assert shot["memory"] == _expected_memory(bank, s["fix"], s["max_memory_size"]), (sid, bank)
            largest = max(largest, len(bank))
        bank += shot["keyframes"]
    return largest


def _check_outputs(out: Path, frame_num: int) -> dict:
    """Per-shot MP4s, keyframe PNGs, final video, storyboard and manifest of a finished render."""
    m = _manifest(out)
    known = {"t2v": 0, "m2v": 0, "mi2v": 1, "mm2v": 5}
    total = 0
    decoded = []
    assert len(m["shots"]) == len(m["plan"])
    for p in m["plan"]:
        sid = f"{p['scene']:02d}_{p['shot']:02d}"
        shot = m["shots"][sid]
        assert shot["mode"] == p["mode"] and shot["seed"] == p["seed"] and shot["prompt"] == p["prompt"]
        n = frame_num - known[shot["mode"]]
        video = out / f"{sid}.mp4"
        assert probe_video(video).num_frames == n, sid
        frames = read_video(video)
        assert frames.shape == (n, 64, 96, 3), sid
        assert shot["frames"] == n and shot["video"] == video.name
        decoded.append(frames)
        total += n
        for j, key in enumerate(shot["keyframes"]):
            owner, idx = key.rsplit(":", 1)
            assert owner == sid and 0 <= int(idx) < n
            with Image.open(out / f"{sid}_keyframe{j}.png") as im:
                assert im.size == (96, 64)
        assert not (out / f"{sid}_keyframe{len(shot['keyframes'])}.png").exists()
        t = shot["timings"]
        assert {"dit", "vae_decode", "keyframes", "write"} <= set(t) and all(v >= 0 for v in t.values()), t
    final = out / m["final"]["video"]
    assert m["final"]["frames"] == total
    assert probe_video(final).num_frames == total
    # The final video remuxes exactly this story's shots, in plan order: same decoded frames.
    assert torch.equal(read_video(final), torch.cat(decoded))
    with Image.open(out / m["final"]["storyboard"]) as im:
        assert im.format == "PNG"
        refs = 1 if m["settings"]["plan"]["reference_images"] else 0
        # storymem_rt.storyboard: one row per shot (+ one for the references), separators between rows.
        n = len(m["plan"]) + refs
        assert im.height == sb.TITLE_HEIGHT + n * sb.ROW_HEIGHT + (n - 1) * sb.SEPARATOR + sb.PAD
    return m


# --------------------------------------------------------------------------- the bank policy


def _entry(name: str) -> MemoryEntry:
    return MemoryEntry(latent=torch.zeros(16, 1, 2, 2), embedding=None, source=name,
                       thumb=torch.zeros(2, 2, 3, dtype=torch.uint8))


@pytest.mark.parametrize("fix,max_size", [(3, 10), (3, 5), (1, 2), (0, 1), (2, 2), (0, 3), (4, 4)])
def test_memory_bank_policy(fix, max_size):
    names = [f"k{i}" for i in range(9)]
    bank = MemoryBank(fix=fix, max_size=max_size)
    for i, name in enumerate(names):
        bank.entries.append(_entry(name))
        got = [e.source for e in bank.active()]
        assert got == _expected_memory(names[: i + 1], fix, max_size)
        assert bank.latents().shape == (16, len(got), 2, 2)


# --------------------------------------------------------------------------- full renders


def test_three_shot_story(baseline):
    m = _check_outputs(baseline, frame_num=5)
    assert [s["mode"] for s in m["plan"]] == ["t2v", "mi2v", "m2v"]
    assert [s["cut"] for s in m["plan"]] == [True, False, True]
    shots = m["shots"]
    assert [shots[k]["seed"] for k in ("01_01", "01_02", "02_01")] == [0, 1, 0]  # seed + index in scene
    assert shots["01_01"]["prompt"] == STORY3["scenes"][0]["video_prompts"][0]
    assert shots["02_01"]["prompt"] == STORY3["scenes"][1]["video_prompts"][0]
    s = m["settings"]
    assert s["size"] == [96, 64] and s["frame_num"] == 5 and s["sample_steps"] == 3
    assert s["max_memory_size"] == 1 and s["fix"] == 0 and s["quality_filter"] == "none"
    assert s["plan"]["mi2v"] is True and s["plan"]["mm2v"] is False and s["plan"]["first_shot"] == "t2v"
    assert s["models"].startswith("tiny")
    largest = _check_memory_policy(m)
    assert largest > s["max_memory_size"], "the tiny render no longer forces the memory window"
    # With --max-memory-size 1 --fix 0 every M2V-family shot sees only the newest keyframe.
    assert shots["01_02"]["memory"] == [shots["01_01"]["keyframes"][-1]]
    assert (baseline / "00_00.mp4").read_bytes() == b"stale file from another render"


def test_mm2v_run(work):
    out = work / "mm2v"
    r = cli("render", str(work / "story2_cont.json"), "--out", str(out), "--mm2v", "--frame-num", "9", *SMALL)
    assert r.exit_code == 0, r.output
    m = _check_outputs(out, frame_num=9)
    assert [m["shots"][k]["mode"] for k in ("01_01", "01_02")] == ["t2v", "mm2v"]
    assert m["final"]["frames"] == 9 + 4
    _check_memory_policy(m)
    assert m["shots"]["01_02"]["memory"] == m["shots"]["01_01"]["keyframes"] != []


def _make_reference_images(folder: Path) -> tuple[Path, Path]:
    a, b = folder / "a.png", folder / "b.png"
    # Sizes unlike the render size: the engine resizes memory images to it.
    Image.linear_gradient("L").resize((120, 80)).convert("RGB").save(a)
    stripes = Image.new("RGB", (50, 70), (20, 40, 200))
    for x in range(0, 50, 10):
        stripes.paste((240, 200, 30), (x, 0, x + 5, 70))
    stripes.save(b)
    return a, b


def test_reference_images_run(work):
    a, b = _make_reference_images(work)
    out = work / "refs"
    r = cli("render", str(work / "story3_cuts.json"), "--out", str(out), "--reference-images", str(a), str(b),
            "--frame-num", "5", "--fix", "2", "--max-memory-size", "3", *SMALL)
    assert r.exit_code == 0, r.output
    m = _check_outputs(out, frame_num=5)
    assert m["settings"]["plan"]["first_shot"] == "m2v"
    assert m["settings"]["plan"]["reference_images"] == [str(a), str(b)]
    shots = [m["shots"][k] for k in ("01_01", "01_02", "01_03")]
    assert [s["mode"] for s in shots] == ["m2v", "m2v", "m2v"]
    assert shots[0]["memory"] == ["ref:1:a.png", "ref:2:b.png"]
    for s in shots:  # --fix 2: the references never leave the memory
        assert s["memory"][:2] == ["ref:1:a.png", "ref:2:b.png"]
    largest = _check_memory_policy(m)
    assert largest > 3, "the tiny render no longer forces the memory window"


def test_reference_images_with_one_name_stay_apart(work):
    """Two files called a.png in different folders are two memory entries, not one."""
    a, b = _make_reference_images(work)
    (work / "other").mkdir()
    b2 = work / "other" / "a.png"
    b2.write_bytes(b.read_bytes())
    out = work / "refs-same-name"
    r = cli("render", str(work / "story3_cuts.json"), "--out", str(out), "--reference-images", str(a), str(b2),
            "--frame-num", "5", *SMALL)
    assert r.exit_code == 0, r.output
    m = json.loads((out / "render.json").read_text())
    assert m["shots"]["01_01"]["memory"] == ["ref:1:a.png", "ref:2:a.png"]
    mem = load_file(out / "state" / "memory.safetensors")
    assert not torch.equal(mem["latent.0"], mem["latent.1"])  # the two images, both kept


# --------------------------------------------------------------------------- resume


def _tree(folder: Path) -> dict[str, tuple[int, int, str]]:
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            st = p.stat()
            out[str(p.relative_to(folder))] = (st.st_size, st.st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def test_resume_after_sigkill_equals_uninterrupted(work, baseline):
    out = work / "killed"
    out.mkdir()
    cmd = _cli_cmd(work / "story3.json", out, STORY3_ARGS)
    kill_after_shots(cmd, out, 2, 240, out.parent / "killed.log", cwd=work)
    m = _manifest(out)
    assert sorted(m["shots"]) == ["01_01", "01_02"] and m["final"] is None
    assert not (out / "02_01.mp4").exists() and not (out / "Three_Shots.mp4").exists()

    _run_cli_subprocess(work / "story3.json", out, STORY3_ARGS)
    m2 = _check_outputs(out, frame_num=5)
    ref = _manifest(baseline)
    for sid in ("01_01", "01_02", "02_01"):
        a, b = m2["shots"][sid], ref["shots"][sid]
        assert {k: v for k, v in a.items() if k != "timings"} == {k: v for k, v in b.items() if k != "timings"}
    final = m2["final"]["video"]
    assert torch.equal(read_video(out / final), read_video(baseline / final))
    # Equal frames give equal files: no creation time in the MP4, and libx264 runs without
    # mbtree, whose AVX-512 code made the bitstream (and the decoded pixels) vary from process
    # to process (see media._add_h264_stream).
    for name in ("01_01.mp4", "01_02.mp4", "02_01.mp4", final):
        assert (out / name).read_bytes() == (baseline / name).read_bytes(), name
    for name in ("01_01_keyframe0.png", "state/memory.safetensors"):
        assert (out / name).read_bytes() == (baseline / name).read_bytes(), name


@pytest.mark.parametrize("change,what", [(["--seed", "1"], "seed"), (["--size", "64*48"], "size"),
                                         (["--no-mi2v"], "mi2v")], ids=["seed", "size", "plan"])
def test_resume_refuses_other_settings(work, baseline, change, what):
    """A finished folder, other settings: refused with a message, exit 1, nothing touched."""
    before = _tree(baseline)
    if change == ["--no-mi2v"]:  # shot 2 becomes M2V: another plan
        args = [a for a in STORY3_ARGS if a != "--mi2v"]
    else:
        args = STORY3_ARGS + change
    r = cli("render", work / "story3.json", "--out", baseline, *args, catch_exceptions=True)
    assert r.exit_code == 1, r.output
    # (the first line is the tiny bundle's note, issue 15)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith("note: ")]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "different settings" in lines[0], r.stderr
    assert what in lines[0]
    assert _tree(baseline) == before


# --------------------------------------------------------------------------- bad input


EMPTY_SCENES = inline_story(name="x", overview="y")


def _file(d: Path, name: str, text: str) -> str:
    """Write d/name with text; its path as a CLI argument."""
    p = d / name
    p.write_text(text)
    return str(p)


@pytest.fixture(scope="module")
def bad_models(work, storymem_cache) -> dict[str, tuple[Path, Path]]:
    """Copies of the tiny bundle, each missing one file: name -> (bundle, the missing file)."""
    from storymem_rt.tiny import ensure_tiny_models

    src = ensure_tiny_models()
    out = {}
    for name, rel in [("shard", "Wan2.2-T2V-A14B/high_noise_model/diffusion_pytorch_model-00002-of-00002.safetensors"),
                      ("vae", "Wan2.2-T2V-A14B/Wan2.1_VAE.pth"),
                      ("i2v_low", "Wan2.2-I2V-A14B/low_noise_model/diffusion_pytorch_model.safetensors"),
                      ("lora", "StoryMem/Wan2.2-MI2V-A14B/backbone_low_noise.pth"),
                      ("tokenizer", "Wan2.2-T2V-A14B/google/umt5-xxl/tokenizer.json")]:
        d = work / f"models_no_{name}"
        if not d.exists():
            shutil.copytree(src, d)
            (d / rel).unlink()
            if name in ("vae", "tokenizer"):  # both Wan folders carry it: remove it from both
                (d / rel.replace("T2V", "I2V")).unlink()
        out[name] = (d, d / rel)
    return out


BAD = [
    # (id, extra args, exit code, words the one error line must hold)
    ("broken-story", lambda d, bm: [_file(d, "broken.json", '{"story_name": "x", "scenes": [')], 2,
     ["broken.json", "invalid JSON"]),
    ("empty-scenes", lambda d, bm: [_file(d, "empty.json", json.dumps(EMPTY_SCENES))], 2, ["empty.json", "scenes"]),
    ("missing-story", lambda d, bm: [str(d / "nope.json")], 2, ["nope.json"]),
    ("mi2v-mm2v", lambda d, bm: [str(d / "story3.json"), "--mi2v", "--mm2v"], 2, ["--mi2v", "--mm2v"]),
    ("size-not-16", lambda d, bm: [str(d / "story3.json"), "--size", "100*64"], 2, ["100*64", "16"]),
    ("size-garbage", lambda d, bm: [str(d / "story3.json"), "--size", "big"], 2, ["big", "WIDTH*HEIGHT"]),
    ("frame-num-4n1", lambda d, bm: [str(d / "story3.json"), "--frame-num", "8"], 2, ["8", "4n+1"]),
    ("frame-num-small", lambda d, bm: [str(d / "story3.json"), "--frame-num", "1"], 2, ["--frame-num"]),
    ("mm2v-frame-num-5", lambda d, bm: [str(d / "story2_cont.json"), "--mm2v", "--frame-num", "5"], 2,
     ["--frame-num 5"]),
    ("fix-gt-max", lambda d, bm: [str(d / "story3.json"), "--fix", "4", "--max-memory-size", "2"], 2,
     ["--fix", "--max-memory-size"]),
    ("missing-ref", lambda d, bm: [str(d / "story3.json"), "--reference-images", str(d / "nothere.png")], 2,
     ["nothere.png"]),
    ("non-image-ref", lambda d, bm: [str(d / "story3.json"), "--reference-images",
                                     _file(d, "notimage.png", "this is not a PNG")], 1,
     ["notimage.png"]),
    ("t2v-first-with-refs", lambda d, bm: [str(d / "story3.json"), "--t2v-first-shot", "--reference-images",
                                           str(_make_reference_images(d)[0])], 2, ["--reference-images"]),
    ("models-missing", lambda d, bm: [str(d / "story3.json"), "--models", str(d / "no_models")], 1,
     ["no_models", "does not exist"]),
    ("models-no-shard", lambda d, bm: [str(d / "story3.json"), "--models", str(bm["shard"][0])], 1,
     ["diffusion_pytorch_model-00002-of-00002.safetensors"]),
    ("models-no-vae", lambda d, bm: [str(d / "story3.json"), "--models", str(bm["vae"][0])], 1,
     ["Wan2.1_VAE.pth"]),
    ("models-no-i2v-expert", lambda d, bm: [str(d / "story3.json"), "--models", str(bm["i2v_low"][0])], 1,
     ["low_noise_model", "diffusion_pytorch_model.safetensors"]),
    ("models-no-lora", lambda d, bm: [str(d / "story3.json"), "--models", str(bm["lora"][0])], 1,
     ["backbone_low_noise"]),
    ("models-no-tokenizer", lambda d, bm: [str(d / "story3.json"), "--models", str(bm["tokenizer"][0])], 1,
     ["tokenizer.json"]),
    ("out-is-a-file", lambda d, bm: [str(d / "story3.json"), "--out", _file(d, "a_file", "x")], 2, ["not a folder"]),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_writes_nothing(work, bad_models, case, tmp_path, monkeypatch):
    name, make_args, code, words = case
    monkeypatch.chdir(tmp_path)  # the default --out is relative: out/<story>
    args = make_args(work, bad_models)
    out = tmp_path / "render_out"
    if "--out" not in args:
        args += ["--out", str(out)]
    # Small settings, so a case that slipped through validation fails fast instead of
    # rendering at the 832*480 defaults of a non-tiny --models folder.
    for opt, value in (("--size", "96*64"), ("--frame-num", "5"), ("--sample-steps", "1")):
        if opt not in args:
            args += [opt, value]
    args.append("--no-progress")
    models_before = {k: _tree(root) for k, (root, _) in bad_models.items()} if name.startswith("models") else {}
    r = cli("render", *args, catch_exceptions=True)
    assert r.exit_code == code, (r.exit_code, r.output)
    assert "Traceback" not in r.output
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("Error")]
    assert len(errors) == 1, r.stderr
    for w in words:
        assert w in errors[0], (w, errors[0])
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []
    if name.startswith("models"):
        assert {k: _tree(root) for k, (root, _) in bad_models.items()} == models_before
