"""Fuzz: malformed and hostile story scripts through `validate` and `render --models tiny`.

Stories are random (seeded) mutations of the ST-Bench scripts and of story/*.json: wrong
types, removed and misspelled keys, hostile names and numbers, unicode (controls, escape
codes, bidi overrides, surrogates, NUL), sizes (huge prompts, deep nesting), encodings
(UTF-16, Latin-1, broken UTF-8, BOMs) and byte damage (truncation, flipped bytes). Each one
goes through both commands in-process. Whatever the input:
- no traceback, an exit code from storymem_rt.guard.EXIT_CODES, and one `Error:` line on failure;
- nothing written outside --out (the working folder holds only the story and --out after);
- no partial file in --out (no temporary name, no lock left, every MP4 readable, the
  manifest valid JSON), and a finished render holds its whole story video.

Most mutations fail validation in milliseconds. Of those that pass, the ones with the fewest
shots are rendered to the end (at 16x16, 5 frames, 1 step) within a budget of shots; the
rest are checked by `validate` and by `render --strict`'s script checks only. The test
reports its counts (`-s`).
"""
from __future__ import annotations

import copy
import json
import random
from pathlib import Path

from click.testing import CliRunner

from conftest import REPO, STBENCH_FILES
from storymem_rt.cli import main
from storymem_rt.guard import EXIT_CODES
from storymem_rt.outdir import LOCK_FILE

N_STORIES = 240
RENDER_SHOT_BUDGET = 12  # shots rendered to the end, over all valid mutations
RENDER_ARGS = ["--models", "tiny", "--size", "16*16", "--frame-num", "5", "--sample-steps", "1",
               "--max-memory-size", "1", "--fix", "0", "--no-quality-filter", "--no-progress"]

HOSTILE_TEXT = ["", " ", "\x00", "\x1b[2J\x1b[31mred", "\x9b31m", "\u202egnp.exe", "\ufeff", "\u200b" * 5,
                "e\u0301" * 50, "🎬🚢" * 20, "日本語の物語", "a" * 25_000, "../../../etc/passwd", "/abs/path",
                "01_01", "02_01_keyframe0", "render", "storyboard", "state", ".hidden", "CON", "a/b\\c",
                "\ud800", "\udfff lone", "%s%n%x", "${HOME}", "' OR 1=1 --", "\n\n\n", "\t"]
HOSTILE_NUMBERS = [0, -1, 1, 2, 99, 9999, 10_000, 10**30, -(10**30), 1.5, -0.0, 1e308, 2**63, True, False]


def _sources() -> list[tuple[str, dict]]:
    files = list(STBENCH_FILES) + sorted((REPO / "story").glob("*.json"))
    out = [(p.name, json.loads(p.read_text(encoding="utf-8"))) for p in files]
    assert len(out) >= 20, "ST-Bench scripts and story/*.json not found"
    return out


def _random_value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(8 if depth < 3 else 5)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice(HOSTILE_NUMBERS)
    if kind == 2:
        return rng.choice(HOSTILE_TEXT)
    if kind == 3:
        return rng.choice([True, False, "True", "false", "yes", 2])
    if kind == 4:
        return rng.choice([[], {}, "", 0])
    if kind == 5:
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    if kind == 6:
        return {rng.choice(["scene_num", "video_prompts", "cut", "x", "\u202e"]): _random_value(rng, depth + 1)}
    return "a prompt " + rng.choice(HOSTILE_TEXT)


