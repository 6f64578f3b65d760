# Session 6, device call 12: the whole shot as in s6_shot.sh (40 steps x CFG back to back, both FP8
# experts, int8-int8 attention), now with what the story engine does after the DiT timed too: VAE
# decode, the shot's mp4, keyframe selection and the keyframes' VAE encode; against the DiT alone.
. bench/device_stage.sh
smrt bench --precision fp8 --memory-frames 10 --size 832*480 --frame-num 81 --layers 40 --repeats 1 \
  --no-baseline --no-eager --no-cuda-graph --fp8-attention int8-int8 --cfg sequential --full-shot --steps 40 \
  --time-budget 560 --json $OUT/shot2.json > $OUT/log.txt 2>&1
grep -v "^\[bench\]" $OUT/log.txt | tail -14 | cut -c1-300; grep -i "shot" $OUT/log.txt | tail -5 | cut -c1-400
