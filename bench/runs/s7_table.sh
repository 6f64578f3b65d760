# Session 7, device call 2: the issue-5 table (docs/PERF.md) after the one-DiT/one-loop/one-registry
# redesign (issue 14's acceptance: per-forward times within 3% of before: bf16 4.80 s, FP8 with
# int8-int8 attention 3.66 s on the H200, 2026-12-02).
. bench/device_stage.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
smrt bench --precision both --memory-frames 10 --size 832*480 --frame-num 81 --layers 40 --repeats 3 \
  --peer diffusers --no-baseline --no-eager --fp8-attention int8-int8 --fp8-attention auto --cfg sequential \
  --time-budget 470 --json $OUT/bench.json > $OUT/log.txt 2>&1
grep -v "^\[bench\]" $OUT/log.txt | tail -30 | cut -c1-400
