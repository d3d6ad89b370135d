"""Progress for anything longer than a few seconds; silent on non-main processes.

On a terminal (stdout): a rich progress bar whose info field (the loss) stays until new values replace it. Elsewhere
(batch jobs, CI logs, output piped to a file): plain lines on stderr, one at the start, then one at most every
``LEANFIT_PROGRESS_SECONDS`` seconds (default 15) and one at the end, so a log shows the run is alive.
``LEANFIT_NO_PROGRESS`` turns both off. :func:`stage` marks a step without a count (data preparation).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

__all__ = ["ProgressBar", "notice", "progress_bar", "stage"]


def _main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def notice(message: str) -> None:
    """One line to stderr, from the main process only: what leanfit decided for the user (a fallback, a start
    from scratch), as opposed to an error."""
    if _main():
        print(f"leanfit: {message}", file=sys.stderr, flush=True)


def _fmt(fields: dict[str, Any]) -> str:
    return "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class ProgressBar:
    """Handle returned by :func:`progress_bar`: ``advance(n, **fields)`` moves the bar; ``fields`` (e.g. the loss)
    are shown until the next call that passes fields."""

    def __init__(self, progress: Any = None, task: Any = None) -> None:
        self._progress, self._task = progress, task

    def advance(self, n: int = 1, **fields: float | str) -> None:
        if self._progress is None:
            return
        if fields:
            self._progress.update(self._task, advance=n, info=_fmt(fields))
        else:
            self._progress.update(self._task, advance=n)


class _PlainBar(ProgressBar):
    """Timed plain lines for logs that are not a terminal."""

    def __init__(self, total: int, description: str, completed: int, every: float) -> None:
        super().__init__()
        self.total, self.description, self.done, self.every = total, description, completed, every
        self.info, self.start = "", time.monotonic()
        self.last = self.start
        self._line(f"started ({completed}/{total})")

    def _line(self, text: str) -> None:
        print(f"leanfit: {self.description}: {text}", file=sys.stderr, flush=True)

    def _status(self, now: float) -> str:
        elapsed = now - self.start
        pct = 100 * self.done / self.total if self.total else 100.0
        text = f"{self.done}/{self.total} ({pct:.0f}%) elapsed {_clock(elapsed)}"
        return text + (f"  {self.info}" if self.info else "")

    def advance(self, n: int = 1, **fields: float | str) -> None:
        self.done += n
        if fields:
            self.info = _fmt(fields)
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            self._line(self._status(now))

    def close(self) -> None:
        self._line("finished " + self._status(time.monotonic()))


@contextlib.contextmanager
def progress_bar(total: int, description: str, *, enabled: bool = True, completed: int = 0) -> Iterator[ProgressBar]:
    """A progress bar on a terminal, timed plain lines elsewhere (see the module docstring); nothing when
    ``enabled`` is false, on a non-main process, or with ``LEANFIT_NO_PROGRESS`` set."""
    if not enabled or os.environ.get("LEANFIT_NO_PROGRESS") or not _main():
        yield ProgressBar()
        return
    if not sys.stdout.isatty():  # rich would draw nothing until the end
        bar = _PlainBar(total, description, completed, float(os.environ.get("LEANFIT_PROGRESS_SECONDS", "15")))
        yield bar
        bar.close()
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
    )
    with Progress(*columns, transient=False) as progress:
        task = progress.add_task(description, total=total, completed=completed, info="")
        yield ProgressBar(progress, task)


@contextlib.contextmanager
def stage(description: str) -> Iterator[None]:
    """A step without a count (data preparation, tokenizer training): a line when it starts and one with its
    duration when it ends (rich spinner on a terminal)."""
    if os.environ.get("LEANFIT_NO_PROGRESS") or not _main():
        yield
        return
    start = time.monotonic()
    if sys.stderr.isatty():
        from rich.console import Console

        console = Console(stderr=True)
        with console.status(f"{description} ..."):
            yield
        console.print(f"{description}: done in {time.monotonic() - start:.1f} s")
        return
    print(f"leanfit: {description} ...", file=sys.stderr, flush=True)
    yield
    print(f"leanfit: {description}: done in {time.monotonic() - start:.1f} s", file=sys.stderr, flush=True)
