"""`storymem-rt validate`: the plan it prints, and one clear line with exit 2 for every broken script."""
from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path

import pytest

from conftest import REPO, STBENCH_FILES, cli, inline_story, write_story

INLINE = inline_story((["a1", "a2", "a3"], [True, False, True], ["f1", "f2", "f3"]),
                      (["b1", "b2"], [True, False]))


def invoke(args, cwd: Path):
    """Run the CLI in `cwd` (which must stay empty: validate writes nothing)."""
    old = os.getcwd()
    os.chdir(cwd)
    try:
        return cli(*args, catch_exceptions=True)
    finally:
        os.chdir(old)


@pytest.fixture
def dirs(tmp_path):
    inp, cwd = tmp_path / "in", tmp_path / "cwd"
    inp.mkdir()
    cwd.mkdir()
    return inp, cwd


def ok(result):
    assert result.exit_code == 0, result.output
    assert result.exception is None
    return result


# --------------------------------------------------------------------------- good scripts

@pytest.mark.parametrize("path", STBENCH_FILES or [None], ids=lambda p: p.stem if p else "missing")
def test_validate_stbench(path, stbench, tmp_path):
    raw = json.loads(path.read_text())
    n = sum(len(s["video_prompts"]) for s in raw["scenes"])
    r = ok(invoke(["validate", path, "--json", "--mi2v"], tmp_path))
    shots = json.loads(r.stdout)["shots"]
    assert len(shots) == n and shots[0]["mode"] == "t2v"
    assert {s["frames"] for s in shots} == {81}  # no per-shot lengths in ST-Bench: every shot as the reference
    assert [s["prompt"] for s in shots] == [p for sc in raw["scenes"] for p in sc["video_prompts"]]
    n_continue = sum(not c for sc in raw["scenes"] for c in sc["cut"]) - (not raw["scenes"][0]["cut"][0])
    assert sum(s["mode"] == "mi2v" for s in shots) == n_continue
    r = ok(invoke(["validate", path], tmp_path))
    assert f"{n} shots" in r.stdout and "01_01" in r.stdout
    assert list(tmp_path.iterdir()) == []


def test_validate_example_stories(tmp_path):
    for path in sorted((REPO / "story").glob("*.json")):
        ok(invoke(["validate", path, "--mm2v"], tmp_path))


def test_validate_json_plan(dirs):
    inp, cwd = dirs
    p = write_story(inp, INLINE)
    r = ok(invoke(["validate", p, "--json", "--mi2v", "--seed", "7"], cwd))
    assert json.loads(r.stdout) == {"shots": [
        {"scene": 1, "shot": 1, "mode": "t2v", "seed": 7, "cut": True, "prompt": "a1", "frames": 81},
        {"scene": 1, "shot": 2, "mode": "mi2v", "seed": 8, "cut": False, "prompt": "a2", "frames": 81},
        {"scene": 1, "shot": 3, "mode": "m2v", "seed": 9, "cut": True, "prompt": "a3", "frames": 81},
        {"scene": 2, "shot": 1, "mode": "m2v", "seed": 7, "cut": True, "prompt": "b1", "frames": 81},
        {"scene": 2, "shot": 2, "mode": "mi2v", "seed": 8, "cut": False, "prompt": "b2", "frames": 81},
    ]}
    assert r.stderr == ""


@pytest.mark.parametrize("args,modes,seeds", [
    ([], ["t2v", "m2v", "m2v", "m2v", "m2v"], [0, 1, 2, 0, 1]),
    (["--mm2v"], ["t2v", "mm2v", "m2v", "m2v", "mm2v"], [0, 1, 2, 0, 1]),
    (["--m2v-first-shot", "--mi2v"], ["m2v", "mi2v", "m2v", "m2v", "mi2v"], [0, 1, 2, 0, 1]),
    (["--t2v-first-shot", "--seed-policy", "unique", "--seed", "3"], ["t2v", "m2v", "m2v", "m2v", "m2v"],
     [3, 4, 5, 6, 7]),
])
def test_validate_options(dirs, args, modes, seeds):
    inp, cwd = dirs
    p = write_story(inp, INLINE)
    shots = json.loads(ok(invoke(["validate", p, "--json", *args], cwd)).stdout)["shots"]
    assert [s["mode"] for s in shots] == modes
    assert [s["seed"] for s in shots] == seeds


