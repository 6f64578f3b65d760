# Session 6, device call 6: the issue-5 table (one run: ours bf16 and FP8, diffusers eager and
# compiled, ratios), after the bf16 kernel's bounded lazy rescale and the GELU epilogue; and the
# GELU epilogue's own check.
. bench/device_stage.sh
(cd /tmp && python3 $R/bench/gelu_epilogue.py)
smrt bench --precision both --memory-frames 10 --size 832*480 --frame-num 81 --layers 40 --repeats 3 \
  --peer diffusers --no-baseline --no-eager --fp8-attention int8-int8 --fp8-attention auto --cfg sequential \
  --time-budget 500 --json $OUT/bench.json > $OUT/log.txt 2>&1
grep -v "^\[bench\]" $OUT/log.txt | tail -30 | cut -c1-400
