"""Progress bars with slides per second for long loops (a no-op when turned off)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text


class _RateColumn(ProgressColumn):
    """Completed units per second, measured by rich over the last seconds."""

    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.speed
        return Text(f"{speed:.1f} {self.unit}/s" if speed else f"- {self.unit}/s")


class ProgressReporter:
    """Start bars and advance them; every method does nothing when the reporter is disabled."""

    def __init__(self, progress: Progress | None) -> None:
        self._progress = progress

    def start(self, description: str, total: int) -> Callable[[int], None]:
        """Add a bar of `total` slides; returns the function that advances it by n slides."""
        progress = self._progress
        if progress is None:
            return lambda n: None
        task = progress.add_task(description, total=total)

        def advance(n: int) -> None:
            progress.advance(task, n)

        return advance

    def finish(self) -> None:
        """Remove finished bars so the next epoch starts on a clean line."""
        if self._progress is None:
            return
        for task in list(self._progress.tasks):
            self._progress.remove_task(task.id)


@contextmanager
def progress_bars(enabled: bool, unit: str = "slides") -> Iterator[ProgressReporter]:
    """Context of a rich progress display on stderr, or a disabled reporter."""
    if not enabled:
        yield ProgressReporter(None)
        return
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        _RateColumn(unit),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    with progress:
        yield ProgressReporter(progress)
