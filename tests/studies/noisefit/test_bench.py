"""``leanfit bench noisefit`` at toy sizes: every arm is measured, the timed step of each arm computes the loss of
the library function it claims to time with the forwards it claims to make, memory accounting sees the packed
branches, and bad settings are one-line errors. Timings are not asserted."""

from __future__ import annotations

import math

import pytest
import torch

from leanfit.cli import main
from leanfit.core.errors import ConfigError
from leanfit.core.io import read_csv, read_json
from leanfit.core.runner import run_benchmark
from leanfit.noisefit.injector import NoiseInjector, find_decoder_layers, unwrap_model
from leanfit.noisefit.loss import noisefit_loss, rdrop_loss
from leanfit.studies.noisefit.bench import (
    ARMS,
    NoiseFiTBenchConfig,
    _step,
    arm_step,
    build_model,
    count_forwards,
    make_batch,
    measure_peak,
    spread_layers,
)

TINY = ["models=[tiny]", "vocab_size=64", "d_model=16", "n_layers=3", "n_heads=2", "batch_size=4", "seq_len=8",
        "warmup=0", "repeats=2", "min_seconds=0", "isolate=false"]
B = 4
# (forward passes, rows through the model per step / B) of every arm
PASSES = {"sft": (1, 1), "label_smoothing": (1, 1), "neftune": (1, 1), "rdrop": (1, 2), "noisefit_paper": (3, 3),
          "noisefit": (1, 2), "noisefit_n2": (1, 3)}


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory):
    threads = torch.get_num_threads()
    path = run_benchmark("noisefit", out=tmp_path_factory.mktemp("noisefit-bench"), overrides=TINY)
    assert torch.get_num_threads() == threads  # the bench restores the thread count it changed
    return path


def _setup(**overrides):
    cfg = NoiseFiTBenchConfig(**{"models": ["tiny"], "vocab_size": 64, "d_model": 16, "n_layers": 3, "n_heads": 2,
                                 "batch_size": B, "seq_len": 8, **overrides})
    model, batch = build_model("tiny", cfg, seed=0)
    return cfg, model, batch


# --- end to end -------------------------------------------------------------------------------------------------
def test_every_arm_is_measured_and_files_are_written(bench_dir):
    rows = read_csv(bench_dir / "results.csv")
    assert [r["arm"] for r in rows] == list(ARMS) and {r["model"] for r in rows} == {"tiny"}
    assert all(float(r["step_ms"]) > 0 and r["timed_steps"] == "2" and float(r["peak_mb"]) >= 0 for r in rows)
    assert all((r["batch"], r["seq"], r["device"]) == ("4", "8", "cpu") for r in rows)
    for name in ("results.json", "env.json", "config.yaml", "report.md", "plots/step_ratio.png"):
        assert (bench_dir / name).is_file(), name
    assert "## Arms" in (bench_dir / "report.md").read_text()


@pytest.mark.parametrize("arm", ARMS)
def test_counted_forward_passes(bench_dir, arm):
    row = next(r for r in read_csv(bench_dir / "results.csv") if r["arm"] == arm)
    assert (int(row["forward_passes"]), float(row["batch_multiple"])) == PASSES[arm]


def test_ratios_and_headline_come_from_the_same_run(bench_dir):
    results = read_json(bench_dir / "results.json")
    by = {r["arm"]: r for r in results["rows"]}
    for r in results["rows"]:
        assert r["ratio_vs_sft"] == pytest.approx(r["step_ms"] / by["sft"]["step_ms"])
    assert by["sft"]["ratio_vs_sft"] == 1.0
    nf, v1 = by["noisefit"]["ratio_vs_sft"], by["noisefit_paper"]["ratio_vs_sft"]
    assert f"leanfit NoiseFiT step = {nf:.2f}x SFT (target <= 2x); reference v1 = {v1:.2f}x" in results["headline"]
    # losses at the initial weights: the clean-branch CE of the NoiseFiT arms is the SFT loss, so with alpha = 0.5
    # and a small soft term the NoiseFiT losses sit near half of it
    assert 0.4 * by["sft"]["loss"] < by["noisefit"]["loss"] < 0.6 * by["sft"]["loss"]


