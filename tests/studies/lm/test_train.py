"""The accelerate training loop: determinism, resume after a kill, and 2 processes matching 1."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from leanfit.core.io import read_json, read_jsonl
from leanfit.core.runner import run_experiment

pytestmark = pytest.mark.integration


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(m["step"], m.get("loss", m.get("val_loss"))) for m in read_jsonl(run_dir / "metrics.jsonl")]


def test_same_seed_is_bitwise_reproducible(tmp_path, tiny_overrides):
    args = [*tiny_overrides, "train.steps=20"]
    a, ra = run_experiment("lm-baseline", out=tmp_path / "a", overrides=args, seed=5)
    b, rb = run_experiment("lm-baseline", out=tmp_path / "b", overrides=args, seed=5)
    c, rc = run_experiment("lm-baseline", out=tmp_path / "c", overrides=args, seed=6)
    assert _losses(a) == _losses(b)
    assert ra["val_loss"] == rb["val_loss"] and ra["test_loss"] == rb["test_loss"]
    assert ra["val_loss"] != rc["val_loss"]
    assert math.log(300) - 1.5 < ra["val_loss"] < math.log(300) + 0.5  # starts near uniform, learns a little
    assert (a / "plots" / "loss.png").exists() and "validation perplexity" in (a / "report.md").read_text()


def test_resume_after_kill_reaches_the_same_final_metrics(tmp_path, tiny_overrides):
    args = [*tiny_overrides, "train.steps=300"]
    ref, ref_results = run_experiment("lm-baseline", out=tmp_path / "ref", overrides=args, run_id="r")
    cmd = [sys.executable, "-m", "leanfit", "run", "lm-baseline", "--out", str(tmp_path / "killed"),
           "--run-id", "r", *args]
    run_dir = tmp_path / "killed" / "lm-baseline" / "r"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (run_dir / "checkpoints" / "LATEST").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()
    assert not (run_dir / "results.json").exists(), "the run finished before it could be killed"
    last = max(m["step"] for m in read_jsonl(run_dir / "metrics.jsonl"))
    assert 10 <= last < 300

    resumed = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    results = read_json(run_dir / "results.json")
    assert results["resumed_from"] >= 10
    for key in ("val_loss", "test_loss", "train_loss"):
        assert results[key] == ref_results[key], key
    assert _losses(run_dir) == _losses(ref)


def test_two_processes_match_one(tmp_path, tiny_overrides):
    args = [*tiny_overrides, "train.steps=20", "train.threads=0"]
    _, single = run_experiment("lm-baseline", out=tmp_path / "one", overrides=args)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LEANFIT_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "leanfit", "run", "lm-baseline", "--out", str(tmp_path / "two"), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = (tmp_path / "two" / "lm-baseline").iterdir()
    double = read_json(run_dir / "results.json")
    assert read_json(run_dir / "env.json")["world_size"] == 2
    for key in ("val_loss", "test_loss", "train_loss"):
        assert double[key] == pytest.approx(single[key], rel=1e-5, abs=1e-6), key


@pytest.mark.parametrize("damage", ["flip-weight-byte", "truncate-optimizer", "no-trainer-state", "dangling-latest"])
def test_resume_from_a_damaged_checkpoint_falls_back_and_reaches_the_same_final_metrics(
    tmp_path, tiny_overrides, damage, capsys
):
    """A run interrupted after its step-30 checkpoint, whose newest checkpoint is then damaged, resumes from the
    intact step-20 one (with a one-line notice) and ends exactly where the uninterrupted run ends."""
    args = [*tiny_overrides, "train.steps=40", "train.keep_checkpoints=2"]
    ref, ref_results = run_experiment("lm-baseline", out=tmp_path / "ref", overrides=args, run_id="r")
    run_dir, _ = run_experiment("lm-baseline", out=tmp_path / "d", overrides=args, run_id="r")
    (run_dir / "results.json").unlink()  # as if killed after the last checkpoint
    ckpt = run_dir / "checkpoints"
    assert (ckpt / "LATEST").read_text().strip() == "step-00000030"
    newest = ckpt / "step-00000030"
    if damage == "flip-weight-byte":
        data = bytearray((newest / "model.safetensors").read_bytes())
        data[-5] ^= 0x01
        (newest / "model.safetensors").write_bytes(bytes(data))
    elif damage == "truncate-optimizer":
        (newest / "optimizer.bin").write_bytes((newest / "optimizer.bin").read_bytes()[:100])
    elif damage == "no-trainer-state":
        (newest / "trainer_state.json").unlink()
    else:
        (ckpt / "LATEST").write_text("step-00000099\n")
        import shutil

        shutil.rmtree(newest)
    capsys.readouterr()
    _, results = run_experiment("lm-baseline", out=tmp_path / "d", overrides=args, run_id="r", resume=True)
    err = capsys.readouterr().err
    assert "not usable" in err and "resuming from the intact step-00000020" in err, err
    assert results["resumed_from"] == 20
    for key in ("val_loss", "test_loss", "train_loss"):
        assert results[key] == ref_results[key], key
    assert _losses(run_dir) == _losses(ref)
