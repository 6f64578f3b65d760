"""Merge the StoryMem LoRA into an I2V expert once, on disk, shard by shard.

`checkpoint.load_expert(lora=...)` merges while loading, every process start. This writes the
merged expert back in the upstream layout (same shard names, same key -> shard assignment,
`config.json` copied, `.index.json` rewritten with the new sizes), so `load_expert(folder)`
loads it with no LoRA at all, and so ONNX / FP8 export start from plain weights.

Memory: one output shard is built in host memory at a time (`safetensors.save_file` needs
the whole file's tensors); the input is read through `iter_safetensors` (memory-mapped, one
tensor at a time). Peak host memory is about one shard (5-10 GB for A14B) plus the LoRA.

Numerics are exactly those of the streaming loader: W' = W + scale * B @ A computed in
float32 by `LoraWeights.merge`, then stored in W's own dtype (float32 for the upstream
checkpoints, so the merged file loads bit-identical to a load-time merge).
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from storymem_rt.atomic import atomic_dir
from storymem_rt.checkpoint import (INDEX_NAME, SAFETENSORS_NAME, build_on_meta, checkpoint_error, iter_safetensors,
                                    read_index, safetensors_files)
from storymem_rt.configs import DiTConfig

log = logging.getLogger("storymem_rt")


def _header_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for f in files:
        with safe_open(f, framework="pt", device="cpu") as h:
            for k in h.keys():
                shapes[k] = tuple(h.get_slice(k).get_shape())
    return shapes


def check_expert_keys(folder: Path, files: list[Path], config: DiTConfig, kind: str | None) -> dict[str, tuple]:
    """Header-only strict check (no tensor is read): the files hold exactly WanDiT's keys and
    shapes. The same rule `load_module_streaming` applies, but before gigabytes are written."""
    from storymem_rt.dit import WanDiT

    shapes = _header_shapes(files)
    expected = {k: tuple(v.shape) for k, v in build_on_meta(lambda: WanDiT(config)).state_dict().items()}
    for k, s in shapes.items():
        if k not in expected:
            raise checkpoint_error(f"{folder}: unexpected key {k!r} that the model does not have", kind)
        if s != expected[k]:
            raise checkpoint_error(f"{folder}: key {k!r} has shape {list(s)} but the model expects "
                                   f"{list(expected[k])}", kind)
    missing = [k for k in expected if k not in shapes]
    if missing:
        raise checkpoint_error(f"{folder}: key {missing[0]!r} is missing from the checkpoint", kind)
    return shapes


def merge_expert(src: str | Path, lora, dst: str | Path) -> list[Path]:
    """Write `src` (an upstream expert folder) with `lora` (a `LoraWeights`) merged into `dst`.

    `dst` must not exist; it is written under a temporary name beside it and renamed at the
    end, so an interrupted merge leaves nothing that looks finished. Returns the written files.
    """
    src, dst = Path(src), Path(dst)
    kind = "i2v"
    config = DiTConfig.from_json(src / "config.json")
    files = safetensors_files(src, kind)
    sharded = files[0].name != SAFETENSORS_NAME
    index = read_index(src / INDEX_NAME, kind) if sharded else None
    shapes = check_expert_keys(src, files, config, kind)
    lora.check_targets(shapes)  # refuse a LoRA that lands nowhere before writing anything
    lora.reset_used()

    if dst.exists():
        raise FileExistsError(f"{dst} exists; merge into a new folder")
    t0 = time.perf_counter()
    with atomic_dir(dst) as tmp:
        weight_map, total = {}, 0
        for shard in files:
            out: dict[str, torch.Tensor] = {}
            for key, t in iter_safetensors([shard], index=index, kind=kind):
                merged = lora.merge(key, t)
                # Targets come back as new float32 tensors; store them in the file's dtype.
                # Non-targets are views of the input map: saved straight from it.
                out[key] = merged.to(t.dtype) if merged is not t else t
                total += t.numel() * t.element_size()
                weight_map[key] = shard.name
            save_file(out, str(tmp / shard.name), metadata={"format": "pt"})
            del out
            log.info("merged LoRA into %s", shard.name)
        lora.assert_all_used()
        shutil.copyfile(src / "config.json", tmp / "config.json")
        if sharded:
            (tmp / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                     indent=2))
    log.info("merged %s + %s -> %s in %.1fs", src, lora.path.name, dst, time.perf_counter() - t0)
    return sorted(p for p in dst.iterdir() if p.is_file())