# --- the timed steps compute what they claim -------------------------------------------------------------------
def _naive_ce(logits, labels, smoothing=0.0):
    """float64 next-token CE over labelled positions, with label smoothing as the Trainer's LabelSmoother has it."""
    logp = logits[:, :-1].double().log_softmax(-1)
    target = labels[:, 1:]
    keep = target != -100
    nll = -logp[keep].gather(-1, target[keep][:, None]).squeeze(-1)
    uniform = -logp[keep].mean(-1)
    return ((1 - smoothing) * nll + smoothing * uniform).mean()


def _arm_loss(arm, seed=0):
    arm.attach()
    try:
        torch.manual_seed(seed)
        return arm.loss()
    finally:
        arm.detach()


@pytest.mark.parametrize("name", ["sft", "label_smoothing"])
def test_plain_arms_equal_naive_cross_entropy(name):
    cfg, model, batch = _setup(label_smoothing=0.2)
    got = _arm_loss(arm_step(name, model, batch, cfg))
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = _naive_ce(logits, batch["labels"], 0.2 if name == "label_smoothing" else 0.0)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


def test_neftune_arm_equals_an_independent_neftune_hook():
    cfg, model, batch = _setup(neftune_alpha=5.0)
    got = _arm_loss(arm_step("neftune", model, batch, cfg))
    emb = unwrap_model(model).get_input_embeddings()
    assert not emb._forward_hooks  # detached

    def hook(module, args, out):  # NEFTune: uniform noise of half-width alpha / sqrt(T * d)
        bound = 5.0 / math.sqrt(out.shape[1] * out.shape[2])
        return out + torch.empty_like(out).uniform_(-bound, bound)

    handle = emb.register_forward_hook(hook)
    torch.manual_seed(0)
    expected = model(**batch).loss
    handle.remove()
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    assert got.item() != pytest.approx(model(**batch).loss.item(), rel=1e-6)  # the noise was there


def test_rdrop_arm_is_rdrop_loss_with_attention_dropout_for_its_steps_only():
    cfg, model, batch = _setup(rdrop_dropout=0.1, rdrop_alpha=1.0)
    arm = arm_step("rdrop", model, batch, cfg)
    attention = [m for m in model.modules() if hasattr(m, "attention_dropout")]
    assert len(attention) == 3
    arm.attach()
    assert [m.attention_dropout for m in attention] == [0.1] * 3
    arm.detach()
    assert [m.attention_dropout for m in attention] == [0.0] * 3
    got = _arm_loss(arm)
    for m in attention:
        m.attention_dropout = 0.1
    torch.manual_seed(0)
    expected = rdrop_loss(model, batch, 1.0)
    for m in attention:
        m.attention_dropout = 0.0
    assert torch.equal(got, expected.loss)
    assert expected.kl.item() > 0  # dropout made the two branches differ


@pytest.mark.parametrize(("name", "expected"), [
    ("noisefit_paper", (True, 2, 0.1, [0, 1, 2])),  # paper_layers=3 of 3 blocks
    ("noisefit", (False, 1, 0.0, [0, 2])),  # ceil(sqrt(3)) = 2 blocks, spread
    ("noisefit_n2", (False, 2, 0.05, [0, 2])),
])
def test_noisefit_arms_equal_noisefit_loss(name, expected):
    cfg, model, batch = _setup()
    arm = arm_step(name, model, batch, cfg)
    nf = arm.noisefit_config
    assert (nf.paper_v1, nf.n_noisy, nf.lam, nf.layers) == expected
    got = _arm_loss(arm)
    assert all(not b._forward_hooks for b in find_decoder_layers(model))  # the injector is gone after the step
    with NoiseInjector(model, nf) as injector:
        expected = noisefit_loss(model, batch, injector, nf).loss
    assert torch.equal(got, expected)


