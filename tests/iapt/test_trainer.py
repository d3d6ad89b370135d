"""IAPTTrainer and save_pretrained(state_dict=...): transformers.Trainer saves, checkpoints, resumes and reloads the
best model as IAPT adapters only (tiny Llama of tests/iapt/test_model.py, two adapters); a reloaded model's
outputs are bitwise those of the trained one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from leanfit.core.errors import ConfigError
from leanfit.iapt.generator import iapt_parameter_count
from leanfit.iapt.model import CONFIG_NAME, WEIGHTS_NAME, IAPTModel
from leanfit.iapt.trainer import IAPTTrainer
from tests.iapt.test_model import D, L, cfg, llama, prefix_mask, tokens, wrapped

ROWS, T = 8, 9


def dataset() -> list[dict[str, torch.Tensor]]:
    ids, instruction = tokens(ROWS, T), prefix_mask(ROWS, T, 5)
    labels = ids.masked_fill(instruction, -100)
    return [{"input_ids": ids[i], "instruction_mask": instruction[i], "labels": labels[i]} for i in range(ROWS)]


def trainer(model: IAPTModel, out: Path, **kw: Any) -> IAPTTrainer:
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=4, use_cpu=True, report_to=[],
                             disable_tqdm=True, logging_strategy="no", seed=0,
                             **{"learning_rate": 1e-2, "max_steps": 2, "save_strategy": "no", **kw})
    return IAPTTrainer(model=model, args=args, train_dataset=dataset(), eval_dataset=dataset()[:4])


def outputs(model: IAPTModel) -> torch.Tensor:
    ids = tokens(3, T, seed=5)
    with torch.no_grad():
        return model.eval()(ids, instruction_mask=prefix_mask(3, T, 5), adapter_names=["a", "b", "a"]).logits


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[IAPTModel, IAPTTrainer, Path]:
    """Two steps with a checkpoint and an evaluation after each; "best" is the highest eval loss, so
    load_best_model_at_end restores the first checkpoint, not the last."""
    folder = tmp_path_factory.mktemp("iapt-trainer")
    model = wrapped("llama")
    start = model.iapt.state_dict()["a.1.up.weight"].clone()
    run = trainer(model, folder, save_strategy="steps", save_steps=1, eval_strategy="steps", eval_steps=1,
                  load_best_model_at_end=True, metric_for_best_model="loss", greater_is_better=True)
    run.train()
    assert not torch.equal(model.iapt.state_dict()["a.1.up.weight"], start)  # it trained
    return model, run, folder


def test_save_model_writes_only_the_adapters_and_reloads_bitwise(trained: tuple) -> None:
    model, run, folder = trained
    run.save_model(str(folder / "out"))
    files = sorted(str(p.relative_to(folder / "out")) for p in (folder / "out").rglob("*") if p.is_file())
    assert files == [f"{a}/{f}" for a in ("a", "b") for f in (CONFIG_NAME, WEIGHTS_NAME)] + ["training_args.bin"]
    from safetensors.torch import load_file

    saved = load_file(folder / "out" / "a" / WEIGHTS_NAME)
    per_adapter = iapt_parameter_count(D, L, cfg())
    assert sum(t.numel() for t in saved.values()) == per_adapter
    assert sorted(saved) == sorted(f"iapt.{k}" for k in model.iapt["a"].state_dict())
    size = (folder / "out" / "a" / WEIGHTS_NAME).stat().st_size
    backbone = sum(p.numel() * p.element_size() for p in model.base_model.parameters())
    assert size <= 4 * per_adapter + 4096 and size < backbone / 10, (size, backbone)  # measured 6.2 KB vs 125 KB
    loaded = IAPTModel.from_pretrained(llama(0), folder / "out")
    assert torch.equal(outputs(loaded), outputs(model))


def test_checkpoints_hold_the_adapters_and_the_best_one_is_reloaded(trained: tuple) -> None:
    model, run, folder = trained
    assert not (folder / "checkpoint-1" / "model.safetensors").exists()
    assert run.state.best_model_checkpoint == str(folder / "checkpoint-1")
    first, last = (IAPTModel.from_pretrained(llama(0), folder / f"checkpoint-{i}") for i in (1, 2))
    assert torch.equal(outputs(model), outputs(first)) and not torch.equal(outputs(model), outputs(last))


def test_resume_from_checkpoint_restores_the_adapters(trained: tuple, tmp_path: Path) -> None:
    _, _, folder = trained
    fresh = wrapped("llama")
    trainer(fresh, tmp_path).train(resume_from_checkpoint=str(folder / "checkpoint-2"))  # no step left to take
    assert torch.equal(outputs(fresh), outputs(IAPTModel.from_pretrained(llama(0), folder / "checkpoint-2")))


def test_save_pretrained_takes_the_adapters_from_a_given_state_dict(tmp_path: Path) -> None:
    model = wrapped("llama")
    state = {k: v + 1 if k.startswith("iapt.b.") else v for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path, state_dict=state)
    loaded = IAPTModel.from_pretrained(llama(0), tmp_path)
    for key, value in loaded.iapt.state_dict().items():
        assert torch.equal(value, state[f"iapt.{key}"]), key
    with pytest.raises(ConfigError, match=r"state_dict=\".*missing \['iapt.a.0."):
        model.save_pretrained(tmp_path, state_dict=model.base_model.state_dict())
    with pytest.raises(TypeError, match="state_dict=.*got list"):
        model.save_pretrained(tmp_path, state_dict=list(state.items()))


def test_the_trainer_refuses_other_models_and_foreign_checkpoints(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="model='LlamaForCausalLM' is invalid: expected an IAPTModel"):
        trainer(llama(0), tmp_path)
    model = wrapped("llama", adapters=("a",))
    model.save_pretrained(tmp_path / "ckpt")
    two = wrapped("llama")
    with pytest.raises(ConfigError, match=r"a checkpoint of adapters \['a', 'b'\] \(found: \['a'\]\)"):
        trainer(two, tmp_path)._load_from_checkpoint(str(tmp_path / "ckpt"))
    other = wrapped("llama", adapters=("a",), num_soft_tokens=2)
    with pytest.raises(ConfigError, match="another config"):
        trainer(other, tmp_path)._load_from_checkpoint(str(tmp_path / "ckpt"))
