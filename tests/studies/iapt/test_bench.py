"""``leanfit bench iapt-serving`` on a tiny random Llama: every (method, tenants) cell measured with consistent
timings, ratios from the same run, adapter budgets and FLOPs against hand counts, mixed-tenant batches that generate
exactly what each row generates alone (IAPT and PEFT LoRA), and bad settings. Timings are not asserted."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from leanfit.core.errors import ConfigError
from leanfit.core.io import read_csv, read_json
from leanfit.core.runner import run_benchmark
from leanfit.iapt.config import IAPTConfig
from leanfit.iapt.generator import iapt_parameter_count
from leanfit.studies.iapt.bench import (
    DECODE_TARGET,
    TINY_LLAMA,
    IAPTServingBenchConfig,
    build_servers,
    cells,
    make_prompts,
    matched_rank,
    measure_peak_memory,
    tenant_names,
    time_generate,
)

B, T, NEW = 4, 6, 4
TINY = {"model": "tiny-llama", "tenants": [1, 3], "batch": B, "prompt_tokens": T, "new_tokens": NEW, "warmup": 0,
        "repeats": 2, "bottleneck": 8, "iapt_init_scale": 0.5, "lora_init_std": 0.5, "isolate_memory": False}
CELLS = [("bare", 1), ("lora_single", 1), ("lora_mixed", 1), ("iapt", 1), ("lora_mixed", 3), ("iapt", 3)]
D, LAYERS, V = TINY_LLAMA["d_model"], TINY_LLAMA["n_layers"], TINY_LLAMA["vocab_size"]
FFN = 96  # tiny_llama: round(8/3 * 32 / 32) * 32
LORA_PER_RANK = LAYERS * (4 * (D + D) + 2 * (D + FFN) + (FFN + D))  # q, k, v, o; gate, up; down
LINEAR_WEIGHTS = LAYERS * (4 * D * D + 3 * D * FFN) + V * D  # layers + lm_head


def cfg(**kw: object) -> IAPTServingBenchConfig:
    return IAPTServingBenchConfig(**{**TINY, **kw})


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory):
    threads = torch.get_num_threads()
    path = run_benchmark("iapt-serving", out=tmp_path_factory.mktemp("iapt-serving"), overrides=TINY)
    assert torch.get_num_threads() == threads  # the bench restores the thread count it changed
    return path


@pytest.fixture(scope="module")
def servers():
    return build_servers(cfg(), torch.device("cpu"), torch.float32, seed=0)


# ------------------------------------------------------------------------------------------------ the run
def test_every_cell_measured_with_consistent_timings(bench_dir):
    rows = read_csv(bench_dir / "results.csv")
    assert [(r["method"], int(r["tenants"])) for r in rows] == CELLS == cells(cfg())
    for r in rows:
        prefill, step, mean, total = (float(r[k]) for k in ("prefill_ms", "decode_ms_per_token", "decode_ms_mean",
                                                               "total_ms"))
        assert prefill > 0 and step > 0 and mean > 0 and total > prefill, r
        assert float(r["decode_tokens_per_s"]) == pytest.approx(1e3 * B / step, rel=1e-9)
        assert float(r["tokens_per_s"]) == pytest.approx(1e3 * B * NEW / total, rel=1e-9)
        assert float(r["peak_mb"]) >= 0 and r["timed_rounds"] == "2" and r["batch"] == str(B)
    for name in ("results.json", "env.json", "config.yaml", "report.md", "plots/decode_throughput.png",
                 "plots/step_times.png"):
        assert (bench_dir / name).is_file(), name
    report = (bench_dir / "report.md").read_text()
    assert "IAPT decode tokens/s" in report and "### All cells" in report and "r=1 on q_proj" in report


def test_ratios_summary_and_headline_come_from_the_same_run(bench_dir):
    results = read_json(bench_dir / "results.json")
    by = {(r["method"], r["tenants"]): r for r in results["rows"]}
    bare = by[("bare", 1)]
    for r in results["rows"]:
        assert r["decode_ratio_vs_bare"] == pytest.approx(r["decode_tokens_per_s"] / bare["decode_tokens_per_s"])
        assert r["prefill_ratio_vs_bare"] == pytest.approx(r["prefill_ms"] / bare["prefill_ms"])
    speedups = {}
    for n in (1, 3):
        iapt, lora = by[("iapt", n)], by[("lora_mixed", n)]
        speedups[str(n)] = iapt["decode_tokens_per_s"] / lora["decode_tokens_per_s"]
        assert iapt["decode_speedup_vs_lora_mixed"] == pytest.approx(speedups[str(n)])
    s = results["summary"]
    assert s["iapt_decode_vs_lora_mixed"] == pytest.approx(speedups)
    assert s["target_faster_than_lora_mixed_at_4plus"] is None  # no N >= 4 measured
    worst = min(by[("iapt", n)]["decode_ratio_vs_bare"] for n in (1, 3))
    assert s["target_decode_within_5pct_of_bare"] == (worst >= DECODE_TARGET)
    assert f"{100 * by[('iapt', 3)]['decode_ratio_vs_bare']:.1f}% at N=3" in results["headline"]
    assert f"{speedups['3']:.2f}x at N=3" in results["headline"]
    assert set(results["phase_seconds"]) == {"load", "timing", "checks", "memory"}


def test_mixed_batches_generated_what_each_tenant_generates_alone(bench_dir):
    rows = read_csv(bench_dir / "results.csv")
    for r in rows:
        if r["method"] in ("lora_mixed", "iapt"):
            assert float(r["tokens_match"]) == 1.0, r
        if r["method"] != "bare":
            assert float(r["rows_changed_vs_bare"]) > 0, r  # the adapters change the generation


def test_adapter_budget_and_flops_match_hand_counts(bench_dir):
    results = read_json(bench_dir / "results.json")
    iapt_count = iapt_parameter_count(D, LAYERS, IAPTConfig(bottleneck=8, num_soft_tokens=4))
    assert iapt_count == LAYERS * (2 * D * 8 + D + 8 + 4 * 8 + 2 * 8 + 10) == 1220
    counts = results["counts"]
    assert counts["iapt_params_per_adapter"] == iapt_count
    assert counts["lora_rank"] == 1 and counts["lora_params_per_adapter"] == LORA_PER_RANK == 1280
    context = T + NEW / 2
    assert results["flops"] == {"backbone": 2 * LINEAR_WEIGHTS + 4 * D * context * LAYERS,
                                "lora": 2 * LORA_PER_RANK, "iapt": 4 * 4 * D * LAYERS}
    by = {(r["method"], r["tenants"]): r for r in results["rows"]}
    assert by[("lora_mixed", 3)]["adapter_mb"] == pytest.approx(3 * 1280 * 4 / 2**20)
    assert by[("iapt", 3)]["adapter_mb"] == pytest.approx(3 * 1220 * 4 / 2**20)
    assert by[("lora_single", 1)]["adapter_mb"] == pytest.approx(1280 * 4 / 2**20)
    assert by[("bare", 1)]["adapter_mb"] == 0.0 and by[("iapt", 3)]["adapters"] == 3


# ------------------------------------------------------------------------------------------------ correctness
def _alone(servers, method: str, ids: torch.Tensor, name: str) -> torch.Tensor:
    if method == "iapt":
        return servers.generate("iapt", 1, ids, NEW, adapter_names=[name])
    servers.lora.set_adapter(name)
    try:
        return servers.generate("lora_single", 1, ids, NEW)  # PEFT's single-adapter path
    finally:
        servers.lora.set_adapter("t0")


@pytest.mark.parametrize("method", ["iapt", "lora_mixed"])
@pytest.mark.parametrize("tenants", [2, 3], ids=["N2", "N3"])
def test_mixed_generation_equals_each_row_alone(servers, method: str, tenants: int) -> None:
    ids = make_prompts(B, T, V, 0, seed=1)
    mixed = servers.generate(method, tenants, ids, NEW)
    names = tenant_names(B, tenants)
    alone = torch.cat([_alone(servers, method, ids[i : i + 1], n) for i, n in enumerate(names)])
    assert mixed.shape == (B, T + NEW) and torch.equal(mixed[:, :T], ids)
    assert torch.equal(mixed, alone)
    # the check can fail: serving every row with t0 instead gives other tokens
    all_t0 = servers.generate(method, 1, ids, NEW)
    assert not torch.equal(all_t0, mixed)


def test_time_generate_splits_one_call_into_prefill_and_steps(servers) -> None:
    ids = make_prompts(B, T, V, 0, seed=2)
    times, out = time_generate(servers, "iapt", 3, ids, NEW)
    assert torch.equal(out, servers.generate("iapt", 3, ids, NEW))
    # prefill, then NEW - 1 steps, then the tail: nested intervals of the same call
    assert 0 < times["prefill_ms"] + (NEW - 1) * times["decode_ms_mean"] <= times["total_ms"]
    assert times["decode_ms_per_token"] > 0


@pytest.mark.parametrize("budget, rank", [(1220, 1), (1900, 1), (1960, 2), (10, 1), (12_000, 9)],
                         ids=["iapt-tiny", "below-half", "above-half", "tiny-budget", "large"])
def test_matched_rank_is_the_closest(servers, budget: int, rank: int) -> None:
    assert matched_rank(servers.bare, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                        budget) == (rank, LORA_PER_RANK)


def test_workload_helpers() -> None:
    assert tenant_names(5, 2) == ["t0", "t1", "t0", "t1", "t0"]
    ids = make_prompts(3, 7, 200, 5, seed=4)
    assert ids.shape == (3, 7) and (ids[:, 0] == 5).all() and ids[:, 1:].min() >= 32 and ids.max() < 200
    assert torch.equal(ids, make_prompts(3, 7, 200, 5, seed=4)) and not torch.equal(ids, make_prompts(3, 7, 200, 5, 5))


@pytest.mark.integration
def test_peak_memory_in_a_fresh_process() -> None:
    from leanfit.core.memory import run_in_fresh_process

    peak, source = run_in_fresh_process(measure_peak_memory, cfg(), "lora_mixed", 3, 0, 1)
    assert 0 <= peak < 200 and source == "rss high-water mark"


def test_registration_does_not_import_torch() -> None:
    code = "import sys, leanfit.studies.iapt.bench; print(sorted({'torch', 'transformers', 'peft'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_mixed_generation_equals_rows_alone() -> None:
    cuda = build_servers(cfg(), torch.device("cuda"), torch.float32, seed=0)
    ids = make_prompts(B, T, V, 0, seed=1).cuda()
    for method in ("iapt", "lora_mixed"):
        mixed = cuda.generate(method, 3, ids, NEW)
        alone = torch.cat([_alone(cuda, method, ids[i : i + 1], n) for i, n in enumerate(tenant_names(B, 3))])
        assert torch.equal(mixed, alone), method
    peak, source = measure_peak_memory(cfg(device="cuda"), "iapt", 3, 0)
    assert peak > 0 and source == "cuda max_memory_allocated"


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "overrides, match",
    [
        pytest.param({"tenants": [5]}, r"tenants=\[5\].*raise batch", id="tenants-above-batch"),
        pytest.param({"tenants": []}, r"tenants=\[\]", id="no-tenants"),
        pytest.param({"methods": ["iapt"]}, r"methods=\['iapt'\].*including 'bare'", id="no-bare"),
        pytest.param({"methods": ["bare", "prefix"]}, "methods=.*distinct names", id="unknown-method"),
        pytest.param({"new_tokens": 1}, "new_tokens=1.*>= 2", id="one-token"),
        pytest.param({"model": "/nonexistent/model"}, "model='/nonexistent/model'.*offline", id="missing-model"),
        pytest.param({"iapt_init_scale": 0.0}, "iapt_init_scale=0.0.*no real work", id="zero-iapt"),
        pytest.param({"lora_targets": []}, r"lora_targets=\[\]", id="no-lora-targets"),
    ],
)
def test_bad_config_raises(overrides: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        IAPTServingBenchConfig.from_dict({**TINY, **overrides})


def test_unknown_lora_target_raises_at_build(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"lora_targets=\['qkv'\].*linear modules of the model \(down_proj"):
        run_benchmark("iapt-serving", out=tmp_path, overrides={**TINY, "lora_targets": ["qkv"]})
