"""Story scripts: read the ST-Bench JSON schema, check it, and plan the story's shots.

A story script (the schema of StoryMem's ST-Bench, `story/*.json` upstream):

    {"story_name": "...", "story_overview": "...",
     "scenes": [{"scene_num": 1,
                 "video_prompts": ["shot 1 ...", "shot 2 ..."],
                 "first_frame_prompt": ["...", "..."],      # optional, unused by generation
                 "cut": [true, false],
                 "frames": [81, 33]}, ...]}                 # optional; or "seconds": [5, 2]

`cut[i]` says whether shot i starts with a cut. A shot without a cut continues from the
previous shot (MI2V / MM2V when enabled), across a scene boundary too. Cut flags may be JSON
booleans, the strings "true"/"false" in any case (the reference README asks for strings, and
the reference then treats the string "False" as a cut because `not "False"` is False: we
parse them), or 0/1. A missing `cut` list means every shot is a cut.

Per-shot length (not in ST-Bench; HoloCine/LongLive-style): `frames[i]` is shot i's frame count,
4n+1 between MIN_FRAMES and MAX_FRAMES, or `seconds[i]` its duration at 16 fps, rounded to
the nearest 4n+1 count (1 s -> 17, 2 s -> 33, 5 s -> 81). Either list may hold `null` for a
shot that takes the default (`--frame-num`); giving both lists in one scene is an error.

Files are read as UTF-8 (a byte order mark is skipped), then as JSON, else as JSON5
(comments, trailing commas, unquoted keys: the reference reads scripts with the `json5`
package); CRLF line ends are whitespace in both.

Every problem raises `StoryError("FILE: JSON_PATH: problem; fix")` with a 0-based JSON path
such as `scenes[2].cut[1]`. Inputs are bounded (file size, text lengths, numbers, shot count:
the `MAX_*` constants), NaN/Infinity are refused, and so is text that is no valid Unicode (a
lone surrogate such as `"\ud800"`). Keys the schema does not know are warned about (a typo
such as `"cuts"` would otherwise make every shot a cut), or refused with `strict=True`. Nothing here imports torch: `storymem-rt validate` stays fast.
"""
from __future__ import annotations

import difflib
import json
import logging
import math
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import StoryError

log = logging.getLogger(__name__)

# The shot modes of storymem_rt.shot.MODES (not imported from there: it pulls in torch).
MODES = ("t2v", "m2v", "mi2v", "mm2v")
FIRST_SHOT_MODES = ("t2v", "m2v")
SEED_POLICIES = ("reference", "unique")
# torch.Generator.manual_seed takes any 64-bit value; we keep seeds in int64 for manifests.
MAX_SEED = 2**63 - 1
# Per-shot lengths: the VAE's temporal stride makes every count 4n+1. 5 frames is one latent
# frame past the first; 161 (10 s) is twice what Wan2.2 was trained on, already a stretch.
FPS = 16
DEFAULT_FRAMES = 81
MIN_FRAMES = 5
MAX_FRAMES = 161
# Frames of the previous shot an MI2V / MM2V shot starts from, dropped from its output
# (storymem_rt.shot.KNOWN_FRAMES; not imported from there: it pulls in torch).
KNOWN_FRAMES = {"t2v": 0, "m2v": 0, "mi2v": 1, "mm2v": 5}


def frames_for_seconds(seconds: float) -> int:
    """The 4n+1 frame count nearest to `seconds` at 16 fps (halves round up): 1 -> 17, 2 -> 33, 5 -> 81."""
    return 4 * math.floor((seconds * FPS - 1) / 4 + 0.5) + 1
# Bounds of a story script. ST-Bench's largest is ~10 kB with prompts under 1000 characters; the
# text encoder reads 512 tokens of a prompt. Scene numbers stay short: they name output files.
MAX_STORY_BYTES = 4 << 20
MAX_PROMPT_CHARS = 20_000
MAX_NAME_CHARS = 1_000
MAX_OVERVIEW_CHARS = 100_000
MAX_SHOTS = 1_000
MAX_SCENE_NUM = 9_999
MAX_INT_DIGITS = 40
KNOWN_KEYS = {"top level": ("story_name", "story_overview", "scenes"),
              "scene": ("scene_num", "video_prompts", "cut", "first_frame_prompt", "frames", "seconds")}


