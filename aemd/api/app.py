"""The ASGI application (Starlette, on trio through anyio): routes, the
bearer-token check, and errors in OpenAI's shape.

| path | what |
|---|---|
| ``GET /`` | the status page (HTML) |
| ``GET /metrics`` | Prometheus text format |
| ``GET /v1/models``, ``GET /v1/models/{domain}`` | text domains of the mesh, their hosts and prices |
| ``POST /v1/chat/completions`` | a chat task |
| ``POST /v1/completions`` | a raw completion task |

It runs inside the node's trio run, so handlers call the node, its store
and its TaskService directly (no thread, no copy of state).
"""

from __future__ import annotations

import hmac
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Awaitable, Callable

import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from aemd.api import errors as api_errors
from aemd.api import openai_routes, page, views
from aemd.api.settings import ApiSettings
from aemd.metrics import CONTENT_TYPE
from protocol import errors
from protocol.errors import AemError

if TYPE_CHECKING:
    from aemd.node import Node
    from aemd.tasks import TaskService

log = logging.getLogger("aemd.api")


@dataclass
class ApiContext:
    node: "Node"
    svc: "TaskService"
    settings: ApiSettings
    url: str = ""
    control: dict = field(default_factory=dict)   # the node's control handlers, reused for the page


def _json_error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse(api_errors.error_body(status, code, message), status_code=status)


def _handler(ctx: ApiContext, fn: Callable[[ApiContext, Request], Awaitable[Any]]):
    """A route that answers every failure in OpenAI's error shape: an
    AemError with its code and status, anything else as a 500 (logged)."""
    async def endpoint(request: Request):
        try:
            return await fn(ctx, request)
        except AemError as exc:
            status, body = api_errors.from_aem(exc)
            return JSONResponse(body, status_code=status)
        except Exception:
            log.exception("api: %s %s", request.method, request.url.path)
            return _json_error(500, "INTERNAL", "internal error (see the node's log)")
    return endpoint


async def status_page(ctx: ApiContext, request: Request) -> HTMLResponse:
    node, c = ctx.node, ctx.control
    st = await c["status"]({}, None)
    bal = await views.balance(node)
    peers = await c["peers"]({}, None)
    ads = await c["ads"]({}, None)
    tasks = await trio.to_thread.run_sync(views.recent_tasks, ctx.svc)
    html = page.render(ctx, st, bal, peers, ads, views.hosted(node, ctx.svc), tasks)
    return HTMLResponse(html, headers={"cache-control": "no-store",
                                       "content-security-policy": "default-src 'none'; style-src 'unsafe-inline'"})


async def metrics(ctx: ApiContext, request: Request) -> Response:
    node = ctx.node
    m = node.metrics
    m.refresh(peers=len(node.p2p.connected_peers()), cards=len(node.mesh.cards), ads=len(node.mesh.ads),
              log_entries=await node.store.count(), now=node.opts.clock())
    return Response(m.render(), media_type=CONTENT_TYPE)


class BearerAuth:
    """Every request carries ``Authorization: Bearer TOKEN`` when a token is
    configured (compared in constant time); else 401 in OpenAI's shape."""

    def __init__(self, app, token: str) -> None:
        self.app = app
        self.token = token.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and self.token:
            got = b""
            for k, v in scope.get("headers", ()):
                if k == b"authorization":
                    got = v
                    break
            scheme, _, cred = got.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(cred.strip(), self.token):
                resp = _json_error(401, errors.REFUSED, "missing or wrong bearer token (Authorization: Bearer ...)")
                resp.headers["www-authenticate"] = "Bearer"
                await resp(scope, receive, send)
                return
        await self.app(scope, receive, send)


def build_app(ctx: ApiContext):
    async def not_found(request: Request, exc: Exception) -> JSONResponse:
        status = getattr(exc, "status_code", 404)
        code = errors.NOT_FOUND if status == 404 else errors.BAD_VALUE
        return _json_error(status, code, f"{request.method} {request.url.path}: "
                                         f"{'no such endpoint' if status == 404 else 'method not allowed'}")

    routes = [
        Route("/", _handler(ctx, status_page), methods=["GET"]),
        Route("/metrics", _handler(ctx, metrics), methods=["GET"]),
        Route("/v1/models", _handler(ctx, openai_routes.models), methods=["GET"]),
        Route("/v1/models/{model:path}", _handler(ctx, openai_routes.model), methods=["GET"]),
        Route("/v1/chat/completions", _handler(ctx, openai_routes.chat_completions), methods=["POST"]),
        Route("/v1/completions", _handler(ctx, openai_routes.completions), methods=["POST"]),
    ]
    app = Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found})
    return BearerAuth(app, ctx.settings.token)
