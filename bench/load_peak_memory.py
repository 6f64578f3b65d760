"""Peak host memory of `load_expert` against shard and checkpoint sizes.

Writes a random multi-shard Wan expert (upstream layout: shards + index + config.json) into a
temp folder, then loads it in a fresh subprocess per case and reports the subprocess's peak RSS
(`ru_maxrss`) above its RSS right after imports, next to the model's own bytes, the largest
shard and the whole checkpoint:

    python bench/load_peak_memory.py                   # ~0.8 GB in 4 shards, cpu
    python bench/load_peak_memory.py --layers 8 --shards 6 --device cuda
    # one load under /usr/bin/time -v (checkpoint kept by --keep DIR on a first run):
    /usr/bin/time -v python bench/load_peak_memory.py --child DIR/Wan2.2-I2V-A14B/high_noise_model bf16

Cases: `load_expert` into float32 (same dtype: the parameters are zero-copy views of the file
map, so file pages are the model), into bfloat16 (a real cast: anything above the model's
bytes is loader overhead), the same with a LoRA merged while streaming, and, for contrast,
the naive way (`safetensors.torch.load_file` every shard into one state dict, then
`load_state_dict` into a model built normally).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

MB = 1 << 20


def rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def write_checkpoint(folder: Path, layers: int, shards: int, dim: int, ffn_dim: int, lora_r: int) -> None:
    from safetensors.torch import save_file

    from storymem_rt.checkpoint import INDEX_NAME, build_on_meta
    from storymem_rt.configs import DiTConfig
    from storymem_rt.dit import WanDiT
    from storymem_rt.lora import STORYMEM_TARGETS

    cfg = DiTConfig(model_type="i2v", dim=dim, ffn_dim=ffn_dim, freq_dim=256, text_dim=4096,
                    num_heads=dim // 128, num_layers=layers, in_dim=36)
    folder.mkdir(parents=True)
    raw = json.loads(json.dumps(cfg.to_json()))
    raw["_class_name"] = "WanModel"
    (folder / "config.json").write_text(json.dumps(raw, indent=2))
    shapes = {k: v.shape for k, v in build_on_meta(lambda: WanDiT(cfg)).state_dict().items()}
    total = sum(s.numel() * 4 for s in shapes.values())
    budget = total / shards
    groups, cur, size = [], [], 0
    for k, s in shapes.items():
        cur.append(k)
        size += s.numel() * 4
        if size >= budget and len(groups) < shards - 1:
            groups.append(cur)
            cur, size = [], 0
    groups.append(cur)
    weight_map = {}
    g = torch.Generator().manual_seed(0)
    for i, keys in enumerate(groups):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({k: torch.randn(shapes[k], generator=g) * 0.02 for k in keys}, folder / name)
        weight_map.update(dict.fromkeys(keys, name))
    (folder / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    lora = {}
    for n in range(layers):
        for t in STORYMEM_TARGETS:
            out_f, in_f = shapes[f"blocks.{n}.{t}.weight"]
            lora[f"base_model.model.blocks.{n}.{t}.lora_A.weight"] = torch.randn(lora_r, in_f, generator=g) * 0.01
            lora[f"base_model.model.blocks.{n}.{t}.lora_B.weight"] = torch.randn(out_f, lora_r, generator=g) * 0.01
    torch.save(lora, folder.parent / "backbone_high_noise.pth")


def child(folder: Path, mode: str, device: str) -> None:
    from storymem_rt.checkpoint import load_expert  # imports (torch, safetensors, dit) before the baseline
    from storymem_rt.configs import DiTConfig
    from storymem_rt.dit import WanDiT
    from storymem_rt.lora import load_lora

    if device == "cuda":
        torch.zeros(1, device="cuda")  # CUDA context in the baseline
    base = rss_now()
    t0 = time.perf_counter()
    if mode == "naive":
        from safetensors.torch import load_file

        sd = {}
        for f in sorted(folder.glob("*-of-*.safetensors")):
            sd.update(load_file(f))
        model = WanDiT(DiTConfig.from_json(folder / "config.json"))
        model.load_state_dict(sd)
        model.to(device)
    else:
        dtype = torch.float32 if mode == "fp32" else torch.bfloat16
        lora = load_lora(folder.parent / "backbone_high_noise.pth") if mode == "bf16+lora" else None
        model = load_expert(folder, device=device, dtype=dtype, lora=lora)
    if device == "cuda":
        torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({"mode": mode, "device": device, "baseline": base, "peak": peak_rss(),
                      "model_bytes": model_bytes, "seconds": secs}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--dim", type=int, default=1536)
    ap.add_argument("--ffn-dim", type=int, default=8960)
    ap.add_argument("--lora-r", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--modes", default="fp32,bf16,bf16+lora,naive")
    ap.add_argument("--keep", type=Path, help="write the checkpoint here and keep it (default: a temp dir)")
    ap.add_argument("--child", nargs=2, metavar=("FOLDER", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(Path(args.child[0]), args.child[1], args.device)
        return

    with tempfile.TemporaryDirectory() as tmp:
        folder = (args.keep or Path(tmp)) / "Wan2.2-I2V-A14B" / "high_noise_model"
        write_checkpoint(folder, args.layers, args.shards, args.dim, args.ffn_dim, args.lora_r)
        shards = sorted(folder.glob("*-of-*.safetensors"))
        sizes = [f.stat().st_size for f in shards]
        print(f"checkpoint: {len(shards)} shards, total {sum(sizes) / MB:.0f} MB, largest shard "
              f"{max(sizes) / MB:.0f} MB, LoRA {(folder.parent / 'backbone_high_noise.pth').stat().st_size / MB:.0f} MB")
        print(f"{'mode':<10} {'device':<6} {'base MB':>8} {'peak MB':>8} {'peak-base':>9} {'model MB':>9} "
              f"{'overhead':>9} {'s':>6}")
        for mode in args.modes.split(","):
            out = subprocess.run([sys.executable, __file__, "--device", args.device, "--child", str(folder), mode],
                                 check=True, capture_output=True, text=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            grown = r["peak"] - r["baseline"]
            # On the GPU the model is not host memory: everything above the baseline is overhead.
            model_host = r["model_bytes"] if args.device == "cpu" else 0
            print(f"{mode:<10} {r['device']:<6} {r['baseline'] / MB:8.0f} {r['peak'] / MB:8.0f} {grown / MB:9.0f} "
                  f"{r['model_bytes'] / MB:9.0f} {(grown - model_host) / MB:9.0f} {r['seconds']:6.2f}")


if __name__ == "__main__":
    main()
