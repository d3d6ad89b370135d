"""Voronoi losses between a fitted and a true top-K Gaussian MoE (arXiv 2309.13850; the construction goes back to the
dense-softmax analysis, arXiv 2305.03288).

Each fitted expert ``i`` is an atom ``omega_i = (beta_1i, a_i, b_i, sigma_i)`` (``sigma`` a variance) with weight
``exp(beta_0i)``. The Voronoi cell ``A_j`` of true atom ``j`` holds the fitted atoms nearer to it than to any other
true atom (ties go to the lower true index). The losses, summed over cells:

- ``kind="exact"`` (D1): ``sum_j [ sum_{i in A_j} exp(beta_0i) (|d beta_1| + |d a| + |d b| + |d sigma|)
  + | sum_{i in A_j} exp(beta_0i) - exp(beta*_0j) | ]``;
- ``kind="over"`` (D2): the same, except that a cell holding ``M > 1`` atoms contributes
  ``exp(beta_0i) (|d beta_1|^r + |d b|^r + |d a|^(r/2) + |d sigma|^(r/2))`` with ``r = rbar(M)``
  (``rbar(2) = 4``, ``rbar(3) = 6``; larger cells are an open problem and are refused).

The paper states D1 with a maximum over the K-subsets of cells that can be active together; the sum over all cells
differs from it by at most a constant factor (the number of such subsets), so rates and slopes are the same.

Translation anchoring: the gate is only identified up to a common shift of every ``(beta_0, beta_1)``. Both models are
anchored on the true reference expert (the last): the fitted atoms whose experts ``(a, b, sigma)`` are nearest to it
(a shift-free matching) are shifted so that their aggregate gate equals the reference's, i.e. their slopes'
weighted mean is 0 and ``log sum exp(beta_0)`` is 0; then the cells are computed on the full atoms.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import numpy as np

__all__ = ["RBAR", "MixingMeasure", "per_parameter_errors", "voronoi_cells", "voronoi_loss"]

RBAR = {1: 1, 2: 4, 3: 6}  # rbar(M) for cells of M atoms (rbar(1) = 1 recovers D1)


class MixingMeasure:
    """Parameters of a Gaussian MoE as arrays: gate_intercept (k,), gate_coef (k, d), coef (k, d), intercept (k,),
    var (k,). Build from a fitted :class:`~leanfit.moe.TopKGaussianMoE`, a :class:`~leanfit.moe.estimator.MoEParams`
    or a dict with those keys."""

    def __init__(self, gate_intercept: Any, gate_coef: Any, coef: Any, intercept: Any, var: Any) -> None:
        self.gate_intercept = np.asarray(gate_intercept, dtype=np.float64).reshape(-1)
        k = self.gate_intercept.size
        self.gate_coef = np.asarray(gate_coef, dtype=np.float64).reshape(k, -1)
        self.coef = np.asarray(coef, dtype=np.float64).reshape(k, -1)
        self.intercept = np.asarray(intercept, dtype=np.float64).reshape(k)
        self.var = np.asarray(var, dtype=np.float64).reshape(k)

    @classmethod
    def of(cls, model: Any) -> MixingMeasure:
        if isinstance(model, MixingMeasure):
            return model
        if isinstance(model, Mapping):
            return cls(**{key: model[key] for key in ("gate_intercept", "gate_coef", "coef", "intercept", "var")})
        params = model.params() if hasattr(model, "params") else model
        if hasattr(model, "top_k") and model.top_k == 1:
            raise ValueError("a model fitted with top_k=1 has no identifiable gate (exp(beta_0) and the scale of "
                             "beta_1 do not change it): compare routings, or fit with top_k >= 2")
        return cls(params.gate[:, -1], params.gate[:, :-1], params.experts[:, :-1], params.experts[:, -1], params.var)

    @property
    def expert_part(self) -> np.ndarray:
        """(k, d + 2): (a, b, sigma), invariant to gate translations."""
        return np.hstack([self.coef, self.intercept[:, None], self.var[:, None]])

    @property
    def atoms(self) -> np.ndarray:
        """(k, 2 d + 2): (beta_1, a, b, sigma)."""
        return np.hstack([self.gate_coef, self.expert_part])

    def shifted(self, d_intercept: float, d_coef: np.ndarray) -> MixingMeasure:
        return MixingMeasure(self.gate_intercept - d_intercept, self.gate_coef - d_coef, self.coef, self.intercept,
                             self.var)


def _anchor(fitted: MixingMeasure, true: MixingMeasure) -> tuple[MixingMeasure, MixingMeasure]:
    """Both anchored on the true reference (last) expert, see the module docstring."""
    true = true.shifted(true.gate_intercept[-1], true.gate_coef[-1])
    dist = np.linalg.norm(fitted.expert_part[:, None] - true.expert_part[None], axis=-1)
    group = dist.argmin(axis=1) == true.gate_intercept.size - 1
    if not group.any():  # no fitted expert is nearest the reference: anchor on the single nearest one
        group = np.zeros(len(dist), dtype=bool)
        group[dist[:, -1].argmin()] = True
    w = np.exp(fitted.gate_intercept[group] - fitted.gate_intercept[group].max())
    lse = fitted.gate_intercept[group].max() + np.log(w.sum())
    mean_coef = (w[:, None] * fitted.gate_coef[group]).sum(axis=0) / w.sum()
    return fitted.shifted(lse, mean_coef), true


def voronoi_cells(fitted: Any, true: Any) -> list[np.ndarray]:
    """Cell ``A_j`` (indices of fitted atoms) of every true atom ``j``, after translation anchoring."""
    f, t = _anchor(MixingMeasure.of(fitted), MixingMeasure.of(true))
    owner = np.linalg.norm(f.atoms[:, None] - t.atoms[None], axis=-1).argmin(axis=1)
    return [np.flatnonzero(owner == j) for j in range(t.gate_intercept.size)]


def _differences(f: MixingMeasure, t: MixingMeasure, i: int, j: int) -> dict[str, float]:
    return {"gate_coef": float(np.linalg.norm(f.gate_coef[i] - t.gate_coef[j])),
            "coef": float(np.linalg.norm(f.coef[i] - t.coef[j])),
            "intercept": float(abs(f.intercept[i] - t.intercept[j])),
            "var": float(abs(f.var[i] - t.var[j]))}


def voronoi_loss(fitted: Any, true: Any, kind: Literal["exact", "over"] = "exact",
                 rbar: Mapping[int, int] | None = None) -> float:
    """D1 (``kind="exact"``) or D2 (``kind="over"``) between a fitted and the true mixing measure."""
    if kind not in ("exact", "over"):
        raise ValueError(f"kind={kind!r} is invalid: expected 'exact' (D1) or 'over' (D2)")
    rbar = dict(RBAR if rbar is None else rbar)
    f, t = _anchor(MixingMeasure.of(fitted), MixingMeasure.of(true))
    cells = voronoi_cells(f, t)
    total = 0.0
    for j, cell in enumerate(cells):
        weight = np.exp(f.gate_intercept[cell])
        size = len(cell) if kind == "over" else 1
        if size not in rbar:
            raise ValueError(f"a Voronoi cell holds {len(cell)} fitted atoms: rbar({len(cell)}) is unknown "
                             f"(known: {sorted(rbar)}); fit fewer experts or pass rbar={{{len(cell)}: r}}")
        r = rbar[size]
        for i, w in zip(cell, weight, strict=True):
            diff = _differences(f, t, int(i), j)
            total += w * (diff["gate_coef"] ** r + diff["intercept"] ** r + diff["coef"] ** (r / 2 if r > 1 else 1)
                          + diff["var"] ** (r / 2 if r > 1 else 1))
        total += abs(weight.sum() - np.exp(t.gate_intercept[j]))
    return float(total)


def per_parameter_errors(fitted: Any, true: Any) -> list[dict[str, float]]:
    """Per true atom ``j``: the cell size, the largest error of each parameter over its cell (``gate_coef``,
    ``coef``, ``intercept``, ``var``; ``nan`` for an empty cell) and the weight error
    ``|sum exp(beta_0) - exp(beta*_0j)|``. These, not the Voronoi loss, show the slow over-specified rates."""
    f, t = _anchor(MixingMeasure.of(fitted), MixingMeasure.of(true))
    out = []
    for j, cell in enumerate(voronoi_cells(f, t)):
        row: dict[str, float] = {"expert": j, "cell_size": len(cell)}
        for name in ("gate_coef", "coef", "intercept", "var"):
            row[name] = max((_differences(f, t, int(i), j)[name] for i in cell), default=float("nan"))
        row["weight"] = float(abs(np.exp(f.gate_intercept[cell]).sum() - np.exp(t.gate_intercept[j])))
        out.append(row)
    return out
