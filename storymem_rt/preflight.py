"""One check, before the first shot, of every checkpoint the whole story will read.

A render loads the I2V experts and the LoRA only when the first M2V shot comes, minutes after
the first shot at real size. So that a corrupt I2V expert, a refused LoRA or a wrong
`--lora-rank` is found before any shot renders, `check_inputs` reads, for every model kind the
plan uses, what can be known without reading the weights themselves:

- each expert's `config.json`, and its safetensors headers (every shard the index lists):
  each key against the model's parameters (unexpected, missing, duplicated), each shape,
  and the file length against the header (a truncated download);
- the LoRA of each M2V expert: pickle safety (`weights_only`), its keys, its rank against
  `--lora-rank` and every target's shape against the expert's;
- the T5 and VAE `.pth` files: pickle safety and that they are state dicts.

Everything is mapped, not read: `torch.load(mmap=True)` and safetensors headers, so at A14B
size this costs seconds, not the minutes of a load. The model's shapes come from the expert
built on the meta device.
"""
from __future__ import annotations

import json
from pathlib import Path

from .checkpoint import (INDEX_NAME, SAFETENSORS_NAME, checkpoint_error, build_on_meta, read_index, read_torch_pth,
                         safetensors_files)
from .configs import DiTConfig
from .errors import CheckpointError
from . import diffusers_format as dfmt
from .models import EXPERTS, T5_FILE, VAE_FILE, ModelPaths, find_lora_file

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
_MAX_HEADER = 100 << 20  # safetensors' own limit


def safetensors_header(path: Path, kind: str | None) -> dict[str, list[int]]:
    """key -> shape of one safetensors file, from its header; the data is not read. A header
    that is cut, no JSON, or points past the end of the file is a CheckpointError."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n > min(_MAX_HEADER, size - 8):
                raise ValueError(f"header length {n} does not fit a file of {size} bytes")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("the header is no JSON object")
        shapes, end = {}, 0
        for key, info in header.items():
            if key == "__metadata__":
                continue
            shape, (start, stop) = [int(d) for d in info["shape"]], info["data_offsets"]
            count = 1
            for d in shape:
                count *= d
            if stop - start != count * _DTYPE_BYTES.get(info["dtype"], 0) or start < 0:
                raise ValueError(f"key {key!r}: {info['dtype']} {shape} does not fit its data offsets")
            shapes[key], end = shape, max(end, stop)
    except FileNotFoundError:
        raise checkpoint_error(f"{path}: file is missing", kind) from None
    except OSError as e:
        raise checkpoint_error(f"{path}: cannot be read ({e.strerror or e})", kind) from None
    except (ValueError, KeyError, TypeError) as e:
        raise checkpoint_error(f"{path}: not a valid safetensors file ({e})", kind) from None
    if 8 + n + end > size:
        raise checkpoint_error(f"{path}: truncated: the header needs {8 + n + end} bytes, the file has {size}", kind)
    return shapes


def expert_shapes(folder: Path, kind: str) -> dict[str, tuple[int, ...]]:
    """The parameter shapes of the expert in `folder`, after checking its checkpoint headers
    against them (keys and shapes, every shard the index lists)."""
    from .dit import WanDiT

    config = DiTConfig.from_json(folder / "config.json")
    model = build_on_meta(lambda: WanDiT(config))
    expected = {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()}
    del model
    files = safetensors_files(folder, kind)
    index = read_index(folder / INDEX_NAME, kind) if files[0].name != SAFETENSORS_NAME else None
    seen: dict[str, Path] = {}
    for path in files:
        shapes = safetensors_header(path, kind)
        if index is not None:
            for k, shard in index.items():
                if shard == path.name and k not in shapes:
                    raise checkpoint_error(f"{path}: the index lists key {k!r} in this shard but it is not there", kind)
        for key, shape in shapes.items():
            if key in seen:
                raise checkpoint_error(f"{path}: key {key!r} is also in {seen[key]}", kind)
            seen[key] = path
            if key not in expected:
                raise checkpoint_error(f"{path}: unexpected key {key!r} that the model does not have", kind)
            if tuple(shape) != expected[key]:
                raise checkpoint_error(f"{path}: key {key!r} has shape {list(shape)} but the model expects "
                            f"{list(expected[key])}", kind)
    missing = [k for k in expected if k not in seen]
    if missing:
        where = folder / (INDEX_NAME if index is not None else SAFETENSORS_NAME)
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise checkpoint_error(f"{where}: key {missing[0]!r}{more} is missing from the checkpoint", kind)
    return expected


def check_inputs(paths: ModelPaths, kinds: set[str], lora_rank: int | None = None) -> None:
    """Check every checkpoint a story whose shots use `kinds` ('t2v', 'm2v') will read;
    raise CheckpointError naming the file, the key and the fix at the first problem."""
    from .lora import LoraConfig, load_lora

    for kind in sorted(kinds):
        root, model_kind = (paths.t2v, "t2v") if kind == "t2v" else (paths.i2v, "i2v")
        if root is None:
            raise CheckpointError(f"the story needs the {model_kind} checkpoint but none was given")
        if dfmt.is_diffusers_folder(root):
            continue  # diffusers layout: its own keys, checked strictly while they stream (diffusers_format)
        for expert, sub in EXPERTS.items():
            shapes = expert_shapes(root / sub, model_kind)
            if kind != "m2v":
                continue
            if paths.lora is None:
                raise CheckpointError("M2V shots need the StoryMem LoRA but none was given")
            config = None if lora_rank is None else LoraConfig.storymem(lora_rank)
            lora = load_lora(find_lora_file(paths.lora, expert), config)
            lora.check_targets(shapes)
    shared = paths.shared_dir()
    if dfmt.is_diffusers_folder(shared):
        return  # safetensors and JSON only there: nothing executes on load
    for name in (T5_FILE, VAE_FILE):
        read_torch_pth(shared / name, "t2v")  # weights_only: a pickle carrying code is refused here
