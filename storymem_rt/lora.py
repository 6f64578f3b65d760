"""StoryMem's LoRA (`backbone_{high,low}_noise.pth`), parsed once and merged while loading.

StoryMem ships each expert's adapter as the dict from peft's `get_peft_model_state_dict`
(keys `base_model.model.blocks.0.self_attn.q.lora_A.weight`), r = lora_alpha = 128 with
rslora, on `self_attn.{q,k,v,o}`, `cross_attn.{q,k,v,o}`, `ffn.0`, `ffn.2` (biases untouched).
The reference runs it unmerged through peft; we merge W += scale * B @ A in float32 into each
target as the expert streams in (`checkpoint.load_expert(lora=...)`), so inference pays nothing.

Shapes: A = lora_A.weight [r, in], B = lora_B.weight [out, r], W [out, in].
Unlike the reference (peft ignores keys that match no module), a LoRA key that lands on no
weight of the model is an error naming the key and the file.

The same adapter as other tools save it is read too (`.safetensors` or `.pth`):
- ComfyUI / Kijai repacks: `diffusion_model.blocks.0.self_attn.q.lora_down.weight` (= A),
  `.lora_up.weight` (= B) and an optional scalar `.alpha`; also `lora_A` / `lora_B` under
  `diffusion_model.`. With an `.alpha` the module's scale is alpha / r, as ComfyUI applies it
  (a faithful repack of StoryMem's rslora adapter carries alpha = r * sqrt(r)); without one,
  StoryMem's convention (alpha = r, rslora), as for the `.pth`.
- diffusers module names (`transformer.blocks.0.attn1.to_q.lora_A.weight`), renamed through
  `diffusers_format.DIT_KEY_MAP`, the table the diffusers-layout experts load through.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import checkpoint_error, iter_safetensors, read_torch_pth
from .errors import CheckpointError

# `[base_model.model.]<module>.lora_{A,B}[.<adapter>].weight`: peft's saved layout (adapter
# name stripped) and its in-memory layout (`lora_A.default.weight`); `lora_down`/`lora_up` the
# ComfyUI / kohya names of A and B. Prefixes other tools put before the module are stripped.
_KEY = re.compile(r"^(?:base_model\.model\.|model\.diffusion_model\.|diffusion_model\.|transformer\.)?"
                  r"(?P<module>.+)\.lora_(?P<ab>A|B|down|up)(?:\.(?P<adapter>[^.]+))?\.weight$")
_ALPHA = re.compile(r"^(?:base_model\.model\.|model\.diffusion_model\.|diffusion_model\.|transformer\.)?"
                    r"(?P<module>.+)\.alpha$")
_AB = {"A": "A", "B": "B", "down": "A", "up": "B"}

STORYMEM_TARGETS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
                    "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")


@dataclass(frozen=True)
class LoraConfig:
    """Rank, alpha and scaling rule; defaults are StoryMem's A14B release (r = alpha = 128, rslora)."""

    r: int = 128
    alpha: float = 128.0
    rslora: bool = True

    def __post_init__(self):
        if self.r < 1:
            raise ValueError(f"LoRA rank r must be >= 1, got {self.r}")
        if self.alpha <= 0:
            raise ValueError(f"LoRA alpha must be > 0, got {self.alpha}")

    @property
    def scale(self) -> float:
        # peft LoraLayer.update_layer: alpha / sqrt(r) with use_rslora, else alpha / r.
        return self.alpha / math.sqrt(self.r) if self.rslora else self.alpha / self.r

    @classmethod
    def storymem(cls, r: int) -> "LoraConfig":
        """StoryMem's convention for a given rank: alpha = r, rslora on."""
        return cls(r=r, alpha=float(r), rslora=True)


