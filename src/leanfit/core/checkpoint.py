"""Training checkpoints through ``accelerate``: model, optimizer, scheduler and RNG states, plus a JSON trainer
state (step, data position, anything the loop needs), verified before they are trusted.

``Accelerator.save_state`` writes tensors as safetensors and the rest with ``torch.save``; ``load_state`` reads
them back with ``weights_only=True``. Trainer state is JSON, never pickle.

A checkpoint is written into a temporary folder (named uniquely per writer), then ``manifest.json`` (the sha256
of every file, written last and atomically) and a rename into place; ``LATEST`` names the newest. Loading checks
the manifest: a checkpoint with a flipped byte, a truncated or missing file, or no manifest is skipped with a
one-line notice, and the newest intact older one is loaded instead. When checkpoints exist but none is intact,
loading refuses with :class:`CheckpointError` rather than silently starting from step 0.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from leanfit.core.errors import LeanfitError, UnreadableFileError
from leanfit.core.io import atomic_write_json, atomic_write_text, read_json, sha256_file
from leanfit.core.progress import notice

if TYPE_CHECKING:
    from accelerate import Accelerator

__all__ = ["CheckpointError", "CheckpointManager"]

_STATE = "trainer_state.json"
_MANIFEST = "manifest.json"
_NAME = re.compile(r"step-(\d+)")


class CheckpointError(LeanfitError):
    """No intact checkpoint to resume from, although checkpoints exist (or a named one is damaged)."""


class CheckpointManager:
    """Save/restore checkpoints under ``root`` (``step-00000100/`` folders), keeping the newest ``keep``."""

    def __init__(self, root: str | os.PathLike, accelerator: Accelerator, keep: int = 2) -> None:
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep={keep!r} is invalid: expected at least 1 checkpoint to keep")
        self.root, self.accelerator, self.keep = Path(root), accelerator, keep

    # --- what is on disk ---------------------------------------------------------------------------------------
    def checkpoints(self) -> list[Path]:
        """The checkpoint folders, newest first: LATEST's target, then every ``step-N`` by falling N."""
        found = sorted((p for p in self.root.glob("step-*") if _NAME.fullmatch(p.name)),
                       key=lambda p: int(p.name[5:]), reverse=True)
        pointer = self.root / "LATEST"
        if pointer.is_file():
            named = self.root / pointer.read_text(encoding="utf-8", errors="replace").strip()
            found = [named, *(p for p in found if p != named)]
        return found

    def problem(self, path: Path) -> str | None:
        """Why the checkpoint at ``path`` cannot be trusted, or None when every file matches its manifest."""
        if not path.is_dir():
            return "the folder is missing"
        if not (path / _MANIFEST).is_file():
            return "no manifest.json (the save did not finish)"
        try:
            manifest = read_json(path / _MANIFEST)
            files = manifest["files"]
        except (UnreadableFileError, KeyError, TypeError):
            return "manifest.json is damaged"
        if _STATE not in files:
            return f"the manifest lists no {_STATE}"
        for name, digest in files.items():
            file = path / name
            if not file.is_file():
                return f"{name} is missing"
            if sha256_file(file) != digest:
                return f"{name} differs from its sha256 in the manifest (damaged or truncated)"
        return None

    def latest(self) -> Path | None:
        """The newest intact checkpoint, or None."""
        return next((p for p in self.checkpoints() if self.problem(p) is None), None)

    # --- save / load -------------------------------------------------------------------------------------------
    def save(self, step: int, state: dict[str, Any]) -> Path:
        """Collective: every process calls it. Returns the checkpoint folder."""
        from accelerate.utils import broadcast_object_list

        acc = self.accelerator
        name = f"step-{step:08d}"
        token = broadcast_object_list([f"{os.getpid()}-{secrets.token_hex(4)}"])[0]  # one name per writer job
        tmp = self.root / f".{name}.{token}.tmp"
        if acc.is_main_process:
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp), safe_serialization=True)
        acc.wait_for_everyone()
        final = self.root / name
        if acc.is_main_process:
            atomic_write_json(tmp / _STATE, {"step": step, **state})
            files = {p.relative_to(tmp).as_posix(): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
            atomic_write_json(tmp / _MANIFEST, {"step": step, "files": files})
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            atomic_write_text(self.root / "LATEST", name + "\n")
            self._prune()
        acc.wait_for_everyone()
        return final

    def load(self, path: Path | None = None) -> dict[str, Any] | None:
        """Restore the newest intact (or the given) checkpoint into the prepared objects; returns its trainer
        state, or None when there is no checkpoint at all. A damaged newest checkpoint is skipped with a notice;
        :class:`CheckpointError` when none is intact (or the given one is damaged)."""
        if path is not None:
            if (why := self.problem(Path(path))) is not None:
                raise CheckpointError(f"checkpoint {str(path)!r} cannot be loaded: {why}")
            return self._restore(Path(path))
        candidates = self.checkpoints()
        skipped: list[str] = []
        for candidate in candidates:
            why = self.problem(candidate)
            if why is None:
                if skipped:
                    notice(f"checkpoint {'; '.join(skipped)}; resuming from the intact {candidate.name} instead")
                return self._restore(candidate)
            skipped.append(f"{candidate.name} is not usable ({why})")
        if skipped:
            raise CheckpointError(
                f"no intact checkpoint under {str(self.root)!r}: {'; '.join(skipped)}; restore a copy, or delete "
                "the folder to train from the start"
            )
        return None

    def _restore(self, path: Path) -> dict[str, Any]:
        self.accelerator.load_state(str(path))
        state = read_json(path / _STATE)
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            raise CheckpointError(f"{str(path / _STATE)!r} holds no step number; restore a copy")
        return state

    def _prune(self) -> None:
        done = sorted((p for p in self.root.glob("step-*") if _NAME.fullmatch(p.name)), key=lambda p: int(p.name[5:]))
        for old in done[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.root.glob(".step-*.tmp"):  # a killed writer's half-written checkpoint (one writer: lock)
            shutil.rmtree(stale, ignore_errors=True)