@dataclass(frozen=True)
class Scene:
    """One scene: its number from the script and one prompt and one cut flag per shot."""

    num: int
    prompts: tuple[str, ...]
    cuts: tuple[bool, ...]
    first_frame_prompts: tuple[str, ...] | None = None  # kept for manifests; generation ignores it
    # Per-shot frame counts (None: the render's default) and, where the script gave seconds,
    # the seconds they came from (for the plan); None when the script says nothing.
    frames: tuple[int | None, ...] | None = None
    seconds: tuple[float | None, ...] | None = None

    def __post_init__(self):
        object.__setattr__(self, "prompts", tuple(self.prompts))
        object.__setattr__(self, "cuts", tuple(bool(c) for c in self.cuts))
        if self.first_frame_prompts is not None:
            object.__setattr__(self, "first_frame_prompts", tuple(self.first_frame_prompts))
        if not self.prompts:
            raise ValueError(f"scene {self.num} has no prompts")
        if len(self.cuts) != len(self.prompts):
            raise ValueError(f"scene {self.num} has {len(self.cuts)} cut flags for {len(self.prompts)} prompts")
        for name in ("frames", "seconds"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(value))
                if len(value) != len(self.prompts):
                    raise ValueError(f"scene {self.num} has {len(value)} {name} entries for {len(self.prompts)} prompts")
        for f in self.frames or ():
            if f is not None and ((f - 1) % 4 or not MIN_FRAMES <= f <= MAX_FRAMES):
                raise ValueError(f"scene {self.num}: {f} frames is not 4n+1 in {MIN_FRAMES}..{MAX_FRAMES}")


@dataclass(frozen=True)
class Story:
    name: str
    overview: str
    scenes: tuple[Scene, ...]
    source: str = "<story>"  # the file, for messages

    def __post_init__(self):
        object.__setattr__(self, "scenes", tuple(self.scenes))
        if not self.scenes:
            raise ValueError("a story needs at least one scene")

    @property
    def num_shots(self) -> int:
        return sum(len(s.prompts) for s in self.scenes)


@dataclass(frozen=True)
class PlannedShot:
    """One shot of the plan, in render order.

    index: 0-based position in the story; scene: the script's `scene_num`; shot: 1-based
    position inside the scene; cut: the effective flag (the story's first shot follows
    nothing, so it is always a cut whatever the script says); frames: the frames the shot is
    generated with (its MP4 has `frames - KNOWN_FRAMES[mode]`), None for "the render's
    --frame-num" when the plan was made without one; seconds: what the script asked for when it
    gave seconds.
    """

    index: int
    scene: int
    shot: int
    mode: str
    seed: int
    cut: bool
    prompt: str
    frames: int | None = None
    seconds: float | None = None

    @property
    def output_frames(self) -> int | None:
        """Frames of this shot's MP4: MI2V drops its 1 known frame, MM2V its 5."""
        return None if self.frames is None else self.frames - KNOWN_FRAMES[self.mode]

    @property
    def id(self) -> str:
        """`01_02` = scene 1, shot 2: the stem of this shot's output files."""
        return f"{self.scene:02d}_{self.shot:02d}"

    def to_json(self) -> dict:
        d = {"scene": self.scene, "shot": self.shot, "mode": self.mode, "seed": self.seed,
             "cut": self.cut, "prompt": self.prompt, "frames": self.frames}
        if self.seconds is not None:
            d["seconds"] = self.seconds
        return d


# --------------------------------------------------------------------------- reading

def _kind(value) -> str:
    """The JSON name of a value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _got(value) -> str:
    """`a string "2"`, `null`: what a message says it found."""
    return "null" if value is None else f"{_kind(value)} {_show(value)}"


def _show(value, limit: int = 40) -> str:
    """A value as JSON on one line, shortened: messages stay one line whatever the input."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _n(count: int, word: str, plural: str | None = None) -> str:
    return f"{count} {word if count == 1 else plural or word + 's'}"


