"""Export stage, step 1: the StoryMem LoRA merged into the I2V experts on disk (export/merge.py)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import rel_err, run_dit
from storymem_rt.checkpoint import load_expert
from storymem_rt.engines.manifest import BuildSpec, Manifest
from storymem_rt.errors import CheckpointError
from storymem_rt.export.build import Builder
from storymem_rt.export.merge import merge_expert
from storymem_rt.lora import load_lora

EXPERTS = [("high_noise_model", "high"), ("low_noise_model", "low")]


def golden_models(golden: Path, tmp_path: Path) -> Path:
    """A models folder in the upstream layout whose I2V experts are the golden tiny ones."""
    models = tmp_path / "models"
    models.mkdir()
    (models / "Wan2.2-I2V-A14B").symlink_to(golden / "tiny-i2v", target_is_directory=True)
    return models


def mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


def test_merged_experts_equal_goldens_and_rerun_is_noop(golden, tmp_path):
    spec = BuildSpec(models=str(golden_models(golden, tmp_path)), lora=str(golden / "tiny-storymem-lora"),
                     precision="fp32", out=str(tmp_path / "engines"), backend="onnx")
    report = Builder(spec).run()
    assert sorted(r["kind"] for r in report.built) == ["merged", "merged", "onnx", "onnx"]
    manifest = Manifest(tmp_path / "engines")
    for expert, tag in EXPERTS:
        (rec,) = manifest.slot("merged", "m2v", tag)
        merged_dir = tmp_path / "engines" / rec["path"] / expert
        src = golden / "tiny-i2v" / expert
        # Upstream layout: same shard names (and index) as the source, config.json copied.
        assert sorted(p.name for p in merged_dir.iterdir()) == sorted(p.name for p in src.iterdir())
        assert (merged_dir / "config.json").read_text() == (src / "config.json").read_text()
        model = load_expert(merged_dir)  # no LoRA: it is in the weights
        case = load_file(golden / f"dit-m2v-lora-{expert}.safetensors")
        err = rel_err(run_dit(model, case), case["out"])
        print(f"merged m2v/{expert} vs golden: rel err {err:.2e}")
        assert err <= 1e-5
        # Bit-identical to merging while loading (same float32 math, stored in the file's dtype).
        lora = load_lora(golden / "tiny-storymem-lora" / f"backbone_{tag}_noise.pth")
        streamed = load_expert(src, lora=lora).state_dict()
        for k, v in model.state_dict().items():
            assert torch.equal(v, streamed[k]), k
        # Record: root inputs (expert files, LoRA file, LoRA config) hashed.
        assert set(rec["inputs"]) == {"expert", "lora", "lora_config"}
        assert rec["input_files"]["lora"].endswith(f"backbone_{tag}_noise.pth")

    before = mtimes(tmp_path / "engines")
    again = Builder(spec).run()
    assert again.built == [] and len(again.reused) == 4
    after = mtimes(tmp_path / "engines")
    assert {k: v for k, v in after.items() if k != "manifest.json"} == \
        {k: v for k, v in before.items() if k != "manifest.json"}
    assert after == before  # nothing rebuilt, so the manifest was not rewritten either


def test_merge_index_and_strictness(golden, tmp_path):
    src = golden / "tiny-i2v" / "high_noise_model"
    lora = load_lora(golden / "tiny-storymem-lora" / "backbone_high_noise.pth")
    files = merge_expert(src, lora, tmp_path / "merged")
    index = json.loads((tmp_path / "merged" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    src_index = json.loads((src / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert index["weight_map"] == src_index["weight_map"]
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for f in files if f.suffix == ".safetensors" for t in load_file(f).values())
    shard = next(f for f in files if f.suffix == ".safetensors")
    with safe_open(shard, "pt") as f:  # dtypes kept (float32 upstream)
        assert all(f.get_tensor(k).dtype == torch.float32 for k in f.keys())
    with pytest.raises(FileExistsError):
        merge_expert(src, lora, tmp_path / "merged")
    # A LoRA for another model is refused before anything is written.
    other = load_lora(golden / "tiny-storymem-lora" / "backbone_low_noise.pth")
    other.pairs["blocks.9.ffn.0.weight"] = next(iter(other.pairs.values()))
    other.source_keys["blocks.9.ffn.0.weight"] = "base_model.model.blocks.9.ffn.0.lora_A.weight"
    with pytest.raises(CheckpointError, match="matches no weight"):
        merge_expert(src, other, tmp_path / "merged2")
    assert not (tmp_path / "merged2").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp folder left
