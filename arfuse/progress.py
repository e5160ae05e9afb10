"""Progress bars with throughput, shared by long-running steps."""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def token_progress(description: str, total: int, completed: int = 0, *, enabled: bool = True,
                   unit: str = "tok") -> Iterator[Callable[[int], None]]:
    """A rich progress bar over ``total`` items showing items/s and time left; yields advance(n)."""
    if not enabled:
        yield lambda n: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    class Rate(TextColumn):
        def render(self, task):  # items per second over the work done in this run
            speed = task.finished_speed or task.speed
            return TextColumn(f"{speed:,.0f} {unit}/s" if speed else f"- {unit}/s").render(task)

    from rich.console import Console

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), Rate(""),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True)) as bar:
        task = bar.add_task(description, total=total, completed=completed)
        yield lambda n: bar.advance(task, n)
