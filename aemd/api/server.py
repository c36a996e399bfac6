"""Serving the API: hypercorn's trio worker, as one task of the node's nursery.

The listening socket is bound synchronously when the node starts its
extensions, so the address (port 0 picks a free one) is known before the
node reports itself started: `aemd start` prints it and `aemctl status`
shows it. The bound socket is handed to hypercorn by file descriptor
(``fd://``), hypercorn's own way to serve a socket it did not create.

The server stops with the node: the node's nursery is cancelled and the
server task with it; :meth:`ApiServer.stop` is the graceful trigger
(hypercorn finishes requests in flight for up to ``GRACEFUL_S``).
"""

from __future__ import annotations

import logging
import socket
from typing import TYPE_CHECKING

import trio

from aemd.api.settings import ApiSettings
from protocol import errors
from protocol.errors import AemError

if TYPE_CHECKING:
    from aemd.node import Node

log = logging.getLogger("aemd.api")

GRACEFUL_S = 2.0
KEEP_ALIVE_S = 30       # the openai client keeps connections open between requests
BACKLOG = 128


class ApiServer:
    def __init__(self, settings: ApiSettings, app) -> None:
        self.settings = settings
        self.app = app
        self.url = ""
        self.error = ""
        self._sock: socket.socket | None = None
        self._stop = trio.Event()

    def bind(self) -> str:
        host, port = self.settings.host, self.settings.port
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(BACKLOG)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        bound = sock.getsockname()[1]
        self.url = f"http://[{host}]:{bound}" if family == socket.AF_INET6 else f"http://{host}:{bound}"
        return self.url

    def start(self, node: "Node", nursery: trio.Nursery) -> None:
        """The node's extension hook: bind now, serve in the node's nursery.
        A port already taken is a warning, not a stopped node: the mesh side
        of the node works without its API (and several nodes on one machine
        with the default config would otherwise refuse to start)."""
        try:
            self.bind()
        except OSError as exc:
            self.error = f"cannot listen on {self.settings.host}:{self.settings.port}: {exc.strerror or exc}"
            log.warning("api: %s; the HTTP API is off (set [api] listen)", self.error)
            return
        node.api_url = self.url
        nursery.start_soon(self.serve)

    async def serve(self) -> None:
        from hypercorn.config import Config
        from hypercorn.trio import serve
        if self._sock is None:      # serve() runs once, after bind() succeeded
            raise AemError(errors.INVARIANT, "the API socket is not bound, or already served")
        cfg = Config()
        cfg.bind = [f"fd://{self._sock.detach()}"]     # hypercorn owns the socket from here
        self._sock = None
        cfg.accesslog = None
        cfg.errorlog = logging.getLogger("aemd.api.http")
        cfg.graceful_timeout = GRACEFUL_S
        cfg.keep_alive_timeout = KEEP_ALIVE_S
        cfg.include_server_header = False
        log.info("api: serving on %s", self.url)
        await serve(self.app, cfg, shutdown_trigger=self._stop.wait)

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        """A socket bound but never served (the node stopped first)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
