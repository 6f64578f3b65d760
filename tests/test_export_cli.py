"""Export stage end to end: `storymem-rt build-engines` on the tiny bundle (onnx, fp8, torch
compile cache), the clean TensorRT refusal on this machine, `storymem-rt doctor`; AOTInductor
packages behind STORYMEM_TEST_AOTI=1 (35 s of C++ compilation on 2 CPU cores)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import cli
from storymem_rt.engines.manifest import Manifest

INSTALL = "install storymem-rt[tensorrt] (TensorRT 10+) on a machine with an NVIDIA GPU"
TINY_SHAPE = ["--size", "224*128", "--frame-num", "17", "--max-memory-size", "3"]


@pytest.fixture(scope="module", autouse=True)
def tiny_cache(storymem_cache):
    """`--models tiny` finds the session's tiny bundle (conftest), not one in ~/.cache."""
    return storymem_cache


def test_build_engines_onnx_fp8_then_noop_then_doctor(tmp_path):
    out = tmp_path / "engines"
    r = cli("build-engines", "--models", "tiny", "--precision", "fp8", "--backend", "onnx", *TINY_SHAPE,
            "--out", str(out))
    assert r.exit_code == 0, r.output
    recs = Manifest(out).artifacts.values()
    assert sorted((x["kind"], x["expert"]) for x in recs) == sorted(
        (k, e) for k in ("merged", "fp8", "onnx") for e in ("high", "low"))
    assert "6 built, 0 up to date" in r.output
    for rec in recs:
        assert {"torch", "onnx", "python", "storymem_rt"} <= rec["tools"].keys()
        assert rec["gpu_arch"] == "cpu" and rec["command"].startswith("storymem-rt build-engines --models tiny")
    onnx_rec = next(x for x in recs if x["kind"] == "onnx")
    assert len(onnx_rec["graph"]["fp8_initializers"]) == 20 and onnx_rec["graph"]["ops"]["DequantizeLinear"] == 20
    r = cli("build-engines", "--models", "tiny", "--precision", "fp8", "--backend", "onnx", *TINY_SHAPE,
            "--out", str(out))
    assert r.exit_code == 0 and "0 built, 6 up to date" in r.output, r.output

    r = cli("doctor", "--engines", str(out))
    assert r.exit_code == 0, r.output
    assert f"tensorrt     not installed; {INSTALL}" in r.output
    assert "onnxruntime  1." in r.output and "torch        2." in r.output
    assert r.output.count("usable  ") == 6 and "UNUSABLE" not in r.output
    # ONNX graphs take any shot length (issue 16: doctor says which lengths are prebuilt).
    assert "lengths      no length-specific artifacts here" in r.output
    r = cli("doctor", "--engines", str(tmp_path / "none"))
    assert r.exit_code == 0 and "no manifest.json" in r.output


@pytest.mark.parametrize("backend", ["tensorrt", "all"])
def test_tensorrt_backend_fails_cleanly_before_building(tmp_path, backend):
    pytest.importorskip("onnx")
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    r = cli("build-engines", "--models", "tiny", "--backend", backend, *TINY_SHAPE, "--out", tmp_path / "engines",
            catch_exceptions=True)
    assert r.exit_code == 1
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: TensorRT is not available") and lines[0].endswith(INSTALL)
    assert not (tmp_path / "engines").exists()  # refused before any merging or exporting


def test_torch_compile_cache_artifact_gives_cache_hits_in_a_fresh_process(tmp_path):
    out = tmp_path / "engines"
    args = ["build-engines", "--models", "tiny", "--precision", "fp32", "--backend", "torch", "--size", "96*64",
            "--frame-num", "5", "--max-memory-size", "1", "--expert", "high", "--torch-buckets", "1",
            "--out", str(out)]
    r = cli(*args)
    assert r.exit_code == 0, r.output
    (rec,) = Manifest(out).slot("torch-cache", "m2v", "high")
    assert rec["buckets"] == "1" and rec["size"] == [96, 64] and rec["inputs"].keys() == {"dit_config"}
    assert "(0 built, 2 up to date)" in cli(*args).output  # merged + torch-cache: no-op
    merged = out / Manifest(out).slot("merged", "m2v", "high")[0]["path"] / "high_noise_model"
    script = textwrap.dedent(f"""
        import json, time, torch
        from storymem_rt.engines.loaders import activate_compile_cache, CompiledExpert
        from storymem_rt.export.torch_engines import sample_call
        activate_compile_cache({str(out / rec['path'])!r}, work_dir={str(tmp_path / 'work')!r})
        from storymem_rt.checkpoint import load_expert
        from storymem_rt.engines.graph import token_grid
        m = load_expert({str(merged)!r})
        g = token_grid((96, 64), 5, m.config)
        call = sample_call(m.config, g.latent_frames, g.h, g.w, 1, 2, "cpu")
        e = CompiledExpert(m, [(1, 1)], g.latent_frames)
        t0 = time.perf_counter()
        with torch.no_grad():
            out, ref = e(*call), m(*call)
        from torch._dynamo.utils import counters
        print(json.dumps({{"first_s": time.perf_counter() - t0, "err": float((out - ref).norm() / ref.norm()),
                          "inductor": dict(counters["inductor"])}}))
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"fresh process with the artifact: first call {res['first_s']:.1f}s (build: "
          f"{rec['warmup']['compile_s']['1-1']:.1f}s), rel err vs eager {res['err']:.1e}")
    assert res["inductor"].get("fxgraph_cache_hit", 0) >= 1 and res["inductor"].get("fxgraph_cache_miss", 0) == 0
    assert res["err"] <= 1e-5


@pytest.mark.skipif(os.environ.get("STORYMEM_TEST_AOTI") != "1", reason="opt-in: STORYMEM_TEST_AOTI=1 (35 s of C++)")
def test_aoti_package_serves_memory_sizes(golden, tmp_path):
    from storymem_rt.checkpoint import load_expert
    from storymem_rt.engines.graph import token_grid
    from storymem_rt.engines.loaders import AotiExpert
    from storymem_rt.export.torch_engines import build_aoti_package, sample_call

    m = load_expert(golden / "tiny-i2v" / "high_noise_model")
    path = build_aoti_package(m, (96, 64), 5, 2, tmp_path / "model.pt2")
    runner = AotiExpert(path, m.config)
    g = token_grid((96, 64), 5, m.config)
    for memory in (0, 2):
        x, t, ctx, y, frame_pos = sample_call(m.config, g.latent_frames, g.h, g.w, memory, 2, "cpu")
        with torch.no_grad():
            ref = m(x, t, ctx, y, frame_pos)
        out = runner(x, t, ctx, y, frame_pos)
        assert float((out - ref).norm() / ref.norm()) <= 1e-5


def test_doctor_lists_prebuilt_lengths_per_size():
    from storymem_rt.export.doctor import prebuilt_lengths

    recs = [{"size": [832, 480], "frame_num": 81}, {"size": [832, 480], "frame_num": 33},
            {"size": [480, 832], "frame_num": 81}, {"size": None, "frame_num": None}]
    assert prebuilt_lengths(recs) == ("lengths      prebuilt for 480*832: 81 frames; 832*480: 33, 81 frames; "
                                      "shots of other lengths run without them (compiled on first use)")
    assert prebuilt_lengths([{"size": None}]).startswith("lengths      no length-specific artifacts")
