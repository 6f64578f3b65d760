"""storymem-rt: a latency-focused inference engine for StoryMem multi-shot story video.

`export/`, `kernels/` and `benchmarks/` live at the top of the repository but install inside the
`storymem_rt` namespace (`storymem_rt.export`, `storymem_rt.kernels`): a real PyPI
package is called `kernels`, and a top-level `export` would shadow anything else.
"""
from setuptools import setup

setup(
    name="storymem-rt",
    version="0.1.0",
    description="Fast one-process inference engine for StoryMem multi-shot story video (Wan2.2 A14B).",
    python_requires=">=3.10",
    packages=["storymem_rt", "storymem_rt.dit", "storymem_rt.export", "storymem_rt.kernels",
              "storymem_rt.benchmarks"],
    package_dir={
        "storymem_rt": "storymem_rt",
        "storymem_rt.export": "export",
        "storymem_rt.kernels": "kernels",
        "storymem_rt.benchmarks": "benchmarks",
    },
    install_requires=[
        # torch is capped at 2.14.1 on the workplace machines (a local wheel); the device has 2.11.
        "torch>=2.4,<=2.14.1",
        "safetensors>=0.4",
        "transformers>=4.46",
        "tokenizers>=0.20",
        "diffusers>=0.33",
        "ftfy",
        "json5>=0.9",  # story scripts as the reference reads them (comments, trailing commas)
        "click>=8.1",
        "tqdm",
        "numpy",
        "pillow",
        "av>=12",
        "open_clip_torch>=2.24",
    ],
    extras_require={
        "tensorrt": ["tensorrt>=10", "torch-tensorrt"],
        "flash": ["flash-attn"],
        "clip": ["open_clip_torch"],
        "dev": [
            "pytest>=8",
            "pytest-xdist",
            "peft>=0.12",
            "onnx>=1.16",
            "onnxruntime>=1.18",
            "open_clip_torch",
        ],
    },
    entry_points={"console_scripts": ["storymem-rt=storymem_rt.cli:main"]},
)
