"""Configs of ``leanfit run neural-de``: the regulariser arms of each model family (ODE, SDE) and the experiment's
data, training and scoring settings (the protocol is in :mod:`leanfit.studies.neural_de.experiment`)."""

from __future__ import annotations

from dataclasses import dataclass

from leanfit.core.config import BaseConfig, option
from leanfit.core.parallel import JobsConfig

__all__ = ["DATASETS", "ODE_METHODS", "SDE_METHODS", "DEArmConfig", "NeuralDEExperimentConfig", "SDEArmConfig"]


ODE_METHODS = ("vanilla", "global", "local_unbiased", "local_biased", "local_taken", "local_sample", "local_subset",
               "local_start", "local_start_k1", "local_taken_const_batch", "local_taken_batch")
SDE_METHODS = ("vanilla", "global", "local_unbiased", "local_biased")
DATASETS = ("digits", "mnist5k")


@dataclass
class DEArmConfig(BaseConfig):
    """One model family (ODE or SDE): what is trained and how."""

    enabled: bool = option(True, help="run this family")
    methods: list[str] = option(default_factory=lambda: list(ODE_METHODS), help="regulariser presets to compare")
    lambdas: list[float] = option(default_factory=lambda: [0.1, 1.0, 10.0], help="lambda sweep (first seed, "
                                  "chosen on validation)")
    method_lambdas: dict[str, float] = option(default_factory=dict, help="a fixed lambda per method: these "
                                              "methods skip the sweep (e.g. the lambdas another run chose)")
    hidden: int = option(100, help="tanh units of the vector field (ODE) or drift (SDE)")
    latent: int = option(32, help="SDE only: latent state size")
    steps: int = option(300, help="optimiser steps")
    batch_size: int = option(128, help="training batch")
    lr: float = option(1e-3, help="Adam learning rate")
    rtol: float = option(1e-7, help="solver relative tolerance")
    atol: float = option(1e-7, help="solver absolute tolerance")
    eval_every: int = option(100, help="validation every this many steps (logged, not used for selection)")

    def __post_init__(self) -> None:
        for name in ("hidden", "latent", "steps", "batch_size", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} is invalid: expected an integer >= 1")
        if not self.lambdas or min(self.lambdas) <= 0:
            raise ValueError(f"lambdas={self.lambdas} is invalid: expected a non-empty list of values > 0")
        if not (self.lr > 0 and self.rtol > 0 and self.atol > 0):
            raise ValueError(f"lr={self.lr}, rtol={self.rtol}, atol={self.atol} are invalid: expected values > 0")
        bad = {m: lam for m, lam in self.method_lambdas.items() if m not in self.methods or m == "vanilla"
               or not lam > 0}
        if bad:
            raise ValueError(f"method_lambdas={bad} is invalid: expected lambdas > 0 for regularised methods listed "
                             f"in methods={self.methods}")
        if "vanilla" not in self.methods:
            raise ValueError(f"methods={self.methods} is invalid: 'vanilla' is the baseline every ratio needs; add it")


@dataclass
class SDEArmConfig(DEArmConfig):
    """The neural SDE family: its own defaults (a strong-order-1 scheme needs loose tolerances, see the model)."""

    methods: list[str] = option(default_factory=lambda: list(SDE_METHODS), help="regulariser presets to compare")
    lambdas: list[float] = option(default_factory=lambda: [1.0, 10.0, 100.0], help="lambda sweep (first seed, "
                                  "chosen on validation)")
    hidden: int = option(64, help="tanh units of the drift")
    lr: float = option(1e-2, help="Adam learning rate")
    rtol: float = option(0.1, help="solver relative tolerance. Bias of adaptive Milstein at 0.1 on geometric "
                         "Brownian motion (dY = Y/2 dt + Y/2 dW, 20000 paths paired with the exact solution): "
                         "Var Y(1) -7.5%, E Y(1) -1.1% in 7 steps; it falls like the step (weak order 1: -4.5% at "
                         "0.01 in 13 steps, -1.7% at 1e-3 in 33), so 0.1 stays: a tenfold tighter tolerance halves "
                         "the bias for 1.9x the steps, and the arms compare on one solver (tests/neural_de/test_sde.py)")
    atol: float = option(0.1, help="solver absolute tolerance (see rtol)")


@dataclass
class NeuralDEExperimentConfig(JobsConfig):
    dataset: str = option("digits", help=f"one of {DATASETS}")
    val_fraction: float = option(0.15, help="validation share (stratified)")
    test_fraction: float = option(0.2, help="test share (stratified)")
    split_seed: int = option(0, help="seed of the split (the same for every run seed)")
    seeds: list[int] = option(default_factory=lambda: [0, 1, 2], help="training seeds; the first one runs the sweep")
    dtype: str = option("float64", help="float64 (the tolerances are tight) or float32")
    lambda_decay: float = option(2.5, help="lambda_t decays exponentially from lambda_decay * lambda to lambda")
    max_acc_drop: float = option(0.3, help="lambda selection: validation accuracy within this many points of vanilla")
    eval_batch: int = option(256, help="test/validation batch (the joint NFE is per batch of this size)")
    timing_repeats: int = option(5, help="warm prediction-time repeats per model (median reported)")
    threads: int = option(0, help="torch threads (0: auto, 1 for these small workloads)")
    device: str = option("auto", help="auto (CUDA when present, else CPU), cpu or cuda[:N]")
    ode: DEArmConfig = option(default_factory=DEArmConfig, help="neural ODE family")
    sde: SDEArmConfig = option(default_factory=SDEArmConfig, help="neural SDE family")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset={self.dataset!r} is invalid: expected one of {DATASETS}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype={self.dtype!r} is invalid: expected float32 or float64")
        if not (0 < self.val_fraction < 1 and 0 < self.test_fraction < 1 and self.val_fraction + self.test_fraction < 1):
            raise ValueError(f"val_fraction={self.val_fraction}, test_fraction={self.test_fraction} are invalid: "
                             "expected shares in (0, 1) summing to less than 1")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or min(self.seeds) < 0:
            raise ValueError(f"seeds={self.seeds} is invalid: expected distinct non-negative integers")
        if self.lambda_decay < 1:
            raise ValueError(f"lambda_decay={self.lambda_decay} is invalid: expected >= 1 (1: constant lambda)")
        if self.device.strip().lower().startswith("mps"):
            raise ValueError(f"device={self.device!r} is invalid: MPS has no float64 and per-step host syncs; use "
                             "cpu or cuda")
        if self.eval_batch < 1 or self.timing_repeats < 1:
            raise ValueError(f"eval_batch={self.eval_batch}, timing_repeats={self.timing_repeats}: expected >= 1")
        for fam, allowed in (("ode", ODE_METHODS), ("sde", SDE_METHODS)):
            bad = sorted(set(getattr(self, fam).methods) - set(allowed))
            if bad:
                raise ValueError(f"{fam}.methods has {bad}: expected a subset of {allowed}")
