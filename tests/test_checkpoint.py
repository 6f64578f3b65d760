"""Weight loading: golden experts load strictly and reproduce the reference; every broken
checkpoint is refused with a sentence naming the file (and key)."""
from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from storymem_rt import checkpoint as ckpt
from storymem_rt.checkpoint import (
    INDEX_NAME,
    SAFETENSORS_NAME,
    build_on_meta,
    iter_safetensors,
    load_expert,
    load_module_streaming,
    read_torch_pth,
    safetensors_files,
)

from conftest import CodePayload, refused, rel_err, run_dit

EXPERTS = [(k, e) for k in ("t2v", "i2v") for e in ("high_noise_model", "low_noise_model")]
SHARDED, SINGLE = "high_noise_model", "low_noise_model"


def copy_expert(golden: Path, kind: str, expert: str, tmp: Path) -> Path:
    """A writable copy (the golden tree is read-only, so no copytree/copystat)."""
    dst = tmp / f"Wan2.2-{kind.upper()}-A14B" / expert
    dst.mkdir(parents=True)
    for f in (golden / f"tiny-{kind}" / expert).iterdir():
        shutil.copyfile(f, dst / f.name)
    return dst


def source_state(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in safetensors_files(folder):
        out.update(load_file(f))
    return out


# ----------------------------------------------------------------------------- golden loads

@pytest.mark.parametrize("kind,expert", EXPERTS)
def test_golden_expert_loads_strictly_and_matches(golden, kind, expert):
    folder = golden / f"tiny-{kind}" / expert
    files = safetensors_files(folder)
    assert len(files) == (2 if expert == SHARDED else 1)
    src = source_state(folder)
    model = load_expert(folder)
    state = model.state_dict()
    assert set(state) == set(src)  # every source key used, every target filled
    for k, v in src.items():
        assert torch.equal(state[k], v), k
    assert not any(p.is_meta for p in model.parameters())
    assert not model.training and not any(p.requires_grad for p in model.parameters())

    case = load_file(golden / f"dit-{kind}-{expert}.safetensors")
    err = rel_err(run_dit(model, case), case["out"])
    print(f"{kind}/{expert} rel_err {err:.2e}")
    assert err <= 1e-5


def test_bf16_load_keeps_fp32_policy(golden):
    model = load_expert(golden / "tiny-i2v" / SHARDED, dtype=torch.bfloat16)
    params = dict(model.named_parameters())
    assert params["blocks.0.self_attn.q.weight"].dtype == torch.bfloat16
    assert params["blocks.0.modulation"].dtype == torch.float32
    assert params["time_embedding.0.weight"].dtype == torch.float32


def test_reopen_window_streams_same_tensors(golden, monkeypatch):
    monkeypatch.setattr(ckpt, "_REOPEN_BYTES", 1)  # reopen the file before every tensor
    files = safetensors_files(golden / "tiny-t2v" / SHARDED)
    origins: dict[str, Path] = {}
    got = {k: v.clone() for k, v in iter_safetensors(files, origins=origins)}
    assert got.keys() == source_state(golden / "tiny-t2v" / SHARDED).keys()
    assert set(origins.values()) == set(files)
    for k, v in source_state(golden / "tiny-t2v" / SHARDED).items():
        assert torch.equal(got[k], v)


class _WithBuffers(nn.Module):
    """A module with a non-persistent buffer computed in __init__ (as RoPE tables are)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.register_buffer("steps", torch.tensor([1, 2, 3]))
        self.register_buffer("table", torch.arange(6.0).reshape(2, 3), persistent=False)


def test_generic_streaming_loader_with_pth(tmp_path):
    ref = _WithBuffers()
    torch.save(ref.state_dict(), tmp_path / "m.pth")
    model = build_on_meta(_WithBuffers)
    assert model.lin.weight.is_meta and not model.table.is_meta
    load_module_streaming(model, read_torch_pth(tmp_path / "m.pth").items(),
                          dtype=torch.float64, source=tmp_path / "m.pth")
    assert model.lin.weight.dtype == torch.float64 and model.steps.dtype == torch.int64
    assert torch.equal(model.lin.weight, ref.lin.weight.double())
    assert torch.equal(model.table, torch.arange(6.0).reshape(2, 3))


def test_loaded_tensors_never_alias_the_source():
    src = _WithBuffers().state_dict()
    model = load_module_streaming(build_on_meta(_WithBuffers), src.items(), source="memory")
    before = model.lin.weight.clone()
    src["lin.weight"].add_(1.0)  # a file map or the caller's dict must not show through
    assert torch.equal(model.lin.weight, before)


def test_legacy_pth_without_zip_loads(tmp_path):
    sd = {"a": torch.randn(3, 2)}
    torch.save(sd, tmp_path / "old.pth", _use_new_zipfile_serialization=False)
    assert torch.equal(read_torch_pth(tmp_path / "old.pth")["a"], sd["a"])


# ----------------------------------------------------------------------------- refusals

def rewrite_shard_of(folder: Path, key: str, edit) -> Path:
    """edit(state) applied to the shard of a sharded expert that the index says holds `key`."""
    shard = folder / json.loads((folder / INDEX_NAME).read_text())["weight_map"][key]
    sd = load_file(shard)
    edit(sd)
    save_file(sd, shard)
    return shard


def rewrite_single(folder: Path, edit) -> Path:
    f = folder / SAFETENSORS_NAME
    sd = load_file(f)
    edit(sd)
    f.unlink()
    save_file(sd, f)
    return f


def test_missing_folder(tmp_path):
    msg = refused("does not exist", load_expert, tmp_path / "Wan2.2-T2V-A14B" / "high_noise_model")
    assert "high_noise_model" in msg and "Wan-AI/Wan2.2-T2V-A14B" in msg


def test_missing_config(golden, tmp_path):
    folder = copy_expert(golden, "i2v", SINGLE, tmp_path)
    (folder / "config.json").unlink()
    msg = refused("config.json is missing", load_expert, folder)
    assert str(folder / "config.json") in msg and "Wan-AI/Wan2.2-I2V-A14B" in msg


def test_missing_shard(golden, tmp_path):
    folder = copy_expert(golden, "t2v", SHARDED, tmp_path)
    shard = sorted(folder.glob("*-of-*.safetensors"))[-1]
    shard.unlink()
    msg = refused("is missing", load_expert, folder)
    assert str(shard) in msg and INDEX_NAME in msg and "Wan-AI/Wan2.2-T2V-A14B" in msg


def test_truncated_shard(golden, tmp_path):
    folder = copy_expert(golden, "t2v", SHARDED, tmp_path)
    shard = sorted(folder.glob("*-of-*.safetensors"))[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    msg = refused("truncated or corrupt", load_expert, folder)
    assert str(shard) in msg


def test_corrupt_header(golden, tmp_path):
    folder = copy_expert(golden, "i2v", SINGLE, tmp_path)
    f = folder / SAFETENSORS_NAME
    data = bytearray(f.read_bytes())
    data[8:24] = b"\x00garbage{{{{}}}}"  # the JSON header starts after the 8-byte length
    f.write_bytes(bytes(data))
    assert str(f) in refused("truncated or corrupt", load_expert, folder)


def test_wrong_shape(golden, tmp_path):
    folder = copy_expert(golden, "i2v", SINGLE, tmp_path)
    key = "blocks.0.ffn.0.weight"
    f = rewrite_single(folder, lambda sd: sd.__setitem__(key, sd[key][:-1].contiguous()))
    msg = refused("has shape", load_expert, folder)
    assert str(f) in msg and key in msg and "expects" in msg


def test_wrong_shape_in_shard_names_shard(golden, tmp_path):
    folder = copy_expert(golden, "t2v", SHARDED, tmp_path)
    key = "blocks.1.ffn.2.weight"
    shard = rewrite_shard_of(folder, key, lambda sd: sd.__setitem__(key, sd[key][:, :-2].contiguous()))
    msg = refused("has shape", load_expert, folder)
    assert str(shard) in msg and key in msg


def test_missing_key(golden, tmp_path):
    folder = copy_expert(golden, "t2v", SINGLE, tmp_path)
    key = "head.modulation"
    f = rewrite_single(folder, lambda sd: sd.pop(key))
    msg = refused("is missing", load_expert, folder)
    assert str(f) in msg and key in msg


def test_index_key_absent_from_its_shard(golden, tmp_path):
    folder = copy_expert(golden, "t2v", SHARDED, tmp_path)
    key = "blocks.1.modulation"
    shard = rewrite_shard_of(folder, key, lambda sd: sd.pop(key))
    msg = refused("not there", load_expert, folder)
    assert str(shard) in msg and key in msg


def test_unexpected_key(golden, tmp_path):
    folder = copy_expert(golden, "i2v", SINGLE, tmp_path)
    key = "img_emb.proj.0.weight"
    f = rewrite_single(folder, lambda sd: sd.__setitem__(key, torch.zeros(4)))
    msg = refused("unexpected key", load_expert, folder)
    assert str(f) in msg and key in msg


def test_duplicate_key_across_shards(golden, tmp_path):
    folder = copy_expert(golden, "t2v", SHARDED, tmp_path)
    first, second = sorted(folder.glob("*-of-*.safetensors"))
    sd = load_file(second)
    with safe_open(first, "pt") as f:
        key = next(iter(f.keys()))
        sd[key] = f.get_tensor(key)
    save_file(sd, second)
    msg = refused("is also in", load_expert, folder)
    assert str(second) in msg and key in msg


@pytest.mark.parametrize("fmt", ["zip", "raw-pickle"])
def test_pickle_with_code_is_refused(tmp_path, fmt):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    if fmt == "zip":
        torch.save({"blocks.0.self_attn.q.weight": torch.zeros(2, 2), "x": CodePayload(marker)}, path)
    else:  # a bare pickle goes through torch.load's legacy path
        path.write_bytes(pickle.dumps({"x": CodePayload(marker)}, protocol=2))
    msg = refused("refused: file contains code/objects; only plain tensors are allowed", read_torch_pth, path)
    assert str(path) in msg
    assert not marker.exists()


def test_pth_with_non_tensor_entry_is_refused(tmp_path):
    path = tmp_path / "odd.pth"
    torch.save({"a": torch.zeros(1), "step": 3}, path)
    msg = refused("not a tensor", read_torch_pth, path)
    assert str(path) in msg and "'step'" in msg


def test_truncated_pth(tmp_path):
    path = tmp_path / "t.pth"
    torch.save({"a": torch.randn(64, 64)}, path)
    path.write_bytes(path.read_bytes()[:1000])
    assert str(path) in refused("truncated or corrupt", read_torch_pth, path)
