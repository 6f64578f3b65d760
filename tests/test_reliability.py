"""Issue 15: no lost shot, no mixed folder, no traceback.

One test (or a few) per defect the issue lists, on the tiny bundle at 32x32, 5 frames. Every
failing render must give one `Error:` line, the documented exit code (storymem_rt.guard), no
half-written file in the output folder, and a folder that a rerun of the same command resumes.
Renders run in-process (click's CliRunner) except where a real process matters (signals,
concurrency, SIGKILL): those are subprocesses.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from storymem_rt.cli import main
from storymem_rt.guard import EXIT_CODES, failure, terminal_safe
from storymem_rt.media import read_video
from storymem_rt.outdir import LOCK_FILE, OutputLock, kept_note, story_video

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--size", "32*32", "--frame-num", "5", "--sample-steps", "2", "--no-quality-filter", "--no-progress"]
STORY2 = {
    "story_name": "Two Shots",
    "story_overview": "A boat, then a lighthouse.",
    "scenes": [{"scene_num": 1, "video_prompts": ["a red boat on the sea at dawn"], "cut": [True]},
               {"scene_num": 2, "video_prompts": ["a lighthouse tower at night in the rain"], "cut": [True]}],
}
STORY1 = {"story_name": "One Shot", "scenes": [{"scene_num": 1, "video_prompts": ["a red boat at dawn"]}]}


@pytest.fixture(scope="module")
def work(tmp_path_factory, storymem_cache) -> Path:
    d = tmp_path_factory.mktemp("reliability")
    (d / "story2.json").write_text(json.dumps(STORY2))
    (d / "story1.json").write_text(json.dumps(STORY1))
    return d


def _render(story: Path, out: Path, *extra: str):
    return CliRunner().invoke(main, ["render", str(story), "--out", str(out), *SMALL, *extra])


def _tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _error_line(r, code: int) -> str:
    """The one `Error:` line of a failed command with exit `code`, no traceback."""
    assert r.exit_code == code, (r.exit_code, r.output, r.exception)
    assert "Traceback" not in r.output
    errors = [ln for ln in r.output.splitlines() if "Error" in ln]
    assert len(errors) == 1 and errors[0].startswith("Error: "), r.output
    return errors[0]


def _no_partial_files(out: Path) -> None:
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name], sorted(out.rglob("*"))
    assert not (out / LOCK_FILE).exists()


def _shot_records(out: Path) -> dict:
    m = json.loads((out / "render.json").read_text())
    return {k: {f: v for f, v in r.items() if f != "timings"} for k, r in m["shots"].items()}


@pytest.fixture(scope="module")
def baseline(work) -> Path:
    out = work / "baseline"
    r = _render(work / "story2.json", out)
    assert r.exit_code == 0, r.output
    return out


# --------------------------------------------------------------------------- exit codes


def test_readme_documents_every_exit_code():
    text = (REPO / "README.md").read_text()
    rows = dict(re.findall(r"^\| `(\d+)` \| (.+?) \|$", text, re.M))
    assert sorted(map(int, rows)) == sorted(EXIT_CODES), rows


def test_failure_maps_user_errors_and_leaves_bugs():
    assert failure(OSError(errno.ENOSPC, "No space left on device", "/x/a.mp4")).exit_code == 4
    f = failure(OSError(errno.ENAMETOOLONG, "File name too long", "/x/" + "a" * 300))
    assert f.exit_code == 4 and "file name too long" in f.message
    assert failure(KeyboardInterrupt(), kept="1 of 2 shots kept").message == "interrupted (Ctrl-C); 1 of 2 shots kept"
    assert failure(MemoryError()).exit_code == 5
    assert failure(RuntimeError("[enforce fail at alloc_cpu.cpp:117] . DefaultCPUAllocator: not enough memory: "
                                "you tried to allocate 1099511627776 bytes.")).exit_code == 5
    assert failure(torch.cuda.OutOfMemoryError("CUDA out of memory")).exit_code == 5
    assert failure(UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed")).exit_code == 2
    assert failure(ZeroDivisionError()) is None and failure(KeyError("k")) is None  # bugs keep their traceback


def test_terminal_safe():
    assert terminal_safe("a\x1b[2Jb\x9b31m\u202ec\ud800\n\td") == "a\\x1b[2Jb\\x9b31m\\u202ec\\ud800\n\td"
    assert terminal_safe("日本語 ok") == "日本語 ok"


# --------------------------------------------------------------------------- UniPC step counts


def test_unipc_92_steps_renders(work, tmp_path):
    """92 steps crashed on the last step of a T2V shot (shift 12 repeats timestep 999)."""
    r = CliRunner().invoke(main, ["render", str(work / "story1.json"), "--out", str(tmp_path / "o"),
                                  "--size", "32*32", "--frame-num", "5", "--sample-steps", "92",
                                  "--no-quality-filter", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "o" / "01_01.mp4").is_file()
    r = CliRunner().invoke(main, ["render", str(work / "story1.json"), "--sample-steps", "1001"])
    assert "1<=x<=1000" in _error_line(r, 2)


# --------------------------------------------------------------------------- output names


@pytest.mark.parametrize("name,video", [("Harbor Morning", "Harbor_Morning.mp4"), ("01_01", "story_01_01.mp4"),
                                        ("01 01", "story_01_01.mp4"), ("3_1_keyframe0", "story_3_1_keyframe0.mp4"),
                                        ("render", "story_render.mp4"), ("Storyboard", "story_Storyboard.mp4"),
                                        ("3 Little Pigs", "3_Little_Pigs.mp4"), ("!!!", "story.mp4")])
def test_story_video_names_never_collide(name, video):
    assert story_video(name) == video
    assert not re.fullmatch(r"\d+_\d+\.mp4", story_video(name))


def test_story_named_like_a_shot_keeps_the_shot(work, tmp_path):
    story = tmp_path / "s.json"
    story.write_text(json.dumps({**STORY2, "story_name": "01_01"}))
    out = tmp_path / "o"
    r = _render(story, out)
    assert r.exit_code == 0, r.output
    shot = read_video(out / "01_01.mp4")
    assert shot.shape[0] == 5 and read_video(out / "story_01_01.mp4").shape[0] == 10
    assert json.loads((out / "render.json").read_text())["final"]["video"] == "story_01_01.mp4"
    r = _render(story, out)  # a rerun of a finished folder: nothing grows
    assert r.exit_code == 0, r.output
    assert torch.equal(read_video(out / "01_01.mp4"), shot) and read_video(out / "story_01_01.mp4").shape[0] == 10


# --------------------------------------------------------------------------- the folder lock


def test_second_render_is_refused_while_the_folder_is_locked(work, baseline):
    before = _tree(baseline)
    with OutputLock(baseline):
        r = _render(work / "story2.json", baseline)
        line = _error_line(r, 3)
        assert f"is in use by another render (pid {os.getpid()}, started " in line and "--wait" in line
        assert (baseline / LOCK_FILE).is_file()
    assert _tree(baseline) == before  # refused before it read or wrote anything


def test_wait_waits_for_the_holder(work, baseline, monkeypatch):
    """--wait: the render blocks on the holder's lock, says so once, and goes on when it is released
    (released here 1 s after the render found the folder busy)."""
    import storymem_rt.outdir as outdir

    busy = threading.Event()
    holder = outdir._holder
    monkeypatch.setattr(outdir, "_holder", lambda path: (busy.set(), holder(path))[1])
    lock = OutputLock(baseline)
    lock.acquire()
    released = []

    def release():
        busy.wait(300)
        time.sleep(1.0)
        released.append(time.monotonic())
        lock.release()

    t = threading.Thread(target=release)
    t.start()
    try:
        r = _render(work / "story2.json", baseline, "--wait")
    finally:
        busy.set()
        t.join()
    assert r.exit_code == 0, r.output
    assert released, "the render never found the folder busy"
    assert r.output.count(f"waiting: {baseline} is in use by another render (pid {os.getpid()}, started ") == 1


def test_lock_of_a_new_folder_is_removed_with_the_folder(tmp_path):
    out = tmp_path / "a" / "b"
    with OutputLock(out):
        assert (out / LOCK_FILE).is_file()
    assert not out.exists() and (tmp_path / "a").is_dir()
    out.mkdir()
    with OutputLock(out):
        (out / "kept.txt").write_text("x")
    assert sorted(p.name for p in out.iterdir()) == ["kept.txt"]


def _cmd(story: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "storymem_rt.cli", "render", str(story), "--out", str(out), *SMALL, *extra]


def _wait_for(pred, proc, timeout=240, what=""):
    deadline = time.monotonic() + timeout
    while not pred():
        assert proc.poll() is None, f"the render ended before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _shots_done(out: Path) -> int:
    try:
        return len(json.loads((out / "render.json").read_text())["shots"])
    except (OSError, ValueError):
        return 0


def test_concurrent_renders_then_sigkill_then_resume(work, baseline):
    """Two renders into one folder: exactly one runs, the other exits 3 naming the holder;
    after a SIGKILL of the holder a new render takes the folder and resumes."""
    out = work / "concurrent"
    with open(work / "concurrent.log", "w") as log:
        a = subprocess.Popen(_cmd(work / "story2.json", out), stdout=log, stderr=subprocess.STDOUT)
        try:
            # Holding the lock means the pid is in the lock file. Then A is stopped (SIGSTOP), so
            # that it still holds the folder whenever B gets there.
            _wait_for(lambda: (out / LOCK_FILE).is_file() and f'"pid": {a.pid}' in (out / LOCK_FILE).read_text(),
                      a, what="the lock")
            os.kill(a.pid, signal.SIGSTOP)
            try:
                b = subprocess.run(_cmd(work / "story2.json", out), capture_output=True, text=True, timeout=120)
            finally:
                os.kill(a.pid, signal.SIGCONT)
            assert b.returncode == 3, (b.returncode, b.stderr)
            lines = [ln for ln in b.stderr.splitlines() if ln.startswith("Error")]
            assert len(lines) == 1 and f"in use by another render (pid {a.pid}, started" in lines[0], b.stderr
            _wait_for(lambda: _shots_done(out) >= 1, a, what="shot 1")
            os.kill(a.pid, signal.SIGKILL)
        finally:
            if a.poll() is None:
                a.kill()
            a.wait()
    assert a.returncode == -signal.SIGKILL
    assert (out / LOCK_FILE).is_file()  # left behind by the kill, but no longer locked
    c = subprocess.run(_cmd(work / "story2.json", out), capture_output=True, text=True, timeout=300)
    assert c.returncode == 0, c.stderr
    _no_partial_files(out)
    assert _shot_records(out) == _shot_records(baseline)
    assert torch.equal(read_video(out / "Two_Shots.mp4"), read_video(baseline / "Two_Shots.mp4"))


# --------------------------------------------------------------------------- disk full and other OS errors


def _enospc(path="") -> OSError:
    return OSError(errno.ENOSPC, "No space left on device", path or None)


def _fail_on(monkeypatch, target: str, name: str, when, error):
    """Make `target.name` raise `error(args)` on the calls `when(args)` selects."""
    import importlib

    mod = importlib.import_module(target)
    real = getattr(mod, name)

    def wrapped(*args, **kwargs):
        if when(*args, **kwargs):
            raise error(*args, **kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(mod, name, wrapped)


def _safetensors_full(*args, **kwargs):
    from safetensors import SafetensorError

    return SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def _count(n):
    """A `when` that is true from the n-th call (1-based) on."""
    calls = [0]

    def when(*args, **kwargs):
        calls[0] += 1
        return calls[0] >= n

    return when


# (writer, module, function, which call fails, raised error, shots kept, file named in the message)
DISK_FULL = [
    ("state-safetensors", "storymem_rt.story", "save_file", _count(2), _safetensors_full, 1, "memory.safetensors"),
    ("shot-mp4-pyav", "av", "open", lambda p, mode="r", **kw: mode == "w" and "02_01" in str(p),
     lambda p, *a, **kw: _enospc(str(p)), 1, "02_01.mp4"),
    ("keyframe-png", "PIL.Image", "Image.save", None, None, 0, "01_01_keyframe1.png"),
    ("manifest-json", "storymem_rt.atomic", "atomic_write_bytes",
     lambda p, data: Path(p).name == "render.json" and b'"02_01"' in data, lambda p, data: _enospc(str(p)), 2,
     "render.json"),  # shot 2's state was committed: the state records it, so it is kept
    ("story-video", "av", "open", lambda p, mode="r", **kw: mode == "w" and "Two_Shots" in str(p),
     lambda p, *a, **kw: _enospc(str(p)), 2, "Two_Shots.mp4"),
]


@pytest.mark.parametrize("case", DISK_FULL, ids=[c[0] for c in DISK_FULL])
def test_disk_full_keeps_every_finished_shot_and_resumes(work, baseline, tmp_path, monkeypatch, case):
    name, module, func, when, error, kept, named = case
    out = tmp_path / "o"
    with monkeypatch.context() as m:
        if name == "keyframe-png":  # Pillow writes a file object: fail the second keyframe of shot 1
            from PIL import Image

            real = Image.Image.save
            calls = [0]

            def save(self, fp, *a, **kw):
                calls[0] += 1
                if calls[0] == 2:
                    raise OSError(errno.ENOSPC, "No space left on device")
                return real(self, fp, *a, **kw)

            m.setattr(Image.Image, "save", save)
        else:
            _fail_on(m, module, func, when, error)
        r = _render(work / "story2.json", out)
    line = _error_line(r, 4)
    assert "no space left on the device" in line, line
    if named:
        assert named in line and ".tmp-" not in line, line
    if kept:
        assert f"{kept} of 2 shots finished and kept in {out}; rerun the same command to resume" in line, line
    if out.exists():
        _no_partial_files(out)
    if out.exists() and kept:
        for sid in ("01_01", "02_01")[:kept]:  # nothing lost: each kept shot equals the baseline's
            assert torch.equal(read_video(out / f"{sid}.mp4"), read_video(baseline / f"{sid}.mp4")), sid
    r = _render(work / "story2.json", out)  # the same command resumes
    assert r.exit_code == 0, r.output
    _no_partial_files(out)
    assert _shot_records(out) == _shot_records(baseline)
    assert torch.equal(read_video(out / "Two_Shots.mp4"), read_video(baseline / "Two_Shots.mp4"))
    assert (out / "state" / "memory.safetensors").read_bytes() == (baseline / "state" / "memory.safetensors").read_bytes()


def test_disk_full_on_a_real_small_tmpfs(work, baseline, tmp_path):
    """The kernel's own ENOSPC: a 160 KiB tmpfs holds the shots but not everything after them.
    Needs root (mount); skipped elsewhere. Then the file system grows and the same command
    finishes the render."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(mnt)], capture_output=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.decode(errors='replace').strip()}")
    try:
        out = mnt / "o"
        line = _error_line(_render(work / "story2.json", out), 4)
        assert "no space left on the device" in line, line
        assert re.search(r"[12] of 2 shots finished and kept in .*; rerun the same command to resume", line), line
        _no_partial_files(out)
        subprocess.run(["mount", "-o", "remount,size=4m", str(mnt)], check=True)
        r = _render(work / "story2.json", out)
        assert r.exit_code == 0, r.output
        _no_partial_files(out)
        assert _shot_records(out) == _shot_records(baseline)
        assert torch.equal(read_video(out / "Two_Shots.mp4"), read_video(baseline / "Two_Shots.mp4"))
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_permission_denied_is_one_line(work, tmp_path, monkeypatch):
    _fail_on(monkeypatch, "av", "open", lambda p, mode="r", **kw: mode == "w",
             lambda p, *a, **kw: PermissionError(errno.EACCES, "Permission denied", str(p)))
    line = _error_line(_render(work / "story1.json", tmp_path / "o"), 4)
    assert "01_01.mp4: permission denied" in line and "no shot was finished" in line


