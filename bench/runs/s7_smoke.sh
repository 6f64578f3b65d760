# Session 7, device call 1: the redesigned core (one WanDiT, one loop, the backend registry) on CUDA at
# small size (2 layers, 17 frames): the bench's every stage incl. diffusers, compile, CUDA graphs,
# int8-int8 attention and the full shot; then the GPU smoke renders (bench/gpu_smoke.sh).
set -o pipefail
. bench/device_stage.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
smrt bench --precision both --memory-frames 2 --size 832*480 --frame-num 17 --layers 2 --repeats 2 --peer diffusers \
  --fp8-attention int8-int8 --fp8-attention auto --cfg sequential --cfg batched --full-shot --steps 4 --time-budget 240 \
  --json $OUT/bench_small.json > $OUT/bench_small.txt 2>&1
grep -v "^\[bench\]" $OUT/bench_small.txt | tail -40 | cut -c1-300
cd $R && timeout 300 bash bench/gpu_smoke.sh > $OUT/smoke.txt 2>&1; echo "smoke rc $?"
tail -30 $OUT/smoke.txt | cut -c1-300
