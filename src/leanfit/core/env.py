"""Environment record written beside every result (``env.json``)."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

__all__ = ["cpu_model", "environment_info", "git_commit"]

_PACKAGES = (
    "leanfit", "torch", "transformers", "peft", "accelerate", "tokenizers", "safetensors",
    "numpy", "scipy", "scikit-learn", "matplotlib", "joblib", "torchdiffeq", "torchode",
)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit(path: str | os.PathLike | None = None) -> str | None:
    """HEAD commit of the checkout holding ``path`` (default: this package), with ``+dirty`` if modified."""
    cwd = Path(path) if path else Path(__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd, capture_output=True, text=True,
            timeout=5, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment_info() -> dict[str, Any]:
    """Package versions, CPU/GPU, threads, world size and git commit."""
    import torch

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpus": gpus,
        "cuda": torch.version.cuda,
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "packages": {name: _version(name) for name in _PACKAGES},
        "git_commit": git_commit(),
    }
