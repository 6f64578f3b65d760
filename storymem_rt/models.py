"""Where the checkpoints are, and the loaded models of one process.

Upstream layout (what users download):
    Wan2.2-T2V-A14B/   high_noise_model/ low_noise_model/ models_t5_umt5-xxl-enc-bf16.pth
                       Wan2.1_VAE.pth google/umt5-xxl/
    Wan2.2-I2V-A14B/   the same, I2V experts
    StoryMem/Wan2.2-MI2V-A14B/backbone_{high,low}_noise.pth   (Kevin-thu/StoryMem)

`--models DIR` names a folder holding those three; `--t2v-model`, `--i2v-model`, `--lora`
name them one by one, as the reference's `--t2v_model_path`, `--i2v_model_path`,
`--lora_weight_path` do. T5 and VAE files are identical in both Wan folders: loaded once.

Either Wan folder may instead be in diffusers' layout (`Wan2.2-T2V-A14B-Diffusers/`:
`transformer/` high noise, `transformer_2/` low noise, `text_encoder/`, `tokenizer/`, `vae/`;
see storymem_rt.diffusers_format); `--models DIR` finds `Wan2.2-T2V-A14B-Diffusers/` where
`Wan2.2-T2V-A14B/` is absent.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .configs import read_json
from . import diffusers_format as dfmt
from .errors import CheckpointError, download_hint
from .tiny import TINY_META

log = logging.getLogger("storymem_rt")

T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
VAE_FILE = "Wan2.1_VAE.pth"
TOKENIZER_DIR = Path("google") / "umt5-xxl"
EXPERTS = {"high": "high_noise_model", "low": "low_noise_model"}
LORA_FILES = {"high": "backbone_high_noise", "low": "backbone_low_noise"}


def expert_dir(root: Path, expert: str) -> Path:
    """The folder of one expert ('high' / 'low') of a Wan folder, upstream or diffusers layout."""
    return root / (dfmt.TRANSFORMER_DIRS[expert] if dfmt.is_diffusers_folder(root) else EXPERTS[expert])


def _wan_dir(models: Path, name: str) -> Path:
    """`models/name`, or `models/name-Diffusers` when only that one is there."""
    d = models / name
    alt = models / f"{name}-Diffusers"
    return alt if not d.exists() and alt.is_dir() else d


def find_lora_file(folder: Path, expert: str) -> Path:
    """`backbone_{high,low}_noise.{safetensors,pth}`, else the one `*.safetensors` whose name
    says high / low (ComfyUI repacks: `..._HIGH_lora_rank128_bf16.safetensors`)."""
    for ext in (".safetensors", ".pth"):
        p = folder / (LORA_FILES[expert] + ext)
        if p.is_file():
            return p
    word = re.compile(rf"(^|[^a-z]){expert}([^a-z]|$)")  # `low` as a word: not the one in `flow`
    found = sorted(f for f in folder.glob("*.safetensors") if word.search(f.name.lower())) if folder.is_dir() else []
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        raise CheckpointError(f"{folder}: several LoRA files for the {expert}-noise expert "
                              f"({', '.join(f.name for f in found[:3])}); keep one, or name it {LORA_FILES[expert]}"
                              ".safetensors")
    raise CheckpointError(
        f"{folder}: no {LORA_FILES[expert]}.pth or .safetensors (StoryMem LoRA); {download_hint('lora')}")


@dataclass(frozen=True)
class ModelPaths:
    t2v: Path | None
    i2v: Path | None
    lora: Path | None

    @classmethod
    def from_models_dir(cls, models: str | Path) -> "ModelPaths":
        d = Path(models)
        if not d.is_dir():
            raise CheckpointError(f"{d}: models folder does not exist")
        lora = d / "StoryMem" / "Wan2.2-MI2V-A14B"
        if not lora.is_dir() and (d / "StoryMem" / LORA_FILES["high"]).with_suffix(".pth").is_file():
            lora = d / "StoryMem"
        return cls(t2v=_wan_dir(d, "Wan2.2-T2V-A14B"), i2v=_wan_dir(d, "Wan2.2-I2V-A14B"), lora=lora)

    def shared_dir(self) -> Path:
        """The folder whose T5, tokenizer and VAE we load (either Wan folder has them)."""
        for d in (self.t2v, self.i2v):
            if d is not None and ((d / T5_FILE).is_file() or (dfmt.is_diffusers_folder(d)
                                                              and (d / dfmt.TEXT_ENCODER_DIR).is_dir())):
                return d
        where = " or ".join(str(d) for d in (self.t2v, self.i2v) if d is not None) or "(no model folder given)"
        what = dfmt.TEXT_ENCODER_DIR + "/" if any(dfmt.is_diffusers_folder(d) for d in (self.t2v, self.i2v)) else T5_FILE
        raise CheckpointError(f"{where}: {what} is missing; {download_hint('t2v')}")

    def check(self, need_t2v: bool, need_m2v: bool) -> None:
        """Fail before any weight is read (and before a render writes anything) if a folder or
        file the story needs is absent: expert configs and every safetensors shard their index
        lists, LoRA files, the T5 checkpoint and tokenizer, the VAE. Headers and tensor shapes
        are checked later, while loading."""
        from .checkpoint import safetensors_files
        from .text_encoder import resolve_paths

        wanted = []
        if need_t2v:
            wanted.append(("t2v", self.t2v))
        if need_m2v:
            wanted += [("i2v", self.i2v), ("lora", self.lora)]
        for kind, d in wanted:
            if d is None:
                raise CheckpointError(f"the story needs the {kind} checkpoint but none was given; {download_hint(kind)}")
            if not d.is_dir():
                raise CheckpointError(f"{d}: folder does not exist; {download_hint(kind, str(d))}")
            if kind != "lora" and dfmt.is_diffusers_folder(d):
                dfmt.check_folder(d, kind)
            elif kind != "lora":
                for e in EXPERTS.values():
                    if not (d / e / "config.json").is_file():
                        raise CheckpointError(f"{d / e}: config.json is missing; {download_hint(kind, str(d))}")
                    safetensors_files(d / e, kind)
            else:
                for e in EXPERTS:
                    find_lora_file(d, e)
        shared = self.shared_dir()
        if dfmt.is_diffusers_folder(shared):
            dfmt.check_shared(shared)
            return
        resolve_paths(shared, None)  # the T5 checkpoint and its tokenizer folder
        if not (shared / VAE_FILE).is_file():
            raise CheckpointError(f"{shared / VAE_FILE} is missing; {download_hint('t2v', str(shared))}")


class ModelSet:
    """The models of one process, loaded once and kept.

    `experts(kind)` returns {'high', 'low'} of 't2v' or 'm2v' (I2V + merged LoRA), built by the
    backend registry (`storymem_rt.backends`) for `backend` (default: the plain WanDiT in `dtype`).
    With `resident=False` only one kind's experts are kept at a time (the other is dropped when the
    story moves on): the story engine renders all T2V shots before M2V needs memory.
    engines: the `engines.BuildSpec` of `render --engines` (artifacts checked before use), or None.
    """

    def __init__(self, paths: ModelPaths, device="cpu", dtype=torch.float32, lora_rank: int | None = None,
                 lora_alpha: float | None = None, text_dtype=None, vae_dtype=torch.float32, resident: bool = True,
                 backend=None, engines=None, frame_num: int = 81, max_memory_size: int = 10,
                 distill: dict | None = None, distill_strength: float = 1.0):
        from .backends import BackendConfig, ExpertsLoader

        self.paths = paths
        self.device = torch.device(device)
        if backend is None:
            backend = BackendConfig(device=str(self.device), precision="bf16" if dtype == torch.bfloat16 else "fp32")
        self.backend = backend
        self.dtype = backend.dtype
        self.text_dtype = text_dtype or dtype
        self.vae_dtype = vae_dtype
        self.lora_rank = lora_rank
        self.lora_alpha = lora_alpha
        self.resident = resident
        self.engines = engines
        self.loader = ExpertsLoader(backend, paths, self.lora_config(), engines, frame_num, max_memory_size,
                                    distill, distill_strength)
        self._experts: dict[str, dict] = {}
        self._text = None
        self._vae = None

    @property
    def text_encoder(self):
        if self._text is None:
            from .text_encoder import TextEncoder

            d = self.paths.shared_dir()
            if dfmt.is_diffusers_folder(d):
                self._text = dfmt.load_text_encoder(d, device=self.device, dtype=self.text_dtype)
            else:
                self._text = TextEncoder.from_checkpoint(d / T5_FILE, d / TOKENIZER_DIR, device=self.device,
                                                         dtype=self.text_dtype)
        return self._text

    def free_text_encoder(self) -> None:
        self._text = None

    @property
    def vae(self):
        if self._vae is None:
            from .vae import WanVAE

            d = self.paths.shared_dir()
            if dfmt.is_diffusers_folder(d):
                self._vae = dfmt.load_vae(d, device=self.device, dtype=self.vae_dtype)
            else:
                self._vae = WanVAE.from_checkpoint(d / VAE_FILE, device=self.device, dtype=self.vae_dtype)
        return self._vae

    def lora_config(self):
        from .lora import LoraConfig

        if self.lora_rank is None:
            return None  # inferred from the file, alpha = r, rslora (StoryMem's convention)
        alpha = self.lora_alpha if self.lora_alpha is not None else float(self.lora_rank)
        return LoraConfig(r=self.lora_rank, alpha=alpha, rslora=True)

    def experts(self, kind: str) -> dict:
        if kind not in ("t2v", "m2v"):
            raise ValueError(f"expert kind must be 't2v' or 'm2v', got {kind!r}")
        if kind not in self._experts:
            if not self.resident:
                self._experts.clear()
            self._experts[kind] = self.loader.load(kind)
        return self._experts[kind]

    def preflight(self, kinds) -> None:
        """Check every engine artifact the story will use before anything is written."""
        self.loader.preflight(kinds)


def read_tiny_meta(models: Path) -> dict | None:
    """`storymem_tiny.json` of a tiny bundle folder, None for any other folder."""
    p = Path(models) / TINY_META
    if not p.is_file():
        return None
    return read_json(p, "tiny bundle description", "rebuild it with storymem-rt make-tiny-models")
