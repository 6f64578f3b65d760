"""`engines/manifest.json`, write side: the record `build-engines` makes for each artifact.

The format, content hashes and staleness checks (the read side, which `render` and `doctor`
use) live in the runtime: `storymem_rt/engines/manifest.py`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

from storymem_rt.engines.manifest import artifact_id, hash_json, now_iso, tool_versions


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


