"""Export stage (installed as storymem_rt.export): `storymem-rt build-engines` and `doctor`.

Modules, in pipeline order (docs/ENGINES.md has the whole story):
- `merge`: the StoryMem LoRA merged into the I2V experts on disk, shard by shard;
- `fp8`: e4m3 block-linear weights with per-output-channel scales, `FP8Linear`, the loader;
- `onnx_export`: one ONNX graph per expert written from dit.py's math, external data, dynamic
  token axis, FP8 as Q/DQ; `OnnxExpert` runs it with onnxruntime;
- `tensorrt_build`: engines (strongly typed, one profile over memory sizes 0..max, timing
  cache), `TrtExpert`; needs TensorRT 10+;
- `torch_engines`: torch.compile caches per memory-size bucket (`CompiledExpert`,
  `activate_compile_cache`) and AOTInductor packages;
- `manifest`: engines/manifest.json, content hashes, `check_artifact`;
- `build`: the stages of build-engines, `find_engine` for render; `doctor`: the report.
"""
