"""The judging web app (Starlette): pages, a small JSON API, and its guards.

Pages are plain files under ``static/`` (``index.html`` to judge, ``summary.html`` for the
counts); the page puts model output into the document with ``textContent`` only, and the
Content-Security-Policy allows scripts from this server's files alone, so a response that holds
HTML or ``<script>`` is shown as text and runs nothing.

API (every body is JSON, at most ``MAX_BODY`` bytes, with exactly the fields listed):

- ``POST /api/next {judge}``: the judge's current pair (renewing its hold) or the next free one.
- ``POST /api/judge {judge, item, verdict, better?}`` (pair mode: verdict ``a|b|tie|both_bad``)
  or ``{judge, item, score}`` (rate mode: 1-5): written durably before the answer.
- ``POST /api/undo {judge}``: removes the judge's latest judgement; it is their pair again.
- ``GET /api/summary``: counts per judge, agreement, win rates.

Guards: on a loopback address only requests naming that host are served (no DNS rebinding); on
any other address every request needs the access token (query ``token``, header
``X-Tunesmith-Token`` or the cookie the first page sets), else 403. POSTs must be
``application/json`` (so another site cannot post a form here), oversized bodies get 413 and
malformed ones 400.
"""

from __future__ import annotations

import json
import secrets
import unicodedata
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tunesmith.feedback.store import PAIR_VERDICTS, RATE_SCORES, Conflict, FeedbackStore, Item

STATIC = Path(__file__).parent / "static"
MAX_BODY = 64 * 1024
MAX_NAME = 64
MAX_ANSWER = 32 * 1024
COOKIE = "tunesmith_token"
LOOPBACK_HOSTS = ["127.0.0.1", "localhost", "[::1]", "::1"]
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Guard:
    """ASGI middleware: the access token (when one is set) and security headers on responses."""

    def __init__(self, app: ASGIApp, token: str | None) -> None:
        self.app, self.token = app, token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request = Request(scope)
        from_query = request.query_params.get("token")
        if self.token is not None:
            given = (
                from_query
                or request.headers.get("x-tunesmith-token")
                or request.cookies.get(COOKIE)
                or ""
            )
            if not secrets.compare_digest(given.encode(), self.token.encode()):
                response = PlainTextResponse(
                    "403: this server needs its access token (printed when it started): "
                    "open the address with ?token=...",
                    status_code=403,
                )
                return await response(scope, receive, send)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for k, v in SECURITY_HEADERS.items():
                    headers[k] = v
                if self.token is not None and from_query:  # later requests carry the cookie
                    headers.append(
                        "set-cookie", f"{COOKIE}={self.token}; HttpOnly; SameSite=Strict; Path=/"
                    )
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _judge_name(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise BadRequest(400, "'judge': give your name (text).")
    name = value.strip()
    if len(name) > MAX_NAME or any(unicodedata.category(c).startswith("C") for c in name):
        raise BadRequest(400, f"'judge': at most {MAX_NAME} printable characters.")
    return name


async def _body(request: Request, allowed: set[str], required: set[str]) -> dict[str, Any]:
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise BadRequest(415, "send the body as application/json.")
    raw = await request.body()  # the app's max_body_size answers 413 past MAX_BODY
    try:
        data = json.loads(raw)
    # ValueError: JSON's own errors, bad UTF-8 and integers past Python's 4,300 digits;
    # RecursionError: arrays or objects nested thousands deep (all within MAX_BODY bytes)
    except (ValueError, RecursionError):
        raise BadRequest(400, "the body is not valid JSON.") from None
    if not isinstance(data, dict):
        raise BadRequest(400, "the body must be a JSON object.")
    unknown, missing = set(data) - allowed, required - set(data)
    if unknown or missing:
        raise BadRequest(
            400,
            f"fields: unknown {sorted(unknown)}, missing {sorted(missing)}; allowed {sorted(allowed)}.",
        )
    data["judge"] = _judge_name(data.get("judge"))
    return data


def create_app(
    store: FeedbackStore,
    token: str | None = None,
    allowed_hosts: list[str] | None = None,
) -> Starlette:
    """The ASGI app over a store. ``token``: required on every request when given;
    ``allowed_hosts``: the Host headers served (None: any)."""

    def state(judge: str, item: Item | None) -> dict[str, Any]:
        return {
            "mode": store.mode,
            "item": item.public() if item else None,
            "progress": store.progress(judge),
        }

    def api(handler: Any) -> Any:
        async def endpoint(request: Request) -> Response:
            try:
                return JSONResponse(await handler(request))
            except BadRequest as e:
                return JSONResponse({"error": str(e)}, status_code=e.status)
            except Conflict as e:
                return JSONResponse({"error": str(e)}, status_code=409)

        return endpoint

    async def next_item(request: Request) -> dict[str, Any]:
        body = await _body(request, {"judge"}, {"judge"})
        item = await run_in_threadpool(store.next_for, body["judge"])
        return state(body["judge"], item)

    async def judge(request: Request) -> dict[str, Any]:
        if store.mode == "pair":
            body = await _body(
                request, {"judge", "item", "verdict", "better"}, {"judge", "item", "verdict"}
            )
            verdict, better = body["verdict"], body.get("better")
            if verdict not in PAIR_VERDICTS:
                raise BadRequest(400, f"'verdict': one of {', '.join(PAIR_VERDICTS)}.")
            if better is not None and (not isinstance(better, str) or len(better) > MAX_ANSWER):
                raise BadRequest(400, f"'better': text of at most {MAX_ANSWER} characters.")
        else:
            body = await _body(request, {"judge", "item", "score"}, {"judge", "item", "score"})
            verdict, better = body["score"], None
            if type(verdict) is not int or verdict not in RATE_SCORES:
                raise BadRequest(400, "'score': a whole number from 1 to 5.")
        if not isinstance(body["item"], str):
            raise BadRequest(400, "'item': the id of the pair shown.")
        who = body["judge"]
        await run_in_threadpool(store.judge, who, body["item"], verdict, better)
        return state(who, await run_in_threadpool(store.next_for, who))

    async def undo(request: Request) -> dict[str, Any]:
        body = await _body(request, {"judge"}, {"judge"})
        who = body["judge"]
        undone = await run_in_threadpool(store.undo, who)
        return {**state(who, await run_in_threadpool(store.next_for, who)), "undone": bool(undone)}

    async def summary(request: Request) -> dict[str, Any]:
        return await run_in_threadpool(store.summary)

    def page(name: str) -> Any:
        async def endpoint(request: Request) -> Response:
            return FileResponse(STATIC / name, media_type="text/html")

        return endpoint

    middleware = [Middleware(Guard, token=token)]
    if allowed_hosts is not None:
        middleware.insert(0, Middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts))
    routes = [
        Route("/", page("index.html")),
        Route("/summary", page("summary.html")),
        Route("/api/next", api(next_item), methods=["POST"]),
        Route("/api/judge", api(judge), methods=["POST"]),
        Route("/api/undo", api(undo), methods=["POST"]),
        Route("/api/summary", api(summary), methods=["GET"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    return Starlette(routes=routes, middleware=middleware, max_body_size=MAX_BODY)
