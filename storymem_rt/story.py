"""The story engine: every shot of a story in one process, memory latents cached on the device.

The reference runs shot 1 and the rest as two processes, round-trips frames through MP4 and
JPEG, re-encodes the whole memory bank with the VAE every shot and finds its memory by globbing
its output folder. Here the state is ours:

- `MemoryBank`: keyframe latents (VAE-encoded once, when they enter), their CLIP embeddings
  (for dedupe) and thumbnails; policy = the first `fix` entries plus the most recent ones, at
  most `max_size` (StoryMem pipeline.py: `bank[:fix] + bank[-(max - fix):]`), chronological.
- Text states of every prompt are encoded first (once per distinct prompt, the negative prompt
  once per story), then the text encoder is freed.
- The all-zeros condition latent of M2V shots is encoded once per size and frame count (shots
  may have their own lengths: `PlannedShot.frames`, from the script's `frames` / `seconds`).
- `render.json` (the manifest) + `state/` (memory bank and the previous shot's last frames as
  safetensors) make a render resumable: finished shots are skipped, a different set of
  settings on an existing folder is refused. Every file is written to a temporary name and
  renamed, so an interrupt never leaves a half file.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .configs import (DEFAULT_FRAME_NUM, DEFAULT_MAX_MEMORY, DEFAULT_NEGATIVE_PROMPT, DEFAULT_SIZE, SamplingConfig,
                      read_json)
from .errors import NonFiniteLatentError, StoryMemError
from .outdir import MANIFEST, STATE_DIR, STORYBOARD, OutputLock, keyframe_image, shot_video, story_video
from .script import PlannedShot, PlanSettings, Story, check_continuations
from .shot import KNOWN_FRAMES

log = logging.getLogger("storymem_rt")

MANIFEST_VERSION = 1


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class RenderSettings:
    """Everything that decides the pixels of a render (recorded in render.json and compared on resume)."""

    plan: PlanSettings
    size: tuple[int, int] = DEFAULT_SIZE  # (W, H)
    frame_num: int = DEFAULT_FRAME_NUM
    sample_steps: int = 40
    solver: str = "unipc"
    guide_scale: tuple[float, float] = (3.5, 3.5)
    t2v_shift: float = 12.0
    t2v_boundary: float = 0.875
    m2v_shift: float = 4.0
    m2v_boundary: float = 0.9
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    max_memory_size: int = DEFAULT_MAX_MEMORY
    fix: int = 3
    max_keyframes: int = 3
    keyframe_threshold: float = 0.9
    quality_filter: str = "auto"  # auto | hpsv3 | heuristic | none
    reference_mi2v_bug: bool = False
    lora_rank: int | None = None
    dtype: str = "float32"
    models: str = ""  # identity of the weights (folder + tiny marker), not a hash of gigabytes
    fps: int = 16
    backend: dict = field(default_factory=dict)  # the resolved backends.BackendConfig (what ran the DiT)
    # preview mode (few-step distill LoRA, step-distill sampler): {"step_list", "shift", "boundary_step",
    # "guided", "strength", "loras": {kind: {expert: {"file", "sha256"}}}}; empty for a full render
    preview: dict = field(default_factory=dict)

    def __post_init__(self):
        w, h = self.size
        if w % 16 or h % 16 or w <= 0 or h <= 0:
            raise ValueError(f"--size {w}*{h}: width and height must be positive multiples of 16")
        if self.max_memory_size < 1:
            raise ValueError(f"--max-memory-size must be >= 1, got {self.max_memory_size}")
        if not 0 <= self.fix <= self.max_memory_size:
            raise ValueError(f"--fix must be between 0 and --max-memory-size ({self.max_memory_size}), got {self.fix}")
        numbers = {"guide_scale": self.guide_scale, "t2v_shift": self.t2v_shift, "m2v_shift": self.m2v_shift,
                   "t2v_boundary": self.t2v_boundary, "m2v_boundary": self.m2v_boundary}
        for name, value in numbers.items():
            if not all(math.isfinite(v) for v in (value if isinstance(value, tuple) else (value,))):
                raise ValueError(f"{name} must be finite, got {value!r}")
        known = KNOWN_FRAMES["mm2v" if self.plan.mm2v else "mi2v"]
        if self.frame_num <= known:
            raise ValueError(f"--frame-num {self.frame_num} leaves no new frames after {known} known frame(s)")

    def sampling(self, kind: str, frame_num: int | None = None) -> SamplingConfig:
        """The sampling config of one shot; `frame_num` is the shot's own length (default: --frame-num)."""
        shift, boundary = (self.t2v_shift, self.t2v_boundary) if kind == "t2v" else (self.m2v_shift, self.m2v_boundary)
        if self.preview:
            p = self.preview
            return SamplingConfig(shift=p["shift"], boundary=boundary, sample_steps=len(p["step_list"]),
                                  guide_scale=self.guide_scale, frame_num=frame_num or self.frame_num,
                                  solver="distill",
                                  negative_prompt=self.negative_prompt, step_list=tuple(p["step_list"]),
                                  boundary_step=p["boundary_step"], guided=tuple(p["guided"]))
        return SamplingConfig(shift=shift, boundary=boundary, sample_steps=self.sample_steps,
                              guide_scale=self.guide_scale, frame_num=frame_num or self.frame_num, solver=self.solver,
                              negative_prompt=self.negative_prompt)

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["plan"] = self.plan.to_json()
        d["size"] = list(self.size)
        d["guide_scale"] = list(self.guide_scale)
        return d