class _Checker:
    """Turns a decoded JSON value into a Story, raising at the first problem with its path."""

    def __init__(self, source: str, strict: bool = False):
        self.source = source
        self.strict = strict

    def fail(self, path: str, problem: str, fix: str):
        raise StoryError(f"{self.source}: {path}: {problem}; {fix}")

    def warn(self, path: str, message: str):
        log.warning("%s: %s: %s", self.source, path, message)

    def text(self, obj: dict, key: str, path: str, default: str, limit: int) -> str:
        value = obj.get(key, default)
        if not isinstance(value, str):
            self.fail(path, f"must be a string, got {_got(value)}", f'write "{key}": "..."')
        return self.checked_text(value, path, limit)

    def checked_text(self, value: str, path: str, limit: int) -> str:
        if len(value) > limit:
            self.fail(path, f"is {len(value)} characters long, more than {limit}", "shorten it")
        bad = next((i for i, c in enumerate(value) if 0xD800 <= ord(c) <= 0xDFFF), None)
        if bad is not None:
            self.fail(path, f"character {bad} is a lone surrogate \\u{ord(value[bad]):04x}, which is no valid "
                      "Unicode", "remove it (write the character itself, or a valid \\u escape pair)")
        return value

    def keys(self, obj: dict, path: str, kind: str):
        known = KNOWN_KEYS[kind]
        for key in obj:
            if key in known:
                continue
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            hint = f' (did you mean "{close[0]}"?)' if close else f" (known: {', '.join(known)})"
            where = f"{path}.{_show(key)}" if kind == "scene" else _show(key)
            if self.strict:
                self.fail(where, f"unknown key{hint}", "fix or remove it (--strict refuses unknown keys)")
            self.warn(where, f"unknown key{hint}; it is ignored")

    def story(self, data) -> Story:
        if not isinstance(data, dict):
            self.fail("top level", f"must be a JSON object, got {_kind(data)}",
                      'write {"story_name": ..., "story_overview": ..., "scenes": [...]}')
        self.keys(data, "top level", "top level")
        name = self.text(data, "story_name", "story_name", Path(self.source).stem, MAX_NAME_CHARS)
        overview = self.text(data, "story_overview", "story_overview", "", MAX_OVERVIEW_CHARS)
        if "scenes" not in data:
            keys = ", ".join(sorted(map(str, data))) or "none"
            self.fail("scenes", f"missing (keys found: {keys})",
                      'add a "scenes" list of {"scene_num", "video_prompts", "cut"} objects')
        scenes = data["scenes"]
        if not isinstance(scenes, list):
            self.fail("scenes", f"must be a list of scene objects, got {_kind(scenes)}", 'write "scenes": [{...}, ...]')
        if not scenes:
            self.fail("scenes", "is empty", "add at least one scene with video_prompts")
        seen: dict[int, int] = {}
        out = []
        shots = 0
        for i, raw in enumerate(scenes):
            scene = self.scene(raw, i, seen)
            seen[scene.num] = i
            out.append(scene)
            shots += len(scene.prompts)
            if shots > MAX_SHOTS:
                self.fail(f"scenes[{i}]", f"the story has more than {MAX_SHOTS} shots", "split it into several stories")
        self.warnings(out)
        return Story(name=name, overview=overview, scenes=tuple(out), source=self.source)

    def scene(self, raw, i: int, seen: dict[int, int]) -> Scene:
        path = f"scenes[{i}]"
        if not isinstance(raw, dict):
            self.fail(path, f"must be a scene object, got {_got(raw)}",
                      'write {"scene_num": N, "video_prompts": [...], "cut": [...]}')
        keys = ", ".join(sorted(map(str, raw))) or "none"
        self.keys(raw, path, "scene")
        if "scene_num" not in raw:
            self.fail(f"{path}.scene_num", f"missing (keys found: {keys})", f'add "scene_num": {i + 1}')
        num = raw["scene_num"]
        # bool is an int in Python: `true` must not pass as scene 1.
        if isinstance(num, bool) or not isinstance(num, int):
            self.fail(f"{path}.scene_num", f"must be an integer, got {_got(num)}",
                      f'write "scene_num": {i + 1}')
        if num < 1:
            self.fail(f"{path}.scene_num", f"must be 1 or more, got {num}", "number scenes from 1")
        if num > MAX_SCENE_NUM:
            self.fail(f"{path}.scene_num", f"must be at most {MAX_SCENE_NUM}, got {_show(num)}",
                      "number scenes from 1 (scene numbers name the output files)")
        if num in seen:
            self.fail(f"{path}.scene_num", f"{num} is already used by scenes[{seen[num]}]",
                      "give every scene its own number")

        ppath = f"{path}.video_prompts"
        if "video_prompts" not in raw:
            self.fail(ppath, f"missing (keys found: {keys})", 'add "video_prompts": ["...", ...], one prompt per shot')
        prompts = raw["video_prompts"]
        if not isinstance(prompts, list):
            self.fail(ppath, f"must be a list of prompt strings, got {_kind(prompts)}",
                      'write "video_prompts": ["...", ...]')
        if not prompts:
            self.fail(ppath, "is empty", "give the scene at least one prompt or remove the scene")
        for j, p in enumerate(prompts):
            if not isinstance(p, str):
                self.fail(f"{ppath}[{j}]", f"must be a string, got {_got(p)}", "write the prompt as text")
            self.checked_text(p, f"{ppath}[{j}]", MAX_PROMPT_CHARS)
            if not p.strip():
                self.fail(f"{ppath}[{j}]", "is empty", "describe the shot or remove it (and its cut flag)")

        cpath = f"{path}.cut"
        raw_cuts = raw.get("cut")
        if raw_cuts is None:
            cuts = [True] * len(prompts)
            log.debug("%s: %s: missing: every shot of scene %d is a cut", self.source, cpath, num)
        else:
            if not isinstance(raw_cuts, list):
                self.fail(cpath, f"must be a list of true/false flags, got {_got(raw_cuts)}",
                          f"write one flag per prompt, e.g. {_show([True] * len(prompts))}")
            if len(raw_cuts) != len(prompts):
                self.fail(cpath, f"has {_n(len(raw_cuts), 'flag')} for {_n(len(prompts), 'video prompt')}",
                          "give exactly one flag per prompt")
            cuts = [self.cut(v, f"{cpath}[{j}]") for j, v in enumerate(raw_cuts)]

        fpath = f"{path}.first_frame_prompt"
        ffp = raw.get("first_frame_prompt")
        if ffp is not None:
            if not isinstance(ffp, list):
                self.fail(fpath, f"must be a list of strings, got {_kind(ffp)}", "write one string per prompt or remove it")
            if len(ffp) != len(prompts):
                self.fail(fpath, f"has {_n(len(ffp), 'entry', 'entries')} for {_n(len(prompts), 'video prompt')}",
                          "give one entry per prompt or remove the list (generation does not use it)")
            for j, p in enumerate(ffp):
                if not isinstance(p, str):
                    self.fail(f"{fpath}[{j}]", f"must be a string, got {_got(p)}", "write it as text")
                self.checked_text(p, f"{fpath}[{j}]", MAX_PROMPT_CHARS)
        frames, seconds = self.lengths(raw, path, len(prompts))
        return Scene(num=num, prompts=tuple(prompts), cuts=tuple(cuts),
                     first_frame_prompts=None if ffp is None else tuple(ffp), frames=frames, seconds=seconds)

    def lengths(self, raw: dict, path: str, n: int) -> tuple[tuple | None, tuple | None]:
        """`frames` / `seconds` of one scene -> (frame counts, the seconds they came from)."""
        has_f, has_s = raw.get("frames") is not None, raw.get("seconds") is not None
        if has_f and has_s:
            self.fail(f"{path}.seconds", 'is given together with "frames"',
                      'give each scene\'s shot lengths once: "frames" or "seconds"')
        if not (has_f or has_s):
            return None, None
        key = "frames" if has_f else "seconds"
        lpath = f"{path}.{key}"
        values = raw[key]
        example = _show([DEFAULT_FRAMES] * n) if has_f else _show([5] * n)
        if not isinstance(values, list):
            self.fail(lpath, f"must be a list with one entry per shot, got {_got(values)}", f"write e.g. {example}")
        if len(values) != n:
            self.fail(lpath, f"has {_n(len(values), 'entry', 'entries')} for {_n(n, 'video prompt')}",
                      "give exactly one entry per prompt (null for the default length)")
        frames, seconds = [], []
        for j, v in enumerate(values):
            at = f"{lpath}[{j}]"
            if v is None:
                frames.append(None)
                seconds.append(None)
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                number = isinstance(v, (int, float)) and not isinstance(v, bool)  # JSON5's NaN / Infinity
                self.fail(at, f"must be a {'finite ' * number}number, got {_got(v)}",
                          f"write the shot's {'frame count, e.g. 81' if has_f else 'duration in seconds, e.g. 5'}")
            if has_f:
                if v != int(v) or (int(v) - 1) % 4:
                    lo = max(MIN_FRAMES, 4 * math.floor((v - 1) / 4) + 1)
                    self.fail(at, f"{_show(v)} is not a valid frame count (4n+1: ..., 17, 33, 49, 65, 81, ...)",
                              f"use {lo} or {lo + 4}")
                f = int(v)
                if not MIN_FRAMES <= f <= MAX_FRAMES:
                    self.fail(at, f"{f} frames is outside {MIN_FRAMES}..{MAX_FRAMES}",
                              f"use a 4n+1 count from {MIN_FRAMES} to {MAX_FRAMES} (about {MAX_FRAMES // FPS} s)")
                frames.append(f)
                seconds.append(None)
            else:
                f = frames_for_seconds(v)
                if not MIN_FRAMES <= f <= MAX_FRAMES:
                    self.fail(at, f"{_show(v)} s gives {f} frames at {FPS} fps, outside {MIN_FRAMES}..{MAX_FRAMES}",
                              f"use 0.3 to {MAX_FRAMES // FPS} seconds")
                frames.append(f)
                seconds.append(float(v))
        return tuple(frames), (tuple(seconds) if has_s else None)

    def cut(self, value, path: str) -> bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        self.fail(path, f"{_show(value)} is not a cut flag", 'write true or false (or "True"/"False", 1/0)')

    def warnings(self, scenes: list[Scene]):
        for i, scene in enumerate(scenes):
            if scene.cuts[0]:
                continue
            if i == 0:
                self.warn("scenes[0].cut[0]", "the story's first shot has cut=false but follows no shot; "
                          "it is planned as a cut")
            else:
                self.warn(f"scenes[{i}].cut[0]", f"scene {scene.num} starts without a cut: its first shot "
                          f"continues from the last shot of scene {scenes[i - 1].num} (MI2V/MM2V when enabled)")
        nums = [s.num for s in scenes]
        if nums != sorted(nums):
            self.warn("scenes", f"scene numbers {nums} are not in ascending order; scenes render in file order")