def test_validate_reference_images(dirs):
    inp, cwd = dirs
    p = write_story(inp, INLINE)
    imgs = [write_story(inp, b"", f"ref{i}.png") for i in range(3)]
    # One flag, several values; the story path may come after them.
    for args in (["validate", p, "--json", "--reference-images", *imgs],
                 ["validate", "--json", "--reference-images", *imgs, p],
                 ["validate", p, "--json", "--reference-images", imgs[0], "--reference-images", imgs[1]]):
        shots = json.loads(ok(invoke(args, cwd)).stdout)["shots"]
        assert [s["mode"] for s in shots] == ["m2v", "m2v", "m2v", "m2v", "m2v"]
    assert list(cwd.iterdir()) == []


def test_validate_text_output(dirs):
    inp, cwd = dirs
    data = copy.deepcopy(INLINE)
    data["scenes"][1]["video_prompts"][0] = "A very long prompt\nthat goes on " + "and on " * 30
    p = write_story(inp, data)
    out = ok(invoke(["validate", p, "--mi2v"], cwd)).stdout.splitlines()
    assert out[0] == f'{p}: "Inline": 2 scenes, 5 shots'
    rows = {line.split()[0]: line.split() for line in out[2:-1]}
    assert list(rows) == ["01_01", "01_02", "01_03", "02_01", "02_02"]
    assert rows["01_02"][:4] == ["01_02", "mi2v", "1", "no"]
    assert rows["02_01"][-1].endswith("...") and len(out[5]) < 120
    assert rows["01_01"][4] == "81" and rows["01_02"][4:7] == ["81", "->", "80"]  # MI2V drops 1 frame
    # 5 shots of 81 frames, two MI2V shots keep 80: 403 frames, 25.2 s.
    assert out[-1] == "ok: t2v 1, m2v 2, mi2v 2; 403 frames (25.2 s at 16 fps)"


def test_validate_warns_on_stderr(dirs):
    inp, cwd = dirs
    data = copy.deepcopy(INLINE)
    data["scenes"][1]["cut"][0] = "False"
    p = write_story(inp, data)
    r = ok(invoke(["validate", p, "--json", "--mi2v"], cwd))
    assert json.loads(r.stdout)["shots"][3]["mode"] == "mi2v"
    assert r.stderr.startswith("warning: ") and "scenes[1].cut[0]" in r.stderr
    assert len(r.stderr.splitlines()) == 1


def test_verbose_flag(dirs):
    inp, cwd = dirs
    p = write_story(inp, {"scenes": [{"scene_num": 1, "video_prompts": ["a"]}]})
    r = ok(invoke(["-vv", "validate", p], cwd))
    assert "debug: " in r.stderr and "scenes[0].cut" in r.stderr
    r = ok(invoke(["validate", p], cwd))
    assert r.stderr == ""


# --------------------------------------------------------------------------- broken scripts

def _set(path, value):
    """A mutation that sets data[path...] = value (path: keys and indices)."""
    def f(d):
        target = d
        for k in path[:-1]:
            target = target[k]
        target[path[-1]] = value
        return d
    return f


def _del(path):
    def f(d):
        target = d
        for k in path[:-1]:
            target = target[k]
        del target[path[-1]]
        return d
    return f


def _lengths(scene: int, key: str, first):
    """Give scene `scene` a `key` list (frames/seconds) whose first entry is `first`, the rest valid."""
    def f(d):
        n = len(d["scenes"][scene]["video_prompts"])
        d["scenes"][scene][key] = [first] + [81 if key == "frames" else 5] * (n - 1)
        return d
    return f


def _text(transform):
    """A mutation of the file's text rather than of its decoded value."""
    def f(d):
        return transform(json.dumps(d, indent=2))
    return f