def test_file_name_too_long_is_one_line(work, tmp_path):
    out = tmp_path / ("x" * 300)
    line = _error_line(_render(work / "story1.json", out), 4)
    assert "file name too long" in line
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- signals


def test_ctrl_c_and_sigterm_in_process(work, tmp_path, monkeypatch):
    """Ctrl-C (KeyboardInterrupt) and SIGTERM during shot 2: exit 130 / 143, one line saying what
    was kept and how to resume; shot 1 stays."""
    import storymem_rt.shot as shot_mod

    real = shot_mod.generate_shot
    handler = signal.getsignal(signal.SIGTERM)

    def ctrl_c():
        raise KeyboardInterrupt

    for code, interrupt in ((130, ctrl_c), (143, lambda: os.kill(os.getpid(), signal.SIGTERM))):
        calls = [0]

        def gen(*a, **kw):
            calls[0] += 1
            if calls[0] == 2:
                interrupt()
                time.sleep(5)  # the handler raises during this
            return real(*a, **kw)

        monkeypatch.setattr(shot_mod, "generate_shot", gen)
        out = tmp_path / f"o{code}"
        line = _error_line(_render(work / "story2.json", out), code)
        word = "interrupted (Ctrl-C)" if code == 130 else "terminated (SIGTERM)"
        assert line == f"Error: {word}; 1 of 2 shots finished and kept in {out}; rerun the same command to resume"
        _no_partial_files(out)
    assert signal.getsignal(signal.SIGTERM) is handler  # the render's handler lives as long as the render


