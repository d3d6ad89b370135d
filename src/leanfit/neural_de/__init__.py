"""Locally regularised neural differential equations (Pal, Edelman & Rackauckas, ICML 2023): the solver core.

A batched explicit embedded Runge-Kutta solver (Tsit5, Dopri5) that exposes what the regularisers need: a public
single step returning its error estimate, the automatic initial step, per-sample step-size control and statistics.

Names are imported lazily so that registering this package's experiments does not import torch."""

from __future__ import annotations

from leanfit.core.lazy import lazy_getattr

_EXPORTS = {
    "DOPRI5": "tableaus",
    "TABLEAUS": "tableaus",
    "TSIT5": "tableaus",
    "ButcherTableau": "tableaus",
    "check_tableau": "tableaus",
    "get_tableau": "tableaus",
    "StepResult": "step",
    "error_ratio": "step",
    "initial_step_size": "step",
    "rk_step": "step",
    "PIController": "solver",
    "Solution": "solver",
    "SolveStats": "solver",
    "solve": "solver",
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr("leanfit.neural_de", _EXPORTS)