class LoraWeights:
    """One parsed adapter: target weight key (`blocks.0.self_attn.q.weight`) -> (A, B).

    `merge(key, W)` is the per-weight hook `load_module_streaming` calls; it records which
    targets it merged, so a load can check that every LoRA pair landed.
    """

    def __init__(self, path: Path, config: LoraConfig, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]],
                 source_keys: dict[str, str], scales: dict[str, float] | None = None):
        self.path = path
        self.config = config
        self.pairs = pairs
        self.source_keys = source_keys  # target weight key -> the file's lora_A key, for messages
        self.scales = scales or {}  # target -> alpha / r where the file stores an alpha (ComfyUI files)
        self._used: set[str] = set()

    def __repr__(self) -> str:
        c = self.config
        return f"LoraWeights({self.path.name}, {len(self.pairs)} targets, r={c.r}, alpha={c.alpha}, rslora={c.rslora})"

    @property
    def targets(self) -> list[str]:
        return list(self.pairs)

    def check_targets(self, shapes: Mapping[str, torch.Size]) -> None:
        """Every pair must land on a 2-D weight of shape [B.out, A.in] among `shapes`."""
        for key, (a, b) in self.pairs.items():
            src = self.source_keys[key]
            if key not in shapes:
                raise checkpoint_error(f"{self.path}: LoRA key {src!r} matches no weight of the model "
                                       f"(no {key!r})", "lora")
            want = (b.shape[0], a.shape[1])
            if tuple(shapes[key]) != want:
                raise checkpoint_error(f"{self.path}: LoRA key {src!r} implies weight shape {list(want)} but "
                                       f"{key!r} has shape {list(shapes[key])}", "lora")

    def delta(self, key: str, device: torch.device | str = "cpu") -> torch.Tensor | None:
        """scale * B @ A in float32 on `device`, or None when `key` is not a target."""
        pair = self.pairs.get(key)
        if pair is None:
            return None
        a, b = (x.to(device=device, dtype=torch.float32) for x in pair)
        return (b @ a).mul_(self.scales.get(key, self.config.scale))

    def merge(self, key: str, weight: torch.Tensor) -> torch.Tensor:
        """W + scale * B @ A in float32 (W's device); non-targets come back unchanged."""
        d = self.delta(key, weight.device)
        if d is None:
            return weight
        self._used.add(key)
        return d.add_(weight.to(torch.float32))

    def merge_state_dict(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A new state dict with every target merged (float32 for targets, others as they are)."""
        self.check_targets({k: v.shape for k, v in state.items()})
        self.reset_used()
        out = {k: self.merge(k, v) for k, v in state.items()}
        self.assert_all_used()
        return out

    def reset_used(self) -> None:
        self._used.clear()

    def assert_all_used(self) -> None:
        # check_targets ran first, so a miss here is a bug of the loader, not of the file.
        unused = [k for k in self.pairs if k not in self._used]
        assert not unused, f"LoRA targets never merged: {unused[:3]}"


def merge_lora_into_state(state: Mapping[str, torch.Tensor], lora: "LoraWeights") -> dict[str, torch.Tensor]:
    """Functional form of `LoraWeights.merge_state_dict`."""
    return lora.merge_state_dict(state)


def _read_raw(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise checkpoint_error(f"{path}: LoRA file is missing", "lora")
    if path.suffix == ".safetensors":
        return dict(iter_safetensors([path], kind="lora"))
    return read_torch_pth(path, kind="lora")


def parse_lora(raw: Mapping[str, torch.Tensor], path: str | Path, config: LoraConfig | None = None) -> LoraWeights:
    """Pair up `lora_A`/`lora_B` keys of a peft state dict; see `load_lora`."""
    path = Path(path)
    halves: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    alphas: dict[str, tuple[str, torch.Tensor]] = {}
    adapters: set[str] = set()
    for k, v in raw.items():
        m = _ALPHA.match(k)
        if m is not None:
            if v.numel() != 1:
                raise checkpoint_error(f"{path}: key {k!r} has shape {list(v.shape)}; an alpha is one number", "lora")
            alphas[_target(m["module"])] = (k, v)
            continue
        m = _KEY.match(k)
        if m is None:
            raise checkpoint_error(f"{path}: key {k!r} is not a LoRA weight (lora_A/lora_B, lora_down/lora_up or alpha; "
                        f"DoRA, full-weight .diff, embedding and bias adapters are not supported)", "lora")
        if m["adapter"]:
            adapters.add(m["adapter"])
            if len(adapters) > 1:
                raise checkpoint_error(f"{path}: holds several adapters {sorted(adapters)} (key {k!r}); keep one", "lora")
        slot = halves.setdefault(_target(m["module"]), {})
        ab = _AB[m["ab"]]
        if ab in slot:
            raise checkpoint_error(f"{path}: key {k!r} duplicates {slot[ab][0]!r}", "lora")
        if v.dim() != 2:
            raise checkpoint_error(f"{path}: key {k!r} has shape {list(v.shape)}; only 2-D (linear) LoRA "
                        f"weights are supported", "lora")
        slot[ab] = (k, v)
    if not halves:
        raise checkpoint_error(f"{path}: holds no LoRA weights", "lora")
    for target, (k, _) in alphas.items():
        if target not in halves:
            raise checkpoint_error(f"{path}: key {k!r} is an alpha for a module without lora_down/lora_up weights", "lora")

    pairs, source_keys, rank, rank_key, rank_shape = {}, {}, None, None, None
    for target, slot in halves.items():
        for ab in "AB":
            if ab not in slot:
                other = slot["B" if ab == "A" else "A"][0]
                raise checkpoint_error(f"{path}: key {other!r} has no matching lora_{ab} weight", "lora")
        (ka, a), (kb, b) = slot["A"], slot["B"]
        if b.shape[1] != a.shape[0]:
            raise checkpoint_error(f"{path}: key {kb!r} has shape {list(b.shape)} but {ka!r} has rank "
                                   f"{a.shape[0]}", "lora")
        if rank is None:
            rank, rank_key, rank_shape = a.shape[0], ka, list(a.shape)
        elif a.shape[0] != rank:
            raise checkpoint_error(f"{path}: key {ka!r} has rank {a.shape[0]} but {rank_key!r} has rank {rank}; "
                                   f"per-module ranks are not supported", "lora")
        pairs[target], source_keys[target] = (a, b), ka
    if config is None:
        config = LoraConfig.storymem(rank)
    elif config.r != rank:
        # The file is fine: the given rank (--lora-rank) is what differs, so no download hint.
        raise CheckpointError(f"{path}: the LoRA has rank {rank} (key {rank_key!r} has shape {rank_shape}) but "
                              f"--lora-rank {config.r} was given; drop --lora-rank (the rank is read from the "
                              f"file) or pass --lora-rank {rank}")
    # ComfyUI: scale = alpha / r per module, r the module's lora_down rows.
    scales = {t: float(a.reshape(())) / pairs[t][0].shape[0] for t, (_, a) in alphas.items()}
    return LoraWeights(path, config, pairs, source_keys, scales)


def _target(module: str) -> str:
    """The weight a LoRA module adapts, in our (upstream Wan) names; diffusers module names
    (`blocks.0.attn1.to_q`) go through the diffusers-layout key map."""
    from .checkpoint import rename_key
    from .diffusers_format import DIT_KEY_MAP

    return rename_key(module + ".weight", DIT_KEY_MAP)


def load_lora(path: str | Path, config: LoraConfig | None = None) -> LoraWeights:
    """Read a StoryMem/peft LoRA from `.pth` (weights_only torch.load) or `.safetensors`.

    Keys may carry the `base_model.model.` prefix or not, and an adapter name
    (`lora_A.default.weight`) or not. The rank comes from the lora_A shapes; with `config`
    None the scaling follows StoryMem (alpha = r, rslora), else `config.r` must equal that rank.
    """
    path = Path(path)
    return parse_lora(_read_raw(path), path, config)
