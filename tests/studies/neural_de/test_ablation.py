"""The ablation between the paper's local regulariser and local_taken: each contrast's arms differ in the one
change it names, and the paired intervals are computed from the rows they name."""

from __future__ import annotations

from dataclasses import fields

import numpy as np
import pytest

from leanfit.core.stats import paired_bootstrap_ci
from leanfit.neural_de.models import REGULARIZER_PRESETS
from leanfit.studies.neural_de.ablation import ABLATION_METHODS, CONTRASTS, contrasts

ABLATION_FIELDS = {"first_stage": "a", "step": "b", "points": "c", "from_step_start": "d"}


@pytest.mark.parametrize(("what", "arm", "ref"), [pytest.param(*c, id=c[1] + "-vs-" + c[2])
                                                  for c in CONTRASTS if not c[0].startswith("(a-d)")])
def test_each_ablation_pair_changes_the_one_thing_it_names(what: str, arm: str, ref: str) -> None:
    """The spec fields that differ between a contrast's arms are exactly its lettered change (the taken step always
    starts at the step start, so from_step_start is implied there, not a second change)."""
    a, b = REGULARIZER_PRESETS[arm], REGULARIZER_PRESETS[ref]
    differ = {f.name for f in fields(a) if getattr(a, f.name) != getattr(b, f.name)}
    if "taken" in (a.step, b.step) and a.step != b.step:
        differ.discard("from_step_start")
    assert {ABLATION_FIELDS[n] for n in differ} == {what[1]}, differ



def test_every_contrast_arm_is_in_the_ablation_preset() -> None:
    assert {m for c in CONTRASTS for m in c[1:]} <= set(ABLATION_METHODS)


def _row(method: str, seed: int, correct: list[int], nfes: list[int], lam: float = 1.0) -> dict:
    return {"family": "ode", "method": method, "seed": seed, "lambda": lam, "test_correct": correct,
            "test_nfe_batches": nfes}


def test_contrasts_are_paired_by_seed_and_item() -> None:
    rng = np.random.default_rng(0)
    base = [rng.integers(0, 2, 50).tolist() for _ in range(3)]
    arm = [[1 - c if i < 5 else c for i, c in enumerate(b)] for b in base]  # 5 items flipped per seed
    rows = [_row("vanilla", s, base[s], [50, 44], 0.0) for s in range(3)]
    rows += [_row("local_taken", s, arm[s], [25, 22]) for s in range(3)]
    rows += [_row("local_taken_batch", s, base[s], [50, 44]) for s in range(3)]
    found = {(c["arm"], c["reference"]): c for c in contrasts(rows)}
    assert set(found) == {("local_taken", "vanilla"), ("local_taken_batch", "vanilla"),
                          ("local_taken", "local_taken_batch")}
    c = found[("local_taken", "vanilla")]
    want = paired_bootstrap_ci(np.array(arm), np.array(base), n_boot=2000)
    assert c["accuracy_diff_points"] == pytest.approx(100 * (np.mean(arm) - np.mean(base)), abs=1e-12)
    assert (c["accuracy_ci_low"], c["accuracy_ci_high"]) == pytest.approx((100 * want.low, 100 * want.high))
    assert c["nfe_change"] == pytest.approx(-0.5) and c["nfe_ci_low"] == pytest.approx(-0.5)
    same = found[("local_taken_batch", "vanilla")]
    assert (same["accuracy_diff_points"], same["accuracy_ci_low"], same["accuracy_ci_high"]) == (0.0, 0.0, 0.0)
    assert same["seeds"] == 3 and same["reference_lambda"] == 0.0
