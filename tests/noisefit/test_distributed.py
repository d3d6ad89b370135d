"""NoiseFiT under ``torchrun --nproc_per_node 2`` (gloo, CPU): calibration agrees across processes and equals one
process on the union of the shards, the processes draw different noise, and the Trainer logs the terms of the
whole data-parallel batch. The processes run ``_dist_calibrate.py``; the references are computed here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from leanfit.noisefit.calibration import calibrate
from tests.noisefit import _dist_calibrate as script

SCRIPT = Path(script.__file__)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("dist-noisefit")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LEANFIT_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT),
           str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.integration
@pytest.mark.parametrize("setting", list(script.SETTINGS), ids=list(script.SETTINGS))
def test_processes_calibrate_like_one_process_on_the_union(ranks, setting):
    net, data = script.model(), script.all_batches(2)
    alone = [calibrate(net, data[r * script.PER_PROCESS:(r + 1) * script.PER_PROCESS],
                       script.config(setting, script.PER_PROCESS)) for r in range(2)]
    assert alone[0].layers != alone[1].layers  # the shards disagree on their own: the data exercise the reduction
    union = calibrate(net, data, script.config(setting, len(data)))
    for record in ranks:
        assert record["world_size"] == 2
        got = record[setting]
        assert got["layers"] == union.layers, (record["rank"], got["layers"], union.layers)
        assert {int(k): v for k, v in got["scales"].items()} == pytest.approx(union.scales, rel=1e-6)
        assert got["scores"] == pytest.approx(union.scores, rel=1e-6)


@pytest.mark.integration
def test_processes_draw_different_noise_and_rank_0_draws_the_single_process_noise(ranks):
    net, data = script.model(), script.all_batches(2)
    single = script.noise_sample(net, data[0])
    assert ranks[0]["noise"] == pytest.approx(single, rel=1e-5, abs=1e-8)
    differences = [abs(a - b) for a, b in zip(ranks[0]["noise"], ranks[1]["noise"], strict=True)]
    assert min(differences) > 0 and max(differences) > 0.1 * max(abs(v) for v in single)


@pytest.mark.integration
def test_rejected_batches_on_one_process_raise_on_every_process(ranks):
    assert "batches='an empty list'" in ranks[1]["rejected"]
    assert "batches='rejected on process(es) [1]'" in ranks[0]["rejected"]


@pytest.mark.integration
def test_logged_terms_are_those_of_the_whole_data_parallel_batch(tmp_path, ranks):
    """2 processes x 2 accumulated micro-batches of 2 = the batch of 8 of one process: same CE (the clean branch
    sees no noise), and on every process the logged loss is the weighted sum of the logged (averaged) terms."""
    single = script.first_log(tmp_path, per_device=8, accumulation=1)
    cfg = script.TRAIN_CONFIG
    for record in ranks:
        log = record["log"]
        assert log["noisefit/ce"] == pytest.approx(single["noisefit/ce"], rel=1e-5)
        assert log["noisefit/soft"] > 1e-3 and log["noisefit/consistency"] > 1e-3
        combined = cfg.alpha * log["noisefit/ce"] + (1 - cfg.alpha) * log["noisefit/soft"] + \
            cfg.lam * log["noisefit/consistency"]
        assert log["loss"] == pytest.approx(combined, rel=1e-5)
