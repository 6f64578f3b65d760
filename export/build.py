"""`storymem-rt build-engines`: the stages, each a no-op when its artifact is up to date.

Per expert (high, low) of the chosen model (m2v = I2V + StoryMem LoRA; t2v):
    merged (m2v only) -> fp8 (--precision fp8) -> onnx (--backend onnx/tensorrt/all)
    -> tensorrt (--backend tensorrt/all);   merged/fp8 -> torch-cache (--backend torch/all)
Each stage: key (its parent's id + its own settings) -> content-derived id; if the manifest
has that id and its files are intact, skip; else build into a temporary folder, rename, record.
The manifest is saved after every stage, so an interrupted build keeps what finished.
"""
from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from storymem_rt.configs import DiTConfig
from storymem_rt.engines.manifest import (HASH_CACHE_NAME, BuildSpec, HashCache, Manifest, Sources, artifact_id,
                                          gpu_arch, hash_json, resolve_sources, root_inputs, tool_versions)
from storymem_rt.models import EXPERTS

from .manifest import make_record

log = logging.getLogger("storymem_rt")

BACKENDS = {"torch": ("torch",), "onnx": ("onnx",), "tensorrt": ("tensorrt",), "all": ("torch", "onnx", "tensorrt")}
GRAPH_VERSION = 1  # bump when onnx_export.py writes a different graph for the same weights


@dataclass
class BuildReport:
    built: list[dict] = field(default_factory=list)
    reused: list[dict] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = []
        for tag, recs in (("built", self.built), ("up to date", self.reused)):
            for r in recs:
                out.append(f"{tag:<10} {r['kind']:<11} {r['expert']:<4} {r['precision'] or '-':<5} {r['path']}")
        return out