def _paths(node, prefix=()):
    """Every (container, key) pair in a JSON tree."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield node, k
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield node, i
            yield from _paths(v, prefix + (i,))


def _shrink(data, rng, n=None):
    """Keep 1-2 shots (n): small valid stories, so that renders stay cheap."""
    scenes = data.get("scenes")
    if isinstance(scenes, list) and scenes and isinstance(scenes[0], dict):
        s = scenes[0]
        n = n or rng.choice([1, 2])
        for key in ("video_prompts", "cut", "first_frame_prompt"):
            if isinstance(s.get(key), list):
                s[key] = s[key][:n]
        data["scenes"] = [s]
    return data


def _mutate_tree(data, rng: random.Random):
    if not isinstance(data, dict):  # an earlier mutation replaced the top level
        return rng.choice([data, {"scenes": data}, [data, data]])
    pairs = list(_paths(data))
    op = rng.randrange(11)
    if op == 0 and pairs:  # replace a value by another type
        parent, key = rng.choice(pairs)
        parent[key] = _random_value(rng)
    elif op == 1 and pairs:  # delete a key or an element
        parent, key = rng.choice(pairs)
        del parent[key]
    elif op == 2:  # misspell a key
        dicts = [p for p, k in pairs if isinstance(p, dict)]
        if dicts:
            d = rng.choice(dicts)
            if d:
                k = rng.choice(list(d))
                d[rng.choice([k + "s", k.upper(), k[:-1], "\u0441" + k[1:], k + "\x1b[2J"])] = d.pop(k)
    elif op == 3:  # hostile story name
        data["story_name"] = rng.choice(HOSTILE_TEXT + ["01_01", "01 01", "Storyboard"])
    elif op == 4 and isinstance(data.get("scenes"), list) and data["scenes"]:  # hostile scene number
        scene = rng.choice(data["scenes"])
        if isinstance(scene, dict):
            scene["scene_num"] = rng.choice(HOSTILE_NUMBERS)
    elif op == 5:  # hostile text inside a prompt
        strings = [(p, k) for p, k in pairs if isinstance(p[k], str)]
        if strings:
            p, k = rng.choice(strings)
            text = p[k]
            i = rng.randrange(len(text) + 1)
            p[k] = text[:i] + rng.choice(HOSTILE_TEXT) + text[i:]
    elif op == 6 and isinstance(data.get("scenes"), list) and data["scenes"]:  # duplicate a scene
        data["scenes"].append(copy.deepcopy(rng.choice(data["scenes"])))
    elif op == 7:  # deep nesting (built in the text: a deep tree would overflow this test's own recursion)
        data[rng.choice(["scenes", "story_overview", "extra"])] = f"__DEEP_{rng.choice([50, 900, 5000])}__"
    elif op == 8:  # cut flags that do not fit
        for scene in data.get("scenes", []) if isinstance(data.get("scenes"), list) else []:
            if isinstance(scene, dict) and rng.random() < 0.5:
                scene["cut"] = rng.choice([[True], [], "False", [None, "maybe"], [1, 0, 1, 0, 1, 0, 1, 0]])
    elif op == 9:  # a whole other top level
        data = rng.choice([[], None, "story", 42, [data], {"scenes": data}])
    else:  # many shots, or many scenes
        data = {"story_name": "many", "scenes": [{"scene_num": i + 1, "video_prompts": ["p"] * rng.choice([1, 600])}
                                                 for i in range(rng.choice([2, 3]))]}
    return data


# Valid but hostile: what must render (names that look like other outputs, text a terminal or a
# file system would misread, numbers at the bounds).
VALID_NAMES = ["01_01", "01_02", "01 01", "02_01_keyframe0", "render", "storyboard", "state", ".hidden", "../../x", "/abs",
               "\x1b[2J\x1b[31mred", "\u202eevil", "日本語の物語", "🎬" * 40, "a" * 900, "CON", "", "\x00\x07"]
VALID_TEXT = ["\x1b[2J\x1b[31m", "\x9b31m", "\u202e", "\x00", "\u200b", "e\u0301", "🎬🚢", "日本語", "%s%n",
              "\n\n", "a" * 15_000]


def _hostile_valid(data, rng: random.Random, k: int):
    """The k-th hostile-but-valid story: the operations and the names in turn, not at random,
    so that every name is met (the first ones are rendered)."""
    data = _shrink(data, rng, n=2)  # two shots: a story video named like a shot would overwrite it
    scene = data["scenes"][0]
    op = k % 4
    if op == 0:
        data["story_name"] = VALID_NAMES[(k // 4) % len(VALID_NAMES)]
    elif op == 1:
        j = rng.randrange(len(scene["video_prompts"]))
        scene["video_prompts"][j] = rng.choice(VALID_TEXT) + scene["video_prompts"][j] + rng.choice(VALID_TEXT)
    elif op == 2:
        scene["scene_num"] = rng.choice([1, 99, 9999])
    else:
        scene[rng.choice(["cuts", "first_frame_prompts", "\x1b[31mcut"])] = [True]
    return data


def _to_bytes(data, rng: random.Random) -> bytes:
    text = json.dumps(data, ensure_ascii=rng.random() < 0.3, indent=rng.choice([None, 2]))
    for depth in (50, 900, 5000):
        text = text.replace(f'"__DEEP_{depth}__"', "[" * depth + '"x"' + "]" * depth)
    raw = text.encode("utf-8", "surrogatepass")
    op = rng.randrange(12)
    if op == 0:
        return raw[: rng.randrange(len(raw) + 1)]  # truncated
    if op == 1:
        b = bytearray(raw)
        for _ in range(rng.randrange(1, 6)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        return bytes(b)
    if op == 2:
        return text.encode("utf-16", "surrogatepass")
    if op == 3:
        return text.encode("latin-1", "replace")
    if op == 4:
        return b"\xef\xbb\xbf" + raw  # BOM: accepted
    if op == 5:
        return raw.replace(b'"scene_num": 1', rng.choice([b'"scene_num": NaN', b'"scene_num": Infinity',
                                                          b'"scene_num": 1e999', b'"scene_num": ' + b"9" * 5000]))
    if op == 6:
        return rng.choice([b"", b"   ", b"null", b"[]", b'"story"', b"\x00" * 64, b"{", b"{}{}"])
    if op == 7:
        return raw + rng.choice([b",", b"}", b"\x00", b" // comment", b"\n{}"])
    return raw  # the tree mutation alone


def _stories(n: int) -> list[tuple[str, bytes]]:
    rng = random.Random(15)
    sources = _sources()
    out = []
    for i in range(n):
        name, base = sources[i % len(sources)]
        data = copy.deepcopy(base)
        if i % 8 == 7:
            out.append((f"{i:03d}-{Path(name).stem}-hostile", json.dumps(_hostile_valid(data, rng, i // 8),
                                                                 ensure_ascii=False).encode()))
            continue
        if rng.random() < 0.5:
            data = _shrink(data, rng)
        for _ in range(rng.choice([1, 1, 2, 3])):
            data = _mutate_tree(data, rng)
        out.append((f"{i:03d}-{Path(name).stem}", _to_bytes(data, rng)))
    return out


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def _check_result(r, what: str) -> None:
    assert r.exit_code in EXIT_CODES, (what, r.exit_code, r.output[-2000:])
    assert "Traceback" not in r.output, (what, r.output[-3000:])
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise AssertionError(f"{what}: {r.exception!r}") from r.exception
    if r.exit_code:
        errors = [ln for ln in r.output.splitlines() if ln.startswith("Error")]
        assert len(errors) == 1, (what, r.output[-2000:])


def _check_out(out: Path, finished: bool) -> None:
    from storymem_rt.media import probe_video

    if not out.exists():
        assert not finished
        return
    names = _files(out)
    assert not [n for n in names if ".tmp-" in n or n.endswith(LOCK_FILE)], names
    for p in out.glob("*.mp4"):
        assert probe_video(p).num_frames > 0, p
    if (out / "render.json").exists():
        m = json.loads((out / "render.json").read_text(encoding="utf-8"))
        if finished:
            assert probe_video(out / m["final"]["video"]).num_frames == m["final"]["frames"]
            assert sorted(m["shots"]) == sorted(f"{p['scene']:02d}_{p['shot']:02d}" for p in m["plan"])
            for sid, shot in m["shots"].items():  # no other output was written over a shot's video
                assert probe_video(out / shot["video"]).num_frames == shot["frames"], sid


def test_fuzz_stories(tmp_path, monkeypatch, storymem_cache):
    stories = _stories(N_STORIES)
    assert len(stories) >= 200
    cache_before = _files(storymem_cache)
    runner = CliRunner()
    valid = []
    codes: dict[int, int] = {}
    for name, raw in stories:
        cwd = tmp_path / name
        cwd.mkdir()
        monkeypatch.chdir(cwd)
        story = cwd / "story.json"
        story.write_bytes(raw)
        r = runner.invoke(main, ["validate", str(story)])
        _check_result(r, f"{name} validate")
        assert _files(cwd) == {"story.json"}, name  # validate writes nothing
        codes[r.exit_code] = codes.get(r.exit_code, 0) + 1
        if r.exit_code == 0:
            shots = json.loads(runner.invoke(main, ["validate", str(story), "--json"]).stdout)["shots"]
            valid.append((len(shots), name, cwd, story))
            continue
        # Broken scripts: render refuses them the same way, before writing anything.
        r = runner.invoke(main, ["render", str(story), "--out", str(cwd / "out"), *RENDER_ARGS])
        _check_result(r, f"{name} render")
        assert r.exit_code == 2 and _files(cwd) == {"story.json"}, (name, r.output[-1000:])

    rendered, budget = 0, RENDER_SHOT_BUDGET
    # The hostile-but-valid ones first, then the fewest shots.
    for n_shots, name, cwd, story in sorted(valid, key=lambda v: (not v[1].endswith("-hostile"), v[0], v[1])):
        monkeypatch.chdir(cwd)
        out = cwd / "out"
        if n_shots > budget:
            # Over the budget: the script checks of render only (--strict may refuse unknown keys).
            r = runner.invoke(main, ["validate", str(story), "--strict"])
            _check_result(r, f"{name} validate --strict")
            continue
        budget -= n_shots
        r = runner.invoke(main, ["render", str(story), "--out", str(out), *RENDER_ARGS])
        _check_result(r, f"{name} render")
        assert r.exit_code == 0, (name, r.output[-2000:])
        rendered += 1
        assert {f.split("/")[0] for f in _files(cwd)} <= {"story.json", "out"}, _files(cwd)
        _check_out(out, finished=True)
    assert _files(storymem_cache) == cache_before  # the shared tiny bundle: never written
    print(f"\nfuzz: {len(stories)} mutated stories through validate and render; exit codes {sorted(codes.items())}; "
          f"{len(valid)} valid, {rendered} rendered to the end ({RENDER_SHOT_BUDGET - budget} shots)")
    assert rendered >= 3, "too few valid mutations rendered: the fuzz no longer reaches the render"