def test_sigterm_subprocess_says_what_was_kept_and_resumes(work, baseline):
    """A real SIGTERM: exit 143 with the message; the log (not a terminal) has no cursor codes."""
    out = work / "sigterm"
    with open(work / "sigterm.log", "w") as log:
        cmd = [a for a in _cmd(work / "story2.json", out) if a != "--no-progress"]  # bars off: not a terminal
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_for(lambda: _shots_done(out) >= 1, p, what="shot 1")
            p.send_signal(signal.SIGTERM)
            p.wait(timeout=120)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
    text = (work / "sigterm.log").read_text()
    assert p.returncode == 143, text
    assert "\r" not in text and "\x1b" not in text, repr(text)
    assert text.splitlines()[-1].startswith("Error: terminated (SIGTERM); ") and "rerun the same command" in text
    _no_partial_files(out)
    r = _render(work / "story2.json", out)
    assert r.exit_code == 0, r.output
    assert _shot_records(out) == _shot_records(baseline)


def test_error_line_is_not_glued_to_a_progress_bar(work, tmp_path, monkeypatch):
    _fail_on(monkeypatch, "av", "open", lambda p, mode="r", **kw: mode == "w",
             lambda p, *a, **kw: _enospc(str(p)))
    r = CliRunner().invoke(main, ["render", str(work / "story1.json"), "--out", str(tmp_path / "o"),
                                  *[a for a in SMALL if a != "--no-progress"], "--progress"])
    assert r.exit_code == 4, r.output
    assert "shot 01_01" in r.output  # bars were drawn
    i = r.output.index("Error: ")
    assert r.output[i - 1] == "\n", repr(r.output[max(0, i - 80):i + 20])


