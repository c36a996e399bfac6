"""The node's HTTP server: an OpenAI-compatible API over the mesh, a status
page and Prometheus metrics, started by `aemd start` (``[api]`` config).

- ``app``: the ASGI application (routes, bearer token, error shape);
- ``openai_routes``: ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``;
- ``page``: the status page at ``/``;
- ``views``: the data those show (balance, models, hosted experts, tasks);
- ``server``: hypercorn's trio worker as a task of the node's nursery;
- ``settings``: the ``[api]`` section, checked before the node starts;
- ``errors``: aem errors as OpenAI error bodies with an HTTP status.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aemd.api.settings import ApiSettings, api_settings

if TYPE_CHECKING:
    from aemd.api.server import ApiServer
    from aemd.node import Node
    from aemd.tasks import TaskService

__all__ = ["ApiSettings", "api_settings", "install"]


def install(node: "Node", cfg: dict, svc: "TaskService") -> "ApiServer | None":
    """Add the HTTP server to ``node`` (before it runs), if ``[api]`` enables
    it. Raises AemError CONFIG for a bad ``[api]`` section, so `aemd start`
    refuses to start rather than serve an open, tokenless API."""
    settings = api_settings(cfg)
    if not settings.enabled:
        return None
    from aemd import nodecontrol
    from aemd.api.app import ApiContext, build_app
    from aemd.api.server import ApiServer
    ctx = ApiContext(node=node, svc=svc, settings=settings, control=nodecontrol.handlers(node))
    server = ApiServer(settings, build_app(ctx))

    def start(n: "Node", nursery) -> None:
        server.start(n, nursery)
        ctx.url = server.url

    node.add_extension(start)
    node.add_closer(server.close)
    return server
