"""`engines/manifest.json`, read side: what was built, from what, and whether it is still usable.

The runtime (`render`, `doctor`) reads records and checks them against the current inputs
here; `export/` (`build-engines`) writes them (`export/manifest.py` `make_record`).

Every artifact of `storymem-rt build-engines` (merged experts, FP8 weights, ONNX graphs,
TensorRT engines, torch compile caches / AOTInductor packages) gets one record:

    {"id": "onnx-m2v-high-fp8-3f2a9c1d0b7e", "kind": "onnx", "model": "m2v", "expert": "high",
     "path": "onnx/onnx-m2v-high-fp8-3f2a9c1d0b7e", "files": {"model.onnx": 51234, ...},
     "inputs": {"expert": "<sha256>", "lora": "<sha256>", "lora_config": "<sha256>"},
     "input_files": {"lora": "backbone_high_noise.pth", ...},
     "precision": "fp8", "size": null, "frame_num": null, "max_memory_size": null,
     "shapes": {...}, "profiles": {...}, "tools": {"torch": "2.11.0", "onnx": "1.23.2", ...},
     "gpu_arch": "cpu", "parent": "merged-m2v-high-...", "command": "storymem-rt build-engines ...",
     "created": "2026-11-20T12:00:00Z", "build_s": 1.2}

`inputs` are always the *root* inputs (the upstream expert files, the LoRA file and the LoRA
config), whatever stage produced the artifact, so a stale TensorRT engine can say "the LoRA
changed" rather than "its ONNX parent changed". Fields that do not shape an artifact are null
(a merged expert has no size; an ONNX graph has no fixed token count).

Artifact names are content hashes (TensorRT demo/Diffusion style: model, LoRA hash,
quantization, tool version): `<kind>-<model>-<expert>-<precision>-<key[:12]>`, key = sha256 of
everything the artifact depends on. Same inputs -> same name -> a rebuild is a no-op.

Hashing a 57 GB expert takes a minute; `HashCache` (`engines/.hashes.json`) remembers each
file's sha256 under (path, size, mtime_ns, inode), so re-runs and `render`'s checks re-read
only files that changed.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import platform
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from storymem_rt.atomic import atomic_write_text
from storymem_rt.configs import (DEFAULT_FRAME_NUM, DEFAULT_MAX_MEMORY, DEFAULT_SIZE, DiTConfig, format_size,
                                 read_json)
from storymem_rt.errors import StoryMemError

MANIFEST_NAME = "manifest.json"
HASH_CACHE_NAME = ".hashes.json"
MANIFEST_FORMAT = 1
PRECISIONS = ("fp32", "bf16", "fp16", "fp8")
KINDS = ("merged", "fp8", "onnx", "tensorrt", "torch-cache", "torch-aoti")
_CHUNK = 16 << 20


class StaleEngineError(StoryMemError):
    """An engine/artifact exists but was built from other inputs or for other settings."""


class MissingEngineError(StoryMemError):
    """No artifact of the requested kind is in the engines folder."""


# --------------------------------------------------------------------------- hashing

def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def hash_json(obj: Any) -> str:
    """sha256 of canonical JSON (sorted keys, no spaces): stable across runs and machines."""
    return sha256_bytes(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode())


class HashCache:
    """sha256 of files, remembered under (resolved path, size, mtime_ns, inode).

    A file rewritten in place gets a new mtime_ns (and usually size), so its hash is recomputed;
    the cache can only be fooled by a writer that restores mtime_ns on purpose.
    """

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path is not None else None
        self._entries: dict[str, dict] = {}
        if self.path is not None and self.path.is_file():
            try:
                self._entries = json.loads(self.path.read_text())
            except (OSError, ValueError):
                self._entries = {}  # a cache is never worth failing for
        self._dirty = False

    def file(self, path: str | Path) -> str:
        p = Path(path).resolve()
        st = p.stat()
        stamp = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino}
        hit = self._entries.get(str(p))
        if hit is not None and all(hit.get(k) == v for k, v in stamp.items()):
            return hit["sha256"]
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        digest = h.hexdigest()
        self._entries[str(p)] = {**stamp, "sha256": digest}
        self._dirty = True
        return digest

    def save(self) -> None:
        if self.path is None or not self._dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps(self._entries, indent=1, sort_keys=True))
        self._dirty = False


def hash_files(files: Iterable[str | Path], cache: HashCache | None = None, root: str | Path | None = None) -> str:
    """One sha256 over several files: sha256 of `name\\tsha256` lines (names relative to `root`),
    so a renamed shard or a moved key -> shard assignment (index.json is hashed too) changes it."""
    cache = cache or HashCache()
    lines = []
    for f in files:
        f = Path(f)
        name = f.relative_to(root).as_posix() if root is not None else f.name
        lines.append(f"{name}\t{cache.file(f)}")
    return sha256_bytes("\n".join(sorted(lines)).encode())


def expert_files(folder: str | Path) -> list[Path]:
    """The files that define an upstream expert folder: config.json, the index (if any), shards."""
    from storymem_rt.checkpoint import INDEX_NAME, safetensors_files

    folder = Path(folder)
    files = [folder / "config.json", *safetensors_files(folder)]
    if (folder / INDEX_NAME).is_file() and files[1].name != "diffusion_pytorch_model.safetensors":
        files.insert(1, folder / INDEX_NAME)
    return files


def lora_config_dict(config) -> dict:
    return {"r": config.r, "alpha": float(config.alpha), "rslora": bool(config.rslora)}


def root_inputs(expert_dir: str | Path, lora_file: str | Path | None, lora_config,
                cache: HashCache | None = None) -> tuple[dict[str, str], dict[str, str]]:
    """(hashes, names) of what every artifact of one expert is made from.

    hashes: {"expert": sha256 over the expert's files, "lora": sha256 of the LoRA file,
    "lora_config": sha256 of {r, alpha, rslora}}; T2V experts have no LoRA entries.
    names: the same keys -> a short human name for messages."""
    cache = cache or HashCache()
    expert_dir = Path(expert_dir)
    hashes = {"expert": hash_files(expert_files(expert_dir), cache, root=expert_dir)}
    names = {"expert": str(expert_dir)}
    if lora_file is not None:
        hashes["lora"] = cache.file(lora_file)
        names["lora"] = str(lora_file)
        cfg = lora_config_dict(lora_config)
        hashes["lora_config"] = hash_json(cfg)
        names["lora_config"] = "r={r}, alpha={alpha:g}, rslora={rslora}".format(**cfg)
    return hashes, names


# --------------------------------------------------------------------------- environment

def tool_versions() -> dict[str, str]:
    """Versions of what builds and runs artifacts; absent tools are left out."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for dist, key in (("storymem-rt", "storymem_rt"), ("torch", "torch"), ("onnx", "onnx"),
                      ("onnxruntime", "onnxruntime"), ("triton", "triton"), ("tensorrt", "tensorrt")):
        try:
            out[key] = md.version(dist)
        except md.PackageNotFoundError:
            continue
    if "tensorrt" not in out:  # wheels named tensorrt-cu12 etc. still import as tensorrt
        try:
            import tensorrt  # type: ignore

            out["tensorrt"] = tensorrt.__version__
        except Exception:
            pass
    return out


