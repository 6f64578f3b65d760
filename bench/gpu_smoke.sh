#!/usr/bin/env bash
# End-to-end render of the 3-shot demo story on the device's GPU with the tiny bundle
# (checks the story engine on CUDA: noise generator, bf16 experts, VAE, keyframes, PyAV).
# Usage on the device (wheels for av/open_clip/timm/ftfy/wcwidth/regex/diffusers in .whl):
#   bash bench/gpu_smoke.sh
# Renders: --fast auto (bf16 fast path) with --mi2v, --fast fp8 with --mm2v, --fast off (plain),
# --fast fp8 --attention int8-int8 with --mi2v, --fast fp8 --compile with --mi2v.
set -euo pipefail
R=$PWD
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
rm -rf /tmp/p && mkdir -p /tmp/p/storymem_rt && cp -r storymem_rt/* /tmp/p/storymem_rt/ \
  && cp -r kernels /tmp/p/storymem_rt/kernels && cp -r export /tmp/p/storymem_rt/export \
  && cp -r benchmarks /tmp/p/storymem_rt/benchmarks
export PYTHONPATH=/tmp/p:/tmp/site STORYMEM_CACHE=/tmp/cache PYTHONUNBUFFERED=1
cd /tmp
run() { python3 -P -c "from storymem_rt.cli import main; main()" "$@"; }
run render "$R/story/harbor_morning.json" --mi2v --out /tmp/smoke --no-progress                # --fast auto = bf16
run render "$R/story/harbor_morning.json" --mm2v --out /tmp/smoke-mm2v --no-progress --seed-policy unique --fast fp8
run render "$R/story/harbor_morning.json" --mi2v --out /tmp/smoke-plain --no-progress --fast off
run render "$R/story/harbor_morning.json" --mi2v --out /tmp/smoke-i8 --no-progress --fast fp8 --attention int8-int8
run render "$R/story/harbor_morning.json" --mi2v --out /tmp/smoke-fp8c --no-progress --fast fp8 --compile  # regional compile
python3 - <<'PY'
import json, torch
import safetensors.torch as st
a = st.load_file("/tmp/smoke/state/memory.safetensors")["latent.0"]
b = st.load_file("/tmp/smoke-plain/state/memory.safetensors")["latent.0"]
print("first keyframe latent, fast bf16 vs plain bf16: rel err", float((a - b).norm() / b.norm()))
c = st.load_file("/tmp/smoke-i8/state/memory.safetensors")["latent.0"]
print("first keyframe latent, fast fp8 + int8-int8 attention vs plain bf16: rel err", float((c - b).norm() / b.norm()))
m = json.load(open("/tmp/smoke/render.json"))
print("device check:", torch.cuda.get_device_name(0), "settings dtype", m["settings"]["dtype"])
for d in ("smoke", "smoke-mm2v", "smoke-plain", "smoke-i8", "smoke-fp8c"):
    print(d, "backend", json.load(open(f"/tmp/{d}/render.json"))["settings"]["backend"])
for k, v in m["shots"].items():
    print(k, v["mode"], "frames", v["frames"], "memory", len(v["memory"]), "keyframes", v["keyframes"], v["timings"])
PY
ls -la /tmp/smoke
cp /tmp/smoke/storyboard.png /tmp/smoke/render.json "$OUT"/ 2>/dev/null || true
