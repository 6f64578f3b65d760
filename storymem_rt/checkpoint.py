"""Weight loading, one way everywhere: meta-device model, streamed tensors, strict checks.

A model is built with its parameters on the meta device (no memory), then tensors are streamed
from the checkpoint one by one, moved to the target device, optionally transformed (LoRA merge,
in float32), cast to the target dtype and assigned in place of the meta parameter. Host memory
beyond the model itself stays around one tensor plus a bounded window of file pages, so a
57 GB A14B expert can go straight to the GPU from a host that could not hold it twice.

Readers:
- `iter_safetensors(files)`: `(key, tensor)` from `safetensors.safe_open`, file by file.
- `read_torch_pth(path)`: `torch.load(weights_only=True, mmap=True)` with a plain fallback for
  the legacy (non-zip) format; pickles that carry code or objects are refused.
- `safetensors_files(folder)`: the single `diffusion_pytorch_model.safetensors` or the shards of
  its `.index.json`, checked against the index.

Every failure a user can fix raises `CheckpointError` with one sentence naming the file (and
the key where there is one) followed by where to download the checkpoint.

Experts in diffusers' layout (`WanTransformer3DModel`: `transformer/`, `transformer_2/`, keys like
`blocks.0.attn1.to_q.weight`) load the same way, their keys renamed through
`diffusers_format.DIT_KEY_MAP` as they stream, so a LoRA in upstream names merges unchanged.
"""
from __future__ import annotations

import contextlib
import json
import logging
import pickle
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .configs import DiTConfig, read_json
from .errors import CheckpointError, download_hint

log = logging.getLogger("storymem_rt")

SAFETENSORS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"

# (regex, replacement) renames from checkpoint keys to WanDiT parameter names. WanDiT keeps the
# upstream Wan2.2 names (wan/modules/model.py), so the table is empty; it exists so that a
# renamed module is a one-line change here rather than a special case in the loop.
KEY_MAP: tuple[tuple[str, str], ...] = ()

# safe_open maps the whole file and every page a tensor touches stays resident until the handle
# closes; reopening after this many bytes bounds the file-backed part of host RSS to about this
# window plus the largest tensor instead of a whole (5-10 GB) shard. Reopening costs ~1 ms.
_REOPEN_BYTES = 64 << 20

PICKLE_REFUSED = "refused: file contains code/objects; only plain tensors are allowed"

