# Session 6, device call 3: bf16 v2 configs (window length, block size) with the bounded lazy
# rescale, and the "rise" check (row max climbing 165 log2 units: the guard must fall back).
. bench/device_stage.sh
nvidia-smi --query-gpu=name,temperature.gpu,clocks.sm,power.draw --format=csv
(cd /tmp && python3 $R/bench/gluon_attn.py --configs ws,128,3,1 w2,128,3,2,0 w2,64,4,3,0 w2,64,4,3,32 w2,64,4,3,64 \
   w2,64,4,3,1000 w2,128,3,2,32 w2,128,3,2,1000 w2,64,5,3,32) 2>&1 | tee $OUT/attn.txt | grep -v "^check"
echo "checks above 3e-3 (or failed):"; grep "^check" $OUT/attn.txt | awk '!($NF + 0 < 3e-3) || $NF !~ /^[0-9.e-]+$/'
echo "worst check:"; grep "^check" $OUT/attn.txt | sort -g -k7 | tail -1