# --------------------------------------------------------------------------- devices, numbers, text


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_device_cuda_without_gpu(work, tmp_path):
    line = _error_line(_render(work / "story1.json", tmp_path / "o", "--device", "cuda"), 5)
    assert "no CUDA GPU" in line and "--device cpu" in line
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("device", ["bogus", "meta", "cuda:x"])
def test_device_that_is_no_device(work, tmp_path, device):
    line = _error_line(_render(work / "story1.json", tmp_path / "o", "--device", device), 2)
    assert "--device" in line
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("size", ["8192*16", "16*4112"])
def test_size_is_bounded(work, tmp_path, size):
    line = _error_line(_render(work / "story1.json", tmp_path / "o", "--size", size), 2)
    assert "--size" in line and "at most 4096" in line


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN"])
def test_guide_scale_must_be_finite(work, tmp_path, value):
    line = _error_line(_render(work / "story1.json", tmp_path / "o", "--sample-guide-scale", value), 2)
    assert "--sample-guide-scale" in line and "finite" in line
    assert not (tmp_path / "o").exists()


def test_nan_latents_stop_the_shot_naming_step_and_expert(work, tmp_path):
    """A finite but absurd guide scale overflows the latents: the shot stops with its step and
    expert, nothing of it is written, the folder stays resumable (with the same settings it fails again)."""
    out = tmp_path / "o"
    line = _error_line(_render(work / "story2.json", out, "--sample-guide-scale", "1e39"), 6)
    assert re.search(r"shot 01_01: the latents became NaN/Inf at denoising step 1 of 2 \(high-noise expert\)", line)
    assert not out.exists()  # nothing was finished: the folder it made is gone


