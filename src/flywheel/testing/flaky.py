"""An editor that fails the way a cluster worker does, for the Ray tests (``tests/test_compute_ray.py``).

``FlakyEditor(recipe, "die", marker)`` is the composite editor, except that the first batch holding an edit
of ``recipe`` kills its own process (once: it leaves ``marker`` behind, so the restarted replica edits it);
``FlakyEditor(recipe, "raise")`` raises on every batch holding one (a poison item).
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