def parse_story(data, source: str = "<story>", strict: bool = False) -> Story:
    """A Story from an already decoded JSON value; `source` names it in messages."""
    return _Checker(source, strict).story(data)


class _NumberError(ValueError):
    pass


def _no_constant(name: str) -> float:
    # NaN / Infinity literals (JSON5's, and Python's json's extension) parse as floats here, so that
    # the field that holds one is named by the checker ("must be a finite number" and the like).
    return float(name)


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise _NumberError(f"an integer of {len(text.lstrip('-'))} digits; no number here needs more than "
                           f"{MAX_INT_DIGITS}")
    return int(text)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NumberError(f"the number {text[:40]} is too large (it reads as infinity); write a finite number")
    return value


def load_story(path: str | os.PathLike, strict: bool = False) -> Story:
    """Read and check a story script. Raises StoryError with the file, the JSON path and a fix.
    strict: unknown keys are errors instead of warnings."""
    source = os.fspath(path)
    try:
        with open(path, "rb") as f:  # read at most the limit: a story may be /dev/zero
            raw = f.read(MAX_STORY_BYTES + 1)
        if len(raw) > MAX_STORY_BYTES:
            raise StoryError(f"{source}: larger than {MAX_STORY_BYTES >> 20} MiB, far more than a story script; "
                             "check the path (a story script is a small JSON file)")
    except FileNotFoundError:
        raise StoryError(f"{source}: no such file; check the path of the story script") from None
    except IsADirectoryError:
        raise StoryError(f"{source}: is a folder; pass the story's JSON file") from None
    except OSError as e:
        raise StoryError(f"{source}: cannot be read ({e.strerror or e}); check the file and its permissions") from None
    for bom, name in _OTHER_BOMS:
        if raw.startswith(bom):
            raise StoryError(f"{source}: byte 0: not UTF-8 text (a {name} byte order mark); "
                             "save the script as UTF-8 JSON")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise StoryError(f"{source}: byte {e.start}: not UTF-8 text; save the script as UTF-8 JSON") from None
    if "\x00" in text:
        raise StoryError(f"{source}: holds NUL characters, so it is not a text file; save the script as UTF-8 JSON")
    return parse_story(_decode(text, source), source, strict)


