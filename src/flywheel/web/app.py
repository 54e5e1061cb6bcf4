"""The review web app: a thin Starlette layer over ``flywheel.review`` (parse, call one function, format).

Routes (docs/review.md):
  GET  /                       the grid, filtered by query parameters (round, kind, verdict, recipe, review,
                               source; the bare page shows what needs a human), paged
  GET  /sources                the sources with per-source statistics; leave one out of training
  GET  /api/items              the same as JSON, plus counts (the page's script refreshes counts with it)
  POST /review                 JSON {image_ids, decision, reason?} or {filter, expected, decision} (every image
                               of a filter) + X-CSRF-Token, or a form (image_id, decision, reason, csrf_token)
  POST /caption                JSON {image_id, text} + X-CSRF-Token, or a form; appends a human caption
  GET  /image/{id}/full|thumb  a catalog image by id; the only way a file leaves the store
  GET  /static/...             the page's own script and style

Handlers are ``async`` and run on the event loop's one thread, so the project's single SQLite
connection is never used by two threads at once; only thumbnail encoding goes to the thread pool.
Every error is a one-line JSON object ``{"error", "hint"}`` with a 4xx status: a malformed body, an
absurd id or an unknown path never reaches a traceback.
"""

from __future__ import annotations

import json
import logging
import secrets
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from flywheel import captions, review
from flywheel.errors import CaptionError, FlywheelError, ReviewError
from flywheel.project import open_project
from flywheel.web.security import Guard, same_token

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
MAX_BODY = 1_000_000  # bytes; a bulk review of thousands of ids is far below this
IMAGE_CACHE = "private, max-age=86400, immutable"  # content-addressed: an id's pixels never change


@dataclass
class Payload:
    """A POST body, from the page's script (JSON) or from a plain form (lists of values)."""

    data: dict[str, Any]
    as_form: bool
    csrf: str | None
    form: dict[str, list[str]] = field(default_factory=dict)

    def next_url(self) -> str:
        return _safe_next((self.form.get("next") or ["/"])[0])


