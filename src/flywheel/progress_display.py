"""The terminal side of progress (only the CLI imports this): a rich bar a user can plan with.

Every stage reports ``progress(done, total, label)`` (``flywheel.progress``); here that becomes one line:
stage, bar, done/total, rate, time left, time spent and the stage's label ("edits", "loss 0.1234"). A
``flywheel run`` feeds several stages through one bar: when a new count starts (``done`` goes back, or
the total changes) the bar restarts, so the rate and the time left are those of the stage that is running.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn,
                           TimeElapsedColumn)
from rich.text import Text


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _rate(task: Task) -> float | None:
    """Units per second since this count started: the average over the stage so far (a windowed rate would
    need two finished units before it shows anything, and stages with one-minute units are the ones to plan)."""
    done = task.completed - task.fields.get("start_done", 0)
    seconds = task.get_time() - task.fields.get("start_time", task.start_time or task.get_time())
    return done / seconds if done > 0 and seconds > 0 else None


class RateColumn(ProgressColumn):
    """Units per second, or seconds per unit when a unit takes longer than a second ("7.5 s/it")."""

    def render(self, task: Task) -> Text:
        rate = _rate(task)
        if rate is None:  # nothing done yet in this count (or it arrived finished: nothing to say)
            return Text("" if task.finished else "-/s", style="progress.data.speed")
        return Text(f"{rate:.2f}/s" if rate >= 1 else f"{1 / rate:.1f} s/it", style="progress.data.speed")


class EtaColumn(ProgressColumn):
    """Time left at that rate ("ETA 3:12"); "ETA ?" until the first unit is done."""

    def render(self, task: Task) -> Text:
        if task.total is not None and task.completed >= task.total:
            return Text("done", style="progress.remaining")
        rate = _rate(task)
        if rate is None or task.total is None:
            return Text("ETA ?", style="progress.remaining")
        return Text(f"ETA {_clock((task.total - task.completed) / rate)}", style="progress.remaining")


@contextmanager
def rich_progress(description: str, console: Console | None = None, *,
                  get_time: Callable[[], float] | None = None) -> Iterator:
    """A ``ProgressFn`` backed by a rich bar: ``enrich ━━━━━ 12/25 7.5 s/it ETA 1:38 0:01:30 edits``."""
    bar = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(), EtaColumn(),
        TimeElapsedColumn(), TextColumn("{task.fields[label]}"), console=console or Console(highlight=False),
        transient=False, get_time=get_time,
    )
    state: dict = {"task": None, "done": 0, "total": None}

    def update(done: int, total: int, label: str = "") -> None:
        if state["task"] is None:  # shown from the first report on: a stage that fails while planning prints no bar
            bar.start()
            state["task"] = bar.add_task(description, total=total, completed=done, label=label, start_done=done,
                                         start_time=bar.get_time())
        elif done < state["done"] or total != state["total"]:  # a new count (next stage): rate and ETA start over
            bar.reset(state["task"], total=total, completed=done, label=label, start_done=done,
                      start_time=bar.get_time())
        else:
            bar.update(state["task"], completed=done, total=total, label=label)
        state.update(done=done, total=total)

    try:
        yield update
    finally:
        if state["task"] is not None:
            bar.stop()
