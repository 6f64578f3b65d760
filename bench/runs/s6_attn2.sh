# Session 6, device call 2: the bf16 v2 kernel with the bounded lazy rescale against the peeled
# exact one and session 3's kernel; then the 2-layer profile again, its tables kept in $OUT/log.txt.
. bench/device_stage.sh
nvidia-smi --query-gpu=name,temperature.gpu,clocks.sm,power.draw --format=csv
(cd /tmp && python3 $R/bench/gluon_attn.py --configs ws,128,3,1 w2,128,3,2,0 w2,128,3,2,16 w2,64,4,3,0 \
   w2,64,4,3,16 w2,128,3,2,8 w2,64,4,3,32) 2>&1 | tee $OUT/attn.txt | grep -v "^check"
smrt bench --precision both --layers 2 --repeats 1 --no-baseline --no-eager --no-cuda-graph --no-memory-plan \
  --profile --cfg sequential --fp8-attention int8-int8 --json $OUT/prof.json > $OUT/log.txt 2>&1
tail -8 $OUT/log.txt
