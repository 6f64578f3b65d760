"""Export stage (installed as storymem_rt.export): `storymem-rt build-engines` and `doctor`.

Modules, in pipeline order (docs/ENGINES.md has the whole story):
- `merge`: the StoryMem LoRA merged into the I2V experts on disk, shard by shard;
- `fp8`: e4m3 block-linear weights with per-output-channel scales, `FP8Linear`, the loader;
- `onnx_export`: one ONNX graph per expert written from dit.py's math, external data, dynamic
  token axis, FP8 as Q/DQ;
- `tensorrt_build`: engines (strongly typed, one profile over memory sizes 0..max, timing
  cache); needs TensorRT 10+;
- `torch_engines`: torch.compile caches per memory-size bucket and AOTInductor packages;
- `manifest`: the records build-engines writes into engines/manifest.json;
- `build`: the stages of build-engines; `doctor`: the report.

This package imports the runtime, never the other way round. What `render` needs to use the
artifacts lives in the runtime package `storymem_rt.engines`: the manifest's read side, content
hashes and staleness checks, `find_engine` (`engines/manifest.py`), the graph contract
(`engines/graph.py`) and the loaders `CompiledExpert`, `AotiExpert`, `OnnxExpert`,
`TensorRTExpert` (`engines/loaders.py`).
"""
