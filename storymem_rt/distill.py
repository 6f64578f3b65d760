"""Few-step distillation LoRAs (preview mode): read the formats users have, stack them on StoryMem's.

Public 4-step LoRAs for Wan2.2 A14B (lightx2v Wan2.2-Distill-Loras, Wan2.2-Lightning) come as one
`.safetensors` per expert: a file whose name contains `high_noise` and one with `low_noise`. Their keys,
in any of the namings users share (each tested on tiny files):
- Wan's original: `diffusion_model.blocks.N.<module>.lora_down.weight` [r, in], `.lora_up.weight`
  [out, r], `.alpha` (scalar; scale alpha / r, 1 without it), plus full-tensor deltas
  `<module>.diff` (added to `<module>.weight`) and `<module>.diff_b` (added to `<module>.bias`);
- ComfyUI/kohya: `lora_unet_blocks_N_<module with _>.lora_down.weight` / `.lora_up.weight` / `.alpha`;
- diffusers/peft: `[transformer.|base_model.model.]blocks.N.<module>.lora_A[.adapter].weight` /
  `.lora_B...`, with Wan module names or diffusers' (`attn1.to_q`, `attn2.to_out.0`, `ffn.net.0.proj`).
Every delta must land on a weight of the expert (else: one error naming the key and the file).

Stacking (the golden `pipeline-preview/` cases): W + strength * (alpha / r) * up @ down (and the diffs),
then StoryMem's LoRA, in float32, while the expert streams in (`checkpoint.load_expert(lora=[...])`).
"""
from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from .checkpoint import checkpoint_error, iter_safetensors, rename_key
from .diffusers_format import DIT_KEY_MAP

_PREFIXES = ("diffusion_model.", "transformer.", "base_model.model.", "model.")
_SUFFIX = re.compile(r"^(?P<module>.+?)\.(?:(?P<lora>lora_(?:down|up|A|B))(?:\.[^.]+)?\.weight|(?P<other>alpha|diff|diff_b))$")
_PART = {"lora_down": "down", "lora_A": "down", "lora_up": "up", "lora_B": "up"}


def _wan_module(module: str, modules: set[str]) -> str | None:
    """The Wan module name a LoRA key's module part means, or None."""
    for p in _PREFIXES:
        if module.startswith(p):
            module = module[len(p):]
            break
    if module.startswith("lora_unet_"):  # kohya: dots written as underscores
        flat = module[len("lora_unet_"):]
        return next((m for m in modules if m.replace(".", "_") == flat), None)
    if module in modules:
        return module
    # diffusers module names (attn1.to_q, ffn.net.0.proj, ...): the diffusers layout's own key map
    cand = rename_key(module + ".weight", DIT_KEY_MAP).removesuffix(".weight")
    return cand if cand in modules else None


class DistillLora:
    """One expert's distill LoRA: target key -> float32 delta factors, merged as `W += strength * delta`."""

    def __init__(self, path: Path, strength: float, pairs: dict, diffs: dict, rank: int, digest: str):
        self.path, self.strength, self.rank, self.digest = path, float(strength), rank, digest
        self.pairs = pairs  # weight key -> (down [r, in], up [out, r], scale)
        self.diffs = diffs  # weight/bias key -> full delta
        self._used: set[str] = set()

    @property
    def targets(self) -> list[str]:
        return [*self.pairs, *self.diffs]

    def check_targets(self, shapes: Mapping[str, torch.Size]) -> None:
        for key, (down, up, _) in self.pairs.items():
            want = (up.shape[0], down.shape[1])
            if key not in shapes or tuple(shapes[key]) != want:
                raise checkpoint_error(f"{self.path}: distill LoRA for {key!r} implies shape {list(want)}, the "
                                       f"expert has {list(shapes[key]) if key in shapes else 'no such weight'}",
                                       "lora")
        for key, d in self.diffs.items():
            if key not in shapes or tuple(shapes[key]) != tuple(d.shape):
                raise checkpoint_error(f"{self.path}: distill delta for {key!r} has shape {list(d.shape)}, the "
                                       f"expert has {list(shapes[key]) if key in shapes else 'no such weight'}",
                                       "lora")

    def merge(self, key: str, weight: torch.Tensor) -> torch.Tensor:
        out = None
        if key in self.pairs:
            down, up, scale = self.pairs[key]
            out = (up.to(weight.device, torch.float32) @ down.to(weight.device, torch.float32)).mul_(
                scale * self.strength)
        if key in self.diffs:
            d = self.diffs[key].to(weight.device, torch.float32) * self.strength
            out = d if out is None else out.add_(d)
        if out is None:
            return weight
        self._used.add(key)
        return out.add_(weight.to(torch.float32))

    def reset_used(self) -> None:
        self._used.clear()

    def assert_all_used(self) -> None:
        unused = [k for k in self.targets if k not in self._used]
        assert not unused, f"distill LoRA targets never merged: {unused[:3]}"


