"""Progress reporting without coupling library code to a terminal.

Stages accept ``progress: ProgressFn | None`` and call ``progress(done, total, label)``; the CLI passes
a rich progress bar (``flywheel.cli``), tests pass nothing or a list-appending lambda.
"""

from __future__ import annotations

from typing import Protocol


class ProgressFn(Protocol):
    def __call__(self, done: int, total: int, label: str = "") -> None: ...


def no_progress(done: int, total: int, label: str = "") -> None:
    """The default: report nothing."""
