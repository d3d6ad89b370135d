"""Locally regularised neural differential equations (Pal, Edelman & Rackauckas, ICML 2023).

A batched explicit embedded Runge-Kutta solver (Tsit5, Dopri5) that exposes what the regularisers need: a public
single step returning its error estimate, the automatic initial step, per-sample step-size control and statistics,
and three backward passes (direct backpropagation, checkpointed recomputation, the continuous adjoint);
the local (one random step) and global (every accepted step) error regularisers; an adaptive SDE solver (Milstein
or Euler-Maruyama, step-doubling error estimate, Brownian bridge memory) for the neural SDE variant; the paper's
ODE and SDE classifiers."""

from __future__ import annotations

from typing import TYPE_CHECKING

from leanfit.core.lazy import lazy_exports

if TYPE_CHECKING:
    from leanfit.neural_de.models import REGULARIZER_PRESETS as REGULARIZER_PRESETS
    from leanfit.neural_de.models import ConcatTanhMLP as ConcatTanhMLP
    from leanfit.neural_de.models import DEClassifierOutput as DEClassifierOutput
    from leanfit.neural_de.models import NeuralODEClassifier as NeuralODEClassifier
    from leanfit.neural_de.models import NeuralSDEClassifier as NeuralSDEClassifier
    from leanfit.neural_de.models import RegularizerSpec as RegularizerSpec
    from leanfit.neural_de.models import sde_local_regularizer as sde_local_regularizer
    from leanfit.neural_de.regularizers import STABILITY_SIZE as STABILITY_SIZE
    from leanfit.neural_de.regularizers import LocalRegularizerInfo as LocalRegularizerInfo
    from leanfit.neural_de.regularizers import global_regularizer as global_regularizer
    from leanfit.neural_de.regularizers import local_regularizer as local_regularizer
    from leanfit.neural_de.regularizers import regularize_solution as regularize_solution
    from leanfit.neural_de.regularizers import sample_times as sample_times
    from leanfit.neural_de.regularizers import with_times as with_times
    from leanfit.neural_de.sde import SDE_CONTROLLER as SDE_CONTROLLER
    from leanfit.neural_de.sde import BrownianPath as BrownianPath
    from leanfit.neural_de.sde import SDESolveStats as SDESolveStats
    from leanfit.neural_de.sde import SDEStepResult as SDEStepResult
    from leanfit.neural_de.sde import sde_solve as sde_solve
    from leanfit.neural_de.sde import sde_step as sde_step
    from leanfit.neural_de.solver import PIController as PIController
    from leanfit.neural_de.solver import PrecisionWarning as PrecisionWarning
    from leanfit.neural_de.solver import Solution as Solution
    from leanfit.neural_de.solver import SolveStats as SolveStats
    from leanfit.neural_de.solver import solve as solve
    from leanfit.neural_de.step import StepResult as StepResult
    from leanfit.neural_de.step import error_ratio as error_ratio
    from leanfit.neural_de.step import initial_step_size as initial_step_size
    from leanfit.neural_de.step import rk_step as rk_step
    from leanfit.neural_de.tableaus import DOPRI5 as DOPRI5
    from leanfit.neural_de.tableaus import TABLEAUS as TABLEAUS
    from leanfit.neural_de.tableaus import TSIT5 as TSIT5
    from leanfit.neural_de.tableaus import ButcherTableau as ButcherTableau
    from leanfit.neural_de.tableaus import check_tableau as check_tableau
    from leanfit.neural_de.tableaus import get_tableau as get_tableau
else:  # names resolve on first use: importing the package does not import torch
    __getattr__, __dir__, __all__ = lazy_exports(__name__, __file__)
