# Session 6, device call 8: the kernels table (bench/kernels.py) with the new bf16 kernel.
. bench/device_stage.sh
(cd /tmp && python3 $R/bench/kernels.py --json $OUT/kernels.json) > $OUT/log.txt 2>&1
tail -45 $OUT/log.txt | cut -c1-220