def gpu_arch(device=None) -> str:
    """"sm_90" for the current (or given) CUDA device, "cpu" without one."""
    try:
        import torch

        if device is not None and torch.device(device).type != "cuda":
            return "cpu"
        if not torch.cuda.is_available():
            return "cpu"
        major, minor = torch.cuda.get_device_capability(device)
        return f"sm_{major}{minor}"
    except Exception:
        return "cpu"


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


# --------------------------------------------------------------------------- the build request

@dataclass(frozen=True)
class BuildSpec:
    """What `build-engines` was asked for; `command()` is the exact line that rebuilds it."""

    models: str = "tiny"
    lora: str | None = None
    precision: str = "bf16"
    size: tuple[int, int] = DEFAULT_SIZE
    frame_num: int = DEFAULT_FRAME_NUM
    max_memory_size: int = DEFAULT_MAX_MEMORY
    out: str = "engines"
    backend: str = "torch"
    kind: str = "m2v"
    lora_rank: int | None = None

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if (self.frame_num - 1) % 4 or self.frame_num < 1:
            raise ValueError(f"frame_num must be 4n+1 (e.g. 81), got {self.frame_num}")
        if self.max_memory_size < 0:
            raise ValueError(f"max_memory_size must be >= 0, got {self.max_memory_size}")
        w, h = self.size
        if w <= 0 or h <= 0 or w % 16 or h % 16:
            raise ValueError(f"size {w}*{h}: width and height must be positive multiples of 16")

    def command(self, backend: str | None = None) -> str:
        args = ["storymem-rt", "build-engines", "--models", self.models]
        if self.lora:
            args += ["--lora", self.lora]
        if self.lora_rank is not None:
            args += ["--lora-rank", str(self.lora_rank)]
        args += ["--precision", self.precision, "--size", format_size(self.size), "--frame-num", str(self.frame_num),
                 "--max-memory-size", str(self.max_memory_size), "--out", self.out,
                 "--backend", backend or self.backend]
        if self.kind != "m2v":
            args += ["--kind", self.kind]
        return shlex.join(args)


