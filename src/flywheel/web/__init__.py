"""The local review web app (``flywheel review``): ``create_app`` for tests and embedding, ``serve`` for the CLI.

Imports are lazy so that ``import flywheel.web`` stays cheap for commands that never serve.
"""

from __future__ import annotations

from typing import Any

__all__ = ["create_app", "serve"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from flywheel.web import app

        return getattr(app, name)
    raise AttributeError(name)
