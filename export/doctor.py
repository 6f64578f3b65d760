"""`storymem-rt doctor`: what is installed, which GPU, and which engines here are usable.

Usable means: files present with their recorded sizes, the runtime the artifact needs is
installed (onnxruntime or TensorRT for ONNX; TensorRT of the same version and a GPU of the
same architecture for engines; torch of the same version and the same device for compile
caches, which otherwise still work but recompile), and the inputs it was built from, where
they are still on disk, unchanged (hashed through the engines folder's hash cache).
"""
from __future__ import annotations

import importlib
from pathlib import Path

from storymem_rt.engines.manifest import (HASH_CACHE_NAME, HashCache, Manifest, expert_files, gpu_arch, hash_files,
                                          tool_versions)


def _version(mod: str) -> tuple[str | None, str | None]:
    try:
        m = importlib.import_module(mod)
        return getattr(m, "__version__", "?"), None
    except Exception as e:
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"


def environment() -> list[tuple[str, str]]:
    """(what, status) rows for the tools and the GPU."""
    from storymem_rt.engines.loaders import INSTALL_MESSAGE

    rows = []
    import platform

    rows.append(("python", platform.python_version()))
    import torch

    cuda = torch.version.cuda or "none (CPU build)"
    rows.append(("torch", f"{torch.__version__} (CUDA {cuda}; available: {torch.cuda.is_available()})"))
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            rows.append((f"gpu {i}", f"{p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}"))
    else:
        rows.append(("gpu", "none (engines for the GPU cannot run here; CPU paths only)"))
    for mod, hint in (("triton", "needed for our Triton kernels on the GPU"), ("onnx", "pip install onnx"),
                      ("onnxruntime", "pip install onnxruntime")):
        v, err = _version(mod)
        if v and mod == "onnxruntime":
            import onnxruntime as ort

            v = f"{v} (providers: {', '.join(ort.get_available_providers())})"
        rows.append((mod, v or f"not usable ({err}); {hint}"))
    v, err = _version("tensorrt")
    rows.append(("tensorrt", v or f"not installed; {INSTALL_MESSAGE}"))
    return rows


def artifact_status(manifest: Manifest, rec: dict, env: dict, cache: HashCache) -> tuple[bool, str]:
    """(usable, reason) of one record on this machine."""
    broken = manifest.files_ok(rec)
    if broken:
        return False, f"damaged: {broken}"
    kind, tools = rec["kind"], rec.get("tools", {})
    if kind == "tensorrt":
        if "tensorrt" not in env:
            return False, "TensorRT is not installed here"
        if tools.get("tensorrt") != env["tensorrt"]:
            return False, f"built with TensorRT {tools.get('tensorrt')}, this machine has {env['tensorrt']}"
        if rec.get("gpu_arch") != env["gpu_arch"]:
            return False, f"built for {rec.get('gpu_arch')}, this machine is {env['gpu_arch']}"
    if kind == "onnx" and "onnxruntime" not in env and "tensorrt" not in env:
        return False, "neither onnxruntime nor TensorRT is installed"
    if kind in ("torch-cache", "torch-aoti"):
        if rec.get("gpu_arch") != env["gpu_arch"]:
            return kind == "torch-cache", (f"built for {rec.get('gpu_arch')}, this machine is {env['gpu_arch']}"
                                           + (" (will recompile)" if kind == "torch-cache" else ""))
        if tools.get("torch") != env.get("torch"):
            return kind == "torch-cache", (f"built with torch {tools.get('torch')}, this machine has "
                                           f"{env.get('torch')}" + (" (will recompile)" if kind == "torch-cache" else ""))
    # Inputs still on disk: are they what the artifact was built from?
    files = rec.get("input_files", {})
    for key, name in files.items():
        p = Path(name)
        want = rec.get("inputs", {}).get(key)
        try:
            if key == "expert" and p.is_dir():
                now = hash_files(expert_files(p), cache, root=p)
            elif key == "lora" and p.is_file():
                now = cache.file(p)
            else:
                continue
        except Exception:
            continue
        if want is not None and now != want:
            return False, f"stale: {name} changed since the build; rebuild with: {rec.get('command')}"
    return True, "ok"


def report(engines: str | Path) -> list[str]:
    lines = [f"{what:<12} {status}" for what, status in environment()]
    root = Path(engines)
    manifest_path = root / "manifest.json"
    if not manifest_path.is_file():
        lines.append(f"engines      {root}: no manifest.json (build with: storymem-rt build-engines --out {root})")
        return lines
    manifest = Manifest(root)
    env = {**tool_versions(), "gpu_arch": gpu_arch()}
    cache = HashCache(root / HASH_CACHE_NAME)
    lines.append(f"engines      {root}: {len(manifest.artifacts)} artifact(s)")
    for rec in sorted(manifest.artifacts.values(), key=lambda r: (r["expert"], r["kind"], r["id"])):
        usable, why = artifact_status(manifest, rec, env, cache)
        shape = ""
        if rec.get("size"):
            shape = f" {rec['size'][0]}*{rec['size'][1]} x{rec.get('frame_num')} mem<={rec.get('max_memory_size')}"
        lines.append(f"  {'usable ' if usable else 'UNUSABLE'} {rec['kind']:<11} {rec['model']}/{rec['expert']:<4} "
                     f"{rec.get('precision') or '-':<5}{shape} {rec['path']}: {why}")
    cache.save()
    lines.append(prebuilt_lengths(manifest.artifacts.values()))
    return lines


def prebuilt_lengths(records) -> str:
    """Which shot lengths (frame counts, per size) have shaped artifacts (TensorRT profiles, compile
    caches; ONNX graphs and merged/FP8 weights serve every length). A story's shots of other
    lengths still render, compiling on first use."""
    by_size: dict[tuple, set[int]] = {}
    for rec in records:
        if rec.get("size") and rec.get("frame_num"):
            by_size.setdefault(tuple(rec["size"]), set()).add(int(rec["frame_num"]))
    if not by_size:
        return "lengths      no length-specific artifacts here (weights and ONNX graphs serve every shot length)"
    shown = "; ".join(f"{w}*{h}: {', '.join(map(str, sorted(f)))} frames" for (w, h), f in sorted(by_size.items()))
    return f"lengths      prebuilt for {shown}; shots of other lengths run without them (compiled on first use)"
