"""TopKGaussianMoE: the scikit-learn contract, the likelihood against a per-sample reference, ECM monotonicity,
recovery of a known model, and bad input."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.exceptions import NotFittedError
from sklearn.metrics import adjusted_rand_score, r2_score
from sklearn.utils.estimator_checks import parametrize_with_checks

from leanfit.moe.estimator import MoEParams, TopKGaussianMoE, log_likelihood_terms
from leanfit.moe.voronoi import per_parameter_errors, voronoi_loss
from tests.reference import gaussian_moe_loglik_reference

# The well-separated truth of the simulation study: k* = 3 experts, K = 2, d = 1, X ~ U[-1, 1].
TRUTH = {"gate_coef": [[-6.0], [-3.0], [0.0]], "gate_intercept": [0.0, 1.0, 0.0], "coef": [[2.0], [-1.0], [2.0]],
         "intercept": [1.5, 0.0, -1.5], "var": [0.09, 0.09, 0.09]}


def _params(p):
    gate = np.hstack([np.asarray(p["gate_coef"]), np.asarray(p["gate_intercept"])[:, None]])
    experts = np.hstack([np.asarray(p["coef"]), np.asarray(p["intercept"])[:, None]])
    return MoEParams(gate, experts, np.asarray(p["var"], dtype=float))


def simulate(n, truth=TRUTH, top_k=2, seed=0, selection="full_logits"):
    """(X, y, true expert of each sample) drawn from the top-K MoE ``truth``."""
    rng = np.random.RandomState(seed)
    X = rng.uniform(-1, 1, size=(n, len(truth["gate_coef"][0])))
    true = TopKGaussianMoE(len(truth["var"]), top_k, selection=selection, init="given", init_params=truth, max_iter=1)
    true._params, true.n_features_in_ = _params(truth), X.shape[1]
    weights = true.gate_weights(X)
    expert = (rng.uniform(size=(n, 1)) > weights.cumsum(1)).sum(1).clip(max=weights.shape[1] - 1)
    params = _params(truth)
    y = (np.hstack([X, np.ones((n, 1))]) * params.experts[expert]).sum(1) + rng.normal(size=n) * np.sqrt(params.var[expert])
    return X, y, expert


@parametrize_with_checks([TopKGaussianMoE(random_state=0), TopKGaussianMoE(3, 2, selection="slope_only", random_state=0)],
                         expected_failed_checks=None)
def test_sklearn_estimator_checks(estimator, check):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="n_samples=.* is smaller than the .* free parameters")
        check(estimator)


@pytest.mark.parametrize("selection", ["full_logits", "slope_only"])
@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_likelihood_equals_the_per_sample_reference(selection, top_k):
    X, y, _ = simulate(60, seed=1)
    rng = np.random.RandomState(2)
    p = {key: np.asarray(v) + 0.3 * rng.standard_normal(np.shape(v)) for key, v in TRUTH.items()}
    p["var"] = np.abs(p["var"]) + 0.05
    Xa = np.hstack([X, np.ones((len(X), 1))])
    _, got = log_likelihood_terms(Xa, y, _params(p), top_k, selection)
    expected = gaussian_moe_loglik_reference(X, y, p["gate_coef"].tolist(), p["gate_intercept"].tolist(),
                                             p["coef"].tolist(), p["intercept"].tolist(), p["var"].tolist(), top_k,
                                             selection)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


@pytest.fixture(scope="module")
def fitted():
    X, y, expert = simulate(4000, seed=0)
    return TopKGaussianMoE(3, 2, random_state=0).fit(X, y), X, y, expert


def test_recovers_a_known_model(fitted):
    model, X, y, expert = fitted
    truth = TopKGaussianMoE(3, 2, init="given", init_params=TRUTH)
    truth._params, truth.n_features_in_ = _params(TRUTH), 1
    # the MLE is at least as likely as the truth
    assert model.lower_bound_ >= truth.conditional_log_likelihood(X, y).mean()
    assert model.converged_
    # routing: the most responsible expert of each sample, fitted vs true
    def routing(m):
        Xa = np.hstack([X, np.ones((len(X), 1))])
        return log_likelihood_terms(Xa, y, m.params(), 2, "full_logits")[0].argmax(1)

    assert adjusted_rand_score(routing(truth), routing(model)) > 0.9
    errors = per_parameter_errors(model, TRUTH)
    assert [e["cell_size"] for e in errors] == [1, 1, 1]
    for e in errors:
        assert e["coef"] < 0.15 and e["intercept"] < 0.1 and e["var"] < 0.03 and e["gate_coef"] < 1.5, e
    assert voronoi_loss(model, TRUTH) < 2.0


def test_ecm_never_lowers_the_likelihood(fitted):
    curve = fitted[0].loglik_curve_
    assert len(curve) == fitted[0].n_iter_ + 1
    assert (np.diff(curve) >= -1e-12).all(), np.diff(curve).min()


def test_search_moves_routing_boundaries():
    """From a start whose boundaries are shifted, ECM with the routing search reaches the truth's likelihood."""
    X, y, _ = simulate(3000, seed=4)
    start = {**TRUTH, "gate_intercept": [1.5, -0.5, 0.0]}
    truth_ll = log_likelihood_terms(np.hstack([X, np.ones((len(X), 1))]), y, _params(TRUTH), 2, "full_logits")[1].mean()
    model = TopKGaussianMoE(3, 2, init="given", init_params=start, random_state=0).fit(X, y)
    assert model.lower_bound_ >= truth_ll


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_gate_weights_have_exactly_k_nonzeros_summing_to_one(fitted, top_k):
    _, X, y, _ = fitted
    model = TopKGaussianMoE(3, top_k, max_iter=5, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(X[:500], y[:500])
    w = model.gate_weights(np.vstack([X[:200], np.zeros((3, 1))]))  # includes a point where logits can tie
    assert ((w > 0).sum(1) == top_k).all()
    np.testing.assert_allclose(w.sum(1), 1.0, rtol=1e-12)


def test_predict_sample_bic_aic(fitted):
    model, X, y, _ = fitted
    x = np.full((20000, 1), 0.3)
    draws = model.sample(x, random_state=0)
    w = model.gate_weights(x[:1])[0]
    means = model.coef_[:, 0] * 0.3 + model.intercept_
    mean = (w * means).sum()
    var = (w * (model.var_ + means**2)).sum() - mean**2
    assert model.predict(x[:1])[0] == pytest.approx(mean, rel=1e-12)
    assert draws.mean() == pytest.approx(mean, abs=4 * np.sqrt(var / len(draws)))
    assert draws.var() == pytest.approx(var, rel=0.05)
    ll = model.conditional_log_likelihood(X, y).sum()
    p = 2 * 2 + 3 * 3
    assert model.bic(X, y) == pytest.approx(-2 * ll + p * np.log(len(X)))
    assert model.aic(X, y) == pytest.approx(-2 * ll + 2 * p)
    assert model.score(X, y) == pytest.approx(r2_score(y, model.predict(X)), rel=1e-12)  # the regressor convention
    assert model.score(X, y) > 0.4


def test_gate_is_anchored_and_translation_free(fitted):
    model = fitted[0]
    assert np.all(model.gate_coef_[-1] == 0) and model.gate_intercept_[-1] == 0


def test_top_k_1_refuses_gate_estimates():
    X, y, _ = simulate(400, seed=3)
    model = TopKGaussianMoE(3, 1, max_iter=20, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(X, y)
    with pytest.raises(AttributeError, match="not identifiable with top_k=1"):
        model.gate_coef_  # noqa: B018
    assert model.routing_coef_.shape == (3, 2)
    assert ((model.gate_weights(X) == 1).sum(1) == 1).all()
    with pytest.raises(ValueError, match="top_k=1 has no identifiable gate"):
        voronoi_loss(model, TRUTH)


def test_warm_start_continues_from_the_previous_fit(fitted):
    model, X, y, _ = fitted
    again = TopKGaussianMoE(3, 2, warm_start=True, random_state=1)
    again._params, again.n_features_in_ = model.params(), 1
    again.fit(X, y)
    assert again.n_iter_ <= 3 and again.lower_bound_ >= model.lower_bound_ - 1e-9


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [({"top_k": 0}, "top_k=0"), ({"n_experts": 2, "top_k": 3}, "top_k=3"), ({"var_floor": 0.0}, "var_floor=0.0"),
     ({"tol": -1.0}, "tol=-1.0"), ({"selection": "slopes"}, "selection='slopes'"), ({"init": "given"}, "init_params"),
     ({"init": "given", "init_params": {"var": [1, 1]}}, "init_params lacks"), ({"n_experts": 50}, "n_experts=50")],
    ids=["top-k-0", "top-k-above-k", "var-floor", "tol", "selection", "given-without-params", "given-incomplete",
         "more-experts-than-samples"],
)
def test_bad_settings_name_the_parameter(kwargs, fragment):
    X, y, _ = simulate(30)
    with pytest.raises(ValueError, match=fragment.replace("[", r"\[").replace("(", r"\(")):
        TopKGaussianMoE(**kwargs).fit(X, y)


def test_bad_data(fitted):
    model, X, y, _ = fitted
    with pytest.raises(ValueError, match="NaN"):
        TopKGaussianMoE().fit(np.where(np.arange(len(X))[:, None] == 3, np.nan, X), y)
    with pytest.raises(ValueError, match="infinity"):
        TopKGaussianMoE().fit(X, np.where(np.arange(len(y)) == 3, np.inf, y))
    with pytest.raises(ValueError, match="X has 2 features, but TopKGaussianMoE is expecting 1"):
        model.predict(np.ones((3, 2)))
    with pytest.raises(NotFittedError):
        TopKGaussianMoE().predict(X)
    with pytest.warns(UserWarning, match="free parameters"):
        TopKGaussianMoE(2, 2, random_state=0).fit(X[:6], y[:6])

