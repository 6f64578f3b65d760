"""Story scripts: parsing, checks, and the shot plan (modes and seeds) against hand-computed plans."""
from __future__ import annotations

import json
import logging

import pytest

from storymem_rt.errors import StoryError
from storymem_rt.script import (MODES, PlannedShot, PlanSettings, Scene, Story, load_story, parse_story,
                                plan_shots)

from conftest import REPO, STBENCH_FILES, inline_story

# Scene 1: cut, no cut, cut.  Scene 2: cut, no cut.  Scene 3 starts without a cut, then a cut.
INLINE = inline_story((["a1", "a2", "a3"], [True, False, True]), (["b1", "b2"], [True, False]),
                      (["c1", "c2"], [False, True]))


def _story(data=None) -> Story:
    return parse_story(json.loads(json.dumps(data or INLINE)), "inline.json")


def _modes(shots):
    return [s.mode for s in shots]


# --------------------------------------------------------------------------- ST-Bench

@pytest.mark.parametrize("path", STBENCH_FILES or [None], ids=lambda p: p.stem if p else "missing")
def test_stbench_script_loads_and_plans(path, stbench):
    story = load_story(path)
    raw = json.loads(path.read_text())
    assert story.name == raw["story_name"]
    assert [s.num for s in story.scenes] == [s["scene_num"] for s in raw["scenes"]]
    assert story.num_shots == sum(len(s["video_prompts"]) for s in raw["scenes"])
    for mi2v, mm2v in [(False, False), (True, False), (False, True)]:
        shots = plan_shots(story, mi2v=mi2v, mm2v=mm2v)
        assert [s.index for s in shots] == list(range(story.num_shots))
        assert shots[0].mode == "t2v" and all(s.mode in MODES for s in shots)
        flat = [(sc["scene_num"], j, c) for sc in raw["scenes"] for j, c in enumerate(sc["cut"])]
        for shot, (num, j, cut) in zip(shots, flat):
            assert (shot.scene, shot.shot, shot.seed) == (num, j + 1, j)
            if shot.index and not cut:
                assert shot.mode == ("mi2v" if mi2v else "mm2v" if mm2v else "m2v")
            elif shot.index:
                assert shot.mode == "m2v"


def test_example_stories_load():
    paths = sorted((REPO / "story").glob("*.json"))
    assert len(paths) >= 2
    for path in paths:
        story = load_story(path)
        assert 2 <= len(story.scenes) <= 3
        assert all(1 <= len(s.prompts) <= 4 for s in story.scenes)
        cuts = [c for s in story.scenes for c in s.cuts]
        assert True in cuts and False in cuts


# --------------------------------------------------------------------------- the plan

def test_plan_default_t2v_first_and_m2v_after():
    shots = plan_shots(_story())
    # Without --mi2v/--mm2v every later shot is M2V, cut or not.
    assert _modes(shots) == ["t2v", "m2v", "m2v", "m2v", "m2v", "m2v", "m2v"]
    assert [s.id for s in shots] == ["01_01", "01_02", "01_03", "02_01", "02_02", "03_01", "03_02"]
    assert [s.prompt for s in shots] == ["a1", "a2", "a3", "b1", "b2", "c1", "c2"]
    assert [s.cut for s in shots] == [True, False, True, True, False, False, True]
    assert shots[0] == PlannedShot(index=0, scene=1, shot=1, mode="t2v", seed=0, cut=True, prompt="a1")


def test_plan_mi2v_when_cut_false():
    # 03_01 has no cut: it continues from 02_02 across the scene boundary.
    assert _modes(plan_shots(_story(), mi2v=True)) == ["t2v", "mi2v", "m2v", "m2v", "mi2v", "mi2v", "m2v"]


def test_plan_mm2v_when_cut_false():
    assert _modes(plan_shots(_story(), mm2v=True)) == ["t2v", "mm2v", "m2v", "m2v", "mm2v", "mm2v", "m2v"]


def test_plan_mi2v_and_mm2v_together_is_an_error():
    with pytest.raises(ValueError, match="mi2v and mm2v"):
        plan_shots(_story(), mi2v=True, mm2v=True)
    with pytest.raises(ValueError):
        PlanSettings(mi2v=True, mm2v=True)


def test_plan_m2v_first_shot():
    assert _modes(plan_shots(_story(), first_shot="m2v", mi2v=True)) == \
        ["m2v", "mi2v", "m2v", "m2v", "mi2v", "mi2v", "m2v"]


def test_plan_reference_images_make_first_shot_m2v():
    assert _modes(plan_shots(_story(), reference_images=True, mm2v=True)) == \
        ["m2v", "mm2v", "m2v", "m2v", "mm2v", "mm2v", "m2v"]
    settings = PlanSettings(first_shot="m2v", reference_images=("a.png", "b.png"))
    assert _modes(settings.plan(_story()))[0] == "m2v"
    assert settings.to_json()["reference_images"] == ["a.png", "b.png"]
    with pytest.raises(ValueError, match="first shot must be m2v"):
        PlanSettings(first_shot="t2v", reference_images=("a.png",))


def test_plan_seeds_reference_policy():
    # Reference: seed + index of the shot inside its scene; every scene restarts at seed.
    assert [s.seed for s in plan_shots(_story())] == [0, 1, 2, 0, 1, 0, 1]
    assert [s.seed for s in plan_shots(_story(), seed=42)] == [42, 43, 44, 42, 43, 42, 43]


