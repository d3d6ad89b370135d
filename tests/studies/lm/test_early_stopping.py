"""train_lm's ``patience``: it stops after that many evaluations without a better validation loss, returns the
best step's weights, and a run killed after a checkpoint resumes to the same stop and weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from leanfit.core.runs import RunDir
from leanfit.studies.lm.train import TrainConfig, train_lm

# the validation loss scripted per training step reached: best at step 10, worse from step 15 on
VAL = {5: 3.0, 10: 2.0, 15: 2.5, 20: 2.2, 25: 2.1, 30: 1.0}


class _Scripted:
    """A loss whose training part moves a weight every step and whose validation value is VAL[step]."""

    def __init__(self, step: int = 0, fail_at: int | None = None) -> None:
        self.step, self.fail_at, self.weights = step, fail_at, {}

    def __call__(self, model, inputs, targets):
        if model.training:
            self.step += 1
            if self.step == self.fail_at:
                raise KeyboardInterrupt("killed")
            return ((model.weight - 10.0) ** 2).sum()
        self.weights[self.step] = model.weight.detach().clone()
        return model.weight.sum() * 0 + VAL[self.step]


def _train(tmp_path, loss, *, resume=False, patience=2):
    cfg = TrainConfig(steps=30, batch_size=2, seq_len=4, eval_every=5, eval_tokens=8, checkpoint_every=5,
                      warmup_steps=0, lr=0.1, patience=patience, log_every=5)
    torch.manual_seed(0)
    model = nn.Linear(1, 1, bias=False)
    tokens = torch.arange(64) % 7
    run = RunDir(tmp_path)
    tmp_path.mkdir(parents=True, exist_ok=True)
    return train_lm(model, tokens, tokens, cfg, run=run, seed=0, resume=resume, loss_fn=loss, description="t")


def test_stops_after_patience_and_returns_the_best_weights(tmp_path):
    loss = _Scripted()
    model, result = _train(tmp_path / "a", loss)
    assert (result.step, result.best_step, result.stopped_early, result.val_loss) == (20, 10, True, 2.0)
    assert torch.equal(model.weight, loss.weights[10]) and not torch.equal(loss.weights[10], loss.weights[20])
    _, full = _train(tmp_path / "b", _Scripted(), patience=0)
    assert (full.step, full.best_step, full.stopped_early, full.val_loss) == (30, 30, False, 1.0)


def test_a_killed_run_resumes_to_the_same_stop_and_weights(tmp_path):
    ref_model, ref = _train(tmp_path / "ref", _Scripted())
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path / "run", _Scripted(fail_at=18))  # after the step-15 checkpoint, best (step 10) on disk
    model, result = _train(tmp_path / "run", _Scripted(step=15), resume=True)
    assert result.resumed_from == 15
    assert (result.step, result.best_step, result.val_loss) == (ref.step, ref.best_step, ref.val_loss)
    assert torch.equal(model.weight, ref_model.weight)