# --------------------------------------------------------------------------- records

@dataclass(frozen=True)
class ArtifactRequest:
    """What a consumer (`render`, `doctor`, a later build stage) needs from the engines folder.

    Fields left None are not checked (a merged expert has no size). `max_memory_size` is an
    upper bound: an engine built for 10 memory frames serves a request for 8."""

    kind: str
    model: str
    expert: str
    inputs: Mapping[str, str]
    precision: str | None = None
    size: tuple[int, int] | None = None
    frame_num: int | None = None
    max_memory_size: int | None = None
    tools: Mapping[str, str] | None = None  # versions that must match exactly (tensorrt, torch)
    gpu_arch: str | None = None
    input_names: Mapping[str, str] | None = None
    rebuild: str | None = None  # the exact build-engines command


_INPUT_WORDS = {"expert": "expert weights", "lora": "LoRA file", "lora_config": "LoRA config"}


def mismatches(record: Mapping, want: ArtifactRequest) -> list[str]:
    """Why `record` cannot serve `want`, one phrase per reason (empty: usable)."""
    why = []
    have_inputs = record.get("inputs", {})
    names = {**record.get("input_files", {}), **(want.input_names or {})}
    for key in sorted(set(have_inputs) | set(want.inputs)):
        a, b = have_inputs.get(key), want.inputs.get(key)
        if a != b:
            word = _INPUT_WORDS.get(key, key)
            where = f" {names[key]}" if key in names else ""
            if a is None or b is None:
                why.append(f"{word}{where} {'added' if a is None else 'removed'}")
            else:
                why.append(f"{word}{where} changed (sha256 {a[:12]} at build, {b[:12]} now)")
    if want.precision is not None and record.get("precision") != want.precision:
        why.append(f"precision changed (built {record.get('precision')}, requested {want.precision})")
    if want.size is not None and record.get("size") is not None and tuple(record["size"]) != tuple(want.size):
        why.append(f"size changed (built {format_size(record['size'])}, requested {format_size(want.size)})")
    if want.frame_num is not None and record.get("frame_num") is not None and record["frame_num"] != want.frame_num:
        why.append(f"frame count changed (built {record['frame_num']}, requested {want.frame_num})")
    if (want.max_memory_size is not None and record.get("max_memory_size") is not None
            and want.max_memory_size > record["max_memory_size"]):
        why.append(f"max memory changed (built for at most {record['max_memory_size']} memory frames, "
                   f"requested {want.max_memory_size})")
    for tool, version in (want.tools or {}).items():
        built = record.get("tools", {}).get(tool)
        if built != version:
            why.append(f"{tool} version changed (built with {built}, running {version})")
    if want.gpu_arch is not None and record.get("gpu_arch") not in (None, want.gpu_arch):
        why.append(f"GPU architecture changed (built for {record.get('gpu_arch')}, this machine is {want.gpu_arch})")
    return why


