"""Device, dtype and CPU-thread policy, in one place.

``auto`` device picks CUDA, then MPS, then CPU. Thread policy, from ``leanfit bench threads``
(``benchmarks/results/threads``): training tiny Llamas of d_model 32-512 (V=8,192) is
1.6-1.8x faster with 2 threads than with 1 on a 2-core machine, so LM work keeps torch's default (one thread per
core); workloads made of many tiny ops (per-sample solvers, small estimators) declare ``small_workload`` and get
one thread, which avoids thread-pool overhead that exceeds their per-op work.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from leanfit.core.errors import ConfigError, bad_value

if TYPE_CHECKING:
    import torch

__all__ = ["configure_threads", "device_name", "resolve_device", "resolve_dtype", "synchronize"]

_DTYPES = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "float64": "float64", "fp64": "float64", "double": "float64",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16",
}


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` | ``mps`` -> ``torch.device``, refusing devices that are absent."""
    import torch

    name = str(name).strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(bad_value("device", name, "'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(bad_value("device", name, "a device present on this machine", "use device=auto or cpu"))
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(bad_value("device", name, f"an index below {torch.cuda.device_count()}"))
    return device


def resolve_dtype(name: str, device: torch.device | None = None) -> torch.dtype:
    """``auto`` (bf16 on CUDA with support, else float32) or a name such as ``fp32``/``bf16``/``float64``."""
    import torch

    key = str(name).strip().lower()
    if key == "auto":
        if device is not None and device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if key not in _DTYPES:
        raise ConfigError(bad_value("dtype", name, "auto, float32, float64, bfloat16 or float16"))
    return getattr(torch, _DTYPES[key])


def configure_threads(threads: int, *, small_workload: bool) -> int:
    """Set torch's intra-op threads: ``threads > 0`` is taken as is; ``0`` (auto) picks 1 for small CPU
    workloads and leaves torch's default (one per physical core) otherwise. Returns the number in force."""
    import torch

    if threads < 0:
        raise ConfigError(bad_value("threads", threads, "0 (auto) or a positive count"))
    if threads == 0:
        env = os.environ.get("LEANFIT_THREADS")
        threads = int(env) if env else (1 if small_workload else torch.get_num_threads())
    torch.set_num_threads(threads)
    return threads


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on a CUDA ``device`` (a no-op elsewhere), so that a host timer measures it."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    """The GPU's name for a CUDA device, else the device type (``cpu``), for results and reports."""
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
