"""Naive reference implementations that the fast paths are tested against."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def vq_logits_reference(hidden: torch.Tensor, codebook: torch.Tensor, mapping: torch.Tensor,
                        bias: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
    """Materialised VQ-Logits logits: the full (N, V) matrix ``h C^T`` gathered by the map, plus the bias."""
    logits = (hidden @ codebook.t())[:, mapping]
    return logits if bias is None else logits + bias


def vq_cross_entropy_reference(hidden, codebook, mapping, labels, bias=None, ignore_index=-100, reduction="mean"):
    logits = vq_logits_reference(hidden, codebook, mapping, bias)
    return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction=reduction)


def residual_log_probs_reference(hidden, codebook, mapping, bias, proj, emb) -> torch.Tensor:
    """log p(v | h) of the factorised head, cluster by cluster with explicit loops: (N, V)."""
    z = hidden @ codebook.t()
    b = torch.zeros(mapping.numel(), dtype=hidden.dtype) if bias is None else bias
    scores = b + (hidden @ proj.t()) @ emb.t()
    out = torch.full_like(scores, -float("inf"))
    cluster_logits = torch.stack([z[:, k] + torch.logsumexp(b[mapping == k], 0) if (mapping == k).any()
                                  else torch.full_like(z[:, k], -float("inf")) for k in range(codebook.shape[0])], 1)  # fmt: skip
    log_pk = torch.log_softmax(cluster_logits, dim=-1)
    for k in range(codebook.shape[0]):
        members = (mapping == k).nonzero().squeeze(1)
        if members.numel():
            out[:, members] = log_pk[:, k : k + 1] + torch.log_softmax(scores[:, members], dim=-1)
    return out


def nucleus_mask_reference(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Tokens kept by top-p with ties kept whole: every token whose logit is >= the largest value ``u`` such that
    the tokens with logit >= ``u`` hold probability >= ``top_p``. Without ties this is Hugging Face's
    ``TopPLogitsWarper``; with ties HF keeps an index-order-dependent part of the boundary tie group."""
    probs = torch.softmax(scores, dim=-1)
    keep = torch.zeros_like(scores, dtype=torch.bool)
    for i in range(scores.shape[0]):
        for u in torch.unique(scores[i][torch.isfinite(scores[i])]).flip(0):
            if probs[i][scores[i] >= u].sum() >= top_p:
                keep[i] = scores[i] >= u
                break
    return keep


def warped_probs_reference(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                           top_p: float | None = None) -> torch.Tensor:  # fmt: skip
    """Sampling distribution after temperature -> top-k -> top-p, as ``transformers``' logits warpers apply them
    (the temperature and top-k warpers are used directly; top-p via :func:`nucleus_mask_reference`): (N, V)."""
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper

    scores = logits.clone()
    ids = torch.zeros(scores.shape[0], 1, dtype=torch.long)
    if temperature != 1.0:
        scores = TemperatureLogitsWarper(temperature)(ids, scores)
    if top_k:
        scores = TopKLogitsWarper(top_k)(ids, scores)
    if top_p is not None and top_p < 1.0:
        scores = scores.masked_fill(~nucleus_mask_reference(scores, top_p), -float("inf"))
    return torch.softmax(scores, dim=-1)


# --- neural_de: ODE solver references (numpy/scipy, one sample at a time) ---


def solve_ivp_reference(fun, y0, t_eval, method: str = "DOP853", rtol: float = 1e-12, atol: float = 1e-12):
    """scipy.integrate.solve_ivp run on each sample alone. fun(t, y, i) -> dy (numpy, flat state of sample i);
    y0: (batch, n). Returns ys: (batch, T, n) float64 and nfe: (batch,) int (scipy's own count)."""
    import numpy as np
    from scipy.integrate import solve_ivp

    y0 = np.asarray(y0, dtype=np.float64)
    t_eval = np.asarray(t_eval, dtype=np.float64)
    ys, nfe = [], []
    for i in range(y0.shape[0]):
        sol = solve_ivp(lambda t, y, i=i: fun(t, y, i), (t_eval[0], t_eval[-1]), y0[i], method=method,
                        t_eval=t_eval, rtol=rtol, atol=atol)  # fmt: skip
        assert sol.success, sol.message
        ys.append(sol.y.T)
        nfe.append(sol.nfev)
    return np.stack(ys), np.asarray(nfe)


def linear_ode_reference(A, y0, t_eval):
    """Exact solution of y' = A y: y(t) = expm(A (t - t0)) y0. A: (n, n); y0: (batch, n). Returns (batch, T, n)."""
    import numpy as np
    from scipy.linalg import expm

    t_eval = np.asarray(t_eval, dtype=np.float64)
    return np.stack([np.asarray(y0, dtype=np.float64) @ expm(A * (t - t_eval[0])).T for t in t_eval], axis=1)


