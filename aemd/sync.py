"""Log replication over one libp2p stream: the I/O shell of
``protocol.syncsession`` (specs/sync-protocol.md).

Every decision of the protocol (what to ask for, pipelining, batching, fork
search, limits) is made by the pure sessions in ``protocol/syncsession.py``;
this module only performs their actions on a stream and a log
(:func:`aemd.sessions.drive`), and keeps the daemon's entry points :func:`sync_client`
and :func:`sync_server`.
"""

from __future__ import annotations

from typing import Protocol

from aemd.sessions import drive
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


async def sync_client(stream, log: LogAccess, net: bytes, batch: int = MAX_BATCH, *,
                      only: Frontier | None = None) -> SyncStats:
    """Pull from the peer on ``stream`` everything it has that we lack (of
    one author, up to one entry, with ``only``); see
    :func:`protocol.syncsession.sync_client`."""
    return await drive(client_session(net, batch=batch, only=only), stream, log)


async def sync_server(stream, log: LogAccess, net: bytes) -> int:
    """Answer one peer's sync session until it is done; returns requests served."""
    return await drive(server_session(net), stream, log)