_NUMBER_HOOKS = dict(parse_constant=_no_constant, parse_int=_bounded_int, parse_float=_finite_float)


# Byte order marks of encodings we refuse (checked before UTF-8; UTF-32 LE starts like UTF-16 LE).
_OTHER_BOMS = ((b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"),
               (b"\xff\xfe", "UTF-16"), (b"\xfe\xff", "UTF-16"))
_JSON5_ERROR = re.compile(r"^<string>:(\d+) (.+) at column (\d+)$")


def _decode(text: str, source: str):
    """JSON, else JSON5 (the reference's loader). On failure, the error of the parser that got
    further (by lines): a plain-JSON mistake keeps json's message, a JSON5 file its JSON5 position."""
    try:
        return json.loads(text, **_NUMBER_HOOKS)
    except json.JSONDecodeError as e:
        json_err = (e.lineno, e.colno, f"invalid JSON ({e.msg})")
    except _NumberError as e:
        raise StoryError(f"{source}: {e}") from None
    except RecursionError:
        raise StoryError(f"{source}: nested too deeply to be a story script; check the file") from None
    import json5

    try:
        return json5.loads(text, **_NUMBER_HOOKS)
    except RecursionError:
        raise StoryError(f"{source}: nested too deeply to be a story script; check the file") from None
    except _NumberError as e:
        raise StoryError(f"{source}: {e}") from None
    except ValueError as e:
        m = _JSON5_ERROR.match(str(e).splitlines()[0] if str(e) else "")
        err = json_err
        # json5 reports the character after the one json stops at; a later line means the
        # file got past JSON5-only syntax (a comment, a trailing comma) before its real error.
        if m is not None and int(m[1]) > json_err[0]:
            err = (int(m[1]), int(m[3]), f"invalid JSON5 ({m[2]})")
    line, col, what = err
    raise StoryError(f"{source}: line {line} col {col}: {what}; fix the syntax there")


# --------------------------------------------------------------------------- planning

def plan_shots(story: Story, *, first_shot: str = "t2v", mi2v: bool = False, mm2v: bool = False,
               reference_images: bool = False, seed: int = 0, seed_policy: str = "reference",
               frame_num: int | None = None) -> list[PlannedShot]:
    """The story's shots in render order, each with its mode and seed.

    Matches the reference's pipeline.py: the first shot is T2V (`first_shot="t2v"`) or M2V
    (`"m2v"`; forced by `reference_images`, MR2V: the images are its memory); every later
    shot is M2V, or MI2V / MM2V when its cut flag is false and `mi2v` / `mm2v` is on (the
    previous shot may end the previous scene). Seeds: `seed + i`, i the shot's 0-based
    index inside its scene (reference: every scene restarts at `seed`), or with
    `seed_policy="unique"` `seed + index` over the whole story. Frames: the script's per-shot
    length, else `frame_num` (None: left to the render's `--frame-num`); a shot that would keep
    no frame after dropping its known ones (a 5-frame MM2V shot), or an MM2V shot after one that
    keeps fewer than 5, raises StoryError naming the shots.
    """
    if first_shot not in FIRST_SHOT_MODES:
        raise ValueError(f"first_shot must be one of {FIRST_SHOT_MODES}, got {first_shot!r}")
    if seed_policy not in SEED_POLICIES:
        raise ValueError(f"seed_policy must be one of {SEED_POLICIES}, got {seed_policy!r}")
    if mi2v and mm2v:
        raise ValueError("mi2v and mm2v cannot both be on: a shot without a cut continues one way")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if frame_num is not None and ((frame_num - 1) % 4 or frame_num < 1):
        raise ValueError(f"frame_num must be 4n+1, got {frame_num}")
    shots = []
    index = 0
    for si, scene in enumerate(story.scenes):
        for i, (prompt, cut) in enumerate(zip(scene.prompts, scene.cuts)):
            if index == 0:
                mode = "m2v" if reference_images or first_shot == "m2v" else "t2v"
                cut = True
            elif not cut and mi2v:
                mode = "mi2v"
            elif not cut and mm2v:
                mode = "mm2v"
            else:
                mode = "m2v"
            shot_seed = seed + (i if seed_policy == "reference" else index)
            if shot_seed > MAX_SEED:
                raise ValueError(f"seed {seed} + {shot_seed - seed} exceeds {MAX_SEED}; use a smaller seed")
            frames = scene.frames[i] if scene.frames is not None and scene.frames[i] is not None else frame_num
            seconds = scene.seconds[i] if scene.seconds is not None else None
            if frames is None:
                pass  # the render's --frame-num: RenderSettings checks it
            elif frames <= KNOWN_FRAMES[mode] and (scene.frames is None or scene.frames[i] is None):
                # The default length: an option's problem (RenderSettings words it), not the script's.
                raise ValueError(f"--frame-num {frame_num} leaves no new frames in {mode.upper()} shot "
                                 f"{scene.num:02d}_{i + 1:02d} after its {KNOWN_FRAMES[mode]} known frame(s)")
            elif frames <= KNOWN_FRAMES[mode]:
                key = "seconds" if scene.seconds is not None else "frames"
                raise StoryError(f"{story.source}: scenes[{si}].{key}[{i}]: shot {scene.num:02d}_{i + 1:02d} is "
                                 f"{mode.upper()} and its {frames} frames leave none after its "
                                 f"{KNOWN_FRAMES[mode]} known frames; give it {KNOWN_FRAMES[mode] + 4} frames or more")
            shots.append(PlannedShot(index=index, scene=scene.num, shot=i + 1, mode=mode, seed=shot_seed,
                                     cut=cut, prompt=prompt, frames=frames, seconds=seconds))
            index += 1
    check_continuations(shots, story.source)
    return shots


def check_continuations(shots: list[PlannedShot], source: str) -> None:
    """An MI2V / MM2V shot starts from the last 1 / 5 frames of the shot before, which must keep
    that many (MM2V after a 9-frame MM2V shot would find 4). Shots without a length yet are skipped."""
    for prev, shot in zip(shots, shots[1:]):
        k = KNOWN_FRAMES[shot.mode]
        if prev.frames is None or k <= prev.output_frames:
            continue
        need = k + prev.frames - prev.output_frames
        need = 4 * math.ceil((need - 1) / 4) + 1  # the smallest 4n+1 count that keeps enough
        raise StoryError(f"{source}: shot {shot.id} is {shot.mode.upper()} and needs the last {k} frames of shot "
                         f"{prev.id}, which keeps only {prev.output_frames}; give shot {prev.id} {need} frames or more")


@dataclass(frozen=True)
class PlanSettings:
    """The options that decide a shot plan, as one value a render can record and compare."""

    first_shot: str = "t2v"
    mi2v: bool = False
    mm2v: bool = False
    reference_images: tuple[str, ...] = ()
    seed: int = 0
    seed_policy: str = "reference"

    def __post_init__(self):
        object.__setattr__(self, "reference_images", tuple(os.fspath(p) for p in self.reference_images))
        if self.first_shot not in FIRST_SHOT_MODES:
            raise ValueError(f"first_shot must be one of {FIRST_SHOT_MODES}, got {self.first_shot!r}")
        if self.seed_policy not in SEED_POLICIES:
            raise ValueError(f"seed_policy must be one of {SEED_POLICIES}, got {self.seed_policy!r}")
        if self.mi2v and self.mm2v:
            raise ValueError("mi2v and mm2v cannot both be on")
        if self.reference_images and self.first_shot != "m2v":
            raise ValueError("reference images are the first shot's memory: the first shot must be m2v")

    def plan(self, story: Story, frame_num: int | None = None) -> list[PlannedShot]:
        return plan_shots(story, first_shot=self.first_shot, mi2v=self.mi2v, mm2v=self.mm2v,
                          reference_images=bool(self.reference_images), seed=self.seed,
                          seed_policy=self.seed_policy, frame_num=frame_num)

    def to_json(self) -> dict:
        d = asdict(self)
        d["reference_images"] = list(self.reference_images)
        return d