class Manifest:
    """`engines/manifest.json`, loaded, edited in memory and saved atomically."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.path = self.root / MANIFEST_NAME
        self.artifacts: dict[str, dict] = {}
        if self.path.is_file():
            raw = read_json(self.path, "engines manifest", "delete it and rebuild the engines", error=StoryMemError)
            if raw.get("format") != MANIFEST_FORMAT:
                raise StoryMemError(f"{self.path}: manifest format {raw.get('format')} is not "
                                    f"{MANIFEST_FORMAT}; delete the folder and rebuild the engines")
            self.artifacts = dict(raw.get("artifacts", {}))

    def save(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        body = {"format": MANIFEST_FORMAT, "updated": now_iso(), "artifacts": self.artifacts}
        atomic_write_text(self.path, json.dumps(body, indent=2, sort_keys=True) + "\n")

    def put(self, record: dict) -> None:
        self.artifacts[record["id"]] = record

    def get(self, artifact_id: str) -> dict | None:
        return self.artifacts.get(artifact_id)

    def slot(self, kind: str, model: str, expert: str) -> list[dict]:
        """Records of one (kind, model, expert), newest first."""
        recs = [r for r in self.artifacts.values()
                if r.get("kind") == kind and r.get("model") == model and r.get("expert") == expert]
        return sorted(recs, key=lambda r: r.get("created", ""), reverse=True)

    def files_ok(self, record: Mapping) -> str | None:
        """None when every file of `record` is there with its recorded size, else what is wrong."""
        base = self.root / record["path"]
        for rel, size in record.get("files", {}).items():
            p = base / rel
            if not p.is_file():
                return f"{p} is missing"
            if p.stat().st_size != size:
                return f"{p} has {p.stat().st_size} bytes, the manifest says {size}"
        return None


def artifact_id(kind: str, model: str, expert: str, precision: str | None, key: Mapping) -> str:
    """Content-derived name: `<kind>-<model>-<expert>[-<precision>]-<sha256(key)[:12]>`."""
    parts = [kind, model, expert] + ([precision] if precision else []) + [hash_json(key)[:12]]
    return "-".join(parts)


def check_artifact(root: str | Path, want: ArtifactRequest, manifest: Manifest | None = None) -> dict:
    """The record of a usable artifact for `want`, or an exception that says why not.

    StaleEngineError names every input or setting that changed since the newest artifact of
    that (kind, model, expert) was built, and ends with the command that rebuilds it;
    MissingEngineError when there is none at all. Files are checked for presence and size.
    """
    manifest = manifest or Manifest(root)
    rebuild = f"; rebuild with: {want.rebuild}" if want.rebuild else ""
    candidates = manifest.slot(want.kind, want.model, want.expert)
    if not candidates:
        raise MissingEngineError(f"{manifest.root}: no {want.kind} artifact for the {want.model} {want.expert}-noise "
                                 f"expert{('; build it with: ' + want.rebuild) if want.rebuild else ''}")
    first_reasons = None
    for rec in candidates:
        reasons = mismatches(rec, want)
        if not reasons:
            broken = manifest.files_ok(rec)
            if broken is None:
                return rec
            reasons = [f"its files are damaged ({broken})"]
        if first_reasons is None:
            first_reasons = (rec, reasons)
    rec, reasons = first_reasons
    raise StaleEngineError(f"{manifest.root / rec['path']}: stale {want.kind} artifact {rec['id']}: "
                           + "; ".join(reasons) + rebuild)


# --------------------------------------------------------------------------- what render asks

@dataclass(frozen=True)
class Sources:
    """Resolved input folders of a build (and of the checks of its artifacts)."""

    model_dir: Path  # Wan2.2-I2V-A14B (m2v) or Wan2.2-T2V-A14B (t2v)
    lora_dir: Path | None  # StoryMem LoRA folder (m2v)


def resolve_sources(spec: BuildSpec) -> Sources:
    from storymem_rt.errors import CheckpointError, download_hint
    from storymem_rt.models import EXPERTS, ModelPaths, find_lora_file
    from storymem_rt.tiny import ensure_tiny_models

    root = ensure_tiny_models() if spec.models == "tiny" else Path(spec.models)
    if spec.models != "tiny" and not root.is_dir():
        raise StoryMemError(f"{root}: models folder does not exist")
    paths = ModelPaths.from_models_dir(root)
    model_dir = paths.i2v if spec.kind == "m2v" else paths.t2v
    kind = "i2v" if spec.kind == "m2v" else "t2v"
    # Only the experts (and the LoRA) are needed here, not T5 or the VAE.
    for sub in EXPERTS.values():
        if not (model_dir / sub / "config.json").is_file():
            raise CheckpointError(f"{model_dir / sub}: config.json is missing; {download_hint(kind, str(model_dir))}")
    lora = None
    if spec.kind == "m2v":
        lora = Path(spec.lora) if spec.lora else paths.lora
        if not lora.is_dir():
            raise CheckpointError(f"{lora}: LoRA folder does not exist; {download_hint('lora', str(lora))}")
        for e in EXPERTS:
            find_lora_file(lora, e)
    return Sources(model_dir=model_dir, lora_dir=lora)


def engine_request(spec: BuildSpec, kind: str, expert: str, cache: HashCache | None = None,
                   device: str | None = None) -> ArtifactRequest:
    """The ArtifactRequest a `render` with these settings makes for one engine kind.

    Root inputs are hashed from the current files (cheap through the engines folder's hash
    cache); tool versions and GPU arch are this machine's where the artifact depends on them."""
    from storymem_rt.models import EXPERTS

    src = resolve_sources(spec)
    expert_dir = src.model_dir / EXPERTS[expert]
    cache = cache or HashCache(Path(spec.out) / HASH_CACHE_NAME)
    tools, arch, sized = None, None, kind in ("tensorrt", "torch-cache", "torch-aoti")
    if kind == "torch-cache":
        cfg = DiTConfig.from_json(expert_dir / "config.json")
        inputs, names = {"dit_config": hash_json(cfg.to_json())}, {"dit_config": str(expert_dir / "config.json")}
    else:
        lora_file = lora_cfg = None
        if spec.kind == "m2v":
            from storymem_rt.lora import LoraConfig, load_lora
            from storymem_rt.models import find_lora_file

            lora_file = find_lora_file(src.lora_dir, expert)
            lora_cfg = (LoraConfig.storymem(spec.lora_rank) if spec.lora_rank is not None
                        else load_lora(lora_file).config)
        inputs, names = root_inputs(expert_dir, lora_file, lora_cfg, cache)
    if kind == "tensorrt":
        from .loaders import require_tensorrt

        tools, arch = {"tensorrt": require_tensorrt().__version__}, gpu_arch(device)
    elif kind in ("torch-cache", "torch-aoti"):
        tv = tool_versions()
        tools, arch = {"torch": tv.get("torch")}, gpu_arch(device)
    cache.save()
    backend = {"tensorrt": "tensorrt", "onnx": "onnx", "torch-cache": "torch", "torch-aoti": "torch"}.get(
        kind, spec.backend)
    return ArtifactRequest(kind=kind, model=spec.kind, expert=expert, inputs=inputs,
                           precision=None if kind == "merged" else spec.precision,
                           size=spec.size if sized else None, frame_num=spec.frame_num if sized else None,
                           max_memory_size=spec.max_memory_size if sized else None, tools=tools, gpu_arch=arch,
                           input_names=names, rebuild=spec.command(backend))


def find_engine(spec: BuildSpec, kind: str, expert: str, device: str | None = None) -> dict:
    """The usable artifact for `render`, or StaleEngineError / MissingEngineError saying which
    input changed and the exact build-engines command."""
    return check_artifact(spec.out, engine_request(spec, kind, expert, device=device))
