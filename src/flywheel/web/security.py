"""The review server's security model, in one place (docs/review.md explains it for users).

- Loopback by default. Without a token the server answers only requests whose Host is a loopback name,
  which also defeats DNS rebinding (a hostile page whose domain resolves to 127.0.0.1 sends its own Host).
- Beyond loopback a token is required (``check_bind``); every request must then carry it: the URL's
  ``?token=`` once (swapped for an HttpOnly, SameSite=Strict cookie and removed from the address bar),
  the cookie, or an ``X-Flywheel-Token`` header.
- State changes are POST only, from the same origin (Origin / Sec-Fetch-Site checked here) and carrying
  the per-server-start CSRF secret that the page embeds (checked by the route, which owns the body).
- A strict Content-Security-Policy: the page runs only its own script and loads only its own images.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress

from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.types import ASGIApp

from flywheel.errors import ReviewError

LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
MIN_TOKEN_CHARS = 16
CSP = ("default-src 'none'; img-src 'self'; script-src 'self'; style-src 'self'; connect-src 'self'; "
       "form-action 'self'; base-uri 'none'; frame-ancestors 'none'")


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> None:
    """Refuse to listen beyond loopback without a token that is hard to guess."""
    if is_loopback(host):
        return
    if not token:
        raise ReviewError(
            f"refusing to serve the review app on {host} without a token: anyone who can reach this machine "
            "could read the catalog's images and record reviews",
            hint="keep the default --host 127.0.0.1, or add --token $(python -c 'import secrets; "
                 "print(secrets.token_urlsafe())') (or set FLYWHEEL_REVIEW_TOKEN)",
        )
    if len(token) < MIN_TOKEN_CHARS:
        raise ReviewError(
            f"the token is too short for a server on {host} ({len(token)} characters, at least {MIN_TOKEN_CHARS})",
            hint="use a random one: python -c 'import secrets; print(secrets.token_urlsafe())'",
        )


def same_token(given: str | None, expected: str) -> bool:
    return bool(given) and hmac.compare_digest(given.encode(), expected.encode())


def token_cookie_name(token: str) -> str:
    # Cookies are shared across ports: name the cookie after the token so two servers never clobber each other.
    return "flywheel_token_" + hashlib.sha256(token.encode()).hexdigest()[:12]


def same_origin(request: Request) -> bool:
    """Whether a state-changing request comes from this server's own page (browsers send these headers)."""
    expected = f"{request.url.scheme}://{request.headers.get('host', '')}"
    origin = request.headers.get("origin")
    if origin is not None:
        return origin == expected
    site = request.headers.get("sec-fetch-site")
    return site is None or site in ("same-origin", "none")


class Guard(BaseHTTPMiddleware):
    """Host check, token check, same-origin check for POST, and security headers on every response."""

    def __init__(self, app: ASGIApp, *, token: str | None):
        super().__init__(app)
        self.token = token
        self.cookie = token_cookie_name(token) if token else ""

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        return _secure(await self._check(request, call_next))

    async def _check(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        # 1. Without a token only loopback names may address the server (DNS rebinding).
        if not self.token and (request.url.hostname or "") not in LOOPBACK_NAMES:
            return PlainTextResponse("unexpected Host header: this server answers on 127.0.0.1 only", 400)
        # 2. With a token every request carries it; a valid ?token= on a page visit becomes a cookie.
        if self.token:
            given = request.cookies.get(self.cookie) or request.headers.get("x-flywheel-token")
            if not same_token(given, self.token):
                if request.method in ("GET", "HEAD") and same_token(request.query_params.get("token"), self.token):
                    return self._login(request)
                return PlainTextResponse(
                    "a token is required: open the URL that `flywheel review` printed (it ends in ?token=...)", 401)
        # 3. State changes only from this server's own page.
        if request.method not in SAFE_METHODS and not same_origin(request):
            return PlainTextResponse("cross-origin request refused", 403)
        return await call_next(request)

    def _login(self, request: Request) -> Response:
        rest = request.url.remove_query_params("token")
        # A relative target: the address bar loses the token, and the Host header cannot steer the redirect.
        response = RedirectResponse(rest.path + (f"?{rest.query}" if rest.query else ""), status_code=303)
        response.set_cookie(self.cookie, self.token or "", httponly=True, samesite="strict", path="/")
        return response


def _secure(response: Response) -> Response:
    headers = response.headers
    headers.setdefault("content-security-policy", CSP)
    headers.setdefault("x-content-type-options", "nosniff")
    headers.setdefault("x-frame-options", "DENY")
    headers.setdefault("referrer-policy", "no-referrer")  # keeps ?token=... out of any Referer
    headers.setdefault("cache-control", "no-store")
    return response
