"""Top-K sparse softmax gating mixtures of experts (Nguyen, Akbarian, Yan & Ho, ICLR 2024, arXiv 2309.13850).

- :func:`topk_softmax_gate`: the top-K softmax gate under the conventions in use (selection on the full logits or
  on the slopes only, as the paper; renormalised over the K kept experts or not), and the router losses.
- :class:`SparseMoE`: a dropless sort-dispatched mixture-of-experts layer, equal to Hugging Face's Mixtral block.
- :class:`TopKGaussianMoE`: a scikit-learn estimator of the paper's top-K gated Gaussian MoE, fitted by ECM.
- :func:`voronoi_cells`, :func:`voronoi_loss`, :func:`per_parameter_errors`: the paper's parameter losses."""

from __future__ import annotations

from typing import TYPE_CHECKING

from leanfit.core.lazy import lazy_exports

if TYPE_CHECKING:
    from leanfit.moe.estimator import MoEParams as MoEParams
    from leanfit.moe.estimator import TopKGaussianMoE as TopKGaussianMoE
    from leanfit.moe.gating import router_z_loss as router_z_loss
    from leanfit.moe.gating import switch_load_balancing_loss as switch_load_balancing_loss
    from leanfit.moe.gating import topk_softmax_gate as topk_softmax_gate
    from leanfit.moe.layer import MoEOutput as MoEOutput
    from leanfit.moe.layer import SparseMoE as SparseMoE
    from leanfit.moe.voronoi import per_parameter_errors as per_parameter_errors
    from leanfit.moe.voronoi import voronoi_cells as voronoi_cells
    from leanfit.moe.voronoi import voronoi_loss as voronoi_loss
else:  # names resolve on first use: importing the package does not import torch
    __getattr__, __dir__, __all__ = lazy_exports(__name__, __file__)
