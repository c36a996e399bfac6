"""The control socket between `aemctl` and a running `aemd`.

A Unix domain socket in the node's home, mode 0600 (the home itself is 0700),
so only the node's owner can drive it; no TCP port. Framing: each message is a
4-byte big-endian length and a msgpack map, at most :data:`MAX_FRAME` bytes
(the one frame format, :mod:`protocol.frame`).

A client sends one request ``{"cmd": NAME, "args": {...}}`` per connection.
The server answers with zero or more events ``{"event": KIND, ...}`` (streamed
output, progress) and then exactly one final ``{"ok": true, "result": ...}``
or ``{"ok": false, "code": CODE, "detail": TEXT}``.

The server checks a request as it would a peer's message (:func:`check_request`:
known fields only, a short string ``cmd``, a map of at most MAX_ARGS string
keys, nesting at most MAX_DEPTH), and a handler's unexpected exception becomes
an ``INTERNAL`` error reply, logged with its traceback: no local request can
stop the node.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Any, Awaitable, Callable

import msgpack
import trio

from protocol import errors
from protocol.errors import AemError
from protocol.frame import HEADER_LEN, decode_header, encode_header

MAX_FRAME = 32 << 20
MAX_CMD = 64          # characters of a command name or an argument name
MAX_ARGS = 64         # argument fields of one request
MAX_DEPTH = 8         # nesting of argument values (chat messages are 3 deep)
MAX_DETAIL = 1000     # characters of an error reply's detail

log = logging.getLogger("aemd.control")

Emit = Callable[[dict], Awaitable[None]]
Handler = Callable[[dict, Emit], Awaitable[Any]]


def _pack(msg: dict) -> bytes:
    body = msgpack.packb(msg, use_bin_type=True)
    if len(body) > MAX_FRAME:
        raise AemError(errors.TOO_LARGE, "control message over the frame limit")
    return encode_header(len(body)) + body


def _unpack(body: bytes) -> dict:
    try:
        msg = msgpack.unpackb(body, raw=False, strict_map_key=False)
    except Exception:
        raise AemError(errors.BAD_ENCODING, "control message is not msgpack") from None
    if not isinstance(msg, dict):
        raise AemError(errors.BAD_TYPE, "control message is not a map")
    return msg


# -- server (inside aemd) -------------------------------------------------------

async def _recv_exact(stream: trio.abc.ReceiveStream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await stream.receive_some(min(n - len(buf), 1 << 20))
        if not chunk:
            raise AemError(errors.BAD_ENCODING, "control connection closed mid-message")
        buf += chunk
    return bytes(buf)


async def serve_control(path: Path, handlers: dict[str, Handler], *,
                        task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``handlers`` on the Unix socket ``path`` until cancelled."""
    if path.exists() or path.is_symlink():
        # A stale socket from a crashed run; a live node would still hold the
        # home's lock, which the caller has taken before getting here.
        path.unlink()
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        await sock.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(64)
    listener = trio.SocketListener(sock)
    try:
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                conn = await listener.accept()
                nursery.start_soon(_serve_one, conn, handlers)
    finally:
        path.unlink(missing_ok=True)
        with trio.CancelScope(shield=True):
            await listener.aclose()


async def _serve_one(conn: trio.SocketStream, handlers: dict[str, Handler]) -> None:
    async with conn:
        async def emit(event: dict) -> None:
            await conn.send_all(_pack(event))

        try:
            with trio.fail_after(30):
                n = decode_header(await _recv_exact(conn, HEADER_LEN), MAX_FRAME, "control request")
                req = _unpack(await _recv_exact(conn, n))
            cmd, args = check_request(req)
            handler = handlers.get(cmd)
            if handler is None:
                raise AemError(errors.NOT_FOUND, f"unknown control command {cmd[:64]!r}")
            try:
                result = await handler(args, emit)
                reply = _pack({"ok": True, "result": result})
            except (AemError, trio.Cancelled, trio.TooSlowError,
                    trio.BrokenResourceError, trio.ClosedResourceError):
                raise
            except Exception as exc:  # noqa: BLE001 - a handler's bug must not stop the node
                log.exception("control command %r failed", cmd)
                detail = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
                raise AemError(errors.INTERNAL, f"{cmd}: {detail}") from None
            await conn.send_all(reply)
        except AemError as exc:
            try:
                await conn.send_all(_pack({"ok": False, "code": str(exc.code)[:64],
                                           "detail": str(exc.detail)[:MAX_DETAIL]}))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        except trio.TooSlowError:
            pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away; its request's work is already accounted


def check_request(req: dict) -> tuple[str, dict]:
    """A request's ``cmd`` and ``args``, checked like a peer's message: the
    local user is another process, and a malformed request must get an error
    reply, not reach a handler with a type it never expected. Handlers still
    check each argument they read (type and range)."""
    unknown = set(req) - {"cmd", "args"}
    if unknown:
        raise AemError(errors.UNKNOWN_FIELD, f"control request: unknown field {sorted(map(str, unknown))[0][:64]!r}")
    cmd = req.get("cmd")
    if not isinstance(cmd, str) or not 0 < len(cmd) <= MAX_CMD:
        raise AemError(errors.BAD_TYPE, "control request: cmd must be a short string")
    args = req.get("args", {})
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise AemError(errors.BAD_TYPE, "control args must be a map")
    if len(args) > MAX_ARGS:
        raise AemError(errors.TOO_LARGE, f"control args: more than {MAX_ARGS} fields")
    for k in args:
        if not isinstance(k, str) or len(k) > MAX_CMD:
            raise AemError(errors.BAD_TYPE, "control args: every key must be a short string")
    _check_depth(args, 0)
    return cmd, args


def _check_depth(v: Any, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise AemError(errors.TOO_DEEP, f"control args nested deeper than {MAX_DEPTH}")
    if isinstance(v, dict):
        for x in v.values():
            _check_depth(x, depth + 1)
    elif isinstance(v, list):
        for x in v:
            _check_depth(x, depth + 1)


# -- client (inside aemctl; plain blocking sockets) -----------------------------

def call(path: Path, cmd: str, args: dict | None = None, *,
         on_event: Callable[[dict], None] | None = None, timeout: float | None = 60.0) -> Any:
    """Send one request to the node at ``path`` and return its result.

    Raises AemError NO_NODE when no node answers there, TIMEOUT when it does
    not finish in ``timeout`` seconds, and the node's own error otherwise.
    """
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        try:
            s.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            raise AemError(errors.NO_NODE,
                           f"no node is running at {path.parent} (start one with `aemd start --home {path.parent}`)") from None
        except OSError as exc:
            raise AemError(errors.NO_NODE, f"cannot reach the node at {path}: {exc.strerror}") from None
        s.sendall(_pack({"cmd": cmd, "args": args or {}}))
        while True:
            msg = _recv_msg(s)
            if "event" in msg:
                if on_event is not None:
                    on_event(msg)
                continue
            if msg.get("ok"):
                return msg.get("result")
            raise AemError(str(msg.get("code", errors.REFUSED)), str(msg.get("detail", "")))
    except socket.timeout:
        raise AemError(errors.TIMEOUT, f"the node did not answer {cmd!r} in {timeout} s") from None
    finally:
        s.close()


def _recv_msg(s: socket.socket) -> dict:
    def exact(n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = s.recv(min(n - len(buf), 1 << 20))
            if not chunk:
                raise AemError(errors.UNAVAILABLE, "the node closed the connection (did it stop?)")
            buf += chunk
        return bytes(buf)

    n = decode_header(exact(HEADER_LEN), MAX_FRAME, "control reply")
    return _unpack(exact(n))
