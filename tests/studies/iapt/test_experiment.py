"""The iapt experiment at toy sizes through the runner: every method and ablation is trained and scored, the
reported trainable counts equal those of the built models and the closed forms, budgets are matched to the
closest size, every method of a seed starts from the same head, a resumed run retrains only what is missing (to
the same numbers), the decoder study runs on a tiny local LM, ROUGE-L matches hand-computed values, and bad
settings are refused; parallel jobs train the same models, and clipping bounds the step."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from leanfit.core.errors import ConfigError
from leanfit.core.io import read_json, read_jsonl
from leanfit.core.runner import run_experiment
from leanfit.iapt.config import IAPTConfig
from leanfit.iapt.generator import iapt_parameter_count

D, L, C = 384, 6, 5  # MiniLM-L6 width and depth, BBC News classes
TINY = ["steps=2", "batch_size=4", "max_length=16", "max_train=32", "max_valid=16", "max_test=24", "seeds=[0,1]",
        "methods=[iapt,lora,prefix,prefix-proj,prompt]", "ablations=[pool-last,tokens-1]", "lrs.iapt=[0.01,0.001]",
        "prompt_tokens=4", "eval_batch=16", "threads=1"]
METHODS = ["iapt", "lora", "prefix", "prefix-proj", "prompt"]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("iapt")
    path, results = run_experiment("iapt", out=out, overrides=TINY)
    return out, path, results


@pytest.fixture(scope="module")
def task():
    from leanfit.core.config import merge_nested, parse_overrides
    from leanfit.studies.iapt.config import IAPTExperimentConfig
    from leanfit.studies.iapt.experiment import PRESETS
    from leanfit.studies.iapt.task import prepare_task

    cfg = IAPTExperimentConfig.from_dict(merge_nested(PRESETS["quick"], parse_overrides(TINY)))
    return prepare_task(cfg, "bbc-news")


def _closed_form(method: str, size: dict[str, int]) -> int:
    """Adapter parameters of each method on MiniLM-L6 from its size, written out by hand."""
    if method == "iapt":
        cfg = IAPTConfig(bottleneck=size["bottleneck"], num_soft_tokens=size["soft_tokens"])
        return iapt_parameter_count(D, L, cfg)
    if method == "lora":  # A (r x d) and B (d x r) on query and value of every layer
        return L * 2 * (size["r"] * D + D * size["r"])
    if method == "prefix":  # a key and a value vector per layer and token
        return size["tokens"] * 2 * L * D
    if method == "prefix-proj":  # embedding, d -> h (+bias), h -> 2 L d (+bias)
        h = size["hidden"]
        return size["tokens"] * D + (D * h + h) + (h * 2 * L * D + 2 * L * D)
    return size["tokens"] * D  # prompt tuning


def test_every_method_and_ablation_is_trained_scored_and_reported(study):
    _, path, results = study
    got = sorted((r["method"], r["setting"], r["seed"]) for r in results["rows"])
    want = sorted([(m, "main", s) for m in METHODS for s in (0, 1)]
                  + [("iapt", a, s) for a in ("pool-last", "tokens-1") for s in (0, 1)])
    assert got == want
    for r in results["rows"]:
        assert 0.0 <= r["test_accuracy"] <= 1.0 and 0.0 <= r["test_macro_f1"] <= 1.0
        assert r["test_examples"] == 24 and r["steps"] == 2 and r["train_seconds"] > 0
    # the grid ran on seed 0 only; the chosen rate is the best validation accuracy; ablations reuse it
    sweep = [s for s in results["sweeps"] if s["method"] == "iapt"]
    assert sorted(s["lr"] for s in sweep) == [0.001, 0.01] and sum(s["chosen"] for s in sweep) == 1
    chosen = next(s for s in sweep if s["chosen"])
    assert chosen["val_accuracy"] == max(s["val_accuracy"] for s in sweep)
    assert {r["lr"] for r in results["rows"] if r["method"] == "iapt"} == {chosen["lr"]}
    other = 0.01 if chosen["lr"] == 0.001 else 0.001
    assert not (path / "runs" / f"bbc-news-iapt-main-lr{other:g}-s1").exists()
    assert not (path / "runs" / f"bbc-news-iapt-main-lr{other:g}-s0" / "test.json").exists()  # scored once
    for name in ("accuracy_vs_params", "ablations"):
        assert (path / "plots" / f"{name}.png").is_file()
    text = (path / "report.md").read_text()
    assert "Task: bbc-news" in text and "IAPT ablations" in text and "prefix-proj" in text


def test_summary_is_the_mean_and_sd_over_seeds(study):
    _, _, results = study
    for s in results["summary"]:
        accs = [r["test_accuracy"] for r in results["rows"]
                if (r["method"], r["setting"]) == (s["method"], s["setting"])]
        assert s["test_accuracy_mean"] == pytest.approx(sum(accs) / 2)
        assert s["test_accuracy_sd"] == pytest.approx(abs(accs[0] - accs[1]) / 2**0.5)
    lora = next(t for t in results["targets"] if t["task"] == "bbc-news")["iapt - lora (points)"]
    main = {s["method"]: s for s in results["summary"] if s["setting"] == "main"}
    assert lora == pytest.approx(100 * (main["iapt"]["test_accuracy_mean"] - main["lora"]["test_accuracy_mean"]))


@pytest.mark.parametrize("method", METHODS, ids=METHODS)
def test_reported_counts_equal_the_built_models_and_the_closed_forms(study, task, method):
    from leanfit.studies.iapt.classifiers import build_classifier

    _, _, results = study
    row = next(r for r in results["rows"] if r["method"] == method and r["setting"] == "main" and r["seed"] == 0)
    module = build_classifier(task, method, "main", 0)
    assert row["trainable_params"] == sum(p.numel() for p in module.parameters() if p.requires_grad)
    assert row["head_params"] == D * C + C
    assert row["adapter_params"] == row["trainable_params"] - row["head_params"] == _closed_form(method, row["size"])


def test_budgets_are_matched_to_the_closest_size(study):
    _, _, results = study
    rows = {r["method"]: r for r in results["rows"] if r["setting"] == "main" and r["seed"] == 0}
    budget = rows["iapt"]["adapter_params"]
    assert budget == iapt_parameter_count(D, L, IAPTConfig(bottleneck=32)) == 151_164
    # LoRA: r * 9216 (query + value); prefix: p * 4608; both the nearest multiple of their unit
    assert rows["lora"]["size"] == {"r": 16} and abs(rows["lora"]["adapter_params"] - budget) <= 9216 / 2
    assert rows["prefix"]["size"] == {"tokens": 33} and abs(rows["prefix"]["adapter_params"] - budget) <= 4608 / 2
    proj_unit = D + 1 + 2 * L * D
    assert rows["prefix-proj"]["size"] == {"tokens": 16, "hidden": 28}
    assert abs(rows["prefix-proj"]["adapter_params"] - budget) <= proj_unit / 2
    assert rows["prompt"]["size"] == {"tokens": 4}  # set explicitly in TINY


def test_matched_prompt_length_is_capped_by_the_positions_left(task):
    from leanfit.studies.iapt.task import matched_sizes

    cfg = task.cfg.updated({"prompt_tokens": 0})
    assert matched_sizes(cfg, task.base, 151_164)["prompt"] == {"tokens": round(151_164 / D)}  # 394 < 512 - 16
    assert matched_sizes(cfg.updated({"max_length": 256}), task.base, 151_164)["prompt"] == {"tokens": 256}
    with pytest.raises(ConfigError, match="prompt_tokens"):
        matched_sizes(cfg.updated({"prompt_tokens": 500}), task.base, 151_164)
    with pytest.raises(ConfigError, match="lora_targets"):
        matched_sizes(cfg.updated({"lora_targets": ["q_proj"]}), task.base, 151_164)


def test_every_method_of_a_seed_starts_from_the_same_head(task):
    from leanfit.studies.iapt.classifiers import build_classifier

    def head(method: str, seed: int) -> torch.Tensor:
        module = build_classifier(task, method, "main", seed)
        return next(p for n, p in module.named_parameters() if p.requires_grad and "classifier" in n and
                    n.endswith("weight")).detach()

    first = head("iapt", 0)
    assert first.std().item() == pytest.approx(0.02, rel=0.1)  # BERT's initializer_range
    for method in METHODS[1:]:
        assert torch.equal(head(method, 0), first)
    assert not torch.equal(head("iapt", 1), first)


def test_prefix_classifier_ignores_padding_and_uses_the_prefix(task):
    from leanfit.studies.iapt.classifiers import build_classifier

    module = build_classifier(task, "prefix", "main", 0).eval()
    texts = ["markets fell", "the minister announced a new budget for schools and hospitals today"]
    both = task.tokenizer(texts, padding=True, return_tensors="pt")
    one = task.tokenizer(texts[:1], return_tensors="pt")
    assert both["attention_mask"][0].sum() < both["attention_mask"].shape[1]  # row 0 is padded in the batch
    with torch.no_grad():
        batched, alone = module(**both)[0], module(**one)[0]
        module.peft.prompt_encoder["default"].embedding.weight.mul_(3.0)
        scaled = module(**one)[0]
    assert (batched - alone).abs().max().item() < 1e-5
    assert (scaled - alone).abs().max().item() > 1e-4  # the prefix reaches the logits


def test_resume_reuses_finished_runs_and_retrains_the_missing_one_identically(study, tmp_path):
    _, path, _ = study
    copy = tmp_path / "iapt" / path.name
    shutil.copytree(path, copy)
    (copy / "results.json").unlink()
    victim = copy / "runs" / "bbc-news-lora-main-lr0.003-s1"
    before = {**read_json(victim / "result.json"), **read_json(victim / "test.json")}
    shutil.rmtree(victim)
    kept = copy / "runs" / "bbc-news-prefix-main-lr0.03-s1" / "result.json"
    stamp = kept.stat().st_mtime_ns
    _, results = run_experiment("iapt", out=tmp_path, overrides=TINY, resume=True)
    assert kept.stat().st_mtime_ns == stamp
    after = {**read_json(victim / "result.json"), **read_json(victim / "test.json")}
    for key in ("loss_first", "loss_last", "test_accuracy", "test_macro_f1", "adapter_params"):
        assert after[key] == before[key]
    assert len(results["rows"]) == 14


def test_parallel_jobs_train_the_sequential_models_bit_for_bit(study, tmp_path):
    _, _, sequential = study
    _, parallel = run_experiment("iapt", out=tmp_path, overrides=[*TINY, "jobs=2"])
    keys = ("name", "loss_first", "loss_last", "test_accuracy", "test_macro_f1", "adapter_params")
    assert [[r[k] for k in keys] for r in parallel["rows"]] == [[r[k] for k in keys] for r in sequential["rows"]]
    assert parallel["sweeps"] == sequential["sweeps"]
    assert {r["jobs"] for r in parallel["rows"]} == {2}


def test_train_loop_clips_the_gradient_norm(tmp_path):
    from accelerate import Accelerator

    from leanfit.studies.iapt.train import train_loop

    def run(clip: float) -> torch.Tensor:
        module = torch.nn.Linear(4, 1)
        start = torch.cat([p.detach().flatten() for p in module.parameters()])
        optimizer = torch.optim.SGD(module.parameters(), lr=1.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        batch = torch.full((2, 4), 100.0)
        train_loop(Accelerator(cpu=True), module, optimizer, scheduler, [batch], lambda m, x: m(x).pow(2).mean(),
                    "clip", tmp_path / f"log{clip}.jsonl", clip, show_progress=False)
        return torch.cat([p.detach().flatten() for p in module.parameters()]) - start

    assert run(0.5).norm().item() == pytest.approx(0.5, rel=1e-5)  # SGD at lr 1: the step is the clipped gradient
    assert run(0.0).norm().item() > 10.0


def test_rational_coefficients_get_their_own_scaled_rate(task):
    from leanfit.studies.iapt.classifiers import build_classifier
    from leanfit.studies.iapt.train import make_optimizer

    module = build_classifier(task, "iapt", "main", seed=0)
    optimizer, _ = make_optimizer(module, lr=1e-3, head_lr=5e-3, steps=10, warmup_fraction=0.0, activation_lr_scale=0.1)
    named = {id(p): n for n, p in module.named_parameters()}
    groups = [(g["lr"], sorted({named[id(p)].split(".")[-1] for p in g["params"]})) for g in optimizer.param_groups]
    assert groups[1] == (pytest.approx(1e-4), ["denominator", "numerator"])
    assert groups[2] == (5e-3, ["bias", "weight"])  # the head
    assert "numerator" not in groups[0][1] and groups[0][0] == 1e-3
    n_act = sum(p.numel() for p in optimizer.param_groups[1]["params"])
    assert n_act == L * (task.cfg.iapt.rational_num_degree + 1 + task.cfg.iapt.rational_den_degree)


# --------------------------------------------------------------------------------------------------- decoder
CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> Path:
    """A 2-layer Llama with a 320-token BPE trained on BBC bodies, a chat template and <|im_end|> as end token."""
    from transformers import PreTrainedTokenizerFast

    from leanfit.studies.data.labelled import bbc_news
    from leanfit.studies.data.tokenizer import train_bpe
    from leanfit.studies.models.tiny_llama import tiny_llama

    raw = train_bpe(list(bbc_news().texts[:60]), 320)
    raw.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|pad|>")
    tok.chat_template = CHAT
    folder = tmp_path_factory.mktemp("tiny-lm")
    tiny_llama(len(tok), d_model=32, n_layers=2, n_heads=4, max_seq_len=256, seed=0).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


DECODER = ["tasks=[]", "decoder.enabled=true", "decoder.body_tokens=24", "decoder.target_tokens=6",
           "decoder.train_examples=16", "decoder.test_examples=6", "decoder.steps=2", "decoder.batch_size=4",
           "decoder.generate_batch=4", "decoder.iapt.bottleneck=4", "threads=1"]


def test_decoder_study_on_a_tiny_lm(tiny_lm, tmp_path):
    pytest.importorskip("rouge_score")
    path, results = run_experiment("iapt", out=tmp_path, overrides=[*DECODER, f"decoder.model={tiny_lm}"])
    rows = {r["method"]: r for r in results["decoder"]}
    assert list(rows) == ["zero-shot", "iapt", "iapt-gate", "lora"]
    d, layers = 32, 2
    budget = iapt_parameter_count(d, layers, IAPTConfig(bottleneck=4))
    unit = layers * 2 * (d + d)  # q_proj and v_proj: 32 -> 32 each (tiny_llama has as many KV heads as heads)
    assert rows["iapt"]["adapter_params"] == budget and rows["zero-shot"]["adapter_params"] == 0
    assert rows["iapt-gate"]["adapter_params"] == budget + layers and rows["iapt-gate"]["lr"] == 1e-3  # one gate each
    assert rows["lora"]["lora_r"] == round(budget / unit) and rows["lora"]["adapter_params"] == rows["lora"][
        "lora_r"] * unit
    for method, row in rows.items():
        preds = read_jsonl(path / "runs" / f"decoder-{method}-s0" / "predictions.jsonl")
        assert len(preds) == row["test_examples"] == 6
        assert row["rouge_l"] == pytest.approx(sum(p["rouge_l"] for p in preds) / 6)
        assert row["rouge_l_articles"] == [p["rouge_l"] for p in preds]
        assert 0.0 <= row["rouge_l"] <= 1.0
    assert rows["iapt"]["steps"] == 2 and rows["iapt"]["train_seconds"] > 0 and rows["zero-shot"]["steps"] == 0
    assert "Decoder" in (path / "report.md").read_text() and (path / "plots" / "decoder_rouge_l.png").exists()


@pytest.mark.parametrize(("pred", "ref", "expected"), [
    ("the cat was on the mat", "the cat sat on the mat", 5 / 6),  # LCS "the cat on the mat": P = R = 5/6
    ("two men arrested by police", "Police arrest two men", 2 * 0.4 * 0.5 / 0.9),  # LCS "two men": P 2/5, R 2/4
    ("Cats running", "cat runs", 1.0),  # Porter stemming: cat run / cat run
    ("", "a headline", 0.0),
], ids=["substitution", "reorder-stemmed", "stemming", "empty"])
def test_rouge_l_matches_hand_computed_values(pred, ref, expected):
    pytest.importorskip("rouge_score")
    from leanfit.studies.iapt.decoder import rouge_l

    assert rouge_l([pred], [ref])[0] == pytest.approx(expected)


@pytest.mark.parametrize(("override", "match"), [
    ("methods=[lora,prefix]", "methods"), ("methods=[iapt,dora]", "methods"), ("ablations=[tokens-3]", "ablations"),
    ("tasks=[imdb]", "tasks"), ("tasks=[]", "tasks"), ("seeds=[0,0]", "seeds"), ("steps=0", "steps"),
    ("warmup_fraction=1.0", "warmup_fraction"), ("valid_fraction=0.9", "valid_fraction"), ("lrs.iapt=[]", "lrs.iapt"),
    ("decoder.methods=[iapt,prefix]", "decoder.methods"), ("decoder.steps=0", "decoder.steps"),
    ("lora_r=-1", "lora_r"), ("iapt.bottleneck=0", "bottleneck"), ("jobs=0", "jobs"), ("backend=spark", "backend"),
    ("backend=threading", "backend"), ("device=tpu", "device"), ("max_grad_norm=-1", "max_grad_norm"), ("activation_lr_scale=0", "activation_lr_scale"),
    ("decoder.max_grad_norm=-1", "decoder.max_grad_norm"), ("decoder.gate_init_scale=0", "decoder.gate_init_scale"),
], ids=lambda v: str(v).split("=")[0])
def test_bad_settings_are_refused(override, match, tmp_path):
    extra = ["decoder.enabled=false"] if override == "tasks=[]" else []
    with pytest.raises(ConfigError, match=match):
        run_experiment("iapt", out=tmp_path, overrides=[override, *extra])
