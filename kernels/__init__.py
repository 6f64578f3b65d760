"""Triton kernels of storymem-rt (installed as storymem_rt.kernels).

One module per kernel family, each with the Triton kernel, its launcher registered as a torch op
(`storymem::*`), and a plain-torch `*_ref` that defines its meaning:
- `qk_norm_rope`: `qk_norm_rope`, `rope_tables` (q/k RMSNorm + 3D RoPE, optional FP8/INT8 out);
- `attention`: `attention` (engine entry, picks ours or cuDNN per shape), `flash_attention`;
- `attention_gluon`: the warp-specialized bf16 and int8-int8 attention for Hopper that
  `flash_attention` uses there (Gluon; compiled but not run in CI, checked on the GPU);
- `adaln`: `adaln_modulate`, `gated_residual`.
Import from the modules (`from storymem_rt.kernels.attention import attention`). Measurements
live in kernels/NOTES.md and docs/PERF.md.
"""
