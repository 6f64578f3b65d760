"""storymem-rt: latency-focused inference engine for StoryMem multi-shot story video."""

__version__ = "0.1.0"
