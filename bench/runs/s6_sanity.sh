# Session 6, device call 4: 2-layer sanity run of the fast path with the new bf16 kernel routed
# (attention auto should now pick it over cuDNN), plus the kernel-level check at L = 48360.
. bench/device_stage.sh
(cd /tmp && python3 $R/bench/gluon_attn.py --configs ws,64,4,3,64 ws,128,3,2,0) 2>&1 | tee $OUT/attn.txt | grep -v "^check"
echo "checks above 3e-3 (or failed):"; grep "^check" $OUT/attn.txt | awk '!($NF + 0 < 3e-3) || $NF !~ /^[0-9.e-]+$/'
smrt bench --precision both --layers 2 --repeats 3 --no-baseline --no-eager --no-cuda-graph --no-memory-plan \
  --cfg sequential --fp8-attention int8-int8 --fp8-attention auto --json $OUT/b.json > $OUT/log.txt 2>&1
grep -iE "attention .* -> |correctness|^\|" $OUT/log.txt | cut -c1-250
