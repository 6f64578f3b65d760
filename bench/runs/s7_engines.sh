# Session 7, device call 4 (issue 14): `render --engines DIR` with FP8 artifacts composes with --fast and
# --attention on CUDA (tiny bundle): build the FP8 artifacts (and ONNX graphs), then render with --fast
# auto (which picks the FP8 fast backend), with --attention int8-int8, and with --fast off (plain FP8).
. bench/device_stage.sh
export STORYMEM_CACHE=/tmp/cache
E=/tmp/engines
for kind in m2v t2v; do
  smrt build-engines --models tiny --precision fp8 --backend onnx --kind $kind --size 224*128 --frame-num 17 \
    --max-memory-size 10 --out $E 2>&1 | tail -2
done
for extra in "" "--attention int8-int8" "--fast off"; do
  out=/tmp/r$(echo "$extra" | tr -dc 'a-z0-9')
  smrt render $R/story/harbor_morning.json --mi2v --engines $E --precision fp8 $extra --out $out --no-progress 2>&1 | tail -3
  python3 -c "
import json; m=json.load(open('$out/render.json')); b=m['settings']['backend']
print('$extra ->', b['name'], b['precision'], b['attention'], 'engines', b['engines_precision'], {k: v['frames'] for k, v in m['shots'].items()})"
done
