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


_BARS: dict[str, bool] = {}  # {"enabled": ...} once the CLI has decided


def third_party_bars(enabled: bool) -> None:
    """Switch the tqdm bars of huggingface_hub (downloads), transformers ("Loading checkpoint shards") and
    diffusers ("Loading pipeline components") on or off, through each library's own switch.

    huggingface_hub is switched now (it is light); transformers reads its setting when it is imported.
    diffusers cannot be switched without importing torch, so the setting is kept here and applied by the
    loader right before a pipeline loads (``apply_third_party_bars``), when diffusers is imported anyway.
    """
    from huggingface_hub import utils as hub

    _BARS["enabled"] = enabled

    (hub.enable_progress_bars if enabled else hub.disable_progress_bars)()
    apply_third_party_bars()


def apply_third_party_bars() -> None:
    """Apply ``third_party_bars``' choice to transformers and diffusers where they are imported (no-op until
    the CLI has chosen: library users keep the libraries' defaults)."""
    import sys

    if "enabled" not in _BARS:
        return
    for name in ("transformers.utils.logging", "diffusers.utils.logging"):
        module = sys.modules.get(name)
        if module is not None:
            (module.enable_progress_bar if _BARS["enabled"] else module.disable_progress_bar)()
