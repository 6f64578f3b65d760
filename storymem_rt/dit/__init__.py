"""The Wan2.2 DiT: one model class (`model.py`) and its ops in their reference, torch and kernel forms
(`ops.py`). Plain, fast bf16 and FP8 are `DiTOptions`, not classes."""
from .model import KEEP_FP32, PRECISIONS, AttentionFn, DiTOptions, WanBlock, WanDiT, compute_dtype
from .ops import OPS, Rope, apply_rope, rope, rope_cos_sin, timestep_embedding

__all__ = ["KEEP_FP32", "OPS", "PRECISIONS", "AttentionFn", "DiTOptions", "Rope", "WanBlock", "WanDiT", "apply_rope",
           "compute_dtype", "rope", "rope_cos_sin", "timestep_embedding"]
