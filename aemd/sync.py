"""Log replication over one libp2p stream: the I/O shell of
``protocol.syncsession`` (specs/sync-protocol.md).

Every decision of the protocol (what to ask for, pipelining, batching, fork
search, limits) is made by the pure sessions in ``protocol/syncsession.py``;
this module only performs their actions on a stream and a log
(:func:`drive`), and keeps the daemon's entry points :func:`sync_client`
and :func:`sync_server`.
"""

from __future__ import annotations

from typing import Any, Protocol

import trio

from aemd.framing import deadline, read_frame_or_eof, write_frame
from protocol.errors import AemError
from protocol.session import Call, Recv, Send, Session
from protocol.sync import MAX_BATCH, Frontier
from protocol.syncsession import (DONE_TIMEOUT_S, FRONTIERS_LIMIT, MAX_FORK_CHECKS, MAX_REQUESTS_PER_SESSION,
                                  PIPELINE, RANGE_LIMIT, READ_TIMEOUT_S, SyncStats)
from protocol.syncsession import sync_client as client_session
from protocol.syncsession import sync_server as server_session

__all__ = ["DONE_TIMEOUT_S", "FRONTIERS_LIMIT", "MAX_FORK_CHECKS", "MAX_REQUESTS_PER_SESSION", "PIPELINE",
           "RANGE_LIMIT", "READ_TIMEOUT_S", "LogAccess", "SyncStats", "drive", "sync_client", "sync_server"]


class LogAccess(Protocol):
    """What sync needs of the log store (async, so it can run in a thread):
    the ``Call`` ops of protocol/syncsession.py."""

    async def frontiers(self) -> dict[bytes, tuple[int, bytes]]: ...

    async def range(self, author: bytes, from_seq: int, limit: int) -> list[bytes]: ...

    async def linked_ids(self, pairs: list[tuple[bytes, int]]) -> dict[tuple[bytes, int], set[bytes]]:
        """Ids of the linked entries at each (author, seq)."""
        ...

    async def insert_batch(self, entries: list[bytes]) -> tuple[int, int]:
        """Insert; return (newly stored, rejected as invalid)."""
        ...


async def drive(session: Session, stream, target: Any) -> Any:
    """Run ``session`` to its end on ``stream``, answering its ``Call``\\s
    with ``target``'s async methods of the same name; returns its outcome.

    An ``AemError`` of the stream (a timeout, a reset, an oversized frame)
    ends the session and propagates; a best-effort ``Send`` that fails is
    passed over (protocol/session.py)."""
    result: Any = None
    try:
        while True:
            try:
                action = session.send(result)
            except StopIteration as stop:
                return stop.value
            result = await _perform(action, stream, target)
    finally:
        session.close()     # a session left mid-way (an error, a cancellation) ends here, not at GC


async def _perform(action: Any, stream, target: Any) -> Any:
    if isinstance(action, Send):
        bound = READ_TIMEOUT_S if action.timeout_s is None else action.timeout_s
        if action.best_effort:
            try:
                with trio.move_on_after(bound):
                    await write_frame(stream, action.data)
            except AemError:
                pass
        else:
            with deadline(bound, action.what):
                await write_frame(stream, action.data)
        return None
    if isinstance(action, Recv):
        with deadline(action.timeout_s, action.what):
            return await read_frame_or_eof(stream, action.limit)
    if isinstance(action, Call):
        return await getattr(target, action.op)(*action.args)
    raise TypeError(f"a session yielded {action!r}, not an action")


async def sync_client(stream, log: LogAccess, net: bytes, batch: int = MAX_BATCH, *,
                      only: Frontier | None = None) -> SyncStats:
    """Pull from the peer on ``stream`` everything it has that we lack (of
    one author, up to one entry, with ``only``); see
    :func:`protocol.syncsession.sync_client`."""
    return await drive(client_session(net, batch=batch, only=only), stream, log)


async def sync_server(stream, log: LogAccess, net: bytes) -> int:
    """Answer one peer's sync session until it is done; returns requests served."""
    return await drive(server_session(net), stream, log)