# (name, mutation of a story with >= 2 scenes of >= 2 shots each, what the one error line must contain:
# a plain string, mostly the JSON path of the problem, or a compiled regex)
BROKEN = [
    ("invalid_json_truncated", _text(lambda s: s[: len(s) // 2]), re.compile(r"line \d+ col \d+: invalid JSON")),
    ("invalid_json_stray_comma", _text(lambda s: s.replace('"scenes": [', '"scenes": [,', 1)),
     re.compile(r"line \d+ col \d+: invalid JSON \(Expecting value\)")),
    ("empty_file", _text(lambda s: ""), "line 1 col 1: invalid JSON"),
    ("not_utf8", lambda d: b"\xff\xfe" + json.dumps(d).encode("utf-16-le"), "not UTF-8"),
    ("top_level_list", lambda d: [d], "top level"),
    ("story_name_not_string", _set(["story_name"], 7), "story_name"),
    ("story_overview_not_string", _set(["story_overview"], ["x"]), "story_overview"),
    ("missing_scenes", _del(["scenes"]), "scenes: missing"),
    ("scenes_not_list", _set(["scenes"], {"scene_num": 1}), "scenes: must be a list"),
    ("empty_scenes", _set(["scenes"], []), "scenes: is empty"),
    ("scene_not_object", _set(["scenes", 1], "scene two"), "scenes[1]: "),
    ("missing_video_prompts", _del(["scenes", 1, "video_prompts"]), "scenes[1].video_prompts"),
    ("video_prompts_is_string", _set(["scenes", 0, "video_prompts"], "one prompt"), "scenes[0].video_prompts"),
    ("empty_video_prompts", _set(["scenes", 1, "video_prompts"], []), "scenes[1].video_prompts: is empty"),
    ("prompt_not_string", _set(["scenes", 1, "video_prompts", 1], 42), "scenes[1].video_prompts[1]"),
    ("prompt_null", _set(["scenes", 0, "video_prompts", 0], None), "scenes[0].video_prompts[0]"),
    ("prompt_blank", _set(["scenes", 0, "video_prompts", 1], "   "), "scenes[0].video_prompts[1]: is empty"),
    ("cut_too_short", lambda d: _set(["scenes", 1, "cut"], d["scenes"][1]["cut"][:-1])(d), "scenes[1].cut: has"),
    ("cut_too_long", lambda d: _set(["scenes", 0, "cut"], d["scenes"][0]["cut"] + [True])(d), "scenes[0].cut: has"),
    ("cut_not_list", _set(["scenes", 0, "cut"], True), "scenes[0].cut: must be a list"),
    ("cut_maybe", _set(["scenes", 1, "cut", 1], "maybe"), "scenes[1].cut[1]"),
    ("cut_two", _set(["scenes", 0, "cut", 1], 2), "scenes[0].cut[1]"),
    ("cut_null", _set(["scenes", 1, "cut", 0], None), "scenes[1].cut[0]"),
    ("scene_num_missing", _del(["scenes", 1, "scene_num"]), "scenes[1].scene_num: missing"),
    ("scene_num_string", _set(["scenes", 1, "scene_num"], "2"), "scenes[1].scene_num: must be an integer"),
    ("scene_num_float", _set(["scenes", 0, "scene_num"], 1.5), "scenes[0].scene_num: must be an integer"),
    ("scene_num_bool", _set(["scenes", 0, "scene_num"], True), "scenes[0].scene_num: must be an integer"),
    ("scene_num_zero", _set(["scenes", 0, "scene_num"], 0), "scenes[0].scene_num: must be 1 or more"),
    ("scene_num_duplicate", lambda d: _set(["scenes", 1, "scene_num"], d["scenes"][0]["scene_num"])(d),
     "scenes[1].scene_num: "),
    ("first_frame_prompt_length", lambda d: _set(["scenes", 1, "first_frame_prompt"],
                                                 ["x"] * (len(d["scenes"][1]["video_prompts"]) + 1))(d),
     "scenes[1].first_frame_prompt: has"),
    ("first_frame_prompt_not_string", lambda d: _set(["scenes", 1, "first_frame_prompt"],
                                                     [3] * len(d["scenes"][1]["video_prompts"]))(d),
     "scenes[1].first_frame_prompt[0]"),
    # per-shot lengths (issue 16)
    ("frames_not_4n1", _lengths(1, "frames", 18), "scenes[1].frames[0]: 18 is not a valid frame count"),
    ("frames_float", _lengths(1, "frames", 33.5), "scenes[1].frames[0]: 33.5 is not a valid frame count"),
    ("frames_too_long", _lengths(0, "frames", 165), "scenes[0].frames[0]: 165 frames is outside 5..161"),
    ("frames_too_short", _lengths(1, "frames", 1), "scenes[1].frames[0]: 1 frames is outside 5..161"),
    ("frames_string", _lengths(1, "frames", "81"), "scenes[1].frames[0]: must be a number"),
    ("frames_bool", _lengths(0, "frames", True), "scenes[0].frames[0]: must be a number"),
    ("frames_not_list", _set(["scenes", 0, "frames"], 81), "scenes[0].frames: must be a list"),
    ("frames_too_few", lambda d: _set(["scenes", 1, "frames"], [81] * (len(d["scenes"][1]["video_prompts"]) - 1))(d),
     "scenes[1].frames: has"),
    ("frames_too_many", lambda d: _set(["scenes", 0, "frames"], [81] * (len(d["scenes"][0]["video_prompts"]) + 1))(d),
     "scenes[0].frames: has"),
    ("frames_and_seconds", lambda d: _lengths(0, "seconds", 5)(_lengths(0, "frames", 81)(d)),
     'scenes[0].seconds: is given together with "frames"'),
    ("seconds_too_long", _lengths(1, "seconds", 30), "scenes[1].seconds[0]: 30 s gives 481 frames"),
    ("seconds_negative", _lengths(0, "seconds", -1), "scenes[0].seconds[0]: -1 s gives"),
    ("seconds_string", _lengths(0, "seconds", "5s"), "scenes[0].seconds[0]: must be a number"),
    ("seconds_infinity", _text(lambda s: s.replace('"scenes": [', '"scenes": [{"scene_num": 99, "video_prompts": ["x"], '
                                                    '"seconds": [Infinity]},', 1)),
     "scenes[0].seconds[0]: must be a finite number, got a number Infinity"),
    ("seconds_not_list", _set(["scenes", 1, "seconds"], 5), "scenes[1].seconds: must be a list"),
    ("seconds_too_few", lambda d: _set(["scenes", 0, "seconds"], [5] * (len(d["scenes"][0]["video_prompts"]) - 1))(d),
     "scenes[0].seconds: has"),
    # formats
    ("json5_error_after_a_comment", _text(lambda s: "// a comment\n" + s.replace('"scenes": [', '"scenes": [}', 1)),
     re.compile(r"line \d+ col \d+: invalid JSON5? \(")),
    ("utf16_be", lambda d: b"\xfe\xff" + json.dumps(d).encode("utf-16-be"), "not UTF-8 text (a UTF-16 byte order mark)"),
    ("utf32", lambda d: json.dumps(d).encode("utf-32"), "not UTF-8 text (a UTF-32 byte order mark)"),
    ("latin1", lambda d: json.dumps(d, ensure_ascii=False).replace('"scenes"', '"caf\u00e9", "scenes"', 1)
     .encode("latin-1", errors="replace"), "not UTF-8"),
    ("nul_bytes", lambda d: json.dumps(d).encode() + b"\x00\x00", "NUL characters"),
]


def _stbench_base() -> Path | None:
    """The first ST-Bench script with two or more scenes of two or more shots."""
    for p in STBENCH_FILES:
        scenes = json.loads(p.read_text())["scenes"]
        if len(scenes) >= 2 and all(len(s["video_prompts"]) >= 2 for s in scenes):
            return p
    return None


def _check_broken(base: dict, mutate, expected, dirs):
    inp, cwd = dirs
    data = mutate(copy.deepcopy(base))
    p = write_story(inp, data)
    r = invoke(["validate", p], cwd)
    assert r.exit_code == 2, r.output
    assert isinstance(r.exception, SystemExit)  # click's exit, not an escaped exception
    assert "Traceback" not in r.output
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    pattern = expected if isinstance(expected, re.Pattern) else re.compile(re.escape(expected))
    assert lines[0].startswith(f"Error: {p}: ") and pattern.search(lines[0]), lines[0]
    assert "; " in lines[0]  # problem; fix
    assert list(cwd.iterdir()) == []
    assert sorted(x.name for x in inp.iterdir()) == ["story.json"]


def test_broken_cases_are_many():
    assert len(BROKEN) >= 15 and len({name for name, *_ in BROKEN}) == len(BROKEN)


@pytest.mark.parametrize("name,mutate,expected", BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_inline(name, mutate, expected, dirs):
    _check_broken(INLINE, mutate, expected, dirs)


@pytest.mark.parametrize("name,mutate,expected", BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_stbench(name, mutate, expected, dirs, stbench):
    base = _stbench_base()
    if base is None:
        pytest.skip("no ST-Bench script with 2+ scenes of 2+ shots")
    _check_broken(json.loads(base.read_text()), mutate, expected, dirs)


def test_missing_file_and_folder(dirs):
    inp, cwd = dirs
    for target, expected in ((inp / "nope.json", "no such file"), (inp, "is a folder")):
        r = invoke(["validate", target], cwd)
        assert r.exit_code == 2 and isinstance(r.exception, SystemExit)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"Error: {target}: {expected}; "), r.stderr
    assert list(cwd.iterdir()) == []


# --------------------------------------------------------------------------- usage errors

@pytest.mark.parametrize("args,expected", [
    (["--mi2v", "--mm2v"], "--mi2v and --mm2v"),
    (["--t2v-first-shot", "--reference-images", "REF"], "--reference-images"),
    (["--seed", "-1"], "--seed"),
    (["--seed-policy", "random"], "--seed-policy"),
    (["--reference-images", "missing.png"], "missing.png"),
    (["--no-such-option"], "No such option"),
])
def test_usage_errors(dirs, args, expected):
    inp, cwd = dirs
    p = write_story(inp, INLINE)
    ref = write_story(inp, b"", "ref.png")
    args = [str(ref) if a == "REF" else a for a in args]
    r = invoke(["validate", p, *args], cwd)
    assert r.exit_code == 2 and isinstance(r.exception, SystemExit), r.output
    assert "Traceback" not in r.output and r.stdout == ""
    lines = r.stderr.strip().splitlines()  # one line: no usage banner above it
    assert len(lines) == 1 and lines[0].startswith("Error: ") and expected in lines[0], r.stderr
    assert lines[0].endswith("(see 'main validate --help')"), lines[0]
    assert list(cwd.iterdir()) == []


@pytest.mark.parametrize("args,expected", [(["--bogus"], "No such option"), (["nocmd"], "No such command"),
                                           (["render"], "Missing argument 'STORY'")])
def test_usage_errors_of_the_group_are_one_line(tmp_path, args, expected):
    r = invoke(args, tmp_path)
    assert r.exit_code == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and expected in lines[0], r.stderr


def test_usage_error_before_reading_the_story(dirs):
    # Conflicting flags are reported even when the story would also be broken.
    inp, cwd = dirs
    r = invoke(["validate", inp / "missing.json", "--mi2v", "--mm2v"], cwd)
    assert r.exit_code == 2 and "--mi2v and --mm2v" in r.stderr and "missing.json" not in r.stderr.splitlines()[-1]


def test_overflowing_seed_is_a_usage_error(dirs):
    inp, cwd = dirs
    p = write_story(inp, INLINE)
    r = invoke(["validate", p, "--seed", str(2**63 - 1)], cwd)
    assert r.exit_code == 2 and isinstance(r.exception, SystemExit) and "seed" in r.stderr


def test_help_lists_reference_options(tmp_path):
    r = ok(invoke(["validate", "--help"], tmp_path))
    for opt in ("--mi2v", "--mm2v", "--t2v-first-shot", "--m2v-first-shot", "--seed", "--seed-policy",
                "--reference-images", "--json"):
        assert opt in r.stdout
    assert ok(invoke(["--version"], tmp_path)).stdout.strip().endswith("0.1.0")


# --------------------------------------------------------------------------- issue 16: lengths and formats

JSON5_STORY = """\ufeff// A story as people write it: comments, trailing commas, unquoted keys.
{
  story_name: "Inline",
  story_overview: 'A test story.',   /* single quotes too */
  scenes: [
    {scene_num: 1, video_prompts: ["a1", "a2", "a3",], first_frame_prompt: ["f1", "f2", "f3"],
     cut: [true, false, true,],},
    {scene_num: 2, video_prompts: ["b1", "b2"], cut: [true, false]},
  ],
}
"""


@pytest.mark.parametrize("newline", ["\n", "\r\n"], ids=["lf", "crlf"])
def test_json5_bom_crlf_give_the_plain_plan(dirs, newline):
    inp, cwd = dirs
    plain = ok(invoke(["validate", write_story(inp, INLINE), "--json", "--mi2v"], cwd)).stdout
    p = inp / "story.json5"
    p.write_bytes(JSON5_STORY.replace("\n", newline).encode("utf-8"))
    assert p.read_bytes().startswith(b"\xef\xbb\xbf")
    assert ok(invoke(["validate", p, "--json", "--mi2v"], cwd)).stdout == plain
    p.write_bytes(("\ufeff" + json.dumps(INLINE, indent=2)).replace("\n", newline).encode("utf-8"))
    assert ok(invoke(["validate", p, "--json", "--mi2v"], cwd)).stdout == plain


def test_lengths_in_the_plan(dirs):
    inp, cwd = dirs
    data = copy.deepcopy(INLINE)
    data["scenes"][0]["frames"] = [17, None, 33]
    data["scenes"][1]["seconds"] = [5, 1.2]
    p = write_story(inp, data)
    shots = json.loads(ok(invoke(["validate", p, "--json", "--mm2v", "--frame-num", "49"], cwd)).stdout)["shots"]
    # null takes --frame-num; 1.2 s = 19.2 frames -> the nearest 4n+1 is 21; 5 s -> 81
    assert [s["frames"] for s in shots] == [17, 49, 33, 81, 21]
    assert [s.get("seconds") for s in shots] == [None, None, None, 5.0, 1.2]
    assert [s["mode"] for s in shots] == ["t2v", "mm2v", "m2v", "m2v", "mm2v"]
    out = ok(invoke(["validate", p, "--mm2v", "--frame-num", "49"], cwd)).stdout.splitlines()
    rows = {line.split()[0]: line for line in out[2:-1]}
    assert " 49 -> 44 " in rows["01_02"] and " 21 -> 16 (1.2 s) " in rows["02_02"] and " 81 (5 s) " in rows["02_01"]
    assert out[-1] == "ok: t2v 1, m2v 2, mm2v 2; 191 frames (11.9 s at 16 fps)"  # 17 + 44 + 33 + 81 + 16


def test_a_shot_too_short_for_mm2v(dirs):
    """5 frames are valid, but an MM2V shot drops 5: the error names the scene, the shot and the mode."""
    inp, cwd = dirs
    data = copy.deepcopy(INLINE)
    data["scenes"][1]["frames"] = [81, 5]
    p = write_story(inp, data)
    ok(invoke(["validate", p, "--mi2v"], cwd))  # MI2V keeps 4 of them
    r = invoke(["validate", p, "--mm2v"], cwd)
    assert r.exit_code == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert lines == [f"Error: {p}: scenes[1].frames[1]: shot 02_02 is MM2V and its 5 frames leave none after its "
                     "5 known frames; give it 9 frames or more"]


def test_frame_num_option_of_validate(dirs):
    inp, cwd = dirs
    p = write_story(inp, INLINE)
    r = invoke(["validate", p, "--frame-num", "80"], cwd)
    assert r.exit_code == 2 and "4n+1" in r.stderr and len(r.stderr.strip().splitlines()) == 1
