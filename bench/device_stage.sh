# Source on the device machine, from the repo root: stages the package as `storymem_rt` with its
# kernels/, export/ and benchmarks/ under /tmp/p (the repo keeps them beside the package), puts the carried
# wheels (.whl/: diffusers, open_clip and its requirements, PyAV) under /tmp/site, and defines `smrt` for the CLI.
#   . bench/device_stage.sh && smrt bench --layers 2 ...
R=$PWD
mkdir -p /tmp/p/storymem_rt
cp -r storymem_rt/* /tmp/p/storymem_rt/
rm -rf /tmp/p/storymem_rt/kernels /tmp/p/storymem_rt/export /tmp/p/storymem_rt/benchmarks
cp -r kernels /tmp/p/storymem_rt/kernels
cp -r export /tmp/p/storymem_rt/export
cp -r benchmarks /tmp/p/storymem_rt/benchmarks
if ls .whl/*.whl >/dev/null 2>&1 && [ ! -d /tmp/site/diffusers ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/p:/tmp/site PYTHONUNBUFFERED=1
smrt() { (cd /tmp && python3 -P -c "from storymem_rt.cli import main; main()" "$@"); }
