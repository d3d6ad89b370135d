"""Training checkpoints through ``accelerate``: model, optimizer, scheduler and RNG states, plus a JSON trainer
state (step, data position, anything the loop needs).

``Accelerator.save_state`` writes tensors as safetensors and the rest with ``torch.save``; ``load_state`` reads
them back with ``weights_only=True``. Each checkpoint is written into a temporary folder and renamed into place,
and ``LATEST`` (written atomically) names the newest complete one, so a kill at any moment leaves a usable
checkpoint. Trainer state is JSON, never pickle.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from leanfit.core.io import atomic_write_json, atomic_write_text, read_json

if TYPE_CHECKING:
    from accelerate import Accelerator

__all__ = ["CheckpointManager"]

_STATE = "trainer_state.json"


class CheckpointManager:
    """Save/restore checkpoints under ``root`` (``step-00000100/`` folders), keeping the newest ``keep``."""

    def __init__(self, root: str | os.PathLike, accelerator: Accelerator, keep: int = 2) -> None:
        if keep < 1:
            raise ValueError(f"keep={keep} is invalid: expected at least 1 checkpoint to keep")
        self.root, self.accelerator, self.keep = Path(root), accelerator, keep

    def latest(self) -> Path | None:
        pointer = self.root / "LATEST"
        if not pointer.is_file():
            return None
        path = self.root / pointer.read_text().strip()
        return path if (path / _STATE).is_file() else None

    def save(self, step: int, state: dict[str, Any]) -> Path:
        """Collective: every process calls it. Returns the checkpoint folder."""
        acc = self.accelerator
        name = f"step-{step:08d}"
        tmp = self.root / f".{name}.tmp"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp), safe_serialization=True)
        acc.wait_for_everyone()
        final = self.root / name
        if acc.is_main_process:
            atomic_write_json(tmp / _STATE, {"step": step, **state})
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            atomic_write_text(self.root / "LATEST", name + "\n")
            self._prune()
        acc.wait_for_everyone()
        return final

    def load(self, path: Path | None = None) -> dict[str, Any] | None:
        """Restore the newest (or given) checkpoint into the prepared objects; returns its trainer state."""
        path = path or self.latest()
        if path is None:
            return None
        self.accelerator.load_state(str(path))
        return read_json(path / _STATE)

    def _prune(self) -> None:
        done = sorted(p for p in self.root.glob("step-*") if p.is_dir())
        for old in done[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