def _diff_settings(old: dict, new: dict, prefix="") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff_settings(a, b, prefix + k + ".")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


# --------------------------------------------------------------------------- memory bank


def ref_source(index: int, path) -> str:
    """Memory id of the `index`-th (from 0) reference image: numbered, so two files with one name
    in different folders stay two entries."""
    return f"ref:{index + 1}:{Path(path).name}"


@dataclass
class MemoryEntry:
    latent: torch.Tensor  # [16, 1, h, w] on the device
    embedding: torch.Tensor | None  # [E] CLIP embedding (for dedupe), None for reference images w/o CLIP
    source: str  # "ref:N:NAME" (N-th reference image, from 1) or "SHOT_ID:FRAME"
    thumb: torch.Tensor  # uint8 [H, W, 3] on the CPU, for the storyboard


@dataclass
class MemoryBank:
    fix: int = 3
    max_size: int = 10
    entries: list[MemoryEntry] = field(default_factory=list)

    def active(self) -> list[MemoryEntry]:
        """StoryMem pipeline.py: the first `fix` keyframes stay, then a sliding window."""
        if len(self.entries) <= self.max_size:
            return list(self.entries)
        tail = self.max_size - self.fix
        return self.entries[: self.fix] + (self.entries[-tail:] if tail > 0 else [])

    def latents(self) -> torch.Tensor:
        act = self.active()
        return torch.cat([e.latent for e in act], dim=1)

    def embeddings(self) -> torch.Tensor | None:
        embs = [e.embedding for e in self.entries if e.embedding is not None]
        return torch.stack(embs) if embs else None

    def state(self) -> tuple[dict[str, torch.Tensor], list[dict]]:
        tensors, meta = {}, []
        for i, e in enumerate(self.entries):
            tensors[f"latent.{i}"] = e.latent.detach().cpu().contiguous()
            tensors[f"thumb.{i}"] = e.thumb.contiguous()
            if e.embedding is not None:
                tensors[f"embedding.{i}"] = e.embedding.detach().cpu().contiguous()
            meta.append({"source": e.source})
        return tensors, meta

    @classmethod
    def from_state(cls, tensors: dict, meta: list[dict], fix: int, max_size: int, device) -> "MemoryBank":
        bank = cls(fix=fix, max_size=max_size)
        for i, m in enumerate(meta):
            emb = tensors.get(f"embedding.{i}")
            bank.entries.append(MemoryEntry(latent=tensors[f"latent.{i}"].to(device),
                                            embedding=None if emb is None else emb.to(device),
                                            source=m["source"], thumb=tensors[f"thumb.{i}"]))
        return bank


