"""Served streams: per-protocol and per-peer limits, idle and session deadlines,
the frame budget (:class:`_GuardedStream`), and opening streams.

The :class:`StreamsMixin` methods are part of :class:`aemd.p2p.host.P2PNode`;
frames themselves are :mod:`aemd.framing`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import trio
from libp2p.abc import INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from aemd.p2p.identity import _parse_peer_id
from protocol.errors import BAD_VALUE, REFUSED, TIMEOUT, TOO_LARGE, UNAVAILABLE, AemError

if TYPE_CHECKING:
    from aemd.p2p.host import P2PNode

log = logging.getLogger("aemd.p2p")

#: ``async handler(stream, remote_peer_id)``; the stream is reset or closed after it returns.
StreamHandler = Callable[[INetStream, str], Awaitable[None]]


class _GuardedStream:
    """The stream a served handler sees (see :meth:`P2PNode.set_stream_handler`).

    Reads fail after ``idle`` seconds without a byte; it is the
    :class:`aemd.framing.FramePolicy` of its frames (pace, byte budget per
    peer and in all); every abuse penalises the peer once per stream. Writes,
    close and reset go to the libp2p stream unchanged.
    """

    def __init__(self, stream: INetStream, node: P2PNode, pid: ID, idle: float) -> None:
        self._stream = stream
        self._node = node
        self._pid = pid
        self._idle = idle
        self.muxed_conn = stream.muxed_conn
        self.frame_policy = self
        self.abused: str | None = None

    async def read(self, n: int | None = None) -> bytes:
        with trio.move_on_after(self._idle):
            return await self._stream.read(n)
        self.abuse(f"no data for {self._idle:g} s")
        raise AemError(TIMEOUT, f"peer sent nothing for {self._idle:g} s")

    async def write(self, data: bytes) -> None:
        await self._stream.write(data)

    async def close(self) -> None:
        await self._stream.close()

    async def reset(self) -> None:
        await self._stream.reset()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    # FramePolicy
    def frame_deadline(self, length: int) -> float:
        return self._idle + length / self._node._config.frame_min_bytes_per_s

    def take(self, n: int) -> None:
        node, cfg = self._node, self._node._config
        mine = node._buffered.get(self._pid, 0)
        if mine + n > cfg.max_buffered_per_peer or node._buffered_total + n > cfg.max_buffered_total:
            self.abuse("inbound frames over the buffer budget")
            raise AemError(TOO_LARGE, "too many bytes of unfinished frames from this peer")
        node._buffered[self._pid] = mine + n
        node._buffered_total += n

    def give(self, n: int) -> None:
        node = self._node
        left = node._buffered.get(self._pid, 0) - n
        if left > 0:
            node._buffered[self._pid] = left
        else:
            node._buffered.pop(self._pid, None)
        node._buffered_total = max(0, node._buffered_total - n)

    def abuse(self, reason: str) -> None:
        if self.abused is None:
            self.abused = reason
            log.info("stream abuse by %s: %s", self._pid, reason)
            self._node._stream_abuse(self._pid, reason)


def _check_protocol(protocol_id: str) -> None:
    if not isinstance(protocol_id, str) or not protocol_id.startswith("/") or len(protocol_id) > 256:
        raise AemError(BAD_VALUE, f"bad protocol id: {protocol_id!r}")


async def _reset_quietly(stream: INetStream) -> None:
    with trio.CancelScope(shield=True), trio.move_on_after(1.0):
        try:
            await stream.reset()
        except Exception:
            pass


async def _close_quietly(stream: INetStream, timeout: float) -> None:
    with trio.CancelScope(shield=True), trio.move_on_after(timeout):
        try:
            await stream.close()
        except Exception:
            pass


class StreamsMixin:
    """The stream half of :class:`~aemd.p2p.host.P2PNode` (its state is set there)."""

    def set_stream_handler(self, protocol_id: str, handler: StreamHandler, *,
                           max_concurrent: int | None = None, max_per_peer: int | None = None,
                           idle_timeout: float | None = None,
                           session_timeout: float | None = None) -> None:
        """Serve ``protocol_id`` with ``async handler(stream, remote_peer_id)``.

        The handler's exceptions are logged and the stream reset; when it
        returns the stream is closed. Streams from banned peers, streams beyond
        ``max_concurrent`` running handlers, and streams beyond ``max_per_peer``
        running handlers of one peer are reset at once (the last also
        penalised). The handler gets a guarded stream: a read that waits more
        than ``idle_timeout`` for a byte fails with AemError(TIMEOUT), frames
        are paced and their bytes budgeted (:mod:`aemd.framing`), and the whole
        handler is cancelled after ``session_timeout`` (None: no limit); each
        of these penalises the peer (``stream_abuse_points``).
        """
        _check_protocol(protocol_id)
        cfg = self._config
        limit = cfg.max_concurrent_streams if max_concurrent is None else max_concurrent
        per_peer = cfg.max_streams_per_peer if max_per_peer is None else max_per_peer
        idle = cfg.stream_idle_timeout if idle_timeout is None else idle_timeout
        if limit <= 0 or per_peer <= 0:
            raise AemError(BAD_VALUE, "max_concurrent and max_per_peer must be positive")
        if not idle > 0 or (session_timeout is not None and not session_timeout > 0):
            raise AemError(BAD_VALUE, "idle_timeout and session_timeout must be positive")
        node = self

        async def wrapped(stream: INetStream) -> None:
            try:
                pid = stream.muxed_conn.peer_id
            except AttributeError:
                await _reset_quietly(stream)
                return
            if node._is_banned_id(pid) or node._handler_active.get(protocol_id, 0) >= limit:
                await _reset_quietly(stream)
                return
            slot = (protocol_id, pid)
            if node._handler_peer_active.get(slot, 0) >= per_peer:
                # Refused at once, so cheap: a small penalty (an honest payer may
                # briefly have more tasks for one host), enough to ban a flood.
                node._stream_abuse(pid, f"more than {per_peer} concurrent {protocol_id} streams",
                                   node._config.stream_overflow_points)
                await _reset_quietly(stream)
                return
            node._handler_active[protocol_id] = node._handler_active.get(protocol_id, 0) + 1
            node._handler_peer_active[slot] = node._handler_peer_active.get(slot, 0) + 1
            guarded = _GuardedStream(stream, node, pid, idle)
            ok = False
            try:
                with trio.move_on_after(math.inf if session_timeout is None else session_timeout) as scope:
                    await handler(guarded, pid.to_base58())  # type: ignore[arg-type]
                    ok = True
                if scope.cancelled_caught:
                    guarded.abuse(f"{protocol_id} session longer than {session_timeout:g} s")
            except AemError as exc:
                log.debug("%s handler for %s: %s", protocol_id, pid, exc)
                if exc.code == TIMEOUT:      # a deadline of the handler's own that the peer missed
                    guarded.abuse(f"{protocol_id}: {exc.detail}")
            except Exception:
                log.warning("%s handler for %s raised", protocol_id, pid, exc_info=True)
            finally:
                node._handler_active[protocol_id] -= 1
                node._handler_peer_active[slot] -= 1
                if node._handler_peer_active[slot] <= 0:
                    del node._handler_peer_active[slot]
                if ok:
                    await _close_quietly(stream, node._config.close_timeout)
                else:
                    await _reset_quietly(stream)

        self._host.set_stream_handler(TProtocol(protocol_id), wrapped)

    def _stream_abuse(self, pid: ID, reason: str, points: float | None = None) -> None:
        self.stream_abuse += 1
        self.penalize(pid.to_base58(), self._config.stream_abuse_points if points is None else points, reason)

    def buffered_bytes(self, peer_id: str | None = None) -> int:
        """Bytes of incomplete inbound frames held now (of one peer, or in all)."""
        if peer_id is None:
            return self._buffered_total
        return self._buffered.get(_parse_peer_id(peer_id), 0)

    def remove_stream_handler(self, protocol_id: str) -> None:
        self._host.remove_stream_handler(TProtocol(protocol_id))

    async def open_stream(self, peer_id: str, protocol_id: str) -> INetStream:
        """Open a stream to ``peer_id`` speaking ``protocol_id``; the caller closes it.

        Dials through the peerstore if not connected. Raises AemError: REFUSED
        (banned), TIMEOUT (``stream_open_timeout``), UNAVAILABLE (no connection,
        protocol not supported, stream failure).
        """
        _check_protocol(protocol_id)
        self._require_running()
        pid = _parse_peer_id(peer_id)
        if self._is_banned_id(pid):
            raise AemError(REFUSED, f"peer {pid} is banned")
        try:
            with trio.fail_after(self._config.stream_open_timeout):
                return await self._host.new_stream(pid, [TProtocol(protocol_id)])
        except trio.TooSlowError:
            raise AemError(TIMEOUT, f"opening {protocol_id} to {pid} took too long") from None
        except Exception as exc:
            raise AemError(UNAVAILABLE,
                           f"opening {protocol_id} to {pid} failed: {type(exc).__name__}: {exc}") from exc

    @asynccontextmanager
    async def stream(self, peer_id: str, protocol_id: str) -> AsyncIterator[INetStream]:
        """``open_stream`` as a context manager: closed on success, reset on error."""
        s = await self.open_stream(peer_id, protocol_id)
        try:
            yield s
        except BaseException:
            await _reset_quietly(s)
            raise
        else:
            await _close_quietly(s, self._config.close_timeout)
