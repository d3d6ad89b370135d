"""Top-K sparse softmax gating mixtures of experts (Nguyen, Akbarian, Yan & Ho, ICLR 2024, arXiv 2309.13850).

- :func:`topk_softmax_gate`: the top-K softmax gate under the conventions in use (selection on the full logits or
  on the slopes only, as the paper; renormalised over the K kept experts or not), and the router losses.
- :class:`SparseMoE`: a dropless sort-dispatched mixture-of-experts layer, equal to Hugging Face's Mixtral block.
- :class:`TopKGaussianMoE`: a scikit-learn estimator of the paper's top-K gated Gaussian MoE, fitted by ECM.
- :func:`voronoi_cells`, :func:`voronoi_loss`, :func:`per_parameter_errors`: the paper's parameter losses.

Names are imported lazily so that registering this package's experiments does not import torch."""

from __future__ import annotations

from leanfit.core.lazy import lazy_getattr

_EXPORTS = {
    "router_z_loss": "gating",
    "switch_load_balancing_loss": "gating",
    "topk_softmax_gate": "gating",
    "MoEOutput": "layer",
    "SparseMoE": "layer",
    "MoEParams": "estimator",
    "TopKGaussianMoE": "estimator",
    "voronoi_cells": "voronoi",
    "voronoi_loss": "voronoi",
    "per_parameter_errors": "voronoi",
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr("leanfit.moe", _EXPORTS)
