"""The backend registry end to end on the tiny bundle (CPU): one story rendered by every backend that
runs here equals the plain render within the backend's stated tolerance; every impossible combination
of backend options is one message, exit 2, nothing written."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import REPO, rel_err
from storymem_rt.cli import main

STORY = str(REPO / "story" / "harbor_morning.json")  # T2V, MI2V (no cut), M2V after a cut
SMALL = ["--size", "96*64", "--frame-num", "9", "--max-memory-size", "4", "--sample-steps", "3", "--mi2v",
         "--no-progress"]


def _run(args):
    return CliRunner().invoke(main, args)


@pytest.fixture(scope="module")
def engines(bundle, tmp_path_factory):
    """fp32 ONNX graphs of both models and FP8 weights of the M2V experts (and the T2V ones)."""
    out = tmp_path_factory.mktemp("eng") / "engines"
    for extra in (["--precision", "fp32", "--backend", "onnx"], ["--precision", "fp32", "--backend", "onnx",
                                                                  "--kind", "t2v"],
                  ["--precision", "fp8", "--backend", "onnx"], ["--precision", "fp8", "--backend", "onnx",
                                                                "--kind", "t2v"]):
        r = _run(["build-engines", "--models", str(bundle), "--out", str(out), "--size", "96*64", "--frame-num", "9",
                  "--max-memory-size", "4", *extra])
        assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="module")
def plain(bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("plain") / "out"
    r = _run(["render", STORY, "--models", str(bundle), "--out", str(out), *SMALL])
    assert r.exit_code == 0, r.output
    return out


def _state(out, shots=None):
    """render.json, the memory latents of `shots` (all by default) as one tensor, the last frames, and
    the keyframes each shot gave."""
    manifest = json.loads((out / "render.json").read_text())
    path = str(out / "state" / "memory.safetensors")
    tensors = load_file(path)
    with safe_open(path, "pt") as f:
        sources = [e["source"] for e in json.loads(f.metadata()["state"])["entries"]]
    keep = [i for i, src in enumerate(sources) if shots is None or src.split(":")[0] in shots]
    latents = torch.cat([tensors[f"latent.{i}"] for i in keep], dim=1)
    picks = {sid: s["keyframes"] for sid, s in manifest["shots"].items() if shots is None or sid in shots}
    return manifest, latents, tensors["last_frames"].float(), picks


# name -> (extra render options, whether they need the engines, bound on the memory latents' relative error
# and on the last frames' mean absolute difference in uint8 levels). fp32 code paths differ from plain in
# summation order only (~1e-6 in the latents), but keyframes are re-encoded from uint8 frames, where a
# value near a rounding edge moves a pixel by one level: 3.4e-4 measured for fast-fp32. bf16 / FP8 (CPU:
# bf16 compute): rounding of every forward, through 3 steps and the VAE.
CASES = {
    "fast-fp32": (["--backend", "fast-bf16"], False, 2e-3, 0.05),
    "fast-bf16": (["--backend", "fast-bf16", "--dtype", "bfloat16"], False, 5e-2, 4.0),
    "fast-fp8": (["--backend", "fast-fp8"], False, 1e-1, 8.0),
    "fast-fp8-engines": (["--backend", "fast-fp8", "--precision", "fp8"], True, 1e-1, 8.0),
    "compiled": (["--backend", "compiled"], False, 2e-3, 0.05),
    "onnxruntime": (["--backend", "onnxruntime", "--precision", "fp32"], True, 2e-3, 0.05),
}


@pytest.mark.parametrize("name", list(CASES))
def test_backend_renders_equal_plain(name, bundle, engines, plain, tmp_path):
    extra, needs_engines, lat_tol, px_tol = CASES[name]
    out = tmp_path / name
    args = ["render", STORY, "--models", str(bundle), "--out", str(out), *SMALL, *extra]
    if needs_engines:
        args += ["--engines", str(engines)]
    r = _run(args)
    assert r.exit_code == 0, r.output
    exact = lat_tol < 1e-2  # the fp32 code paths: the whole story
    shots = None if exact else {"01_01"}
    m, lat, last, picks = _state(out, shots)
    m0, lat0, last0, picks0 = _state(plain, shots)
    want = {"fast-fp32": "fast-bf16", "fast-fp8-engines": "fast-fp8"}.get(name, name)
    assert m["settings"]["backend"]["name"] == want  # the resolved backend is recorded
    assert picks == picks0, (picks, picks0)
    err, px = rel_err(lat, lat0), float((last - last0).abs().mean())
    print(f"{name}: memory latents rel err {err:.2e}, last frames mean |diff| {px:.3f} levels")
    assert err <= lat_tol and (px <= px_tol or not exact)
    assert [s["frames"] for s in m["shots"].values()] == [s["frames"] for s in m0["shots"].values()]


REFUSED = [
    (["--backend", "fast-bf16", "--fast", "fp8"], "--backend fast-bf16 and --fast fp8"),
    (["--backend", "onnxruntime"], "add --engines"),
    (["--backend", "tensorrt", "--engines", "ENGINES"], "needs an NVIDIA GPU"),
    (["--compile"], "--backend compiled"),
    (["--backend", "compiled", "--compile"], "--compile"),
    (["--precision", "fp8"], "--engines"),
    (["--attention", "int8-int8"], "--attention"),
    (["--fast", "bf16", "--attention", "triton"], "--attention"),  # CPU: the bf16 fast backend runs in fp32 here
    (["--fast", "bf16", "--engines", "ENGINES", "--precision", "fp8"], "FP8 weights"),
    (["--backend", "fast-bf16", "--engines", "ENGINES", "--precision", "fp8"], "FP8 weights"),
    (["--dtype", "bfloat16", "--engines", "ENGINES", "--precision", "fp32"], "drop --dtype"),
]


@pytest.mark.parametrize("extra,needle", REFUSED, ids=[" ".join(a) for a, _ in REFUSED])
def test_impossible_backend_combinations_are_one_message(extra, needle, engines, tmp_path):
    extra = [str(engines) if a == "ENGINES" else a for a in extra]
    out = tmp_path / "out"
    r = _run(["render", STORY, "--out", str(out), "--no-progress", *extra])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:") and needle in lines[0], r.output
    assert "Traceback" not in r.output and not out.exists()


def test_fp8_engines_compose_with_fast_and_attention_on_cuda():
    """The resolution the CPU cannot run: FP8 artifacts with --fast auto/fp8 and --attention on CUDA."""
    from storymem_rt.backends import resolve

    for fast in ("auto", "fp8"):
        cfg = resolve(fast=fast, attention="int8-int8", device="cuda", engines="e", engines_precision="fp8")
        assert (cfg.name, cfg.precision, cfg.attention, cfg.cfg) == ("fast-fp8", "fp8", "int8-int8", "sequential")
        opts = cfg.dit_options()
        assert opts.precision == "fp8" and opts.attention == "int8-int8" and opts.fuse_qkv
    cfg = resolve(fast="off", device="cuda", engines="e", engines_precision="fp8")
    assert (cfg.name, cfg.precision) == ("plain", "fp8")
