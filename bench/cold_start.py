"""Cold start of the torch backend: first-step latency of a fresh process, with and without
the compile-cache artifact that `storymem-rt build-engines --backend torch` writes.

Every measured row is its own fresh Python process (nothing in memory, empty or artifact-only
caches), run one after the other:
  build     compile once into an empty cache folder -> the artifact (what build-engines does)
  eager     no compile: load + first step + second step
  cold      torch.compile with an empty TORCHINDUCTOR_CACHE_DIR / TRITON_CACHE_DIR
  warm      torch.compile after activate_compile_cache(artifact) (a fresh copy of it)
and the process's own import time. Printed as one table (medians over --repeats fresh processes),
written as JSON to --json or $OUT/cold_start.json.

    # on the device (real A14B size, random weights made on the GPU, bf16, 10 memory frames);
    # two commands so each stays under a 10-minute limit (the artifact is built by the first):
    python bench/cold_start.py --weights random:i2v-a14b --precision bf16 --memory 10 \
        --artifact-dir /tmp/cs-bf16 --rows cold
    python bench/cold_start.py --weights random:i2v-a14b --precision bf16 --memory 10 \
        --artifact-dir /tmp/cs-bf16 --rows eager,warm
    # here (tiny bundle's merged-free I2V expert on the CPU, float32):
    python bench/cold_start.py --weights tiny --precision fp32 --size 96*64 --frame-num 5 --memory 1
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

T_START = time.perf_counter()


def _phase(args) -> dict:
    """One measured process (called as `cold_start.py --phase MODE ...`)."""
    cache = Path(args.cache)
    if args.phase == "warm":
        # import only what is needed to copy/activate the artifact before torch's compile machinery
        from storymem_rt.engines.loaders import activate_compile_cache

        activate_compile_cache(args.artifact, work_dir=cache)
    else:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache)
        os.environ["TRITON_CACHE_DIR"] = str(cache / "triton")
    import torch

    from storymem_rt.engines.graph import token_grid
    from storymem_rt.engines.loaders import CompiledExpert
    from storymem_rt.export.torch_engines import load_for_precision, sample_call

    t_import = time.perf_counter() - T_START
    dev = torch.device(args.device)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    t0 = time.perf_counter()
    model = load_for_precision(args.weights_dir, args.precision, dev)
    sync()
    t_load = time.perf_counter() - t0
    grid = token_grid(tuple(args.size), args.frame_num, model.config)
    call = sample_call(model.config, grid.latent_frames, grid.h, grid.w, args.memory, args.batch, dev)
    if args.phase == "eager":
        fn = model
    else:
        fn = CompiledExpert(model, [(args.memory, args.memory)], grid.latent_frames)
    times = []
    with torch.no_grad():
        for _ in range(2):
            t0 = time.perf_counter()
            fn(*call)
            sync()
            times.append(time.perf_counter() - t0)
    out = {"import_s": t_import, "load_s": t_load, "first_step_s": times[0], "second_step_s": times[1],
           "process_to_first_step_s": time.perf_counter() - T_START - times[1]}
    try:
        from torch._dynamo.utils import counters

        out["cache"] = {k: dict(v) for k, v in counters.items() if k in ("inductor", "aot_autograd")}
    except Exception:
        pass
    if dev.type == "cuda":
        out["peak_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
    return out


def _weights(args) -> str:
    if args.weights == "tiny":
        from storymem_rt.tiny import ensure_tiny_models

        return str(ensure_tiny_models() / ("Wan2.2-I2V-A14B/high_noise_model"))
    if args.weights.startswith("random:") or args.precision != "fp8":
        return args.weights
    # fp8 from a real folder: quantize once into a temp folder (the build-engines fp8 stage)
    from storymem_rt.export.fp8 import quantize_expert

    dst = Path(tempfile.mkdtemp(prefix="cold-start-fp8-")) / "expert"
    quantize_expert(args.weights, dst)
    return str(dst)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default="random:i2v-a14b",
                    help="'tiny', 'random:<preset>' (e.g. random:i2v-a14b) or an expert folder")
    ap.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16", "fp8"])
    ap.add_argument("--size", default="832*480")
    ap.add_argument("--frame-num", type=int, default=81)
    ap.add_argument("--memory", type=int, default=10, help="memory frames of the measured step")
    ap.add_argument("--batch", type=int, default=2, help="2 = CFG batched, as shot.py runs it")
    ap.add_argument("--device", default=None)
    ap.add_argument("--repeats", type=int, default=1, help="fresh processes per row")
    ap.add_argument("--rows", default="eager,cold,warm")
    ap.add_argument("--json", default=None)
    ap.add_argument("--artifact-dir", default=None,
                    help="keep the built artifact here and reuse it on the next invocation (split the rows over "
                         "several commands when one must stay under a time limit)")
    ap.add_argument("--timeout", type=float, default=1800)
    # internal: one measured process
    ap.add_argument("--phase", default=None)
    ap.add_argument("--cache", default=None)
    ap.add_argument("--artifact", default=None)
    ap.add_argument("--weights-dir", default=None)
    args = ap.parse_args()
    args.size = tuple(int(v) for v in args.size.lower().replace("x", "*").split("*"))
    if args.phase:
        args.size = list(args.size)
        print("RESULT " + json.dumps(_phase(args)), flush=True)
        return

    import torch

    from storymem_rt.export.torch_engines import WarmupSpec, build_compile_cache

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    weights = _weights(args)
    work = Path(tempfile.mkdtemp(prefix="cold-start-"))
    artifact = Path(args.artifact_dir) if args.artifact_dir else work / "artifact"
    spec = WarmupSpec(weights=weights, precision=args.precision, device=args.device, size=args.size,
                      frame_num=args.frame_num, buckets=((args.memory, args.memory),), batch=args.batch)
    build, build_s = "reused", float("nan")
    stamp = artifact / "warmup.json"
    if stamp.is_file():  # built by an earlier invocation with the same --artifact-dir
        prev = json.loads(stamp.read_text())
        if prev["spec"] != spec.to_json():
            sys.exit(f"{artifact} was built for {prev['spec']}, not {spec.to_json()}; pick another --artifact-dir")
        build, build_s = prev["build"], prev["build_s"]
    else:
        t0 = time.perf_counter()
        build = build_compile_cache(spec, artifact, timeout=args.timeout)
        build_s = time.perf_counter() - t0
        stamp.write_text(json.dumps({"spec": spec.to_json(), "build": build, "build_s": build_s}))
    size_mb = sum(p.stat().st_size for p in artifact.rglob("*") if p.is_file()) / 2**20

    rows: dict[str, list[dict]] = {}
    for rep in range(args.repeats):
        for mode in args.rows.split(","):
            cmd = [sys.executable, __file__, "--phase", mode, "--cache", str(work / f"{mode}-{rep}"),
                   "--artifact", str(artifact), "--weights-dir", weights, "--precision", args.precision,
                   "--size", f"{args.size[0]}*{args.size[1]}", "--frame-num", str(args.frame_num),
                   "--memory", str(args.memory), "--batch", str(args.batch), "--device", args.device]
            env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
            wall = time.perf_counter() - t0
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                sys.exit(f"{mode} run failed:\n" + "\n".join(proc.stderr.strip().splitlines()[-20:]))
            res = json.loads(line[len("RESULT "):])
            res["process_wall_s"] = wall
            rows.setdefault(mode, []).append(res)

    dev_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"cold start: {args.weights} {args.precision} size {args.size[0]}*{args.size[1]} frames {args.frame_num} "
          f"memory {args.memory} batch {args.batch} on {dev_name}, torch {torch.__version__}")
    print(f"artifact build (fresh process, empty cache): {build_s:.1f} s, {size_mb:.1f} MiB; inside: {build}")
    cols = ["import_s", "load_s", "first_step_s", "second_step_s", "process_wall_s"]
    print(f"{'row':<6}" + "".join(f"{c:>16}" for c in cols) + "   cache")
    summary = {}
    for mode, res in rows.items():
        med = {c: statistics.median(r[c] for r in res) for c in cols}
        summary[mode] = {**med, "runs": res}
        hits = res[-1].get("cache", {}).get("inductor", {})
        note = f"fxgraph hit {hits.get('fxgraph_cache_hit', 0)} miss {hits.get('fxgraph_cache_miss', 0)}"
        print(f"{mode:<6}" + "".join(f"{med[c]:>15.2f}s" for c in cols) + f"   {note if mode != 'eager' else '-'}")
    out = {"config": {k: v for k, v in vars(args).items() if k in ("weights", "precision", "size", "frame_num",
                                                                    "memory", "batch", "device")},
           "device_name": dev_name, "torch": torch.__version__, "build_s": build_s, "artifact_mib": size_mb,
           "rows": summary}
    path = args.json or (os.path.join(os.environ["OUT"], "cold_start.json") if os.environ.get("OUT") else None)
    if path:
        Path(path).write_text(json.dumps(out, indent=2))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