# --------------------------------------------------------------------------- helpers


def to_uint8(video: torch.Tensor) -> torch.Tensor:
    """[3, F, H, W] in [-1, 1] -> uint8 [F, H, W, 3], rounding as the reference's save_video."""
    from .media import video_to_uint8

    return torch.from_numpy(video_to_uint8(video))


def uint8_to_float(frames: torch.Tensor, device) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] in [-1, 1] (what the reference reads back from disk)."""
    from .media import frames_to_float

    return frames_to_float(frames, device)


def _atomic_json(path: Path, obj) -> None:
    from .media import atomic_write_text

    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False))


def _atomic_safetensors(path: Path, tensors: dict, metadata: dict | None = None) -> None:
    from .media import atomic_path

    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


# --------------------------------------------------------------------------- engine


class StoryRenderer:
    """Renders a planned story into `out_dir`.

    models: a `storymem_rt.models.ModelSet`; selector: a `storymem_rt.keyframes.KeyframeSelector`.
    """

    def __init__(self, models, selector, settings: RenderSettings, out_dir: str | Path, progress: bool = True,
                 wait: bool = False, on_wait=None, notes: dict | None = None):
        self.models = models
        self.selector = selector
        self.settings = settings
        self.out = Path(out_dir)
        self.progress = progress
        # The output folder's lock: wait for another render instead of refusing (on_wait(holder)
        # is told once). notes: recorded in render.json as "notes" (e.g. the tiny bundle's).
        self.wait = wait
        self.on_wait = on_wait
        self.notes = notes
        self.device = models.device
        self.dtype = models.dtype
        self._cond_latents: dict = {}

    # ---- manifest and state

    def _manifest_path(self) -> Path:
        return self.out / MANIFEST

    def _load_manifest(self, story: Story, plan: list[PlannedShot]) -> dict:
        p = self._manifest_path()
        settings = self.settings.to_json()
        shots = [s.to_json() for s in plan]
        if p.is_file():
            old = read_json(p, "render manifest", "delete the output folder or pick another --out", error=StoryMemError)
            diffs = _diff_settings(old.get("settings", {}), settings)
            if old.get("plan") != shots:
                diffs.append("the story's shot plan changed")
            if diffs:
                raise StoryMemError(
                    f"{self.out} holds a render with different settings ({'; '.join(diffs[:4])}); "
                    "rerun with the same options to resume, or pick another --out")
            return self._newer_state_manifest(old)
        new = {"version": MANIFEST_VERSION, "story": story.name, "settings": settings, "plan": shots,
               "shots": {}, "final": None}
        return self._newer_state_manifest(new)

    def _newer_state_manifest(self, manifest: dict) -> dict:
        """The state file carries the manifest it was saved with. When render.json could not be
        written after it (a full disk, a kill between the two renames), the state is one shot
        ahead, and its shot's files are on disk: continue from the state's manifest, so the
        memory bank and the manifest agree."""
        p = self.out / STATE_DIR / "memory.safetensors"
        if not p.is_file():
            return manifest
        from safetensors import safe_open

        try:
            with safe_open(str(p), "pt") as f:
                saved = json.loads((f.metadata() or {}).get("state", "{}")).get("manifest")
        except Exception:  # an unreadable state is reported by _load_state, when it is needed
            return manifest
        if (isinstance(saved, dict) and saved.get("settings") == manifest["settings"]
                and saved.get("plan") == manifest["plan"] and set(manifest["shots"]) < set(saved.get("shots", {}))
                and all((self.out / r["video"]).is_file() for r in saved["shots"].values())):
            log.info("%s: the state is ahead of %s: continuing from the state's record", self.out, MANIFEST)
            # Timings are not in the state (they would make its bytes differ between runs).
            manifest["shots"] = {k: {**r, "timings": manifest["shots"].get(k, {}).get("timings", {})}
                                 for k, r in saved["shots"].items()}
        return manifest

    def _save_state(self, manifest: dict, bank: MemoryBank, last_frames: torch.Tensor | None) -> None:
        from .media import remove_stale_temp_files

        state_dir = self.out / STATE_DIR
        state_dir.mkdir(exist_ok=True)
        remove_stale_temp_files(state_dir)
        tensors, meta = bank.state()
        if last_frames is not None:
            tensors["last_frames"] = last_frames.contiguous()
        _atomic_safetensors(state_dir / "memory.safetensors", tensors,
                            # One metadata key: safetensors writes several in a random order, and equal
                            # renders must give equal state files.
                            {"state": json.dumps({"entries": meta, "manifest": _commit_record(manifest)})})
        # The manifest is written last: a shot counts as done only once its state is on disk.
        _atomic_json(self._manifest_path(), manifest)

    def _load_state(self) -> tuple[MemoryBank, torch.Tensor | None]:
        p = self.out / STATE_DIR / "memory.safetensors"
        from safetensors import safe_open

        with safe_open(str(p), "pt") as f:
            saved = f.metadata()
            # "entries" alone: a state written before the manifest was recorded in it.
            meta = json.loads(saved["state"])["entries"] if "state" in saved else json.loads(saved["entries"])
        tensors = load_file(str(p))
        bank = MemoryBank.from_state(tensors, meta, self.settings.fix, self.settings.max_memory_size, self.device)
        return bank, tensors.get("last_frames")

    # ---- pieces

    def encode_prompts(self, plan: list[PlannedShot]) -> dict[str, torch.Tensor]:
        """Every distinct prompt once, plus the negative prompt; returns padded [1, text_len, D] states."""
        from .shot import pad_context

        te = self.models.text_encoder
        texts = list(dict.fromkeys([s.prompt for s in plan] + [self.settings.negative_prompt]))
        out = {}
        for i in range(0, len(texts), 8):
            chunk = texts[i:i + 8]
            for t, c in zip(chunk, te.encode(chunk)):
                out[t] = pad_context([c.to(self.device, self.dtype)], te.config.text_len)
        return out

    def cond_latent(self, size, frame_num) -> torch.Tensor:
        """Encode of the all-zeros clip, identical for every M2V shot of one size: computed once."""
        from .shot import condition_video

        key = (tuple(size), frame_num)
        if key not in self._cond_latents:
            clip = condition_video(None, frame_num, size, self.device)
            self._cond_latents[key] = self.models.vae.encode(clip.to(self.models.vae_dtype))[0].float()
        return self._cond_latents[key]

    def add_keyframes(self, bank: MemoryBank, shot_id: str, frames_u8: torch.Tensor) -> list[int]:
        """Select keyframes of a finished shot (uint8 [F, H, W, 3]) and push them into the bank."""
        frames = uint8_to_float(frames_u8, self.device)
        res = self.selector.select(frames, bank.embeddings())
        idx = list(res.indices)
        if idx:
            lat = self.models.vae.encode_images(frames[idx].to(self.models.vae_dtype)).float()  # [16, k, h, w]
            for j, i in enumerate(idx):
                bank.entries.append(MemoryEntry(latent=lat[:, j:j + 1], embedding=res.embeddings[j],
                                                source=f"{shot_id}:{i}", thumb=frames_u8[i].cpu().clone()))
        return idx

    def add_reference_images(self, bank: MemoryBank, paths: list[str]) -> None:
        """MR2V: user images become the initial memory (resized to the story size, bicubic as
        the reference resizes memory images)."""
        from .media import load_image
        from .shot import resize_frames

        # One by one: the user's images may all differ in size.
        imgs = torch.cat([resize_frames(load_image(p)[None].to(self.device), self.settings.size)
                          for p in paths]).clamp(-1, 1)
        lat = self.models.vae.encode_images(imgs.to(self.models.vae_dtype)).float()
        embs = self.selector.embed(imgs, selection_resize=False) if self.selector is not None else None
        u8 = ((imgs + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()
        for j, p in enumerate(paths):
            bank.entries.append(MemoryEntry(latent=lat[:, j:j + 1], embedding=None if embs is None else embs[j],
                                            source=ref_source(j, p), thumb=u8[j]))

    # ---- the loop

    def render(self, story: Story, plan: list[PlannedShot]) -> dict:
        """Render (or resume) the story into the output folder, which it owns meanwhile
        (`storymem_rt.outdir.OutputLock`); returns the manifest."""
        self._bars = []
        with OutputLock(self.out, wait=self.wait, on_wait=self.on_wait):
            try:
                return self._render(story, plan)
            finally:
                for b in self._bars:  # an error line must start on a line of its own
                    b.close()

    def _render(self, story: Story, plan: list[PlannedShot]) -> dict:
        from .media import concat_videos, remove_stale_temp_files, save_image, write_video
        from .shot import ShotSpec, generate_shot, synced_clock

        def clock() -> float:  # stage timings at synchronized points: true on a GPU
            return synced_clock(self.device)

        s = self.settings
        # Shots the plan left to --frame-num get this render's default length.
        plan = [dataclasses.replace(p, frames=s.frame_num) if p.frames is None else p for p in plan]
        check_continuations(plan, story.source)
        manifest = self._load_manifest(story, plan)
        if self.notes is not None:
            manifest["notes"] = self.notes
        done = manifest["shots"]
        todo = [p for p in plan if p.id not in done]
        timings_total: dict[str, float] = {}
        contexts = {}
        if todo:
            t0 = clock()
            # The whole plan, even on resume: the encoder's batches (and so the last bits of
            # each prompt's states) must be those of an uninterrupted render.
            contexts = self.encode_prompts(plan)
            self.models.free_text_encoder()
            timings_total["text_encode"] = clock() - t0
            # Read every weight the first shot needs before the output folder exists: a corrupt
            # checkpoint must not leave a half-made render behind.
            t0 = clock()
            self.models.preflight({"t2v" if p.mode == "t2v" else "m2v" for p in todo})
            self.models.vae
            self.models.experts("t2v" if todo[0].mode == "t2v" else "m2v")
            timings_total["load"] = clock() - t0
        self.out.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_files(self.out)
        if done:
            bank, last_frames = self._load_state()
        else:
            bank, last_frames = MemoryBank(fix=s.fix, max_size=s.max_memory_size), None
            if todo and s.plan.reference_images:
                self.add_reference_images(bank, list(s.plan.reference_images))
                self._save_state(manifest, bank, None)
        bar = _bar(total=len(plan), initial=len(plan) - len(todo), desc="shots", enabled=self.progress)
        self._bars.append(bar)
        for shot in todo:
            kind = "t2v" if shot.mode == "t2v" else "m2v"
            spec = ShotSpec(mode=shot.mode, prompt=shot.prompt, seed=shot.seed, size=s.size,
                            sampling=s.sampling(kind, shot.frames), reference_mi2v_bug=s.reference_mi2v_bug)
            known = None
            if spec.known_frames:
                if last_frames is None:
                    raise StoryMemError(f"shot {shot.id} continues the previous shot but none was rendered")
                known = uint8_to_float(last_frames[-spec.known_frames:], self.device)
            memory_ids = [e.source for e in bank.active()] if kind == "m2v" else []
            mem = bank.latents() if kind == "m2v" else None
            if kind == "m2v" and mem is None:
                raise StoryMemError(f"shot {shot.id} is M2V but the memory bank is empty")
            t = {}
            t0 = clock()
            experts = self.models.experts(kind)
            t["load"] = clock() - t0
            cond = self.cond_latent(s.size, shot.frames) if kind == "m2v" else None
            steps = _bar(total=s.sample_steps, desc=f"shot {shot.id} ({shot.mode})", enabled=self.progress,
                         leave=False)
            try:
                res = generate_shot(experts, self.models.vae, spec, contexts[shot.prompt],
                                    contexts[s.negative_prompt], memory_latents=mem, known=known,
                                    cond_latent=cond, device=self.device, dtype=self.dtype, progress=steps,
                                    cfg=self.models.backend.cfg, cuda_graph=self.models.backend.cuda_graph)
            except NonFiniteLatentError as e:
                e.shot = shot.id
                raise
            finally:
                steps.close()  # an error line must start on a line of its own
            t.update(res.timings)
            video = res.video[:, spec.known_frames:]  # MI2V drops 1 frame, MM2V 5 (StoryMem pipeline.py)
            t0 = clock()
            frames_u8 = to_uint8(video)
            write_video(self.out / shot_video(shot.id), frames_u8, fps=s.fps)
            t["write"] = clock() - t0
            t0 = clock()
            picked = self.add_keyframes(bank, shot.id, frames_u8)
            for j, i in enumerate(picked):
                save_image(self.out / keyframe_image(shot.id, j), frames_u8[i])
            t["keyframes"] = clock() - t0
            last_frames = frames_u8[-max(KNOWN_FRAMES.values()):].cpu().clone()
            done[shot.id] = {"index": shot.index, "mode": shot.mode, "seed": shot.seed, "prompt": shot.prompt,
                             "memory": memory_ids, "keyframes": [f"{shot.id}:{i}" for i in picked],
                             "frames": int(frames_u8.shape[0]), "video": shot_video(shot.id), **res.counts,
                             "timings": {k: round(v, 4) for k, v in t.items()}}
            for k, v in t.items():
                timings_total[k] = timings_total.get(k, 0.0) + v
            self._save_state(manifest, bank, last_frames)
            bar.update(1)
        bar.close()

        # Final story video: exactly this story's shots, in plan order.
        shots = [self.out / done[p.id]["video"] for p in plan]
        final = self.out / story_video(story.name)
        t0 = clock()
        concat_videos(shots, final, fps=s.fps)
        self.storyboard(story, plan, done, bank)
        timings_total["final"] = clock() - t0
        manifest["final"] = {"video": final.name, "storyboard": STORYBOARD,
                             "frames": sum(done[p.id]["frames"] for p in plan)}
        manifest["timings_this_run"] = {k: round(v, 4) for k, v in timings_total.items()}
        _atomic_json(self._manifest_path(), manifest)
        return manifest

    def storyboard(self, story: Story, plan: list[PlannedShot], done: dict, bank: MemoryBank) -> None:
        """storyboard.png: per shot its prompt, mode, length, memory and keyframes (storymem_rt.storyboard)."""
        from .storyboard import ShotRow, render_storyboard

        by_source = {e.source: e for e in bank.entries}
        rows = []
        refs = [(e.source, e.thumb) for e in bank.entries if e.source.startswith("ref:")]
        if refs:
            rows.append(ShotRow.references(refs))
        prev = None
        for p in plan:
            d = done[p.id]
            rows.append(ShotRow(
                shot_id=p.id, mode=p.mode, frames=d["frames"], cut=p.cut, prompt=p.prompt, seconds=p.seconds,
                memory=[(k, by_source[k].thumb) for k in d["memory"] if k in by_source],
                keyframes=[(int(k.rsplit(":", 1)[1]), by_source[k].thumb) for k in d["keyframes"] if k in by_source],
                continues=None if p.cut else prev))
            prev = p.id
        total = sum(done[p.id]["frames"] for p in plan)
        title = (f"{story.name}: {len(plan)} shot{'s' * (len(plan) != 1)}, {total} frames "
                 f"({total / self.settings.fps:.1f} s)")
        render_storyboard(rows, self.out / STORYBOARD, title=title)


def _commit_record(manifest: dict) -> dict:
    """What the state file records of the manifest it commits: settings, plan and the finished
    shots without their timings (equal frames must give equal state files)."""
    return {"settings": manifest["settings"], "plan": manifest["plan"],
            "shots": {k: {f: v for f, v in r.items() if f != "timings"} for k, r in manifest["shots"].items()}}


def _bar(total: int, desc: str, enabled: bool, initial: int = 0, leave: bool = True):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, leave=leave, dynamic_ncols=True)
