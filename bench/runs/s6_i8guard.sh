# Session 6, device calls 9 and 10 (the second with the configs below: guard 0 = none, 1 = per window,
# 2 = one check after block 0): the int8-int8 kernel with the same guard on its lazy reference max
# (exact windows where the logit bound is loose), checked at odd lengths, sharp and climbing logits,
# and timed against cuDNN and the bf16 kernel.
. bench/device_stage.sh
(cd /tmp && python3 $R/bench/gluon_attn.py --configs i8,128,4,3,0,0 i8,128,4,3,0,1 i8,128,4,3,0,2 ws,64,4,3,64) 2>&1 | tee $OUT/attn.txt | grep -v "^check"
echo "checks:"; grep "^check" $OUT/attn.txt | grep "i8," | awk '{print $2, $4, $5, $NF}'
