"""`engines/manifest.json`: what was built, from what, with what, and whether it is still usable.

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


from storymem_rt.atomic import atomic_write_text  # noqa: E402,F401  (one atomic writer everywhere)


# --------------------------------------------------------------------------- the build request

def _fmt_size(size) -> str:
    return f"{size[0]}*{size[1]}"


@dataclass(frozen=True)
class BuildSpec:
    """What `build-engines` was asked for; `command()` is the exact line that rebuilds it."""

    models: str = "tiny"
    lora: str | None = None
    precision: str = "bf16"
    size: tuple[int, int] = (832, 480)
    frame_num: int = 81
    max_memory_size: int = 10
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
        args += ["--precision", self.precision, "--size", _fmt_size(self.size), "--frame-num", str(self.frame_num),
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
        why.append(f"size changed (built {_fmt_size(record['size'])}, requested {_fmt_size(want.size)})")
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
            try:
                raw = json.loads(self.path.read_text())
            except ValueError as e:
                raise StoryMemError(f"{self.path}: not valid JSON ({e}); delete it and rebuild the engines") from None
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


def make_record(*, kind: str, model: str, expert: str, precision: str | None, key: Mapping,
                inputs: Mapping[str, str], input_names: Mapping[str, str], path_root: Path, files_dir: Path,
                command: str, parent: str | None = None, **extra) -> dict:
    """A manifest record for the files under `files_dir` (sizes recorded for the cheap check)."""
    files = {p.relative_to(files_dir).as_posix(): p.stat().st_size
             for p in sorted(files_dir.rglob("*")) if p.is_file()}
    rec = {
        "kind": kind, "model": model, "expert": expert, "precision": precision,
        "id": artifact_id(kind, model, expert, precision, key),
        "path": files_dir.relative_to(path_root).as_posix(), "files": files,
        "inputs": dict(inputs), "input_files": dict(input_names), "key": hash_json(key),
        "size": None, "frame_num": None, "max_memory_size": None,
        "tools": tool_versions(), "gpu_arch": "cpu", "parent": parent, "command": command, "created": now_iso(),
    }
    tools = extra.pop("tools", None)
    if tools:  # versions the stage itself reports (TensorRT) complete those of this process
        rec["tools"].update(tools)
    rec.update(extra)
    return rec


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