def test_render_settings_must_be_finite():
    from storymem_rt.script import PlanSettings
    from storymem_rt.story import RenderSettings

    for kw in ({"guide_scale": (float("nan"), 3.5)}, {"guide_scale": (3.5, float("inf"))}, {"m2v_shift": float("nan")}):
        with pytest.raises(ValueError, match="must be finite"):
            RenderSettings(plan=PlanSettings(), **kw)


def test_nan_check_in_denoise(monkeypatch):
    """The check in the plain loop: the first non-finite step, and the expert that ran it."""
    from storymem_rt.configs import SamplingConfig
    from storymem_rt.errors import NonFiniteLatentError
    from storymem_rt.shot import ShotSpec, denoise

    spec = ShotSpec(mode="t2v", prompt="p", seed=0, size=(16, 16),
                    sampling=SamplingConfig(shift=12.0, boundary=0.875, sample_steps=10, frame_num=5))
    calls = []

    def expert(name):
        def f(x, t, ctx, y, pos):
            calls.append(name)
            return torch.full_like(x, float("nan") if len(calls) == 7 else 0.1)
        return f

    noise = torch.randn(16, 2, 2, 2)
    with pytest.raises(NonFiniteLatentError) as ei:
        denoise({"high": expert("high"), "low": expert("low")}, spec, noise, torch.Generator(), torch.zeros(1, 4, 8),
                torch.zeros(1, 4, 8), None, None, torch.float32)
    assert (ei.value.step, ei.value.steps, ei.value.expert) == (7, 10, calls[6])
    assert ei.value.exit_code == 6