@pytest.mark.parametrize("name", ARMS)
def test_forwards_counted_at_the_embeddings(name):
    cfg, model, batch = _setup()
    arm = arm_step(name, model, batch, cfg)
    arm.attach()
    rows, _ = count_forwards(model, arm.loss)
    arm.detach()
    passes, multiple = PASSES[name]
    assert rows == [B * multiple // passes] * passes  # the paper arm: 3 x B; the packed arms: one forward of kB


def test_step_updates_the_weights_and_leaves_no_hooks():
    cfg, model, batch = _setup()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for name in ARMS:
        arm = arm_step(name, model, batch, cfg)
        arm.attach()
        assert math.isfinite(_step(arm, optimizer).item())
        arm.detach()
    assert all(not m._forward_hooks for m in model.modules())
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert len(changed) == len(before)


# --- pieces ----------------------------------------------------------------------------------------------------
def test_make_batch_shapes_padding_and_completion():
    batch = make_batch(100, 16, 20, 0.25, seed=3, pad_id=1)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape == mask.shape == labels.shape == (16, 20)
    lengths = mask.sum(1)
    assert lengths[0] == 20 and bool((lengths >= 15).all())
    for j in range(16):
        n = int(lengths[j])
        assert bool((mask[j, :n] == 1).all()) and bool((ids[j, n:] == 1).all())  # right padding
        assert bool((ids[j, :n] >= 2).all())
        labelled = (labels[j] != -100).nonzero().squeeze(-1).tolist()
        assert labelled == list(range(n - round(0.25 * n), n))  # the last quarter of the row's tokens
        assert torch.equal(labels[j, labelled], ids[j, labelled])
    assert torch.equal(make_batch(100, 16, 20, 0.25, seed=3)["input_ids"], ids)


@pytest.mark.parametrize(("k", "n", "expected"), [(1, 4, [2]), (2, 4, [0, 3]), (3, 3, [0, 1, 2]),
                                                  (6, 30, [0, 6, 12, 17, 23, 29]), (3, 30, [0, 14, 29])],
                         ids=["one", "two-of-4", "all", "auto-of-30", "paper-of-30"])
def test_spread_layers(k, n, expected):
    assert spread_layers(k, n) == expected


def test_too_many_noisy_layers_is_a_config_error():
    with pytest.raises(ConfigError, match="paper_layers"):
        spread_layers(5, 4)


def test_peak_memory_sees_the_packed_branches():
    """Memory accounting is real: with a large vocabulary the logits dominate, and three packed branches hold about
    three times the logits (and their float32 softmax copies) of one."""
    pytest.importorskip("resource")
    cfg = NoiseFiTBenchConfig(models=["tiny"], vocab_size=16384, d_model=16, n_layers=2, n_heads=2, batch_size=16,
                              seq_len=64, warmup=1)
    logits_mb = 16 * 64 * 16384 * 4 / 2**20  # one branch: 64 MiB
    sft = measure_peak("tiny", "sft", cfg, seed=0)
    n2 = measure_peak("tiny", "noisefit_n2", cfg, seed=0)
    assert sft > logits_mb
    assert n2 > 2.0 * sft, (sft, n2)


@pytest.mark.parametrize(("override", "fragment"), [
    ("models=[gpt2]", "models=['gpt2']"),
    ("arms=[noisefit]", "including 'sft'"),
    ("completion_fraction=0", "completion_fraction=0"),
    ("device=tpu", "device='tpu'"),
    ("d_model=30", "multiple of n_heads"),
], ids=["model", "no-sft", "completion", "device", "heads"])
def test_bad_settings_are_one_line_errors(capsys, tmp_path, override, fragment):
    with pytest.raises(SystemExit) as exit_info:
        raise SystemExit(main(["bench", "noisefit", override, "--out", str(tmp_path)]))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and fragment in err, err
    assert not (tmp_path / "noisefit").exists()
