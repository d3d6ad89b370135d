"""Progress bars (rich) for anything longer than a few seconds; silent on non-main processes."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any

__all__ = ["ProgressBar", "notice", "progress_bar"]


def notice(message: str) -> None:
    """One line to stderr, from the main process only: what leanfit decided for the user (a fallback, a start
    from scratch), as opposed to an error."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"leanfit: {message}", file=sys.stderr, flush=True)


class ProgressBar:
    """Handle returned by :func:`progress_bar`: ``advance(n, **fields)`` moves the bar and shows the fields."""

    def __init__(self, progress: Any, task: Any) -> None:
        self._progress, self._task = progress, task

    def advance(self, n: int = 1, **fields: float | str) -> None:
        if self._progress is None:
            return
        info = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
        self._progress.update(self._task, advance=n, info=info)


@contextlib.contextmanager
def progress_bar(total: int, description: str, *, enabled: bool = True, completed: int = 0) -> Iterator[ProgressBar]:
    """A rich progress bar (disabled when ``enabled`` is false or ``LEANFIT_NO_PROGRESS`` is set)."""
    if not enabled or os.environ.get("LEANFIT_NO_PROGRESS"):
        yield ProgressBar(None, None)
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