def _story_file(tmp_path: Path, text: str, name="s.json") -> Path:
    p = tmp_path / name
    p.write_bytes(text.encode("utf-8", "surrogatepass"))
    return p


BAD_SCRIPTS = [
    ("lone-surrogate", r'{"scenes": [{"scene_num": 1, "video_prompts": ["a boat \ud800 at dawn"]}]}',
     "lone surrogate"),
    ("raw-surrogate-bytes", '{"scenes": [{"scene_num": 1, "video_prompts": ["a \ud800"]}]}', "not UTF-8"),
    ("huge-integer", '{"scenes": [{"scene_num": ' + "9" * 5000 + ', "video_prompts": ["x"]}]}', "5000 digits"),
    ("long-scene-number", '{"scenes": [{"scene_num": ' + "9" * 30 + ', "video_prompts": ["x"]}]}', "at most 9999"),
    ("nan", '{"scenes": [{"scene_num": NaN, "video_prompts": ["x"]}]}', "scenes[0].scene_num: must be an integer, got a number NaN"),
    ("infinity-literal", '{"scenes": [{"scene_num": 1, "video_prompts": ["x"], "cut": [Infinity]}]}', "Infinity"),
    ("overflowing-float", '{"scenes": [{"scene_num": 1e999, "video_prompts": ["x"]}]}', "infinity"),
    ("huge-prompt", json.dumps({"scenes": [{"scene_num": 1, "video_prompts": ["a" * 30_000]}]}),
     "30000 characters long"),
    ("too-many-shots", json.dumps({"scenes": [{"scene_num": 1, "video_prompts": ["x"] * 1001}]}), "1000 shots"),
    ("deep-nesting", '{"scenes": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
]


@pytest.mark.parametrize("case", BAD_SCRIPTS, ids=[c[0] for c in BAD_SCRIPTS])
@pytest.mark.parametrize("command", ["validate", "render"])
def test_bad_scripts_are_one_line(tmp_path, monkeypatch, case, command):
    name, text, words = case
    monkeypatch.chdir(tmp_path)
    story = _story_file(tmp_path, text)
    args = [command, str(story)] + (["--out", str(tmp_path / "o"), *SMALL] if command == "render" else [])
    line = _error_line(CliRunner().invoke(main, args), 2)
    assert words in line and str(story) in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.json"]


@pytest.mark.parametrize("command", ["validate", "render"])
def test_story_size_is_bounded(tmp_path, command):
    big = _story_file(tmp_path, json.dumps({"scenes": [{"scene_num": 1, "video_prompts": ["a" * (5 << 20)]}]}))
    for story in ("/dev/zero", str(big)):
        t0 = time.monotonic()
        args = [command, story] + (["--out", str(tmp_path / "o")] if command == "render" else [])
        line = _error_line(CliRunner().invoke(main, args), 2)
        assert "larger than 4 MiB" in line and time.monotonic() - t0 < 30
    assert not (tmp_path / "o").exists()


def test_unknown_keys_warn_and_strict_refuses(tmp_path):
    story = _story_file(tmp_path, json.dumps({"story_name": "x", "extra": 1, "scenes": [
        {"scene_num": 1, "video_prompts": ["a", "b"], "cuts": [True, False]}]}))
    r = CliRunner().invoke(main, ["validate", str(story)])
    assert r.exit_code == 0
    warnings = [ln for ln in r.stderr.splitlines() if ln.startswith("warning: ")]
    assert any('scenes[0]."cuts": unknown key (did you mean "cut"?); it is ignored' in w for w in warnings), warnings
    assert any('"extra": unknown key' in w for w in warnings), warnings
    for command in ("validate", "render"):
        args = [command, str(story), "--strict"] + (["--out", str(tmp_path / "o")] if command == "render" else [])
        line = _error_line(CliRunner().invoke(main, args), 2)
        assert "unknown key" in line and "--strict" in line
    assert not (tmp_path / "o").exists()


def test_escape_codes_never_reach_the_terminal(tmp_path):
    story = _story_file(tmp_path, json.dumps({"story_name": "evil\x1b]0;title\x07\u202e", "scenes": [
        {"scene_num": 1, "video_prompts": ["a boat\x1b[2J\x9b31m at dawn"], "cutz\x1b[31m": [True]}]},
        ensure_ascii=False))
    for args in (["validate", str(story)], ["validate", str(story), "--json"],
                 ["validate", str(story), "--strict"]):
        r = CliRunner().invoke(main, args)
        for c in ("\x1b", "\x9b", "\x07", "\u202e"):
            assert c not in r.output, (args, repr(r.output))
    r = CliRunner().invoke(main, ["validate", str(story), "--json"])
    assert json.loads(r.stdout)["shots"][0]["prompt"] == "a boat\x1b[2J\x9b31m at dawn"  # still the same JSON


# --------------------------------------------------------------------------- the tiny bundle says so


def test_tiny_bundle_is_announced_first_and_recorded(work, tmp_path):
    out = tmp_path / "o"
    r = CliRunner().invoke(main, ["render", str(work / "story1.json"), "--out", str(out), "--size", "32*32",
                                  "--frame-num", "5", "--no-quality-filter", "--no-progress"])
    assert r.exit_code == 0, r.output
    first = r.output.splitlines()[0]
    assert first.startswith("note: rendering with the tiny bundle of random weights") and "noise" in first
    assert "tiny mode set --sample-steps 8 (pass them to choose)" in first and "--size" not in first
    notes = json.loads((out / "render.json").read_text())["notes"]
    assert notes == {"tiny_random_weights": True, "replaced_defaults": {"sample_steps": 8}}


# --------------------------------------------------------------------------- pre-flight


@pytest.fixture(scope="module")
def broken_bundles(work, storymem_cache) -> dict[str, Path]:
    """Copies of the tiny bundle, each with one defect only a later M2V shot would have met."""
    from safetensors.torch import load_file, save_file

    from storymem_rt.tiny import ensure_tiny_models

    src = ensure_tiny_models()
    out = {}

    def copy(name):
        d = work / f"bundle_{name}"
        shutil.copytree(src, d)
        out[name] = d
        return d

    low = "Wan2.2-I2V-A14B/low_noise_model/diffusion_pytorch_model.safetensors"
    d = copy("truncated_i2v")
    data = (d / low).read_bytes()
    (d / low).write_bytes(data[: len(data) - 100])
    d = copy("i2v_shape")
    sd = load_file(d / low)
    k = next(k for k in sd if k.endswith("self_attn.q.weight"))
    sd[k] = sd[k][:, :-1].contiguous()
    save_file(sd, d / low)
    d = copy("lora_pickle")
    (d / "StoryMem/Wan2.2-MI2V-A14B/backbone_low_noise.pth").write_bytes(_evil_pickle(work / "PWNED"))
    d = copy("t5_pickle")
    (d / "Wan2.2-T2V-A14B/models_t5_umt5-xxl-enc-bf16.pth").write_bytes(_evil_pickle(work / "PWNED"))
    (d / "Wan2.2-I2V-A14B/models_t5_umt5-xxl-enc-bf16.pth").write_bytes(_evil_pickle(work / "PWNED"))
    return out


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil_pickle(marker: Path) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save({"x": _Evil(marker)}, buf)
    return buf.getvalue()


PREFLIGHT = [
    ("truncated_i2v", [], ["low_noise_model", "truncated"]),
    ("i2v_shape", [], ["low_noise_model", "self_attn.q.weight", "has shape"]),
    ("lora_pickle", [], ["backbone_low_noise.pth", "refused"]),
    ("t5_pickle", [], ["models_t5_umt5-xxl-enc-bf16.pth", "refused"]),
    ("ok", ["--lora-rank", "16"], ["the LoRA has rank 8", "--lora-rank 16 was given", "pass --lora-rank 8"]),
]


@pytest.mark.parametrize("case", PREFLIGHT, ids=[c[0] for c in PREFLIGHT])
def test_preflight_refuses_before_the_first_shot(work, broken_bundles, tmp_path, monkeypatch, case):
    """Every input the whole story needs is checked before shot 1 (a T2V shot that needs none
    of the broken I2V/LoRA files) starts: exit 1, nothing written, no code run."""
    import storymem_rt.shot as shot_mod

    name, extra, words = case
    models = broken_bundles.get(name) or "tiny"
    monkeypatch.setattr(shot_mod, "generate_shot", lambda *a, **kw: pytest.fail("a shot started"))
    out = tmp_path / "o"
    r = _render(work / "story2.json", out, "--models", str(models), *extra)
    line = _error_line(r, 1)
    for w in words:
        assert w in line, (w, line)
    if name == "ok":
        assert "download" not in line  # the option is wrong, not the file
    assert not out.exists() and not (work / "PWNED").exists()


# --------------------------------------------------------------------------- resume stays consistent


def test_kept_note(tmp_path):
    assert kept_note(tmp_path / "none") == "no shot was finished; nothing to resume"
    (tmp_path / "render.json").write_text(json.dumps({"plan": [1, 2, 3], "shots": {"01_01": {}}, "final": None}))
    assert kept_note(tmp_path) == f"1 of 3 shots finished and kept in {tmp_path}; rerun the same command to resume"
