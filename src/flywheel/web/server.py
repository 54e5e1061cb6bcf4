"""``flywheel review``'s server: refuse an unsafe setup, bind, tell the user, serve until Ctrl+C."""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import webbrowser
from pathlib import Path

from flywheel.errors import ReviewError
from flywheel.web.app import create_app
from flywheel.web.security import check_bind

log = logging.getLogger(__name__)


def review_url(host: str, port: int, token: str | None = None) -> str:
    shown = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)  # "any" is not an address
    shown = f"[{shown}]" if ":" in shown else shown
    return f"http://{shown}:{port}/" + (f"?token={token}" if token else "")


def serve(project_root: Path | None, *, host: str = "127.0.0.1", port: int = 8765, token: str | None = None,
          reviewer: str | None = None, open_browser: bool = True, on_ready=None) -> None:
    """Run the review server until interrupted. ``on_ready(url)`` is called once it listens."""
    import uvicorn

    # 1. Refuse an unsafe setup, then open the project (a missing project fails before anything listens).
    check_bind(host, token)
    app = create_app(project_root, token=token, reviewer=reviewer)
    # 2. Bind here, not in uvicorn, so a busy port is a clear error rather than a log line and exit.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        app.state.project.close()
        raise ReviewError(f"cannot listen on {host}:{port}: {err.strerror}",
                          hint=f"pick another port (--port {port + 1}) or stop the program using it") from None
    sock.listen(128)  # from here connections queue until uvicorn accepts them: the URL works at once
    url = review_url(host, sock.getsockname()[1], token)
    # 3. Serve; tell the user (and open a browser tab) first, since run() blocks until Ctrl+C.
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    if on_ready:
        on_ready(url)
    if open_browser:
        _open_browser(url)
    log.info("review: serving %s", url.split("?")[0])
    server.run(sockets=[sock])


def _open_browser(url: str) -> None:
    # Without a display, webbrowser falls back to console browsers (w3m, lynx) that would take the terminal.
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        log.info("review: no display; open the URL in a browser yourself")
        return
    threading.Thread(target=webbrowser.open, args=(url,), daemon=True).start()
