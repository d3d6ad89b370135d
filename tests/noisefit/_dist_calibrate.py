"""NoiseFiT under ``torchrun --nproc_per_node 2`` (gloo, CPU); run by ``test_distributed.py``.

Every process builds the same 6-block model and the same list of batches, calibrates on its own shard (a
contiguous slice, so the union in rank order is the whole list), draws one noise sample from a
:class:`NoiseInjector` built with defaults, calibrates once more with process 1's batches rejected (both must
raise, none hang), and trains one SGD step with the :class:`NoiseFiTTrainer` (2 accumulated micro-batches of 2
per process). It writes ``rank{r}.json`` into the folder given as argument: layers, scales and scores per
calibration setting, the noise sample, the error message and the first training log. The test imports the
builders below to compute the single-process references.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

from leanfit.core.errors import ConfigError
from leanfit.noisefit.calibration import calibrate
from leanfit.noisefit.config import NoiseFiTConfig
from leanfit.noisefit.injector import NoiseInjector, find_decoder_layers
from leanfit.noisefit.trainer import NoiseFiTTrainer
from leanfit.studies.models.tiny_llama import tiny_llama
from leanfit.studies.noisefit.hallucination import batch_to_tensors

VOCAB, N_LAYERS, PER_PROCESS = 64, 6, 2
SETTINGS: dict[str, dict[str, Any]] = {
    "propagated": {"layers": "auto:2", "rel_noise": 0.05},
    "snr": {"layers": "snr_high:2", "rel_noise": 0.05},
}


def model() -> torch.nn.Module:
    return tiny_llama(VOCAB, d_model=32, n_layers=N_LAYERS, n_heads=2, seed=0)


def all_batches(n_processes: int) -> list[dict[str, torch.Tensor]]:
    """``PER_PROCESS`` batches per process; shard r draws its tokens from its own part of the vocabulary and has its
    own lengths, so that the shards disagree when calibrated alone. Right padding, -100 on prompt and padding."""
    out = []
    for b in range(n_processes * PER_PROCESS):
        shard = b // PER_PROCESS
        g = torch.Generator().manual_seed(100 + b)
        rows, seq = 3, 10 + 4 * shard
        low = 2 + shard * (VOCAB - 2) // n_processes
        ids = torch.randint(low, low + (VOCAB - 2) // n_processes, (rows, seq), generator=g)
        attention = torch.ones_like(ids)
        attention[0, seq - 3:] = 0
        ids[attention == 0] = 1
        labels = ids.clone()
        labels[:, :4] = -100
        labels[attention == 0] = -100
        out.append({"input_ids": ids, "attention_mask": attention, "labels": labels})
    return out


def config(setting: str, n_batches: int) -> NoiseFiTConfig:
    return NoiseFiTConfig(**SETTINGS[setting], calib_batches=n_batches)


def noise_sample(net: torch.nn.Module, batch: dict[str, torch.Tensor], layer: int = 1) -> list[float]:
    """The noise a default-built injector adds to block ``layer``'s output on ``batch`` (first 16 values)."""
    seen: list[torch.Tensor] = []
    block = find_decoder_layers(net)[layer]
    net.eval()
    with torch.no_grad():
        clean = block.register_forward_hook(lambda m, a, o: seen.append(o.detach().clone()))
        net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        clean.remove()
        with NoiseInjector(net, NoiseFiTConfig(layers=[layer], rel_noise=0.1)) as injector:
            handle = block.register_forward_hook(lambda m, a, o: seen.append(o.detach().clone()))
            with injector.noisy(force=True):
                net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            handle.remove()
    return (seen[1] - seen[0]).flatten()[:16].tolist()


TRAIN_CONFIG = NoiseFiTConfig(layers="1", rel_noise=1.0, n_noisy=2, alpha=0.5, lam=0.5, calibration="snr")


def features(n: int = 16) -> list[dict[str, list[int]]]:
    """Toy QA examples of uneven completion lengths (the first prompt token determines the completion)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        prompt = torch.randint(4, VOCAB, (4,), generator=g).tolist()
        completion = [4 + prompt[0] % 4, 0] + [5, 0] * (i % 3 == 0)
        out.append({"input_ids": prompt + completion, "labels": [-100] * 4 + completion})
    return out


def first_log(out: Path, per_device: int, accumulation: int) -> dict[str, float]:
    """The Trainer's first training log (one SGD step, logged at once) with :data:`TRAIN_CONFIG`."""
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(out), max_steps=1, per_device_train_batch_size=per_device,
                             gradient_accumulation_steps=accumulation, learning_rate=1e-2, optim="sgd", report_to=[],
                             save_strategy="no", use_cpu=True, disable_tqdm=True, logging_steps=1,
                             remove_unused_columns=False, seed=0)
    trainer = NoiseFiTTrainer(model=model(), args=args, train_dataset=features(), noisefit_config=TRAIN_CONFIG,
                              data_collator=lambda feats: batch_to_tensors(feats, pad_id=1))
    trainer.train()
    return next(h for h in trainer.state.log_history if "loss" in h)


def main(out: Path) -> None:
    torch.distributed.init_process_group("gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    torch.manual_seed(1234 + rank)  # the global stream differs per process, as it may in user code
    net = model()
    shard = all_batches(world)[rank * PER_PROCESS:(rank + 1) * PER_PROCESS]
    record: dict[str, Any] = {"rank": rank, "world_size": world}
    for setting in SETTINGS:
        result = calibrate(net, shard, config(setting, PER_PROCESS))
        record[setting] = {"layers": result.layers, "scales": {str(k): v for k, v in result.scales.items()},
                           "scores": result.scores}
    record["noise"] = noise_sample(net, all_batches(world)[0])
    try:  # process 1's batches are rejected: every process must raise instead of waiting for it
        calibrate(net, shard if rank == 0 else [], config("propagated", PER_PROCESS))
    except ConfigError as err:
        record["rejected"] = str(err)
    record["log"] = first_log(out / "trainer", per_device=2, accumulation=2)
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