Transform = Callable[[str, torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------- helpers

def checkpoint_error(msg: str, kind: str | None) -> CheckpointError:
    """CheckpointError(msg), followed by the download command of `kind` (t2v, i2v, lora) if any."""
    hint = download_hint(kind) if kind else ""
    return CheckpointError(f"{msg}; {hint}" if hint else msg)


def rename_key(key: str, key_map: Iterable[tuple[str, str]] = KEY_MAP) -> str:
    for pattern, repl in key_map:
        key, n = re.subn(pattern, repl, key)
        if n:
            break
    return key


def guess_kind(path: str | Path) -> str | None:
    """'t2v' / 'i2v' from a folder name like `Wan2.2-I2V-A14B/high_noise_model`, else None."""
    s = str(path).lower()
    has_i, has_t = "i2v" in s, "t2v" in s
    return "i2v" if has_i and not has_t else "t2v" if has_t and not has_i else None


@contextlib.contextmanager
def _params_on_meta():
    """Build modules with parameters on the meta device but real buffers.

    Unlike `with torch.device("meta")`, buffers (RoPE tables and other non-persistent state
    computed in `__init__`) are still computed for real, since no checkpoint holds them.
    `register_parameter` is patched only for the duration of the construction (as accelerate's
    `init_empty_weights(include_buffers=False)` does); `torch.empty` for each weight is
    allocated and dropped untouched, so it costs no resident memory.
    """
    orig = nn.Module.register_parameter

    def register_parameter(self, name, param):
        orig(self, name, param)
        if param is not None and param.device.type != "meta":
            p = self._parameters[name]
            self._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register_parameter
    try:
        yield
    finally:
        nn.Module.register_parameter = orig


def build_on_meta(factory: Callable[[], nn.Module]) -> nn.Module:
    """`factory()` with every parameter on the meta device (see `_params_on_meta`)."""
    with _params_on_meta():
        return factory()


# ----------------------------------------------------------------------------- readers

def safetensors_files(folder: str | Path, kind: str | None = None, name: str = SAFETENSORS_NAME) -> list[Path]:
    """The safetensors files of a diffusers-layout folder, in a stable order.

    One `diffusion_pytorch_model.safetensors` (or `name`: transformers' `model.safetensors`),
    or the shards listed by its `.index.json`; each listed shard must exist. (Whether each
    shard holds the keys the index says is checked while streaming, by
    `iter_safetensors(..., index=...)`.)
    """
    folder = Path(folder)
    single, index = folder / name, folder / f"{name}.index.json"
    if single.is_file():  # diffusers' order: the single file wins over an index
        return [single]
    if not index.is_file():
        raise checkpoint_error(f"{folder}: neither {name} nor {index.name} is there", kind)
    weight_map = read_index(index, kind)
    files = []
    for name in dict.fromkeys(weight_map.values()):
        shard = folder / name
        if not shard.is_file():
            key = next(k for k, v in weight_map.items() if v == name)
            raise checkpoint_error(f"{shard}: shard listed in {index.name} (for key {key!r}) is missing", kind)
        files.append(shard)
    return files


def read_index(index: str | Path, kind: str | None = None) -> dict[str, str]:
    """`weight_map` of a `*.safetensors.index.json`: key -> shard file name."""
    index = Path(index)
    raw = read_json(index, "safetensors index", download_hint(kind) if kind else None)
    try:
        weight_map = raw["weight_map"]
        if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            raise TypeError("weight_map must map keys to file names")
    except (KeyError, TypeError) as e:
        raise checkpoint_error(f"{index}: not a valid safetensors index ({type(e).__name__}: {e})", kind) from None
    return weight_map


def _brief(e: BaseException) -> str:
    """The first line (or sentence) of an exception from a library, for our one-sentence errors."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text.split(". ")[0][:160]


def _safetensors_error(path: Path, e: Exception, kind: str | None, key: str | None = None) -> CheckpointError:
    what = f" while reading key {key!r}" if key else ""
    return checkpoint_error(f"{path}: truncated or corrupt safetensors file{what} ({_brief(e)})", kind)


def _in_file_order(path: Path, keys: list[str]) -> list[str]:
    # safe_open lists keys by name; reading by data offset makes a shard one sequential read.
    # The header (8-byte little-endian length, then JSON) was validated by safe_open already.
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    return sorted(keys, key=lambda k: header[k]["data_offsets"][0])


def iter_safetensors(
    files: Iterable[str | Path],
    *,
    origins: MutableMapping[str, Path] | None = None,
    index: Mapping[str, str] | None = None,
    kind: str | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(key, tensor)` for every tensor of `files`, one at a time, on the CPU.

    Tensors come in file-offset order (sequential reads) and are views of a memory map (no
    copy) that pin the map while alive: copy what you keep (`load_module_streaming` does), so
    that pages are released as the reader moves on. `origins`, when given, is filled with
    key -> file before each yield (error messages of the consumer name the file). `index` (key -> shard file name) is checked:
    every key the index puts in a shard must be in that shard. Duplicate keys across files are
    refused.
    """
    seen: dict[str, Path] = {} if origins is None else origins
    for path in map(Path, files):
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                keys = _in_file_order(path, list(f.keys()))
        except FileNotFoundError:
            raise checkpoint_error(f"{path}: file is missing", kind) from None
        except (SafetensorError, OSError) as e:
            raise _safetensors_error(path, e, kind) from None
        if index is not None:
            present = set(keys)
            for k, shard in index.items():
                if shard == path.name and k not in present:
                    raise checkpoint_error(f"{path}: the index lists key {k!r} in this shard but it is not there", kind)
        handle, window = None, 0
        try:
            for key in keys:
                if key in seen and seen[key] != path:
                    raise checkpoint_error(f"{path}: key {key!r} is also in {seen[key]}", kind)
                seen[key] = path
                try:
                    if handle is None or window > _REOPEN_BYTES:
                        if handle is not None:
                            handle.__exit__(None, None, None)
                        handle, window = safe_open(path, framework="pt", device="cpu").__enter__(), 0
                    t = handle.get_tensor(key)
                except (SafetensorError, OSError) as e:
                    raise _safetensors_error(path, e, kind, key) from None
                window += t.numel() * t.element_size()
                yield key, t
                del t
        finally:
            if handle is not None:
                handle.__exit__(None, None, None)


def read_torch_pth(path: str | Path, kind: str | None = None) -> dict[str, torch.Tensor]:
    """A flat `{key: tensor}` dict from a torch-pickled `.pth`, memory-mapped when possible.

    Only `torch.load(weights_only=True)` is used: a pickle that would run code or build objects
    other than tensors and containers is refused. mmap needs the zipfile format (torch >= 1.6
    default); legacy files are read without it.
    """
    path = Path(path)
    if not path.is_file():
        raise checkpoint_error(f"{path}: file is missing", kind)
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # weights_only's restricted unpickler refuses any global that is not an allow-listed
        # tensor type: reaching it means the file tried to import something.
        lines = str(e).strip().splitlines()
        detail = next((ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln), lines[0] if lines else "")
        # first sentence only: torch goes on to suggest allow-listing the global, which we won't
        first = detail.strip().split(". ")[0][:160].rstrip(".")
        raise checkpoint_error(f"{path}: {PICKLE_REFUSED} ({first})", kind) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        if "legacy .tar format" in str(e):
            raise checkpoint_error(f"{path}: is in the legacy .tar format, which cannot be loaded safely "
                                   "(weights_only); re-save it with torch.save", kind) from None
        raise checkpoint_error(f"{path}: truncated or corrupt torch file ({_brief(e)})", kind) from None
    if not isinstance(obj, Mapping):
        raise checkpoint_error(f"{path}: expected a state dict (a dict of tensors), found a {type(obj).__name__}", kind)
    for k, v in obj.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise checkpoint_error(f"{path}: entry {k!r} is not a tensor ({type(v).__name__}); {PICKLE_REFUSED}", kind)
    return dict(obj)


# ----------------------------------------------------------------------------- loader

def _dtype_policy(module: nn.Module) -> Callable[[str, torch.dtype], torch.dtype]:
    """Precision policy as data: the module's own `param_dtype(name, dtype)` (WanDiT keeps
    time MLPs, modulation, head and norm3 in float32), else diffusers'
    `_keep_in_fp32_modules` name fragments, else `dtype` for everything."""
    policy = getattr(module, "param_dtype", None)
    if callable(policy):
        return policy
    fp32 = tuple(getattr(module, "_keep_in_fp32_modules", None) or ())
    return lambda name, dtype: torch.float32 if any(f in name for f in fp32) else dtype


def _set_tensor(module: nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if leaf in owner._parameters:
        old = owner._parameters[leaf]
        owner._parameters[leaf] = type(old)(value, requires_grad=old.requires_grad) if isinstance(
            old, nn.Parameter) else nn.Parameter(value, requires_grad=False)
    else:
        owner._buffers[leaf] = value


def load_module_streaming(
    module: nn.Module,
    items: Iterable[tuple[str, torch.Tensor]],
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    source: str | Path,
    origins: Mapping[str, Path] | None = None,
    key_map: Iterable[tuple[str, str]] = KEY_MAP,
    transform: Transform | None = None,
    kind: str | None = None,
) -> nn.Module:
    """Fill `module`'s state (built by `build_on_meta`) from `(key, tensor)` items, strictly.

    Each tensor goes to `device` first; `transform(key, tensor)` (a LoRA merge) then runs there
    and returns float32; results that still alias the source (CPU, same dtype) are cloned, so
    the module never holds views of a file map or of the caller's tensors; floating tensors are cast to `dtype`, or to what the module's precision
    policy says for that name (see `_dtype_policy`); integer tensors keep theirs. Every source key must name a
    state entry of matching shape, every state entry must be filled: otherwise CheckpointError
    naming `origins[key]` (or `source`) and the key. Non-persistent buffers move to `device`
    with their dtype unchanged.
    """
    device = torch.device(device)
    key_map = tuple(key_map)
    expected = {k: v.shape for k, v in module.state_dict(keep_vars=True).items()}
    param_dtype = _dtype_policy(module)
    filled: set[str] = set()

    def where(key: str) -> str:
        return str(origins.get(key, source)) if origins is not None else str(source)

    for src_key, tensor in items:
        key = rename_key(src_key, key_map)
        shown = src_key if key == src_key else f"{src_key} (as {key})"
        if key not in expected:
            raise checkpoint_error(f"{where(src_key)}: unexpected key {shown!r} that the model does not have", kind)
        if key in filled:
            raise checkpoint_error(f"{where(src_key)}: key {shown!r} appears twice", kind)
        if tuple(tensor.shape) != tuple(expected[key]):
            raise checkpoint_error(f"{where(src_key)}: key {shown!r} has shape {list(tensor.shape)} but the model "
                                   f"expects {list(expected[key])}", kind)
        t = tensor.to(device)
        if transform is not None:
            t = transform(key, t)
        if t.is_floating_point():
            t = t.to(param_dtype(key, dtype))
        if t.device.type == "cpu" and t.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr():
            # Nothing copied (CPU, same dtype): own the memory. A view of the file map would pin
            # the whole map, and with it every page read so far for tensors that were converted.
            t = t.clone()
        del tensor
        _set_tensor(module, key, t)
        filled.add(key)
        del t
    missing = [k for k in expected if k not in filled]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise checkpoint_error(f"{source}: key {missing[0]!r}{more} is missing from the checkpoint", kind)
    persistent = set(expected)
    for name, buf in list(module.named_buffers()):
        if name not in persistent and buf is not None:
            if buf.device.type == "meta":  # our bug: _params_on_meta keeps buffers real
                raise RuntimeError(f"buffer {name} is still on the meta device after loading")
            _set_tensor(module, name, buf.to(device))
    return module


FP8_CONFIG = "fp8_config.json"
FP8_FORMAT = "storymem-fp8"
FP8_VERSION = 1


def read_fp8_config(folder: str | Path) -> dict | None:
    """The FP8 artifact's `fp8_config.json` (build-engines --precision fp8), None for a bf16/fp32 folder."""
    p = Path(folder) / FP8_CONFIG
    if not p.exists():
        return None
    try:
        cfg = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise checkpoint_error(f"{p}: unreadable FP8 config ({e}); rebuild with storymem-rt build-engines --precision fp8",
                    None) from None
    if not isinstance(cfg, dict) or cfg.get("format") != FP8_FORMAT or cfg.get("version") != FP8_VERSION:
        raise checkpoint_error(f"{p}: not a {FP8_FORMAT} v{FP8_VERSION} folder; rebuild with storymem-rt build-engines "
                    f"--precision fp8", None)
    return cfg


def load_expert(
    folder: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    lora=None,
    distill: tuple[str | Path, float] | None = None,
) -> nn.Module:
    """One Wan2.2 expert (`high_noise_model/` or `low_noise_model/`) as a `WanDiT` in eval mode.
    An FP8 artifact folder (with `fp8_config.json`) loads with e4m3 block linears (`dtype`: their
    compute dtype).

    `distill`: (a few-step distill LoRA's .safetensors, strength), merged first (storymem_rt.distill).
    `lora`: a `storymem_rt.lora.LoraWeights` (or a path to a LoRA file, read with its rank
    inferred and alpha = r, rslora on: StoryMem's convention) merged into its target weights
    as they stream (W += scale * B @ A in float32 before the cast), so the merged expert never
    exists twice in memory.
    """
    from .dit import DiTOptions, WanDiT  # dit imports nothing from here; keep the module import light

    folder = Path(folder)
    kind = guess_kind(folder)
    if not folder.is_dir():
        raise checkpoint_error(f"{folder}: checkpoint folder does not exist", kind)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise checkpoint_error(f"{cfg_path}: config.json is missing", kind)
    from . import diffusers_format

    key_map = KEY_MAP
    try:
        raw = json.loads(cfg_path.read_text())
        if isinstance(raw, dict) and diffusers_format.is_diffusers_transformer_config(raw):
            config, key_map = diffusers_format.dit_config(raw, cfg_path), diffusers_format.DIT_KEY_MAP
        else:
            config = DiTConfig.from_json(cfg_path)
    except json.JSONDecodeError as e:
        raise checkpoint_error(f"{cfg_path}: not valid JSON ({e})", kind) from None
    except CheckpointError as e:
        raise checkpoint_error(str(e), kind) from None
    kind = config.model_type
    files = safetensors_files(folder, kind)
    index = read_index(folder / INDEX_NAME, kind) if files[0].name != SAFETENSORS_NAME else None

    fp8 = read_fp8_config(folder)
    options = None
    if fp8 is not None:  # block linears are e4m3 with per-channel scales (storymem_rt.fp8)
        if lora is not None:
            raise checkpoint_error(f"{folder}: an FP8 expert cannot take a LoRA merge; merge before quantizing", kind)
        options = DiTOptions(precision="fp8", fp8_activations="static" if fp8.get("input_scale") else "none")
    model = build_on_meta(lambda: WanDiT(config, options))
    transform = None
    if lora is not None and isinstance(lora, (str, Path)):
        from .lora import load_lora

        lora = load_lora(lora)
    if distill is not None:  # a few-step distill LoRA (path, strength), merged before StoryMem's
        from .distill import LoraStack, load_distill_lora

        if fp8 is not None:
            raise checkpoint_error(f"{folder}: an FP8 expert cannot take a distill LoRA merge; use bf16 "
                                   f"artifacts or the upstream weights for preview", kind)
        lora = LoraStack([load_distill_lora(distill[0], set(model.state_dict(keep_vars=True)), distill[1]), lora])
    if lora is not None:
        shapes = {k: v.shape for k, v in model.state_dict(keep_vars=True).items()}
        lora.check_targets(shapes)  # refuse before streaming gigabytes
        lora.reset_used()
        transform = lora.merge

    origins: dict[str, Path] = {}
    load_module_streaming(
        model,
        iter_safetensors(files, origins=origins, index=index, kind=kind),
        device=device, dtype=dtype, source=files[0] if index is None else folder / INDEX_NAME,
        origins=origins, key_map=key_map, transform=transform, kind=kind,
    )
    if lora is not None:
        lora.assert_all_used()
    if fp8 is not None:
        from .fp8 import block_linear_names

        if sorted(block_linear_names(model)) != sorted(fp8.get("quantized", [])):
            raise checkpoint_error(f"{folder / FP8_CONFIG}: quantized layers do not match the model's block linears", kind)
        model.cast_(dtype)  # FP8 weights stay; bias and compute dtype follow `dtype`
    log.info("loaded %s expert from %s (%d tensors%s)", kind, folder, len(origins),
             f", LoRA {lora.path.name} merged" if lora is not None else "")
    return model.eval().requires_grad_(False)
