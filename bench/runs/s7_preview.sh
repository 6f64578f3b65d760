# Session 7, device call 3 (issue 18): one preview M2V shot at the real shape (832x480, 81 frames,
# 10 memory frames; FP8 experts with int8-int8 attention, 4 distilled steps without CFG, then decode, mp4,
# keyframes), and the demo story rendered with --preview on the GPU (tiny bundle, fast FP8).
. bench/device_stage.sh
smrt bench --precision fp8 --memory-frames 10 --size 832*480 --frame-num 81 --layers 40 --repeats 3 \
  --no-baseline --no-eager --fp8-attention int8-int8 --cfg sequential --no-cuda-graph --full-shot --preview \
  --time-budget 420 --json $OUT/bench_preview.json > $OUT/log_preview.txt 2>&1
grep -v "^\[bench\]" $OUT/log_preview.txt | tail -22 | cut -c1-300
export STORYMEM_CACHE=/tmp/cache
smrt render $R/story/harbor_morning.json --mi2v --preview --fast fp8 --out /tmp/prev --no-progress 2>&1 | tail -6
python3 -c "
import json; m=json.load(open('/tmp/prev/render.json'))
print('backend', m['settings']['backend']['name'], 'preview', m['settings']['preview']['step_list'])
print({k: (v['mode'], v['steps'], v['dit_forwards'], v['frames'], v['timings']['dit']) for k, v in m['shots'].items()})"