def create_app(project_root: Path | None, token: str | None = None, reviewer: str | None = None) -> Starlette:
    """The review app for the project at ``project_root``. A token, when given, guards every request."""
    project = open_project(project_root)
    csrf = secrets.token_urlsafe(32)  # per server start: a page from an earlier run must be reloaded
    reviewer = (reviewer or "").strip() or review.default_person()
    templates = _templates()
    for name in ("grid.html", "sources.html"):  # compile now: the first page view should not pay for it
        templates.env.get_template(name)

    @asynccontextmanager
    async def lifespan(app: Starlette):
        yield
        project.close()

    def page(request: Request, name: str, **context: Any) -> Response:
        sources = review.list_sources(project)
        return templates.TemplateResponse(request, name, {
            "project": project.config.project, "reviewer": reviewer, "csrf": csrf, "here": _here(request),
            "n_sources": len(sources), "n_left_out": sum(s.left_out for s in sources), **context})

    async def grid(request: Request) -> Response:
        try:
            filters = review.Filters.parse(request.query_params)
        except ReviewError as err:
            return _error(err, 400)
        counts = review.count_items(project, filters)
        items = review.list_items(project, filters)
        return page(request, "grid.html", items=items, counts=counts, filters=filters,
                    filter_query=urlencode(filters.query()), options=review.filter_options(project),
                    tally=review.verdict_tally(project), shown=(filters.offset + 1, filters.offset + len(items)),
                    page_links=_page_links(filters, len(items)))

    async def sources_page(request: Request) -> Response:
        return page(request, "sources.html", sources=review.list_sources(project), judge=project.config.judge)

    async def api_items(request: Request) -> Response:
        try:
            filters = review.Filters.parse(request.query_params)
        except ReviewError as err:
            return _error(err, 400)
        return JSONResponse({
            "items": [item.to_json() for item in review.list_items(project, filters)],
            "counts": review.count_items(project, filters).to_json(),
        })

    async def payload(request: Request) -> Payload | Response:
        """Read the body (bounded), parse it, and check the CSRF secret: a Payload, or the error response."""
        body = await _read_body(request)
        if body is None:
            return _error(ReviewError(f"request too large (over {MAX_BODY:,} bytes)"), 413)
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "application/json":
            try:
                data = json.loads(body or b"{}")
            except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: absurdly deep nesting
                return _error(ReviewError("the request body is not valid JSON (or is nested too deeply)"), 400)
            if not isinstance(data, dict):
                return _error(ReviewError("the request body must be a JSON object"), 400)
            got = Payload(data, False, request.headers.get("x-csrf-token"))
        elif ctype == "application/x-www-form-urlencoded":
            form = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
            data = {k: v[0] for k, v in form.items()}
            got = Payload(data, True, data.get("csrf_token") or request.headers.get("x-csrf-token"), form)
        else:
            return _error(ReviewError("send JSON or a URL-encoded form"), 415)
        # The CSRF secret proves the request comes from a page this server rendered.
        if not same_token(got.csrf if isinstance(got.csrf, str) else None, csrf):
            return _error(ReviewError("missing or wrong CSRF token", hint="reload the page (the server restarted?)"),
                          403)
        return got

    async def post_review(request: Request) -> Response:
        # 1. Read and check the body.
        got = await payload(request)
        if isinstance(got, Response):
            return got
        data = got.data
        ids = got.form.get("image_id", []) if got.as_form else data.get("image_ids")
        decision, reason = data.get("decision"), data.get("reason")
        if not isinstance(decision, str) or not isinstance(reason, (str, type(None))):
            return _error(ReviewError("expected a decision (text) and an optional reason (text)"), 400)
        # 2. Append the reviews (all or none): listed images, or every image of a filter.
        try:
            if not got.as_form and "filter" in data:
                filters, expected = _filter_of(data)
                ids = review.matching_ids(project, filters)
                previous = review.latest_decisions(project, ids)
                rows = review.record_filter_review(project, filters, decision, reviewer, expected=expected,
                                                   reason=reason)
            else:
                if not isinstance(ids, list):
                    raise ReviewError("expected image_ids (a list of image ids)")
                previous = review.latest_decisions(project, [review.parse_image_id(i) for i in ids])
                rows = review.record_review(project, ids, decision, reviewer, reason)
        except review.SelectionChanged as err:
            return _error(err, 409)
        except ReviewError as err:
            return _error(err, 400)
        # 3. Answer: the previous decisions let the page undo exactly this action.
        if got.as_form:
            return RedirectResponse(got.next_url(), status_code=303)
        return JSONResponse({"recorded": len(rows), "decision": decision, "reviewer": reviewer,
                             "previous": {str(k): v for k, v in previous.items()}})

    async def post_caption(request: Request) -> Response:
        got = await payload(request)
        if isinstance(got, Response):
            return got
        image_id, text = got.data.get("image_id"), got.data.get("text")
        if not isinstance(text, str):
            return _error(CaptionError("expected image_id and text (the caption)"), 400)
        try:
            edit = captions.set_caption(project, image_id, text, author=reviewer, via="review")
        except CaptionError as err:
            return _error(err, 400)
        if got.as_form:
            return RedirectResponse(got.next_url(), status_code=303)
        return JSONResponse({**edit.to_json(), "source": "human"})

    def image_path(request: Request) -> tuple[str, Path] | Response:
        try:
            image_id = review.parse_image_id(request.path_params["image_id"])
        except ReviewError as err:
            return _error(err, 400)
        sha = review.image_sha(project, image_id)
        path = project.store.image_path(sha) if sha else None
        if path is None or not path.is_file():
            return _error(ReviewError(f"no image with id {image_id} in the catalog"), 404)
        return sha, path

    async def image_full(request: Request) -> Response:
        found = image_path(request)
        if isinstance(found, Response):
            return found
        return FileResponse(found[1], media_type="image/png", headers={"cache-control": IMAGE_CACHE})

    async def image_thumb(request: Request) -> Response:
        found = image_path(request)
        if isinstance(found, Response):
            return found
        path = await run_in_threadpool(review.thumbnail, project, found[0])
        return FileResponse(path, media_type="image/jpeg", headers={"cache-control": IMAGE_CACHE})

    routes = [
        Route("/", grid, methods=["GET"]),
        Route("/sources", sources_page, methods=["GET"]),
        Route("/api/items", api_items, methods=["GET"]),
        Route("/review", post_review, methods=["POST"]),
        Route("/caption", post_caption, methods=["POST"]),
        # {image_id} is any path segment, parsed by review.parse_image_id: Starlette's int convertor would
        # hand int() thousands of digits (a ValueError, so a 500) and send '-1' or '1e3' to a bare 404.
        Route("/image/{image_id}/full", image_full, methods=["GET"]),
        Route("/image/{image_id}/thumb", image_thumb, methods=["GET"]),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    handlers = {HTTPException: _http_error, Exception: _internal_error}
    app = Starlette(routes=routes, middleware=[Middleware(Guard, token=token)], lifespan=lifespan,
                    exception_handlers=handlers)
    app.state.project = project
    app.state.csrf = csrf
    return app


def _filter_of(data: dict[str, Any]) -> tuple[review.Filters, int]:
    """The filter and confirmed count of a filter action, or ReviewError."""
    query, expected = data.get("filter"), data.get("expected")
    if not isinstance(query, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in query.items()):
        raise ReviewError("filter must be an object of query parameters (text values), as in the page's URL")
    if isinstance(expected, bool) or not isinstance(expected, int) or not 0 < expected <= 10_000_000:
        raise ReviewError("expected must be the number of images you confirmed (a whole number above 0)")
    return review.Filters.parse(query), expected


def _templates() -> Jinja2Templates:
    import jinja2

    # Autoescape everything: captions and reasons come from models and may contain markup.
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined)
    env.filters["num"] = lambda v, fmt=".3g": "n/a" if v is None else f"{v:{fmt}}"
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


def _error(err: FlywheelError, status: int) -> JSONResponse:
    message = " ".join(str(err.args[0]).split())  # one line, whatever the message held
    return JSONResponse({"error": message, "hint": err.hint}, status)


async def _http_error(request: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, HTTPException) else 400
    text = {404: "not found: no such page or image", 405: f"{request.method} is not allowed here"}.get(
        status, "bad request")
    return JSONResponse({"error": text, "hint": None}, status, headers=getattr(exc, "headers", None))


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.error("review: %s %s failed: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
    return JSONResponse({"error": "internal error (a bug: the server log has the details)", "hint": None}, 500)


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
    limit = {} if filters.limit == review.PAGE_SIZE else {"limit": filters.limit}
    return {
        "prev": "?" + urlencode({**base, **limit, "offset": prev_offset}) if filters.offset > 0 else None,
        "next": "?" + urlencode({**base, **limit, "offset": filters.offset + filters.limit}) if more else None,
    }
