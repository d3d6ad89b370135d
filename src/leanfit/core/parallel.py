"""joblib backends for embarrassingly parallel studies: ``loky`` (processes on this machine), ``threading``,
``dask`` (a ``dask.distributed`` cluster) or ``ray``. Studies call ``Parallel`` inside :func:`joblib_backend`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

__all__ = ["BACKENDS", "joblib_backend"]

BACKENDS = ("loky", "threading", "dask", "ray")


@contextlib.contextmanager
def joblib_backend(name: str, address: str = "") -> Iterator[None]:
    """joblib's ``parallel_config`` for ``name``; dask and ray start (or join, given ``address``) their cluster."""
    from joblib import parallel_config

    from leanfit.core.errors import LeanfitError

    if name not in BACKENDS:
        raise ValueError(f"backend={name!r} is invalid: expected one of {', '.join(BACKENDS)}")
    if name in ("loky", "threading"):
        with parallel_config(backend=name):
            yield
        return
    if name == "dask":
        try:
            from dask.distributed import Client
        except ImportError as exc:
            raise LeanfitError("backend='dask' needs dask.distributed: pip install 'dask[distributed]'") from exc
        client = Client(address) if address else Client(processes=True, dashboard_address=None)
        with client, parallel_config(backend="dask", wait_for_workers_timeout=60):
            yield
        return
    try:
        import ray
        from ray.util.joblib import register_ray
    except ImportError as exc:
        raise LeanfitError("backend='ray' needs ray: pip install 'ray[default]'") from exc
    register_ray()
    ray.init(address=address or None, ignore_reinit_error=True)
    try:
        with parallel_config(backend="ray"):
            yield
    finally:
        ray.shutdown()