def test_plan_seeds_unique_policy():
    assert [s.seed for s in plan_shots(_story(), seed=42, seed_policy="unique")] == [42, 43, 44, 45, 46, 47, 48]


def test_plan_first_shot_never_continues():
    # The story's first shot follows nothing: cut=false there is planned as a cut, T2V/M2V.
    data = json.loads(json.dumps(INLINE))
    data["scenes"][0]["cut"][0] = False
    for kw in ({"mi2v": True}, {"mm2v": True}, {"mi2v": True, "first_shot": "m2v"}):
        first = plan_shots(_story(data), **kw)[0]
        assert first.mode in ("t2v", "m2v") and first.cut is True


def test_plan_rejects_bad_arguments():
    for kw in ({"first_shot": "mi2v"}, {"seed_policy": "random"}, {"seed": -1}, {"seed": True},
               {"seed": 2**63 - 1}):
        with pytest.raises(ValueError):
            plan_shots(_story(), **kw)


def test_modes_match_shot_module():
    shot = pytest.importorskip("storymem_rt.shot", exc_type=ImportError)
    assert tuple(shot.MODES) == MODES


# --------------------------------------------------------------------------- cut parsing

@pytest.mark.parametrize("value,expected", [
    (True, True), (False, False), ("True", True), ("False", False), ("false", False), ("TRUE", True),
    (" false ", False), (1, True), (0, False),
])
def test_cut_values(value, expected):
    data = {"scenes": [{"scene_num": 1, "video_prompts": ["a", "b"], "cut": [True, value]}]}
    assert _story(data).scenes[0].cuts == (True, expected)


def test_string_false_is_not_a_cut():
    # The reference's `not scene["cut"][i]` makes the string "False" a cut; it is not one here.
    data = {"scenes": [{"scene_num": 1, "video_prompts": ["a", "b"], "cut": ["True", "False"]}]}
    assert _modes(plan_shots(_story(data), mi2v=True)) == ["t2v", "mi2v"]


def test_missing_cut_means_all_cuts():
    data = {"scenes": [{"scene_num": 1, "video_prompts": ["a", "b", "c"]},
                       {"scene_num": 2, "video_prompts": ["d"], "cut": None}]}
    story = _story(data)
    assert [s.cuts for s in story.scenes] == [(True, True, True), (True,)]
    assert _modes(plan_shots(story, mi2v=True)) == ["t2v", "m2v", "m2v", "m2v"]


@pytest.mark.parametrize("value", ["maybe", 2, -1, None, 1.0, "", "yes", [True], {}])
def test_bad_cut_values(value):
    data = {"scenes": [{"scene_num": 1, "video_prompts": ["a", "b"], "cut": [True, value]}]}
    with pytest.raises(StoryError, match=r"^inline\.json: scenes\[0\]\.cut\[1\]: "):
        _story(data)


# --------------------------------------------------------------------------- schema details

def test_story_fields_and_defaults(tmp_path):
    p = tmp_path / "my_story.json"
    p.write_text(json.dumps({"scenes": [{"scene_num": 1, "video_prompts": ["a"],
                                         "first_frame_prompt": ["fa"]}]}))
    story = load_story(p)
    assert story.name == "my_story" and story.overview == ""
    assert story.scenes == (Scene(num=1, prompts=("a",), cuts=(True,), first_frame_prompts=("fa",)),)
    with pytest.raises(Exception):
        story.name = "x"  # frozen


def test_utf8_bom_accepted(tmp_path):
    p = tmp_path / "bom.json"
    p.write_bytes(b"\xef\xbb\xbf" + json.dumps(INLINE).encode())
    assert load_story(p).num_shots == 7


def test_error_message_shape(tmp_path):
    p = tmp_path / "s.json"
    data = json.loads(json.dumps(INLINE))
    data["scenes"][2]["cut"][1] = "maybe"
    p.write_text(json.dumps(data))
    with pytest.raises(StoryError) as e:
        load_story(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}: scenes[2].cut[1]: ") and "; " in msg and "\n" not in msg


def test_invalid_json_names_line_and_column(tmp_path):
    p = tmp_path / "s.json"
    p.write_text('{\n  "scenes": [\n    {"scene_num": 1,, }\n  ]\n}\n')
    with pytest.raises(StoryError, match=r"line 3 col 21: invalid JSON"):
        load_story(p)


def test_warning_first_shot_without_cut(caplog):
    data = json.loads(json.dumps(INLINE))
    data["scenes"][0]["cut"][0] = "false"
    with caplog.at_level(logging.WARNING, logger="storymem_rt"):
        _story(data)
    msgs = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("scenes[0].cut[0]" in m and "first shot" in m for m in msgs)
    # Scene 3 starting without a cut is suspicious but allowed: a warning, not an error.
    assert any("scenes[2].cut[0]" in m and "scene 3" in m for m in msgs)


def test_no_warning_when_every_scene_starts_with_a_cut(caplog):
    data = json.loads(json.dumps(INLINE))
    data["scenes"][2]["cut"][0] = True
    with caplog.at_level(logging.WARNING, logger="storymem_rt"):
        _story(data)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
