"""The local review web app (``flywheel review``): ``create_app`` for tests and embedding, ``serve`` for the CLI.

Imports are lazy so that ``import flywheel.web`` stays cheap for commands that never serve.
"""

from __future__ import annotations

from typing import Any

__all__ = ["create_app", "serve"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from flywheel.web import app

        return app.create_app
    if name == "serve":
        from flywheel.web import server

        return server.serve
    raise AttributeError(name)
