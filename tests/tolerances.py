"""dtype -> (rtol, atol): the one tolerance table of parity tests, where a fast path is compared with its reference.

``TOL[dtype]`` is how far a fast path computed in ``dtype`` may be from a reference computed from the same (rounded)
inputs, in float64 or in ``dtype``: a relative tolerance of a few ulps of float32 (1e-6) and of 1e-12 in float64,
with an absolute floor 100x below it for entries near zero. ``assert_close(actual, expected)`` picks the entry from the less precise of the two tensors' dtypes. A test
that needs a looser tolerance keeps it local with a comment that says why.
"""

from __future__ import annotations

import numpy as np
import torch

TOL: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-12, 1e-14),
    torch.float32: (1e-6, 1e-7),
}


def tolerance(*dtypes: torch.dtype) -> tuple[float, float]:
    """(rtol, atol) of the least precise of ``dtypes``; a dtype without an entry is a KeyError naming the table."""
    dtype = min(dtypes, key=lambda d: torch.finfo(d).bits)
    if dtype not in TOL:
        raise KeyError(f"dtype={dtype} has no entry in tests/tolerances.py TOL: expected one of {list(TOL)}")
    return TOL[dtype]


def _as_tensor(x: torch.Tensor | np.ndarray | float) -> torch.Tensor:
    return x.detach() if isinstance(x, torch.Tensor) else torch.as_tensor(x, dtype=torch.float64)


def assert_close(actual: torch.Tensor | np.ndarray | float, expected: torch.Tensor | np.ndarray | float, *,
                 msg: str | None = None, equal_nan: bool = False) -> None:
    """``torch.testing.assert_close`` with ``TOL`` of the least precise input dtype; both sides are compared in
    float64, so a float64 reference keeps its precision. The failure message names the worst index and values.
    numpy arrays and Python floats count as float64."""
    actual, expected = _as_tensor(actual), _as_tensor(expected)
    rtol, atol = tolerance(actual.dtype, expected.dtype)
    a, e = actual.double(), expected.double()
    if a.shape != e.shape:
        raise AssertionError(f"{msg + ': ' if msg else ''}shape {tuple(a.shape)} != expected {tuple(e.shape)}")
    prefix = f"{msg}: " if msg else ""

    def message(default: str) -> str:
        diff = (a - e).abs().nan_to_num(nan=float("inf")) - rtol * e.abs()
        worst = tuple(int(i) for i in np.unravel_index(int(diff.argmax()), a.shape)) if a.numel() else ()
        return f"{prefix}{default}\nworst at {worst}: actual {a[worst].item()!r}, expected {e[worst].item()!r}"

    torch.testing.assert_close(a, e, rtol=rtol, atol=atol, equal_nan=equal_nan, msg=message)