def parse_distill_lora(raw: Mapping[str, torch.Tensor], path: str | Path, model_keys: set[str],
                       strength: float = 1.0) -> DistillLora:
    """Pair a distill LoRA's keys (any naming above) against the expert's state keys `model_keys`."""
    path = Path(path)
    modules = {k.rsplit(".", 1)[0] for k in model_keys}
    parts: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for k, v in raw.items():
        m = _SUFFIX.match(k)
        module = _wan_module(m["module"], modules) if m else None
        if module is None:
            raise checkpoint_error(f"{path}: key {k!r} matches no weight of the expert (a distill LoRA holds "
                                   f"lora_down/lora_up/alpha/diff/diff_b or lora_A/lora_B keys of its modules)",
                                   "lora")
        part = _PART.get(m["lora"], m["lora"]) if m["lora"] else m["other"]
        slot = parts.setdefault(module, {})
        if part in slot:
            raise checkpoint_error(f"{path}: key {k!r} duplicates {slot[part][0]!r}", "lora")
        slot[part] = (k, v)
    pairs, diffs, rank = {}, {}, None
    for module, slot in parts.items():
        if "down" in slot or "up" in slot:
            if "down" not in slot or "up" not in slot:
                have = next(k for p, (k, _) in slot.items() if p in ("down", "up"))
                raise checkpoint_error(f"{path}: key {have!r} has no matching down/up half", "lora")
            (kd, down), (ku, up) = slot["down"], slot["up"]
            if down.dim() != 2 or up.dim() != 2 or up.shape[1] != down.shape[0]:
                raise checkpoint_error(f"{path}: {kd!r} {list(down.shape)} and {ku!r} {list(up.shape)} do not "
                                       f"pair (down [r, in], up [out, r])", "lora")
            r = down.shape[0]
            rank = r if rank is None else rank
            alpha = float(slot["alpha"][1]) if "alpha" in slot else float(r)
            pairs[module + ".weight"] = (down, up, alpha / r)
        elif "alpha" in slot:
            raise checkpoint_error(f"{path}: key {slot['alpha'][0]!r} has no lora_down/lora_up beside it", "lora")
        if "diff" in slot:
            diffs[module + ".weight"] = slot["diff"][1]
        if "diff_b" in slot:
            diffs[module + ".bias"] = slot["diff_b"][1]
    if not pairs and not diffs:
        raise checkpoint_error(f"{path}: holds no LoRA weights", "lora")
    return DistillLora(path, strength, pairs, diffs, rank or 0, file_digest(path))


def file_digest(path: Path) -> str:
    """sha256 of a file (recorded in render.json: which distill LoRA rendered the preview)."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError:
        return ""
    return h.hexdigest()


def load_distill_lora(path: str | Path, model_keys: set[str], strength: float = 1.0) -> DistillLora:
    path = Path(path)
    if not path.is_file():
        raise checkpoint_error(f"{path}: distill LoRA file is missing", "lora")
    if path.suffix != ".safetensors":
        raise checkpoint_error(f"{path}: distill LoRAs are read from .safetensors files", "lora")
    return parse_distill_lora(dict(iter_safetensors([path], kind="lora")), path, model_keys, strength)


def find_distill_files(folder: str | Path) -> dict[str, Path]:
    """{'high', 'low'}: the folder's one `.safetensors` whose name contains `high_noise` and the one
    with `low_noise` (as the upstream repositories ship them)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise checkpoint_error(f"{folder}: distill LoRA folder does not exist (it holds the *high_noise* and "
                               f"*low_noise* .safetensors of a 4-step LoRA, e.g. lightx2v Wan2.2-Distill-Loras)",
                               "lora")
    out = {}
    for expert in ("high", "low"):
        hits = sorted(p for p in folder.glob("*.safetensors") if f"{expert}_noise" in p.name)
        if len(hits) != 1:
            what = "no" if not hits else f"{len(hits)}"
            raise checkpoint_error(f"{folder}: {what} .safetensors file with '{expert}_noise' in its name; put "
                                   f"exactly one there", "lora")
        out[expert] = hits[0]
    return out


class LoraStack:
    """Several adapters merged one after the other into each weight while it streams (float32)."""

    def __init__(self, adapters):
        self.adapters = [a for a in adapters if a is not None]

    def check_targets(self, shapes) -> None:
        for a in self.adapters:
            a.check_targets(shapes)

    def reset_used(self) -> None:
        for a in self.adapters:
            a.reset_used()

    def merge(self, key: str, weight: torch.Tensor) -> torch.Tensor:
        for a in self.adapters:
            weight = a.merge(key, weight)
        return weight

    def assert_all_used(self) -> None:
        for a in self.adapters:
            a.assert_all_used()

    @property
    def path(self) -> Path:
        return self.adapters[-1].path
