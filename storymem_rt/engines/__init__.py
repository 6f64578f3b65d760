"""Built artifacts at run time: what `render` and `doctor` need to use what `build-engines` made.

- `manifest`: engines/manifest.json (read side: `Manifest`, `BuildSpec`, `ArtifactRequest`),
  content hashes of the inputs, staleness checks (`check_artifact`, `find_engine`);
- `graph`: the contract of an exported expert graph and the host-side pre/post-processing;
- `loaders`: `CompiledExpert` (+ `activate_compile_cache`), `AotiExpert`, `OnnxExpert`,
  `TensorRTExpert`, each called like WanDiT.

The build side (`storymem_rt.export`, installed from `export/`) imports these; nothing here
imports it. Import from the modules (`from storymem_rt.engines.manifest import find_engine`);
`loaders` and `graph` import torch, `manifest` does not.
"""
