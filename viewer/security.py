"""What keeps the viewer safe to leave running: read-only methods, an optional token, strict headers.

One ASGI middleware in front of every route:

- GET and HEAD only: any other method answers 405 with `Allow: GET, HEAD`, whatever the path.
- With a token (`--token-file`): a request must carry it as `Authorization: Bearer <token>`
  or in the cookie that `?token=<token>` sets once (then the address bar is cleaned by a
  redirect). Compared in constant time (`hmac.compare_digest`). Without it: 401, a page
  that says what to do (JSON under /api/).
- Every response gets a Content-Security-Policy without inline script, nosniff, no
  framing, no referrer.
"""
from __future__ import annotations

import hmac
import json
from http.cookies import SimpleCookie
from pathlib import Path
from urllib.parse import parse_qsl, urlencode

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from reconciler.errors import ConfigError

COOKIE = "winslow_viewer_token"
METHODS = ("GET", "HEAD")
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "font-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "cross-origin-opener-policy": "same-origin",
}
UNAUTHORIZED = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Winslow viewer: a token is needed</title>
<link rel="stylesheet" href="/static/viewer.css"></head>
<body><main class="narrow"><h1>This viewer needs a token</h1>
<p>Whoever started it with <code>winslow viewer --token-file FILE</code> holds the token (the contents of that file).</p>
<p>Open this page once with <code>?token=&lt;token&gt;</code> added to its address; the browser keeps it in a cookie
for this site from then on. From a script, send <code>Authorization: Bearer &lt;token&gt;</code>, for example
<code>curl -H "Authorization: Bearer $(cat FILE)" http://HOST:PORT/api/projects</code>.</p>
</main></body></html>
"""


def read_token(path: Path) -> str:
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"--token-file {path}: {exc.strerror}") from None
    if len(token) < 16:
        raise ConfigError(f"--token-file {path}: the token is {len(token)} characters; use at least 16 "
                          "(for example `openssl rand -hex 24 > FILE`)")
    return token


def _same(given: str | None, token: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode("utf-8", "replace"), token.encode("utf-8"))


class Guard:
    def __init__(self, app: ASGIApp, token: str | None = None) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in HEADERS.items():
                    if name not in headers:
                        headers[name] = value
            await send(message)

        if scope["method"] not in METHODS:
            await _respond(with_headers, 405, b"405 Method Not Allowed: the viewer only reads (GET, HEAD)\n",
                           "text/plain; charset=utf-8", [(b"allow", b"GET, HEAD")])
            return
        if self.token is not None and not await self._admitted(scope, with_headers):
            return
        await self.app(scope, receive, with_headers)

    async def _admitted(self, scope: Scope, send: Send) -> bool:
        """True when the request carries the token; else it has been answered (401, or the cookie's redirect)."""
        assert self.token is not None
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        auth = headers.get("authorization", "")
        if auth[:7].lower() == "bearer " and _same(auth[7:].strip(), self.token):
            return True
        cookie = SimpleCookie()
        try:
            cookie.load(headers.get("cookie", ""))
        except Exception:  # noqa: BLE001 - a malformed cookie header is just no cookie
            cookie = SimpleCookie()
        if COOKIE in cookie and _same(cookie[COOKIE].value, self.token):
            return True
        query = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        given = next((v for k, v in query if k == "token"), None)
        if given is not None and _same(given, self.token):
            rest = urlencode([(k, v) for k, v in query if k != "token"])
            location = scope["path"] + (f"?{rest}" if rest else "")
            cookie_header = f"{COOKIE}={self.token}; Path=/; HttpOnly; SameSite=Strict"
            await _respond(send, 303, b"", "text/plain", [(b"location", location.encode("latin-1", "replace")),
                                                             (b"set-cookie", cookie_header.encode("latin-1"))])
            return False
        if scope["path"].startswith("/static/"):
            return True  # the stylesheet and script hold nothing; the 401 page uses the stylesheet
        if scope["path"].startswith("/api/"):
            body = json.dumps({"error": "unauthorized", "detail": "send Authorization: Bearer <token> "
                                                                  "(the contents of the viewer's --token-file)"})
            await _respond(send, 401, body.encode(), "application/json", [(b"www-authenticate", b"Bearer")])
        else:
            await _respond(send, 401, UNAUTHORIZED.encode(), "text/html; charset=utf-8",
                           [(b"www-authenticate", b"Bearer")])
        return False


async def _respond(send: Send, status: int, body: bytes, media_type: str,
                   extra: list[tuple[bytes, bytes]] | None = None) -> None:
    headers = [(b"content-type", media_type.encode()), (b"content-length", str(len(body)).encode()),
               (b"cache-control", b"no-store"), *(extra or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