class Builder:
    """Runs the stages of one BuildSpec into spec.out."""

    def __init__(self, spec: BuildSpec, experts: tuple[str, ...] = ("high", "low"), torch_buckets: str | None = None,
                 torch_mode: str = "cache", device: str | None = None, strongly_typed: bool = True,
                 workspace_gib: float | None = None, echo: Callable[[str], None] = log.info):
        self.spec = spec
        self.experts = experts
        self.backends = BACKENDS[spec.backend]
        self.torch_buckets, self.torch_mode = torch_buckets, torch_mode
        self.device = device
        self.strongly_typed, self.workspace_gib = strongly_typed, workspace_gib
        self.echo = echo
        self.out = Path(spec.out)
        self.report = BuildReport()

    # -- the stage helper ----------------------------------------------------------------------
    def stage(self, manifest: Manifest, *, kind: str, expert: str, precision: str | None, key: dict,
              inputs: dict, names: dict, parent: str | None, build: Callable[[Path], dict | None],
              backend: str, **fields) -> dict:
        model = self.spec.kind
        aid = artifact_id(kind, model, expert, precision, key)
        rec = manifest.get(aid)
        if rec is not None and manifest.files_ok(rec) is None:
            self.report.reused.append(rec)
            return rec
        dst = self.out / kind / aid
        if dst.exists():  # a damaged or unrecorded leftover with this name
            shutil.rmtree(dst)
        self.echo(f"building {kind} for the {model} {expert}-noise expert -> {dst}")
        t0 = time.perf_counter()
        extra = build(dst) or {}
        rec = make_record(kind=kind, model=model, expert=expert, precision=precision, key=key, inputs=inputs,
                          input_names=names, path_root=self.out, files_dir=dst,
                          command=self.spec.command(backend), parent=parent, **fields, **extra)
        rec["build_s"] = round(time.perf_counter() - t0, 2)
        assert rec["id"] == aid
        manifest.put(rec)
        manifest.save()
        self.report.built.append(rec)
        return rec

    # -- the whole build -------------------------------------------------------------------------
    def run(self) -> BuildReport:
        spec = self.spec
        if "tensorrt" in self.backends:  # fail before an hour of merging and exporting
            from storymem_rt.engines.loaders import require_tensorrt

            require_tensorrt()
        src = resolve_sources(spec)
        self.out.mkdir(parents=True, exist_ok=True)
        manifest = Manifest(self.out)
        cache = HashCache(self.out / HASH_CACHE_NAME)
        try:
            for expert in self.experts:
                self._expert(manifest, cache, src, expert)
        finally:
            cache.save()
        return self.report

    def _lora(self, src: Sources, expert: str):
        from storymem_rt.lora import LoraConfig, load_lora
        from storymem_rt.models import find_lora_file

        path = find_lora_file(src.lora_dir, expert)
        config = None if self.spec.lora_rank is None else LoraConfig.storymem(self.spec.lora_rank)
        return path, load_lora(path, config)

    def _expert(self, manifest: Manifest, cache: HashCache, src: Sources, expert: str) -> None:
        spec = self.spec
        expert_dir = src.model_dir / EXPERTS[expert]
        config = DiTConfig.from_json(expert_dir / "config.json")
        lora_file = lora = None
        if spec.kind == "m2v":
            lora_file, lora = self._lora(src, expert)
        inputs, names = root_inputs(expert_dir, lora_file, lora.config if lora else None, cache)
        common = dict(inputs=inputs, names=names)

        # 1. merged LoRA (m2v), in the upstream layout
        weights_dir, weights_id = expert_dir, None
        if lora is not None:
            from .merge import merge_expert

            def build_merged(dst: Path) -> None:
                merge_expert(expert_dir, lora, dst / EXPERTS[expert])

            rec = self.stage(manifest, kind="merged", expert=expert, precision=None,
                             key={"inputs": inputs, "format": 1}, parent=None, backend=spec.backend,
                             build=build_merged, **common)
            weights_dir, weights_id = self.out / rec["path"] / EXPERTS[expert], rec["id"]

        # 2. FP8 weights
        if spec.precision == "fp8":
            from .fp8 import FP8_VERSION, quantize_expert

            src_dir = weights_dir

            def build_fp8(dst: Path) -> None:
                quantize_expert(src_dir, dst / EXPERTS[expert])

            rec = self.stage(manifest, kind="fp8", expert=expert, precision="fp8",
                             key={"parent": weights_id or inputs, "fp8": FP8_VERSION}, parent=weights_id,
                             backend=spec.backend, build=build_fp8, **common)
            weights_dir, weights_id = self.out / rec["path"] / EXPERTS[expert], rec["id"]

        # 3. ONNX graph (+ 4. TensorRT engine)
        if "onnx" in self.backends or "tensorrt" in self.backends:
            from .onnx_export import OPSET, export_expert_onnx, graph_summary

            wdir = weights_dir

            def build_onnx(dst: Path) -> dict:
                path = export_expert_onnx(wdir, dst, spec.precision)
                return {"graph": graph_summary(path)}

            onnx_rec = self.stage(manifest, kind="onnx", expert=expert, precision=spec.precision,
                                  key={"parent": weights_id or inputs, "precision": spec.precision, "opset": OPSET,
                                       "graph": GRAPH_VERSION},
                                  parent=weights_id, backend="onnx", build=build_onnx, opset=OPSET, **common)
            if "tensorrt" in self.backends:
                self._tensorrt(manifest, onnx_rec, config, expert, common)

        # 5. torch engines
        if "torch" in self.backends:
            self._torch(manifest, weights_dir, weights_id, config, expert, common)

    def _tensorrt(self, manifest: Manifest, onnx_rec: dict, config: DiTConfig, expert: str, common: dict) -> None:
        from storymem_rt.engines.loaders import require_tensorrt

        from .tensorrt_build import ENGINE_NAME, TIMING_CACHE, build_engine, plan_engine

        spec = self.spec
        trt = require_tensorrt()
        arch = gpu_arch()
        plan = plan_engine(onnx_rec, config, spec.size, spec.frame_num, spec.max_memory_size, trt.__version__, arch,
                           self.strongly_typed)
        onnx_path = self.out / onnx_rec["path"] / "model.onnx"

        def build(dst: Path) -> dict:
            return build_engine(onnx_path, dst / ENGINE_NAME, plan, timing_cache=self.out / "tensorrt" / TIMING_CACHE,
                                workspace_gib=self.workspace_gib, strongly_typed=self.strongly_typed)

        self.stage(manifest, kind="tensorrt", expert=expert, precision=spec.precision, key=plan.key,
                   parent=onnx_rec["id"], backend="tensorrt", build=build, size=list(spec.size),
                   frame_num=spec.frame_num, max_memory_size=spec.max_memory_size, gpu_arch=arch,
                   profiles=plan.profile.to_json(), **common)

    def _torch(self, manifest: Manifest, weights_dir: Path, weights_id: str | None, config: DiTConfig, expert: str,
               common: dict) -> None:
        import torch

        from storymem_rt.engines.loaders import code_hash, format_buckets, parse_buckets

        from .torch_engines import WarmupSpec, build_aoti_package, build_compile_cache, load_for_precision

        spec = self.spec
        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        arch = gpu_arch(device)
        tools = tool_versions()
        if self.torch_mode == "aoti":
            def build(dst: Path) -> dict:
                model = load_for_precision(weights_dir, spec.precision, device)
                build_aoti_package(model, spec.size, spec.frame_num, spec.max_memory_size, dst / "model.pt2")
                return {}

            key = {"parent": weights_id or common["inputs"], "precision": spec.precision, "size": list(spec.size),
                   "frame_num": spec.frame_num, "max_memory_size": spec.max_memory_size, "torch": tools.get("torch"),
                   "gpu_arch": arch, "code": code_hash()}
            self.stage(manifest, kind="torch-aoti", expert=expert, precision=spec.precision, key=key,
                       parent=weights_id, backend="torch", build=build, size=list(spec.size),
                       frame_num=spec.frame_num, max_memory_size=spec.max_memory_size, gpu_arch=arch, **common)
            return
        buckets = parse_buckets(self.torch_buckets, spec.max_memory_size)
        warm = WarmupSpec(weights=str(weights_dir), precision=spec.precision, device=device, size=tuple(spec.size),
                          frame_num=spec.frame_num, buckets=tuple(buckets))
        # Compiled graphs take weights as inputs: the cache depends on the config, not the weights.
        cfg_hash = hash_json(config.to_json())
        key = {"dit_config": cfg_hash, "precision": spec.precision, "size": list(spec.size),
               "frame_num": spec.frame_num, "buckets": format_buckets(buckets), "batch": warm.batch,
               "torch": tools.get("torch"), "triton": tools.get("triton"), "gpu_arch": arch, "code": code_hash()}
        self.stage(manifest, kind="torch-cache", expert=expert, precision=spec.precision, key=key, parent=weights_id,
                   backend="torch", build=lambda dst: {"warmup": build_compile_cache(warm, dst)},
                   inputs={"dit_config": cfg_hash}, names={"dit_config": str(weights_dir / "config.json")},
                   size=list(spec.size), frame_num=spec.frame_num, max_memory_size=spec.max_memory_size,
                   buckets=format_buckets(buckets), gpu_arch=arch)


def build_engines(spec: BuildSpec, **kw) -> BuildReport:
    return Builder(spec, **kw).run()