def error_ratio_reference(error, y0, y1, rtol, atol, norm="rms", per_sample=True):
    """Scaled error norm with explicit loops over samples. All arrays (batch, n) numpy. Returns (batch,)."""
    import numpy as np

    ratios = np.abs(error) / (atol + rtol * np.maximum(np.abs(y0), np.abs(y1)))
    groups = [ratios[i] for i in range(ratios.shape[0])] if per_sample else [ratios.ravel()] * ratios.shape[0]
    return np.array([np.sqrt(np.mean(g**2)) if norm == "rms" else np.max(g) for g in groups])


def initial_step_reference(fun, t0, y0, rtol, atol, order):
    """Hairer, Norsett & Wanner, Solving ODEs I, II.4 (HINIT), one sample at a time in plain Python floats.
    fun(t, y, i) -> dy for sample i; y0: (batch, n). Returns a list of step sizes."""
    import math

    def rms(v):
        return math.sqrt(sum(x * x for x in v) / len(v))

    out = []
    for i, y in enumerate(y0):
        y = [float(v) for v in y]
        f0 = [float(v) for v in fun(t0, y, i)]
        sc = [atol + rtol * abs(v) for v in y]
        d0, d1 = rms([v / s for v, s in zip(y, sc, strict=True)]), rms([v / s for v, s in zip(f0, sc, strict=True)])
        h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
        f1 = [float(v) for v in fun(t0 + h0, [v + h0 * d for v, d in zip(y, f0, strict=True)], i)]
        d2 = rms([(a - b) / s for a, b, s in zip(f1, f0, sc, strict=True)]) / h0
        h1 = max(1e-6, h0 * 1e-3) if max(d1, d2) <= 1e-15 else (0.01 / max(d1, d2)) ** (1.0 / (order + 1))
        out.append(min(100 * h0, h1))
    return out


class Counter:
    """Wraps a vector field and counts its calls (the NFE reference)."""

    def __init__(self, f):
        self.f, self.calls = f, 0

    def __call__(self, t, y):
        self.calls += 1
        return self.f(t, y)


# --- moe: Gaussian MoE estimator (one sample at a time, plain floats) ---


def gaussian_moe_loglik_reference(X, y, gate_coef, gate_intercept, coef, intercept, var, top_k, selection):
    """log p(y_i | x_i) of the top-K gated Gaussian MoE by explicit loops: the K experts with the largest selection
    score (ties to the lower index), softmax of the full logits over them, Gaussian experts (var = variance)."""
    import math

    out = []
    k = len(gate_intercept)
    for x, target in zip(X.tolist(), y.tolist(), strict=True):
        logits = [sum(b * v for b, v in zip(gate_coef[j], x, strict=True)) + gate_intercept[j] for j in range(k)]
        scores = logits if selection == "full_logits" else [logit - gate_intercept[j] for j, logit in enumerate(logits)]
        chosen = sorted(range(k), key=lambda j: (-scores[j], j))[:top_k]
        norm = sum(math.exp(logits[j]) for j in chosen)
        p = 0.0
        for j in chosen:
            mean = sum(a * v for a, v in zip(coef[j], x, strict=True)) + intercept[j]
            dens = math.exp(-0.5 * (target - mean) ** 2 / var[j]) / math.sqrt(2 * math.pi * var[j])
            p += math.exp(logits[j]) / norm * dens
        out.append(math.log(p))
    return out


# --- moe: sparse MoE layer (token by token) ---


def sparse_moe_reference(x, router_weight, gate_up, down, top_k, renormalize=True, capacity=None, real=None):
    """Top-K SwiGLU MoE one token at a time: softmax over all experts, keep the K largest (renormalised or not).
    With ``capacity``, an expert serves at most ``capacity`` (token, slot) pairs, slot-major: all first choices in
    token order, then all second choices, ...; ``real`` (T bools) leaves padding tokens out (zero output).
    x: (T, d); router_weight: (E, d); gate_up: (E, 2I, d); down: (E, d, I). Returns (output (T, d), dropped)."""
    import torch

    tokens = [t for t in range(x.shape[0]) if real is None or bool(real[t])]
    chosen = {}
    for t in tokens:
        probs = torch.softmax(router_weight @ x[t], dim=-1)
        top = probs.topk(top_k)
        chosen[t] = (top.values / top.values.sum() if renormalize else top.values, top.indices.tolist())
    served, kept, dropped = [0] * router_weight.shape[0], set(), 0
    for slot in range(top_k):
        for t in tokens:
            e = chosen[t][1][slot]
            if capacity is not None and served[e] >= capacity:
                dropped += 1
                continue
            served[e] += 1
            kept.add((t, slot))
    out = torch.zeros_like(x)
    for t, slot in sorted(kept):
        weight, e = chosen[t][0][slot], chosen[t][1][slot]
        g, u = (gate_up[e] @ x[t]).chunk(2)
        out[t] = out[t] + weight * (down[e] @ (torch.nn.functional.silu(g) * u))
    return out, dropped
