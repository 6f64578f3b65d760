# Session 6, device call 1: bf16 Gluon v2 sweep (bench/gluon_attn.py), then a 2-layer profile of
# the fast forwards (bf16 and FP8 int8-int8) at the M2V shape.
. bench/device_stage.sh
nvidia-smi --query-gpu=name,temperature.gpu,clocks.sm,power.draw --format=csv
(cd /tmp && python3 $R/bench/gluon_attn.py --configs ws,128,3,1 w2,128,3,2,0 w2,128,3,2,16 w2,128,2,3,0 \
   w2,64,4,3,0 w2,64,4,3,16 w2,64,6,2,0)
smrt bench --precision both --layers 2 --repeats 1 --no-baseline --no-eager --no-cuda-graph --no-memory-plan \
  --profile --cfg sequential --fp8-attention int8-int8 --json $OUT/prof.json
