"""CheckpointManager: bitwise save/load round trip of model, optimizer, scheduler and RNG, the LATEST pointer,
pruning, the sha256 manifest, and the fallback from a damaged, incomplete or missing newest checkpoint to the
newest intact one (or a refusal when none is intact)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from leanfit.core.checkpoint import CheckpointError, CheckpointManager


class Training:
    """A prepared Linear + AdamW + StepLR on the CPU, stepped on seeded random batches."""

    def __init__(self, seed: int = 0) -> None:
        from accelerate import Accelerator

        self.acc = Accelerator(cpu=True)
        torch.manual_seed(seed)
        model = torch.nn.Linear(4, 3)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
        self.model, self.optimizer, self.scheduler = self.acc.prepare(model, optimizer, scheduler)

    def step(self) -> None:
        loss = self.model(torch.randn(8, 4)).pow(2).mean()
        self.acc.backward(loss)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad()

    def snapshot(self) -> dict[str, torch.Tensor]:
        """Every tensor of the model and optimizer state, plus the learning rate, as flat copies."""
        out = {f"model.{k}": v.detach().clone() for k, v in self.model.state_dict().items()}
        for i, state in self.optimizer.state_dict()["state"].items():
            out.update({f"optim.{i}.{k}": torch.as_tensor(v).clone() for k, v in state.items()})
        out["lr"] = torch.tensor(self.scheduler.get_last_lr(), dtype=torch.float64)
        return out


def assert_bitwise_equal(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(got[key], value), f"{key}: {got[key]} != {value}"


def test_round_trip_is_bitwise_and_restores_the_rng(tmp_path: Path) -> None:
    run = Training()
    for _ in range(3):
        run.step()
    manager = CheckpointManager(tmp_path, run.acc)
    folder = manager.save(3, {"position": 17, "epoch": 1})
    saved, draw_after_save = run.snapshot(), torch.rand(5)
    for _ in range(2):  # move every state away from the checkpoint
        run.step()
    assert not torch.equal(run.snapshot()["model.weight"], saved["model.weight"])
    assert manager.load() == {"step": 3, "position": 17, "epoch": 1}
    assert_bitwise_equal(run.snapshot(), saved)
    assert torch.equal(torch.rand(5), draw_after_save)  # the torch RNG is back where it was at save time
    assert folder == tmp_path / "step-00000003"
    assert json.loads((folder / "trainer_state.json").read_text()) == {"step": 3, "position": 17, "epoch": 1}


def test_resumed_training_equals_uninterrupted_training(tmp_path: Path) -> None:
    straight = Training()
    for _ in range(4):
        straight.step()
    first = Training()
    for _ in range(2):
        first.step()
    CheckpointManager(tmp_path, first.acc).save(2, {})
    resumed = Training(seed=1)  # different initial weights: everything must come from the checkpoint
    assert CheckpointManager(tmp_path, resumed.acc).load() == {"step": 2}
    for _ in range(2):
        resumed.step()
    assert_bitwise_equal(resumed.snapshot(), straight.snapshot())


def test_latest_names_the_newest_and_only_keep_checkpoints_remain(tmp_path: Path) -> None:
    run = Training()
    manager = CheckpointManager(tmp_path, run.acc, keep=2)
    for step in (1, 2, 3):
        run.step()
        manager.save(step, {"position": 10 * step})
    assert (tmp_path / "LATEST").read_text() == "step-00000003\n"
    assert manager.latest() == tmp_path / "step-00000003"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LATEST", "step-00000002", "step-00000003"]  # no .tmp


def test_load_of_an_explicit_older_checkpoint(tmp_path: Path) -> None:
    run = Training()
    manager = CheckpointManager(tmp_path, run.acc, keep=3)
    run.step()
    manager.save(1, {"position": 1})
    at_one = run.snapshot()
    run.step()
    manager.save(2, {"position": 2})
    assert manager.load(tmp_path / "step-00000001") == {"step": 1, "position": 1}
    assert_bitwise_equal(run.snapshot(), at_one)


def test_saving_the_same_step_again_replaces_it(tmp_path: Path) -> None:
    run = Training()
    manager = CheckpointManager(tmp_path, run.acc)
    manager.save(5, {"position": 1})
    run.step()
    manager.save(5, {"position": 2})
    after = run.snapshot()
    run.step()
    assert manager.load() == {"step": 5, "position": 2}
    assert_bitwise_equal(run.snapshot(), after)


def test_no_checkpoint_loads_nothing(tmp_path: Path) -> None:
    run = Training()
    before = run.snapshot()
    manager = CheckpointManager(tmp_path / "empty", run.acc)
    assert manager.latest() is None and manager.load() is None
    assert_bitwise_equal(run.snapshot(), before)


def _flip_byte(path: Path, offset_from_end: int = 3) -> None:
    """Flip one byte near the end of ``path`` (inside tensor data for a safetensors file, not its header)."""
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGES = {
    "flipped-weight-byte": lambda f: _flip_byte(f / "model.safetensors"),
    "flipped-optimizer-byte": lambda f: _flip_byte(f / "optimizer.bin", 40),
    "truncated-weights": lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:-9]),
    "garbage-weights": lambda f: (f / "model.safetensors").write_bytes(b"garbage"),
    "torn-trainer-state": lambda f: (f / "trainer_state.json").write_text("{torn", encoding="utf-8"),
    "no-trainer-state": lambda f: (f / "trainer_state.json").unlink(),
    "no-manifest": lambda f: (f / "manifest.json").unlink(),
    "torn-manifest": lambda f: (f / "manifest.json").write_text("{", encoding="utf-8"),
    "missing-folder": lambda f: shutil.rmtree(f),
}


def test_the_manifest_lists_every_file_with_its_sha256(tmp_path: Path) -> None:
    run = Training()
    folder = CheckpointManager(tmp_path, run.acc).save(1, {"position": 3})
    manifest = json.loads((folder / "manifest.json").read_text())
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert sorted(manifest["files"]) == [f for f in files if f != "manifest.json"]
    assert {"model.safetensors", "optimizer.bin", "trainer_state.json"} <= set(manifest["files"])
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest
    assert manifest["step"] == 1


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_a_damaged_newest_checkpoint_falls_back_to_the_older_intact_one(
    tmp_path: Path, damage: str, capsys: pytest.CaptureFixture[str]
) -> None:
    run = Training()
    manager = CheckpointManager(tmp_path, run.acc, keep=2)
    run.step()
    manager.save(1, {"position": 1})
    at_one = run.snapshot()
    run.step()
    newest = manager.save(2, {"position": 2})
    DAMAGES[damage](newest)
    run.step()
    assert manager.latest() == tmp_path / "step-00000001"
    assert manager.load() == {"step": 1, "position": 1}
    assert_bitwise_equal(run.snapshot(), at_one)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "step-00000002 is not usable" in err[0] and "resuming from the intact step-00000001" in err[0]


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_when_no_checkpoint_is_intact_load_refuses_and_touches_nothing(tmp_path: Path, damage: str) -> None:
    run = Training()
    manager = CheckpointManager(tmp_path, run.acc)
    folder = manager.save(1, {})
    DAMAGES[damage](folder)
    run.step()
    before = run.snapshot()
    with pytest.raises(CheckpointError, match=r"no intact checkpoint under .*step-00000001 is not usable"):
        manager.load()
    assert manager.latest() is None
    assert_bitwise_equal(run.snapshot(), before)


def test_a_dangling_latest_falls_back_to_the_newest_step_folder(tmp_path: Path) -> None:
    run = Training()
    manager = CheckpointManager(tmp_path, run.acc)
    manager.save(1, {"position": 7})
    (tmp_path / "LATEST").write_text("step-00000099\n")
    assert manager.checkpoints()[0] == tmp_path / "step-00000099"
    assert manager.load() == {"step": 1, "position": 7}


def test_loading_a_named_damaged_checkpoint_refuses(tmp_path: Path) -> None:
    run = Training()
    manager = CheckpointManager(tmp_path, run.acc)
    folder = manager.save(1, {})
    _flip_byte(folder / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.safetensors differs from its sha256"):
        manager.load(folder)


def test_a_killed_writers_temporary_folder_is_removed_by_the_next_save(tmp_path: Path) -> None:
    run = Training()
    manager = CheckpointManager(tmp_path, run.acc)
    stale = tmp_path / ".step-00000001.123-abcd.tmp"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half")
    manager.save(1, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LATEST", "step-00000001"]


def test_keep_below_one_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="keep=0 is invalid: expected at least 1 checkpoint to keep"):
        CheckpointManager(tmp_path, Training().acc, keep=0)
