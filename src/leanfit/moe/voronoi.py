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

from leanfit.core.errors import bad_value

__all__ = ["RBAR", "MixingMeasure", "per_parameter_errors", "voronoi_cells", "voronoi_loss"]

RBAR = {1: 1, 2: 4, 3: 6}  # rbar(M) for cells of M atoms (rbar(1) = 1 recovers D1)
_KEYS = ("gate_intercept", "gate_coef", "coef", "intercept", "var")


class MixingMeasure:
    """Parameters of a Gaussian MoE as arrays: gate_intercept (k,), gate_coef (k, d), coef (k, d), intercept (k,),
    var (k,). Build from a fitted :class:`~leanfit.moe.TopKGaussianMoE`, a :class:`~leanfit.moe.estimator.MoEParams`
    or a dict with those keys."""

    def __init__(self, gate_intercept: Any, gate_coef: Any, coef: Any, intercept: Any, var: Any) -> None:
        self.gate_intercept = _array("gate_intercept", gate_intercept, None)
        k = self.gate_intercept.size
        if k == 0:
            raise ValueError(bad_value("gate_intercept", gate_intercept, "one value per expert, at least one expert",
                                       "pass the parameters of a fitted model"))
        self.gate_coef = _array("gate_coef", gate_coef, (k, -1))
        self.coef = _array("coef", coef, (k, self.gate_coef.shape[1]))
        self.intercept = _array("intercept", intercept, (k,))
        self.var = _array("var", var, (k,))
        if not (self.var > 0).all():
            raise ValueError(bad_value("var", self.var.tolist(), "variances > 0", "pass variances, not log-variances"))

    @classmethod
    def of(cls, model: Any) -> MixingMeasure:
        """The measure of ``model``: a MixingMeasure, a dict of the five arrays, a fitted TopKGaussianMoE or its
        MoEParams."""
        if isinstance(model, MixingMeasure):
            return model
        if isinstance(model, Mapping):
            missing = [key for key in _KEYS if key not in model]
            if missing:
                raise ValueError(bad_value("model", f"<dict without {missing}>", f"a dict with keys {list(_KEYS)}",
                                           "add the missing parameters"))
            return cls(**{key: model[key] for key in _KEYS})
        if not (hasattr(model, "params") or all(hasattr(model, a) for a in ("gate", "experts", "var"))):
            shown = model if isinstance(model, (str, int, float, type(None))) else type(model).__name__
            raise TypeError(bad_value("model", shown, "a MixingMeasure, a dict of its arrays, a fitted "
                                      "TopKGaussianMoE or MoEParams", "pass the fitted estimator"))
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


def _array(name: str, value: Any, shape: tuple[int, ...] | None) -> np.ndarray:
    """``value`` as a finite float64 array of ``shape`` (flat if None); ValueError naming ``name`` otherwise."""
    try:
        arr = np.asarray(value, dtype=np.float64)
        arr = arr.reshape(-1) if shape is None else arr.reshape(shape)
    except (TypeError, ValueError) as exc:
        raise ValueError(bad_value(name, value, f"numbers of shape {shape} (k experts)" if shape else "numbers",
                                   "pass one row per expert")) from exc
    if not np.isfinite(arr).all():
        raise ValueError(bad_value(name, arr.tolist(), "finite values", "check the fit that produced them"))
    return arr


def _pair(fitted: Any, true: Any) -> tuple[MixingMeasure, MixingMeasure]:
    """Both measures, checked to share the feature dimension."""
    f, t = MixingMeasure.of(fitted), MixingMeasure.of(true)
    if f.gate_coef.shape[1] != t.gate_coef.shape[1]:
        raise ValueError(bad_value("fitted", f"<{f.gate_coef.shape[1]} features>", f"the {t.gate_coef.shape[1]} "
                                   "features of true", "compare models fitted on the same inputs"))
    return f, t


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
    f, t = _anchor(*_pair(fitted, true))
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
    if not all(isinstance(m, int) and isinstance(r, (int, float)) and not isinstance(r, bool) and 0 < r < np.inf
               for m, r in rbar.items()):
        raise ValueError(bad_value("rbar", rbar, "a mapping {cell size: exponent > 0}", "use the default RBAR"))
    f, t = _anchor(*_pair(fitted, true))
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
    f, t = _anchor(*_pair(fitted, true))
    out = []
    for j, cell in enumerate(voronoi_cells(f, t)):
        row: dict[str, float] = {"expert": j, "cell_size": len(cell)}
        for name in ("gate_coef", "coef", "intercept", "var"):
            row[name] = max((_differences(f, t, int(i), j)[name] for i in cell), default=float("nan"))
        row["weight"] = float(abs(np.exp(f.gate_intercept[cell]).sum() - np.exp(t.gate_intercept[j])))
        out.append(row)
    return out
