# Session 6, device call 5: where the bf16 forward's non-GEMM, non-attention time goes (profile with
# input shapes, 1 layer), and cuBLASLt's GELU epilogue for the FFN.
. bench/device_stage.sh
(cd /tmp && python3 $R/bench/gelu_epilogue.py)
smrt bench --precision bf16 --layers 1 --repeats 1 --no-baseline --no-eager --no-cuda-graph --no-memory-plan \
  --profile --cfg sequential --json $OUT/prof.json > $OUT/log.txt 2>&1
tail -3 $OUT/log.txt
