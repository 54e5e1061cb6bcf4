"""The review web app: a thin Starlette layer over ``flywheel.review`` (parse, call one function, format).

Routes (docs/review.md):
  GET  /                       the grid, filtered by query parameters (round, kind, verdict, recipe, review)
  GET  /api/items              the same as JSON, plus counts (the page's script refreshes counts with it)
  POST /review                 JSON {image_ids, decision, reason?} + X-CSRF-Token header, or a form with
                               image_id, decision, csrf_token (the no-script buttons); appends reviews
  GET  /image/{id}/full|thumb  a catalog image by id; the only way a file leaves the store
  GET  /static/...             the page's own script and style

Handlers are ``async`` and run on the event loop's one thread, so the project's single SQLite
connection is never used by two threads at once; only thumbnail encoding goes to the thread pool.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import secrets
import socket
import sys
import threading
import webbrowser
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import parse_qs, urlencode

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from flywheel import review
from flywheel.errors import ReviewError
from flywheel.project import open_project
from flywheel.web.security import Guard, check_bind, same_token

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
MAX_BODY = 1_000_000  # bytes; a bulk review of thousands of ids is far below this
IMAGE_CACHE = "private, max-age=86400, immutable"  # content-addressed: an id's pixels never change


def default_reviewer() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no login name (some containers)
        return "reviewer"


def create_app(project_root: Path | None, token: str | None = None, reviewer: str | None = None) -> Starlette:
    """The review app for the project at ``project_root``. A token, when given, guards every request."""
    project = open_project(project_root)
    csrf = secrets.token_urlsafe(32)  # per server start: a page from an earlier run must be reloaded
    reviewer = (reviewer or "").strip() or default_reviewer()
    templates = _templates()

    @asynccontextmanager
    async def lifespan(app: Starlette):
        yield
        project.close()

    async def grid(request: Request) -> Response:
        try:
            filters = review.Filters.parse(request.query_params)
        except ReviewError as err:
            return PlainTextResponse(f"{err.args[0]}\n{err.hint or ''}", 400)
        counts = review.count_items(project, filters)
        items = review.list_items(project, filters)
        shown = (filters.offset + 1, filters.offset + len(items))
        return templates.TemplateResponse(request, "grid.html", {
            "project": project.config.project, "reviewer": reviewer, "csrf": csrf, "items": items,
            "counts": counts, "filters": filters, "options": review.filter_options(project), "shown": shown,
            "page_links": _page_links(filters, len(items)), "here": _here(request),
        })

    async def api_items(request: Request) -> Response:
        try:
            filters = review.Filters.parse(request.query_params)
        except ReviewError as err:
            return _error(err, 400)
        return JSONResponse({
            "items": [item.to_json() for item in review.list_items(project, filters)],
            "counts": review.count_items(project, filters).to_json(),
        })

    async def post_review(request: Request) -> Response:
        # 1. Read the body (bounded), as JSON from the page's script or as a form from a plain button.
        body = await _read_body(request)
        if body is None:
            return PlainTextResponse("request too large", 413)
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        as_form = ctype == "application/x-www-form-urlencoded"
        if ctype == "application/json":
            try:
                data = json.loads(body or b"{}")
            except (ValueError, UnicodeDecodeError):
                return _error(ReviewError("the request body is not valid JSON"), 400)
            if not isinstance(data, dict):
                return _error(ReviewError("the request body must be a JSON object"), 400)
            ids, decision, reason = data.get("image_ids"), data.get("decision"), data.get("reason")
            given = request.headers.get("x-csrf-token")
        elif as_form:
            form = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
            ids, decision = form.get("image_id", []), (form.get("decision") or [""])[0]
            reason = (form.get("reason") or [None])[0]
            given = (form.get("csrf_token") or [None])[0] or request.headers.get("x-csrf-token")
        else:
            return PlainTextResponse("send JSON or a URL-encoded form", 415)
        # 2. The CSRF secret proves the request comes from a page this server rendered.
        if not same_token(given, csrf):
            err = ReviewError("missing or wrong CSRF token", hint="reload the page (the server restarted?)")
            return _error(err, 403)
        if not isinstance(ids, list) or not isinstance(decision, str) or not isinstance(reason, (str, type(None))):
            return _error(ReviewError("expected image_ids (a list), decision and an optional reason (text)"), 400)
        # 3. Append the reviews (all or none) and answer.
        try:
            rows = review.record_review(project, ids, decision, reviewer, reason)
        except ReviewError as err:
            return _error(err, 400)
        if as_form:
            return RedirectResponse(_safe_next((form.get("next") or ["/"])[0]), status_code=303)
        return JSONResponse({"recorded": len(rows), "decision": decision, "reviewer": reviewer})

    async def image_full(request: Request) -> Response:
        sha = review.image_sha(project, request.path_params["image_id"])
        path = project.store.image_path(sha) if sha else None
        if path is None or not path.is_file():
            return PlainTextResponse("no such image", 404)
        return FileResponse(path, media_type="image/png", headers={"cache-control": IMAGE_CACHE})

    async def image_thumb(request: Request) -> Response:
        sha = review.image_sha(project, request.path_params["image_id"])
        if sha is None or not project.store.image_path(sha).is_file():
            return PlainTextResponse("no such image", 404)
        path = await run_in_threadpool(review.thumbnail, project, sha)
        return FileResponse(path, media_type="image/jpeg", headers={"cache-control": IMAGE_CACHE})

    routes = [
        Route("/", grid, methods=["GET"]),
        Route("/api/items", api_items, methods=["GET"]),
        Route("/review", post_review, methods=["POST"]),
        Route("/image/{image_id:int}/full", image_full, methods=["GET"]),
        Route("/image/{image_id:int}/thumb", image_thumb, methods=["GET"]),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    app = Starlette(routes=routes, middleware=[Middleware(Guard, token=token)], lifespan=lifespan)
    app.state.project = project
    app.state.csrf = csrf
    return app


def _templates() -> Jinja2Templates:
    import jinja2

    # Autoescape everything: captions and reasons come from models and may contain markup.
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined)
    env.filters["num"] = lambda v: "n/a" if v is None else f"{v:.3g}"
    env.filters["query"] = lambda params: urlencode(params)
    return Jinja2Templates(env=env)


async def _read_body(request: Request) -> bytes | None:
    """The body, or None once it passes MAX_BODY (read in chunks: a huge upload never sits in memory)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _error(err: ReviewError, status: int) -> JSONResponse:
    return JSONResponse({"error": err.args[0], "hint": err.hint}, status)


def _here(request: Request) -> str:
    return request.url.path + (f"?{request.url.query}" if request.url.query else "")


def _safe_next(target: str) -> str:
    # Only a path on this server: never '//evil.example' or 'https://...' (an open redirect).
    if not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


def _page_links(filters: review.Filters, shown: int) -> dict[str, str | None]:
    base = filters.query()
    prev_offset = max(filters.offset - filters.limit, 0)
    more = shown == filters.limit and filters.limit > 0
    return {
        "prev": "?" + urlencode({**base, "offset": prev_offset}) if filters.offset > 0 else None,
        "next": "?" + urlencode({**base, "offset": filters.offset + filters.limit}) if more else None,
    }


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
