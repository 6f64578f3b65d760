"""Export stage, step 6 (manifest) and the plain-Python part of step 4 (TensorRT profiles and
engine names): staleness is refused with the input that changed and the rebuild command."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch

from storymem_rt.configs import DiTConfig
from storymem_rt.engines.graph import token_grid
from storymem_rt.engines.manifest import (ArtifactRequest, BuildSpec, HashCache, Manifest, MissingEngineError,
                                          StaleEngineError, check_artifact, engine_request, find_engine)
from storymem_rt.export.build import Builder
from storymem_rt.export.tensorrt_build import ENGINE_NAME, plan_engine, profile_shapes
from storymem_rt.tiny import make_tiny_models

A14B = DiTConfig.from_name("i2v-a14b")


# --------------------------------------------------------------------------- TensorRT plan (plain Python)

def test_profile_shapes_cover_memory_sizes():
    p = profile_shapes(A14B, (832, 480), 81, 10)
    assert (p.grid.latent_frames, p.grid.h, p.grid.w) == (21, 30, 52)
    lo, opt, hi = p.shapes["tokens"]
    assert lo == (1, 21 * 1560, 144) and opt == (2, 31 * 1560, 144) and hi == (2, 31 * 1560, 144)
    assert p.shapes["rope_cos"] == ((32760, 64), (48360, 64), (48360, 64))
    assert p.shapes["context"] == ((1, 512, 4096), (2, 512, 4096), (2, 512, 4096))
    assert p.shapes["t_emb"] == ((1, 256), (2, 256), (2, 256))
    assert all(p.covers(m, b) for m in range(11) for b in (1, 2))
    assert not p.covers(11, 2) and not p.covers(0, 3)
    # other sizes / frame counts / memory
    q = profile_shapes(A14B, (1280, 720), 81, 8)
    assert q.shapes["tokens"][2] == (2, 29 * 45 * 80, 144)
    r = profile_shapes(A14B, (832, 480), 49, 0)
    assert r.shapes["tokens"][0][1] == r.shapes["tokens"][2][1] == 13 * 1560
    t = token_grid((224, 128), 17, DiTConfig.from_name("tiny-i2v"))
    assert (t.latent_frames, t.h, t.w, t.tokens(3)) == (5, 8, 14, 8 * 112)
    with pytest.raises(ValueError):
        profile_shapes(A14B, (832, 481), 81, 10)
    with pytest.raises(ValueError):
        profile_shapes(A14B, (832, 480), 80, 10)


def test_engine_names_are_content_hashes():
    onnx_rec = {"id": "onnx-m2v-high-fp8-0123456789ab", "model": "m2v", "expert": "high", "precision": "fp8"}
    base = dict(config=A14B, size=(832, 480), frame_num=81, max_memory_size=10, trt_version="10.9.0",
                gpu_arch="sm_90")
    a = plan_engine(onnx_rec, **base)
    assert re.fullmatch(r"tensorrt-m2v-high-fp8-[0-9a-f]{12}", a.id)
    assert plan_engine(dict(onnx_rec), **base).id == a.id  # same inputs, same name
    variants = [dict(size=(1280, 720)), dict(frame_num=49), dict(max_memory_size=8), dict(trt_version="10.13.0"),
                dict(gpu_arch="sm_100")]
    ids = {plan_engine(onnx_rec, **{**base, **v}).id for v in variants}
    ids.add(plan_engine({**onnx_rec, "id": "onnx-m2v-high-fp8-ba9876543210"}, **base).id)  # new LoRA/weights
    assert len(ids) == len(variants) + 1 and a.id not in ids


# --------------------------------------------------------------------------- manifest and staleness

@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_tiny_models(tmp_path_factory.mktemp("bundle") / "models")


def spec_for(models: Path, out: Path, **kw) -> BuildSpec:
    return BuildSpec(**{"models": str(models), "precision": "fp32", "size": (224, 128), "frame_num": 17,
                        "max_memory_size": 3, "out": str(out), "backend": "onnx", **kw})


def test_staleness_refused_with_reason_and_command(bundle, tmp_path):
    models = tmp_path / "models"
    shutil.copytree(bundle, models)
    spec = spec_for(models, tmp_path / "engines")
    Builder(spec, experts=("high",)).run()
    rec = find_engine(spec, "onnx", "high")  # fresh: usable
    assert rec["kind"] == "onnx" and rec["precision"] == "fp32"
    assert find_engine(spec, "merged", "high")["id"].startswith("merged-m2v-high-")

    # changed precision
    with pytest.raises(StaleEngineError) as ei:
        find_engine(spec_for(models, tmp_path / "engines", precision="bf16"), "onnx", "high")
    msg = str(ei.value)
    assert "precision changed (built fp32, requested bf16)" in msg
    assert msg.endswith(f"rebuild with: storymem-rt build-engines --models {models} --precision bf16 --size '224*128' "
                        f"--frame-num 17 --max-memory-size 3 --out {tmp_path / 'engines'} --backend onnx")

    # changed LoRA file (same name, new content)
    lora_file = models / "StoryMem" / "Wan2.2-MI2V-A14B" / "backbone_high_noise.pth"
    raw = torch.load(lora_file, weights_only=True)
    key = next(k for k in raw if "lora_B" in k)
    raw[key] = raw[key] * 1.01
    torch.save(raw, lora_file)
    for kind in ("merged", "onnx"):
        with pytest.raises(StaleEngineError) as ei:
            find_engine(spec, kind, "high")
        reasons, _, command = str(ei.value).partition("; rebuild with: ")
        assert f"LoRA file {lora_file} changed" in reasons, reasons
        assert "expert weights" not in reasons and "precision" not in reasons
        assert command.startswith("storymem-rt build-engines --models") and command.endswith("--backend onnx")
    # the low expert was never built
    with pytest.raises(MissingEngineError, match="no onnx artifact for the m2v low-noise expert; build it with"):
        find_engine(spec, "onnx", "low")
    # rebuilding makes it usable again, beside the stale one
    Builder(spec, experts=("high",)).run()
    assert find_engine(spec, "onnx", "high")["inputs"]["lora"] != rec["inputs"]["lora"]
    assert len(Manifest(tmp_path / "engines").slot("onnx", "m2v", "high")) == 2


def test_sized_artifacts_size_memory_versions(bundle, tmp_path):
    """TensorRT records (built here with a stand-in for the engine file: TensorRT is not
    installable in this workplace) are refused for another size, a larger max memory, another
    TensorRT version or GPU; a smaller max memory is served."""
    spec = spec_for(bundle, tmp_path / "engines", max_memory_size=10)
    builder = Builder(spec, experts=("high",))
    builder.run()
    manifest = Manifest(tmp_path / "engines")
    (onnx_rec,) = manifest.slot("onnx", "m2v", "high")
    cfg = DiTConfig.from_json(bundle / "Wan2.2-I2V-A14B" / "high_noise_model" / "config.json")
    plan = plan_engine(onnx_rec, cfg, spec.size, spec.frame_num, spec.max_memory_size, "10.9.0", "sm_90")

    def fake_build(dst: Path) -> dict:
        dst.mkdir(parents=True)
        (dst / ENGINE_NAME).write_bytes(b"engine stand-in")
        return {"tools": {"tensorrt": "10.9.0"}}  # what build_engine reports

    builder.stage(manifest, kind="tensorrt", expert="high", precision="fp32", key=plan.key, parent=onnx_rec["id"],
                  backend="tensorrt", build=fake_build, size=list(spec.size), frame_num=spec.frame_num,
                  max_memory_size=spec.max_memory_size, gpu_arch="sm_90", profiles=plan.profile.to_json(),
                  inputs=onnx_rec["inputs"], names=onnx_rec["input_files"])
    base = engine_request(spec, "onnx", "high")

    def want(**kw) -> ArtifactRequest:
        fields = dict(kind="tensorrt", model="m2v", expert="high", inputs=base.inputs, precision="fp32",
                      size=(224, 128), frame_num=17, max_memory_size=10, tools={"tensorrt": "10.9.0"},
                      gpu_arch="sm_90", input_names=base.input_names, rebuild=spec.command("tensorrt"))
        return ArtifactRequest(**{**fields, **kw})

    root = tmp_path / "engines"
    assert check_artifact(root, want())["id"] == plan.id
    assert check_artifact(root, want(max_memory_size=4))["id"] == plan.id  # 0..4 within 0..10
    cases = {
        "size changed (built 224*128, requested 320*192)": want(size=(320, 192)),
        "max memory changed (built for at most 10 memory frames, requested 12)": want(max_memory_size=12),
        "frame count changed (built 17, requested 33)": want(frame_num=33),
        "tensorrt version changed (built with 10.9.0, running 10.13.0)": want(tools={"tensorrt": "10.13.0"}),
        "GPU architecture changed (built for sm_90, this machine is sm_100)": want(gpu_arch="sm_100"),
        "precision changed (built fp32, requested fp8)": want(precision="fp8"),
    }
    for reason, request in cases.items():
        with pytest.raises(StaleEngineError) as ei:
            check_artifact(root, request)
        assert reason in str(ei.value) and "--backend tensorrt" in str(ei.value), str(ei.value)
    rec = Manifest(root).get(plan.id)
    assert rec["tools"]["tensorrt"] == "10.9.0" and rec["gpu_arch"] == "sm_90"
    assert rec["profiles"]["shapes"]["tokens"]["max"] == [2, 15 * 112, 144]
    # a damaged engine file is refused too
    (root / rec["path"] / ENGINE_NAME).write_bytes(b"truncated")
    with pytest.raises(StaleEngineError, match="files are damaged"):
        check_artifact(root, want())


def test_hash_cache_rehashes_changed_files(tmp_path):
    f = tmp_path / "a.bin"
    f.write_bytes(b"one")
    cache = HashCache(tmp_path / ".hashes.json")
    h1 = cache.file(f)
    cache.save()
    assert HashCache(tmp_path / ".hashes.json").file(f) == h1
    f.write_bytes(b"two")
    assert HashCache(tmp_path / ".hashes.json").file(f) != h1
