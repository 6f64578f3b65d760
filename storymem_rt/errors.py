"""User-facing errors. Each carries one sentence a user can act on."""
from __future__ import annotations


class StoryMemError(Exception):
    """Base class for every error a user can fix (bad input, bad checkpoint, bad option)."""


class CheckpointError(StoryMemError):
    """A checkpoint folder or file is missing, truncated, corrupt or of the wrong shape."""


class StoryError(StoryMemError):
    """A story script is malformed."""


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
