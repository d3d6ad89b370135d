"""Naive reference implementations that the fast paths are tested against."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from leanfit.iapt.generator import PromptGenerator
    from leanfit.iapt.model import IAPTModel


def vq_logits_reference(hidden: torch.Tensor, codebook: torch.Tensor, mapping: torch.Tensor,
                        bias: torch.Tensor | None) -> torch.Tensor:
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
                                  else torch.full_like(z[:, k], -float("inf")) for k in range(codebook.shape[0])], 1)
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
                           top_p: float | None = None) -> torch.Tensor:
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
                        t_eval=t_eval, rtol=rtol, atol=atol)
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


def initial_step_reference(fun, t0, y0, rtol, atol, iord):
    """Hairer's HINIT (Solving ODEs I, II.4; the Fortran DOPRI5/DOP853 routine), one sample at a time in plain
    Python floats, with HMAX = inf and forward direction. fun(t, y, i) -> dy for sample i; y0: (batch, n).
    iord: DOPRI5's IORD, the power of h in the local error estimate (5 for a 5(4) pair). Norms are the book's RMS
    norm (4.11); the Fortran sums squares without dividing by n (identical for n = 1). Returns a list of steps.

        DNF = ||f0/sk||, DNY = ||y0/sk||, sk = atol + rtol |y0|
        H = 1e-6 if DNF or DNY < 1e-5, else 0.01 DNY/DNF            (the explicit Euler step)
        DER2 = ||(f(t0 + H, y0 + H f0) - f0)/sk|| / H               (second-derivative estimate)
        DER12 = max(DER2, DNF); H1 = (0.01/DER12)**(1/IORD), or max(1e-6, 1e-3 H) if DER12 <= 1e-15
        HINIT = min(100 H, H1)                                      (H**IORD * DER12 = 0.01)
    """

    def rms(v):
        return math.sqrt(math.fsum(x * x for x in v) / len(v))

    out = []
    for i, row in enumerate(y0):
        y = [float(v) for v in row]
        f0 = [float(v) for v in fun(t0, y, i)]
        sk = [atol + rtol * abs(v) for v in y]
        dnf = rms([a / b for a, b in zip(f0, sk, strict=True)])
        dny = rms([a / b for a, b in zip(y, sk, strict=True)])
        h = 1e-6 if dnf < 1e-5 or dny < 1e-5 else 0.01 * dny / dnf
        f1 = [float(v) for v in fun(t0 + h, [a + h * b for a, b in zip(y, f0, strict=True)], i)]
        der2 = rms([(a - b) / c for a, b, c in zip(f1, f0, sk, strict=True)]) / h
        der12 = max(der2, dnf)
        h1 = max(1e-6, 1e-3 * h) if der12 <= 1e-15 else (0.01 / der12) ** (1.0 / iord)
        out.append(min(100 * h, h1))
    return out


class Counter:
    """Wraps a vector field and counts its calls (the NFE reference)."""

    def __init__(self, f):
        self.f, self.calls = f, 0

    def __call__(self, t, y):
        self.calls += 1
        return self.f(t, y)


# --- neural_de: regularisers (one sample at a time, explicit loops over the Tsit5 tableau) ---


def tsit5_step_reference(f, t: float, y, h: float, k1=None, tab=None):
    """One Tsit5 step (or one step of the Butcher tableau ``tab``) for ONE sample y: (1, n), stage by stage. Returns
    (y1, error, ks, stage states); ks[0] is ``k1`` if given. y1 = y + h sum_j b_j k_j; error = h sum_j b_error_j k_j."""
    import torch

    from leanfit.neural_de.tableaus import TSIT5

    tab = tab or TSIT5

    def at(tt):
        return torch.tensor([tt], dtype=torch.float64)

    ks, states = [f(at(t), y) if k1 is None else k1], [y]
    for s in range(1, tab.stages):
        g = y
        for j in range(s):
            g = g + h * tab.a[s][j] * ks[j]
        states.append(g)
        ks.append(f(at(t + tab.c[s] * h), g))
    y1 = y
    for j in range(tab.stages):
        y1 = y1 + h * tab.b[j] * ks[j]
    error = sum(h * tab.b_error[j] * ks[j] for j in range(tab.stages))
    return y1, error, ks, states


def local_regularizer_reference(f, t, y, h, rtol, atol, points="batch", estimate="error", stability=3.5068,
                                k1_graph=False, tab=None):
    """The local regulariser sample by sample: y (batch, n) and h are constants, k1 = f(t_i, y_i) is computed
    without gradient (with it if ``k1_graph``), the other stages with it. t, h: per-sample floats. ``points="batch"``: one RMS over the
    residuals of all samples (h[0] is the shared step); ``"sample"``: per-sample RMS, then the mean. ``tab``: a
    Butcher tableau other than Tsit5 (pass its ``stability`` size too).
    error: RMS(e / (atol + rtol max(|y|, |y1|))) |h|; stiffness: RMS(k7 - k6) / (RMS(y1 - g6) + eps) / stability."""
    import torch

    y = y.detach()
    res, dk, dg = [], [], []
    for i in range(y.shape[0]):
        yi = y[i : i + 1]
        with torch.set_grad_enabled(k1_graph):
            k1 = f(torch.tensor([float(t[i])], dtype=torch.float64), yi)
        y1, err, ks, states = tsit5_step_reference(f, float(t[i]), yi, float(h[i]), k1=k1, tab=tab)
        res.append((err / (atol + rtol * torch.maximum(yi.abs(), y1.abs()))).reshape(-1))
        dk.append((ks[6] - ks[5]).reshape(-1))
        dg.append((y1 - states[5]).reshape(-1))
    if points == "batch":
        groups = [(torch.cat(res), torch.cat(dk), torch.cat(dg), h[0])]
    else:
        groups = list(zip(res, dk, dg, h, strict=True))

    def rms(v):
        return torch.sqrt(torch.mean(v * v))

    eps = torch.finfo(torch.float64).eps
    vals = [rms(r) * abs(float(hh)) if estimate == "error" else rms(a) / (rms(b) + eps) / stability
            for r, a, b, hh in groups]
    return sum(vals) / len(vals)


def global_regularizer_reference(f, step_t, step_h, step_y, n_accepted, rtol, atol, per_sample=True):
    """ERNODE's sum_j EEst_j |h_j| per sample (per-sample norms), re-stepping every recorded step with
    :func:`tsit5_step_reference`; returns the mean over samples (a float). ``per_sample=False`` (a joint solve,
    every sample takes the same steps): EEst_j is one RMS over the residuals of the whole batch at step j."""
    import math

    def residuals(i, j):
        yj, hj = step_y[i, j : j + 1].detach(), float(step_h[i, j])
        y1, err, _, _ = tsit5_step_reference(f, float(step_t[i, j]), yj, hj)
        return (err / (atol + rtol * yj.abs().maximum(y1.abs()))).reshape(-1).tolist()

    def rms(r):
        return math.sqrt(sum(v * v for v in r) / len(r))

    if not per_sample:
        batch = range(len(n_accepted))
        return sum(rms([v for i in batch for v in residuals(i, j)]) * abs(float(step_h[0, j]))
                   for j in range(int(n_accepted[0])))
    total = [sum(rms(residuals(i, j)) * abs(float(step_h[i, j])) for j in range(int(n)))
             for i, n in enumerate(n_accepted)]
    return sum(total) / len(total)


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


# --- neural_de: SDE (Euler-Maruyama one sample at a time, explicit loops) ---


def sde_step_reference(drift, diffusion, t: float, y, h: float, dw1, dw2):
    """One step-doubled Euler-Maruyama step for ONE sample in plain floats. drift(t, y), diffusion(t, y): lists of
    floats -> lists (diagonal noise); y, dw1, dw2: lists. Returns (y_next from two half steps, y_next - full step)."""
    f0, g0 = drift(t, y), diffusion(t, y)
    full = [v + h * f + g * (a + b) for v, f, g, a, b in zip(y, f0, g0, dw1, dw2, strict=True)]
    y_mid = [v + h / 2 * f + g * a for v, f, g, a in zip(y, f0, g0, dw1, strict=True)]
    f1, g1 = drift(t + h / 2, y_mid), diffusion(t + h / 2, y_mid)
    y_next = [v + h / 2 * f + g * b for v, f, g, b in zip(y_mid, f1, g1, dw2, strict=True)]
    return y_next, [a - b for a, b in zip(y_next, full, strict=True)]


def euler_maruyama_reference(drift, diffusion, times, y0, w):
    """Plain Euler-Maruyama for ONE sample y0: (1, n) on the grid ``times`` (floats) with the Brownian values
    ``w[k]``: (1, n) at ``times[k]``: y_{k+1} = y_k + (t_{k+1} - t_k) f(t_k, y_k) + g(t_k, y_k) (w_{k+1} - w_k).
    The fields get t as a float64 (1,) tensor. Returns the states at every grid point (differentiable)."""
    import torch

    ys = [y0]
    for k in range(len(times) - 1):
        t = torch.tensor([times[k]], dtype=torch.float64)
        y = ys[-1]
        dw = (w[k + 1] - w[k]).to(y.dtype)
        ys.append(y + (times[k + 1] - times[k]) * drift(t, y) + diffusion(t, y) * dw)
    return ys


def fixed_grid_reference(t_eval, dt: float):
    """Times of fixed steps of ``dt`` from t_eval[0] that land on every t_eval point (a step within 1 % of the next
    point is stretched onto it, as in Hairer's DOPRI5), as plain floats."""
    grid = [float(t_eval[0])]
    for t_out in t_eval[1:]:
        while grid[-1] < t_out:
            grid.append(float(t_out) if grid[-1] + 1.01 * dt >= t_out else grid[-1] + dt)
    return grid


# --- neural_de: Milstein and the SDE local regulariser (one sample at a time) ---


def milstein_step_reference(drift, diffusion, t: float, y, h: float, dw1, dw2):
    """One step-doubled Milstein step for ONE sample in plain floats, as :func:`sde_step_reference`: each
    step adds s (g(t, y + f h + s g sqrt(h)) - g) (dW^2 - h) / (2 sqrt(h)), s = sign(dW) (+1 at 0), entry by entry,
    to Euler-Maruyama. Returns (y_next from two half steps, y_next - full step)."""

    def step(t, y, h, dw):
        f, g = drift(t, y), diffusion(t, y)
        side = [1.0 if w >= 0 else -1.0 for w in dw]
        g_hat = diffusion(t, [v + h * a + s * b * math.sqrt(h) for v, a, b, s in zip(y, f, g, side, strict=True)])
        return [v + h * a + b * w + s * (c - b) * (w * w - h) / (2 * math.sqrt(h))
                for v, a, b, c, w, s in zip(y, f, g, g_hat, dw, side, strict=True)]

    full = step(t, y, h, [a + b for a, b in zip(dw1, dw2, strict=True)])
    y_next = step(t + h / 2, step(t, y, h / 2, dw1), h / 2, dw2)
    return y_next, [a - b for a, b in zip(y_next, full, strict=True)]


def milstein_reference(drift, diffusion, times, y0, w):
    """Plain Milstein for ONE sample y0: (1, n) on the grid ``times`` with the Brownian values ``w[k]``: (1, n), as
    :func:`euler_maruyama_reference` (differentiable; the fields get t as a float64 (1,) tensor)."""
    ys = [y0]
    for k in range(len(times) - 1):
        t, h, y = torch.tensor([times[k]], dtype=torch.float64), times[k + 1] - times[k], ys[-1]
        dw = (w[k + 1] - w[k]).to(y.dtype)
        side = torch.tensor([[1.0 if float(v) >= 0 else -1.0 for v in dw[0]]], dtype=y.dtype)
        f, g = drift(t, y), diffusion(t, y)
        g_hat = diffusion(t, y + h * f + side * g * math.sqrt(h))
        ys.append(y + h * f + g * dw + side * (g_hat - g) * (dw * dw - h) / (2 * math.sqrt(h)))
    return ys


def sde_scheme_step_reference(scheme, drift, diffusion, t, y, h: float, dw):
    """One step of one sample y: (1, n): Euler-Maruyama, plus for Milstein s (g(t, y_hat) - g) (dW^2 - h) /
    (2 sqrt(h)) with y_hat = y + f h + s g sqrt(h), s = sign(dW) entry by entry."""
    f, g = drift(t, y), diffusion(t, y)
    out = y + h * f + g * dw
    if scheme == "euler":
        return out
    side = torch.tensor([[1.0 if float(v) >= 0 else -1.0 for v in dw.flatten()]], dtype=y.dtype)
    g_hat = diffusion(t, y + h * f + side * g * h**0.5)
    return out + side * (g_hat - g) * (dw * dw - h) / (2 * h**0.5)


def sde_local_regularizer_reference(scheme, drift, diffusion, t, y, h, dw1, dw2, rtol, atol) -> torch.Tensor:
    """Sample by sample: EEst * h of one step-doubled step of the scheme, averaged over the samples."""
    values = []
    for i in range(y.shape[0]):
        ti, yi, hi = t[i : i + 1], y[i : i + 1], float(h[i])
        full = sde_scheme_step_reference(scheme, drift, diffusion, ti, yi, hi, (dw1[i] + dw2[i])[None])
        mid = sde_scheme_step_reference(scheme, drift, diffusion, ti, yi, hi / 2, dw1[i][None])
        nxt = sde_scheme_step_reference(scheme, drift, diffusion, ti + hi / 2, mid, hi / 2, dw2[i][None])
        scale = atol + rtol * torch.maximum(yi.abs(), nxt.abs())
        values.append(((nxt - full) / scale).pow(2).mean().sqrt() * hi)
    return torch.stack(values).mean()


# --- iapt: rational activation, prompt generator and greedy decoding (row by row, no fast paths) ---


def rational_reference(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_j a_j x^j / (1 + |sum_i b_i x^i|) with explicit powers (no Horner, no continuation)."""
    num = sum(a[j] * x**j for j in range(a.shape[0]))
    den = 1 + (sum(b[i - 1] * x**i for i in range(1, b.shape[0] + 1))).abs()
    return num / den


def prompts_reference(gen: PromptGenerator, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Row by row and token by token: down, pooling over instruction positions only, norm, act, up."""
    out = torch.zeros(hidden.shape[0], gen.num_soft_tokens, hidden.shape[-1], dtype=hidden.dtype)
    m = gen.down.out_features
    for b in range(hidden.shape[0]):
        z = gen.down(hidden[b][mask[b]])  # (n, m): instruction positions only
        for k in range(gen.num_soft_tokens):
            if gen.pooler == "self_attn":
                w = torch.softmax(torch.stack([z[t] @ gen.query[k] for t in range(z.shape[0])]) / math.sqrt(m), 0)
                pooled = sum(w[t] * z[t] for t in range(z.shape[0]))
            elif gen.pooler == "mean":
                pooled = z.mean(0) + gen.query[k]
            else:
                pooled = z[-1] + gen.query[k]
            out[b, k] = gen.up(gen.act(gen.norm(pooled)))
    return out


def greedy_reference(model: IAPTModel, ids: torch.Tensor, mask: torch.Tensor, new: int,
                     names: list[str] | None = None) -> torch.Tensor:
    """Greedy decoding with a full forward (no cache) per token; the prompt is the instruction."""
    seq, attn, instruction = ids, mask, mask.bool()
    with torch.no_grad():
        for _ in range(new):
            logits = model(seq, attention_mask=attn, instruction_mask=instruction, adapter_names=names,
                           use_cache=False).logits
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
            attn = torch.cat([attn, torch.ones_like(attn[:, :1])], 1)
            instruction = torch.cat([instruction, torch.zeros_like(instruction[:, :1])], 1)
    return seq


# --- noisefit: noise std, SNR probe and KL (token by token in float64) ---


def winsorized_reference(x: torch.Tensor, k: float = 5.0) -> torch.Tensor:
    """One token's channels clamped to median +- k * 1.4826 * MAD (lower medians, as torch.median)."""
    d = x.numel()
    med = x.sort().values[(d - 1) // 2]
    mad = (x - med).abs().sort().values[(d - 1) // 2]
    return x.clamp(float(med - k * 1.4826 * mad), float(med + k * 1.4826 * mad))


def token_std_reference(h: torch.Tensor, mask: torch.Tensor | None, scale: float, adaptive: bool,
                        beta: float = 0.1, max_factor: float = 5.0) -> torch.Tensor:
    """leanfit's std token by token in float64."""
    h = h.double()
    rows, seq, d = h.shape
    out = torch.empty_like(h)
    variances = [[float(((w - w.mean()) ** 2).mean()) for w in map(winsorized_reference, h[b])] for b in range(rows)]
    valid = [variances[b][t] for b in range(rows) for t in range(seq) if mask is None or mask[b, t]]
    mean_var = sum(valid) / len(valid)
    for b in range(rows):
        for t in range(seq):
            x = winsorized_reference(h[b, t])
            rms = math.sqrt(float((x**2).mean()))
            if not adaptive:
                out[b, t] = scale * rms
                continue
            factor = min(variances[b][t] / mean_var, max_factor)
            raw = h[b, t]
            med = raw.sort().values[(d - 1) // 2]
            mad = max(float((raw - med).abs().sort().values[(d - 1) // 2]), 1e-6 * rms)
            w = torch.exp(-beta * (raw - med).abs() / mad)
            out[b, t] = scale * rms * factor * w / math.sqrt(float((w**2).mean()))
    return out


def v1_std_reference(h: torch.Tensor, base: float, beta: float = 0.1) -> torch.Tensor:
    """The reference v1 std token by token in float64 (unbiased variance, lower median, eps 1e-6)."""
    h = h.double()
    rows, seq, d = h.shape
    var = torch.tensor([[float(h[b, t].var()) for t in range(seq)] for b in range(rows)], dtype=torch.float64)
    out = torch.empty_like(h)
    for b in range(rows):
        for t in range(seq):
            x = h[b, t]
            med = x.sort().values[(d - 1) // 2]
            mad = max(float((x - med).abs().sort().values[(d - 1) // 2]), 1e-6 * float(x.norm()))
            factor = min(math.exp(float(var[b, t]) / (float(var.mean()) + 1e-6)), 5.0)
            out[b, t] = base * mad * torch.exp(-beta * (x - med).abs() / (mad + 1e-6)) * factor
    return out


def snr_reference(model, used, cfg, n_draws=10):
    """The SNR probe written out: block outputs from hooks, noise drawn directly on them, float64."""
    from leanfit.noisefit.injector import find_decoder_layers
    from leanfit.noisefit.loss import statistics_mask

    blocks = find_decoder_layers(model)
    outs = {}
    hooks = [b.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o.detach()))
             for i, b in enumerate(blocks)]
    g = torch.Generator().manual_seed(1234)
    signal, noise, count = [0.0] * len(blocks), [0.0] * len(blocks), [0] * len(blocks)
    with torch.no_grad():
        for batch in used:
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            keep = torch.ones(batch["input_ids"].shape, dtype=torch.bool)
            if not cfg.paper_v1:
                keep = statistics_mask(batch["labels"])
            for i in range(len(blocks)):
                h = outs[i].double()
                if cfg.paper_v1:
                    std = v1_std_reference(h, cfg.rel_noise * float(h.std()))  # the probe: noise_std once
                else:
                    std = token_std_reference(h, keep, cfg.rel_noise, cfg.token_adaptive)
                signal[i] += float(h[keep].abs().sum())
                count[i] += int(keep.sum()) * h.shape[-1]
                for _ in range(n_draws):
                    noise[i] += float((torch.randn(h.shape, generator=g, dtype=torch.float64) * std)[keep].abs().sum())
    for hook in hooks:
        hook.remove()
    return [(s / c) / (n / (c * n_draws) + 1e-6) for s, n, c in zip(signal, noise, count, strict=True)]


def kl_reference(p: torch.Tensor, q: torch.Tensor, t: float = 1.0) -> torch.Tensor:
    """Per-position KL(softmax(p/t) || softmax(q/t)) in float64: (..., V) -> (...)."""
    log_p, log_q = torch.log_softmax(p.double() / t, -1), torch.log_softmax(q.double() / t, -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def masked_kl_reference(p, q, mask, t, num_items):
    """Token by token in float64."""
    total, count = torch.zeros((), dtype=torch.float64), 0
    for idx in zip(*torch.nonzero(mask, as_tuple=True), strict=True):
        a, b = torch.softmax(p[idx].double() / t, -1), torch.softmax(q[idx].double() / t, -1)
        total = total + (a * (a.log() - b.log())).sum()
        count += 1
    return total / (count if num_items is None else num_items)


# --- vq_logits: Sigma-weighted clustering and the learned map (loops, float64) ---


def sigma_kmeans_reference(weight, second_moment, num_codes, weights, ridge, iters, init):
    """Weighted k-means in the metric ``S = Sigma + ridge * tr(Sigma)/d * I`` point by point: ``S^{1/2}`` from
    scipy's sqrtm, distances and weighted means by explicit loops; an empty code restarts at the token with the
    largest weighted error. Returns (labels (V,), codebook (K, d) mapped back by the inverse root)."""
    import numpy as np
    from scipy.linalg import sqrtm

    s = second_moment.double().numpy()
    s = s + ridge * np.trace(s) / s.shape[0] * np.eye(s.shape[0])
    root = np.real(sqrtm(s))
    x = weight.double().numpy() @ root
    w = weights.double().numpy()
    centers = x[init.numpy()].copy()

    def assign(c):
        return np.array([int(np.argmin([((xv - ck) ** 2).sum() for ck in c])) for xv in x])

    def means(labels):
        out, mass = np.zeros_like(centers), np.zeros(num_codes)
        for v, k in enumerate(labels):
            out[k] += w[v] * x[v]
            mass[k] += w[v]
        return np.where(mass[:, None] > 0, out / np.maximum(mass, 1e-300)[:, None], 0.0), mass

    labels = assign(centers)
    for _ in range(iters):
        centers, mass = means(labels)
        empty = [k for k in range(num_codes) if mass[k] == 0]
        if empty:
            err = np.array([w[v] * ((x[v] - centers[labels[v]]) ** 2).sum() for v in range(len(x))])
            for k, v in zip(empty, np.argsort(-err, kind="stable")[: len(empty)], strict=True):
                centers[k] = x[v]
        new = assign(centers)
        if (new == labels).all() and not empty:
            break
        labels = new
    centers, _ = means(labels)
    return torch.as_tensor(labels), torch.as_tensor(centers @ np.linalg.inv(root))


def reassign_reference(vectors, codebook, sigma, mapping, movable, targets):
    """Each movable token to argmin over target codes of (x_v - c_k)^T Sigma (x_v - c_k), token by token."""
    out = mapping.clone()
    for v in range(vectors.shape[0]):
        if movable[v]:
            cost = [float((vectors[v] - c) @ sigma @ (vectors[v] - c)) if targets[k] else float("inf")
                    for k, c in enumerate(codebook.double())]
            out[v] = int(torch.tensor(cost).argmin())
    return out


def context_reassign_reference(sums, counts, mapping, covariance, num_codes, shrinkage, ridge, movable):
    """Token by token: the shrunk context mean's nearest pooled code mean, Mahalanobis under the ridged covariance."""
    d = covariance.shape[0]
    s = covariance.double() + ridge * float(torch.linalg.eigvalsh(covariance.double()).clamp_min(0).mean()) * torch.eye(d, dtype=torch.float64)
    inv = torch.linalg.inv(s)
    code_mean, seen = {}, []
    for k in range(num_codes):
        members = [v for v in range(len(mapping)) if int(mapping[v]) == k]
        n = sum(float(counts[v]) for v in members)
        if n > 0:
            code_mean[k] = sum(sums[v].double() for v in members) / n
            seen.append(k)
    out = mapping.clone()
    for v in range(len(mapping)):
        if movable[v] and counts[v] > 0:
            mu = (sums[v].double() + shrinkage * code_mean[int(mapping[v])]) / (float(counts[v]) + shrinkage)
            cost = [float((mu - code_mean[k]) @ inv @ (mu - code_mean[k])) for k in seen]
            out[v] = seen[int(torch.tensor(cost).argmin())]
    fit = {}  # each moved-or-kept observed token's weighted distance to its chosen code, for the refill
    for v in range(len(mapping)):
        if movable[v] and counts[v] > 0:
            mu = (sums[v].double() + shrinkage * code_mean[int(mapping[v])]) / (float(counts[v]) + shrinkage)
            diff = mu - code_mean[int(out[v])]
            fit[v] = float(counts[v]) * float(diff @ inv @ diff)
    for k in range(num_codes):
        if any(int(c) == k for c in out):
            continue
        shared = {v: c for v, c in fit.items() if c >= 0 and sum(int(out[u]) == int(out[v]) for u in range(len(out))) > 1}
        if not shared:
            break
        v = max(shared, key=lambda u: (shared[u], -u))
        if shared[v] <= 0:
            break
        out[v], fit[v] = k, -1.0
    return out
