"""An editor that fails the way a cluster worker does, for the Ray tests (``tests/test_compute_ray.py``).

``FlakyEditor(recipe, "die", marker)`` is the composite editor, except that the first batch holding an edit
of ``recipe`` kills its own process (once: it leaves ``marker`` behind, so the restarted replica edits it);
``FlakyEditor(recipe, "raise")`` raises on every batch holding one (a poison item). ``FlakyVLM(text)`` raises
on every question containing ``text``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


class FlakyEditor:
    def __init__(self, recipe: str, mode: str, marker: str | None = None):
        from flywheel.models.composite import CompositeEditor

        self.inner, self.recipe, self.mode, self.marker = CompositeEditor(), recipe, mode, marker

    def __getattr__(self, name: str) -> Any:  # model_id, params(), ...: the composite editor's
        return getattr(self.inner, name)

    def edit(self, requests):
        if any(r.recipe is not None and r.recipe.id == self.recipe for r in requests):
            if self.mode == "raise":
                raise RuntimeError(f"cannot edit {self.recipe}")
            if self.mode == "die" and self.marker and not Path(self.marker).exists():
                Path(self.marker).touch()
                os._exit(1)  # the worker process dies mid-batch, as on a lost node or an OOM kill
        return self.inner.edit(requests)


class FlakyVLM:
    """A fixed-answer VLM (P(yes) = 0.9, and ``caption`` as text) that raises on every question containing
    ``fail_on``: a judge question that keeps failing on the cluster."""

    model_id = "flaky-vlm"

    def __init__(self, fail_on: str, caption: str = "fw_ray in a test"):
        self.fail_on, self.caption = fail_on, caption

    def _check(self, requests) -> None:
        if any(self.fail_on in r.text for r in requests):
            raise RuntimeError(f"cannot answer {self.fail_on!r}")

    def generate(self, requests, *, max_new_tokens: int = 128, seed: int | None = None) -> list[str]:
        self._check(requests)
        return [self.caption for _ in requests]

    def option_probabilities(self, requests, options) -> list[dict[str, float]]:
        self._check(requests)
        return [{o: (0.9 if o == options[0] else 0.1 / max(1, len(options) - 1)) for o in options} for _ in requests]

    def params(self) -> dict[str, Any]:
        return {"model_id": self.model_id, "fail_on": self.fail_on}


class Sleeper:
    """``work(seconds)`` sleeps that long (a GPU call that leaves the CPU free) and returns when it ended."""

    model_id = "sleeper"

    def work(self, seconds: float) -> float:
        import time

        time.sleep(seconds)
        return time.time()
