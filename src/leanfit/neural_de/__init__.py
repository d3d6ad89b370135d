"""Locally regularised neural differential equations (Pal, Edelman & Rackauckas, ICML 2023).

A batched explicit embedded Runge-Kutta solver (Tsit5, Dopri5) that exposes what the regularisers need: a public
single step returning its error estimate, the automatic initial step, per-sample step-size control and statistics;
the local (one random step) and global (every accepted step) error regularisers; an adaptive SDE solver (Milstein
or Euler-Maruyama, step-doubling error estimate, Brownian bridge memory) for the neural SDE variant; the paper's
ODE and SDE classifiers.

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
    "STABILITY_SIZE": "regularizers",
    "LocalRegularizerInfo": "regularizers",
    "global_regularizer": "regularizers",
    "local_regularizer": "regularizers",
    "regularize_solution": "regularizers",
    "sample_times": "regularizers",
    "with_times": "regularizers",
    "SDE_CONTROLLER": "sde",
    "BrownianPath": "sde",
    "SDESolveStats": "sde",
    "SDEStepResult": "sde",
    "sde_solve": "sde",
    "sde_step": "sde",
    "ConcatTanhMLP": "models",
    "DEClassifierOutput": "models",
    "NeuralODEClassifier": "models",
    "NeuralSDEClassifier": "models",
    "REGULARIZER_PRESETS": "models",
    "RegularizerSpec": "models",
    "sde_local_regularizer": "models",
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr("leanfit.neural_de", _EXPORTS)
