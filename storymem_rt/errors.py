"""User-facing errors. Each carries one sentence a user can act on, and the exit code the
command line ends with (the table is `storymem_rt.guard.EXIT_CODES`, and the README's)."""
from __future__ import annotations


class StoryMemError(Exception):
    """Base class for every error a user can fix (bad input, bad checkpoint, bad option)."""

    exit_code = 1


class CheckpointError(StoryMemError):
    """A checkpoint folder or file is missing, truncated, corrupt or of the wrong shape."""


class StoryError(StoryMemError):
    """A story script is malformed."""

    exit_code = 2


class OutputLockedError(StoryMemError):
    """Another render holds the output folder."""

    exit_code = 3


class DeviceError(StoryMemError):
    """The device cannot run the render: no such device, no GPU, out of device memory."""

    exit_code = 5


class NonFiniteLatentError(StoryMemError):
    """The latents of a shot became NaN or Inf during denoising.

    step: 1-based step after which the latents were first non-finite; steps: the shot's step
    count; expert: 'high' or 'low', the expert that ran that step; shot: the shot id, filled
    in by the story engine (None below it).
    """

    exit_code = 6

    def __init__(self, step: int, steps: int, expert: str, shot: str | None = None):
        super().__init__(step, steps, expert, shot)
        self.step, self.steps, self.expert, self.shot = step, steps, expert, shot

    def __str__(self) -> str:
        where = f"shot {self.shot}: " if self.shot else ""
        return (f"{where}the latents became NaN/Inf at denoising step {self.step} of {self.steps} "
                f"({self.expert}-noise expert); nothing of this shot was written; check --sample-guide-scale "
                f"and the checkpoints, or try --dtype float32")


UPSTREAM_REPOS = {
    "t2v": "Wan-AI/Wan2.2-T2V-A14B",
    "i2v": "Wan-AI/Wan2.2-I2V-A14B",
    "lora": "Kevin-thu/StoryMem",
}


def download_hint(kind: str, local_dir: str | None = None) -> str:
    repo = UPSTREAM_REPOS.get(kind)
    if repo is None:
        return ""
    target = local_dir or f"./{repo.split('/')[-1]}"
    return f"download it with: huggingface-cli download {repo} --local-dir {target}"
