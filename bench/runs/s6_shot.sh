# Session 6, device call 7: the whole shot (40 steps x CFG back to back, both FP8 experts, VAE
# decode) with int8-int8 attention, against the DiT time alone.
. bench/device_stage.sh
smrt bench --precision fp8 --memory-frames 10 --size 832*480 --frame-num 81 --layers 40 --repeats 1 \
  --no-baseline --no-eager --no-cuda-graph --fp8-attention int8-int8 --cfg sequential --full-shot --steps 40 \
  --time-budget 560 --json $OUT/shot.json > $OUT/log.txt 2>&1
grep -v "^\[bench\]" $OUT/log.txt | tail -14 | cut -c1-300; grep -i "shot" $OUT/log.txt | tail -5 | cut -c1-300
