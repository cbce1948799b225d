"""The progress bar shown on a terminal (rich), imported only when one is shown."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from .units import human_size


class BinarySpeedColumn(ProgressColumn):
    """Throughput in binary units (MiB/s), like every other size lvbackup prints."""

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("?" if speed is None else f"{human_size(int(speed))}/s",
                    style="progress.data.speed")


@contextmanager
def progress_bar(label: str, console: Console) -> Iterator[Callable[..., None]]:
    """Bytes done, throughput, ETA and, for a backup, bytes reused and stored so far.
    Yields `update(done, total, stats=None)`."""
    with Progress(TextColumn(label), BarColumn(), DownloadColumn(binary_units=True),
                  BinarySpeedColumn(), TimeRemainingColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[extra]}"), console=console,
                  transient=True) as bar:
        task = bar.add_task(label, total=None, extra="")

        def update(done: int, total: int, stats: dict | None = None) -> None:
            extra = ""
            if stats:
                extra = (f"reused {human_size(stats.get('reused'))}, "
                         f"stored {human_size(stats.get('stored'))}")
            bar.update(task, completed=done, total=total, extra=extra)

        yield update
