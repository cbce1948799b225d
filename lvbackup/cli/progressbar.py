"""The progress bar shown on a terminal (rich), imported only when one is shown."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    ProgressColumn,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from ..base.units import human_size

# The backup's "new X, stored Y" (30 more characters) only where it fits on the line.
WIDE = 110


class BinarySpeedColumn(ProgressColumn):
    """Throughput in binary units (MiB/s), like every other size lvbackup prints."""

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("?" if speed is None else f"{human_size(int(speed))}/s",
                    style="progress.data.speed")


def columns(label: str, width: int) -> list[ProgressColumn]:
    """The bar's columns for a terminal `width` wide: always one line (80 columns hold
    label, bar, bytes done of total, throughput and time left)."""
    cols: list[ProgressColumn] = [
        TextColumn(label), BarColumn(bar_width=20 if width < WIDE else 30),
        DownloadColumn(binary_units=True), BinarySpeedColumn(), TimeRemainingColumn()]
    if width >= WIDE:
        cols.append(TextColumn("{task.fields[extra]}"))
    return cols


@contextmanager
def progress_bar(label: str, console: Console) -> Iterator[Callable[..., None]]:
    """Bytes done, throughput, ETA and, for a backup, new bytes and stored bytes so far.
    Yields `update(done, total, stats=None)`. The bar is drawn at the first update, so a
    command refused before any work draws none."""
    with ExitStack() as stack:
        shown: list[tuple[Progress, TaskID]] = []

        def update(done: int, total: int, stats: dict | None = None) -> None:
            if not shown:
                bar = stack.enter_context(Progress(*columns(label, console.width),
                                                   console=console, transient=True))
                shown.append((bar, bar.add_task(label, total=None, extra="")))
            bar, task = shown[0]
            extra = ""
            if stats:  # as the summary line says it: new data, and what it took stored
                extra = (f"new {human_size(done - (stats.get('reused') or 0))}, "
                         f"stored {human_size(stats.get('stored'))}")
            bar.update(task, completed=done, total=total, extra=extra)

        yield update
