"""Log replication over one libp2p stream (specs/sync-protocol.md).

Pull-based: the side that opens the stream (the client) sends its Frontiers,
the server answers with its own, and the client then asks for the ranges it
is missing in bounded batches, verifying every entry on insert. Each side
pulls for itself, so two nodes that connect both run a session.

Both ends bound everything: frames by size, sessions by request count and
time, batches by entries and bytes. A peer that sends entries that fail
verification is reported through ``SyncStats.rejected`` so the node can
penalise it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

import trio

from aemd.framing import deadline, read_frame, read_frame_or_eof, write_frame
from protocol import errors
from protocol.errors import AemError
from protocol.sync import (MAX_BATCH, Frontier, Frontiers, RangeRequest, RangeResponse,
                           SyncDone, decode_sync_message, plan_fetch)

MAX_REQUESTS_PER_SESSION = 10_000
PIPELINE = 4                   # range requests in flight on one stream
READ_TIMEOUT_S = 30.0
FRONTIERS_LIMIT = Frontiers.MAX_SIZE
RANGE_LIMIT = RangeResponse.MAX_SIZE


class LogAccess(Protocol):
    """What sync needs of the log store (async, so it can run in a thread)."""

    async def frontiers(self) -> dict[bytes, tuple[int, bytes]]: ...

    async def range(self, author: bytes, from_seq: int, limit: int) -> list[bytes]: ...

    async def insert_batch(self, entries: list[bytes]) -> tuple[int, int]:
        """Insert; return (newly stored, rejected as invalid)."""
        ...


@dataclass
class SyncStats:
    requests: int = 0
    received: int = 0
    added: int = 0
    rejected: int = 0
    authors: set = field(default_factory=set)    # authors with newly stored entries


def _frontier_list(fr: dict[bytes, tuple[int, bytes]]) -> tuple[Frontier, ...]:
    return tuple(Frontier(author=a, seq=s, head=h) for a, (s, h) in sorted(fr.items()))


async def sync_client(stream, log: LogAccess, net: bytes, batch: int = MAX_BATCH, *,
                      only: Frontier | None = None) -> SyncStats:
    """Pull from the peer on ``stream`` everything it has that we lack; with
    ``only`` (from a head announcement), just that author up to that entry,
    without the frontier exchange, which grows with the number of authors."""
    stats = SyncStats()
    batch = max(1, min(batch, MAX_BATCH))
    local = await log.frontiers()
    if only is not None:
        remote_frontiers: tuple[Frontier, ...] = (only,)
    else:
        with deadline(READ_TIMEOUT_S, "sync frontiers"):
            await write_frame(stream, Frontiers(net=net, frontiers=_frontier_list(local)).encode())
            remote = decode_sync_message(await read_frame(stream, FRONTIERS_LIMIT))
        if not isinstance(remote, Frontiers) or remote.net != net:
            raise AemError(errors.WRONG_OBJECT, "peer did not answer with its frontiers")
        remote_frontiers = remote.frontiers
    targets = {fr.author: fr.seq for fr in remote_frontiers}
    queue = deque(plan_fetch(local, remote_frontiers, batch))
    # Up to PIPELINE requests in flight (the server answers in order), and
    # small responses merged into one insert: with many authors of few
    # entries each, a request per round trip and a commit per author would
    # cost far more than the entries themselves.
    in_flight: deque[tuple[bytes, int, int]] = deque()
    pending: list[bytes] = []
    pending_authors: set[bytes] = set()
    while queue or in_flight:
        while queue and len(in_flight) < PIPELINE and stats.requests < MAX_REQUESTS_PER_SESSION:
            author, from_seq, limit = queue.popleft()
            stats.requests += 1
            with deadline(READ_TIMEOUT_S, "sync range request"):
                await write_frame(stream, RangeRequest(net=net, author=author, from_seq=from_seq,
                                                       limit=limit).encode())
            in_flight.append((author, from_seq, limit))
        if not in_flight:
            break
        author, from_seq, limit = in_flight.popleft()
        with deadline(READ_TIMEOUT_S, "sync range"):
            resp = decode_sync_message(await read_frame(stream, RANGE_LIMIT))
        if not isinstance(resp, RangeResponse) or resp.net != net or resp.author != author:
            raise AemError(errors.WRONG_OBJECT, "peer answered a range request with something else")
        if len(resp.entries) > limit:
            raise AemError(errors.BAD_VALUE, "peer sent more entries than asked")
        got = len(resp.entries)
        stats.received += got
        if got:
            pending.extend(resp.entries)
            pending_authors.add(author)
        nxt = from_seq + got
        # Keep going while the peer had a full batch and more to give.
        if got == limit and nxt <= targets.get(author, -1):
            queue.append((author, nxt, min(batch, targets[author] - nxt + 1)))
        if len(pending) >= batch or not (queue or in_flight):
            added, rejected = await log.insert_batch(pending)
            stats.added += added
            stats.rejected += rejected
            if added:
                stats.authors |= pending_authors
            pending, pending_authors = [], set()
            if rejected:
                break  # a peer serving bad entries gets no more of our time this session
    if pending:  # the session's request limit stopped the loop with entries in hand
        added, rejected = await log.insert_batch(pending)
        stats.added += added
        stats.rejected += rejected
        if added:
            stats.authors |= pending_authors
    with trio.move_on_after(5):
        await write_frame(stream, SyncDone(net=net).encode())
    return stats


async def sync_server(stream, log: LogAccess, net: bytes) -> int:
    """Answer one peer's sync session until it is done; returns requests served."""
    served = 0
    while served < MAX_REQUESTS_PER_SESSION + 2:
        with deadline(READ_TIMEOUT_S, "sync request"):
            frame = await read_frame_or_eof(stream, FRONTIERS_LIMIT)
        if frame is None:
            return served
        msg = decode_sync_message(frame)
        if getattr(msg, "net", None) != net:
            raise AemError(errors.WRONG_NETWORK, "sync message for another network")
        served += 1
        if isinstance(msg, SyncDone):
            return served
        if isinstance(msg, Frontiers):
            reply = Frontiers(net=net, frontiers=_frontier_list(await log.frontiers()))
        elif isinstance(msg, RangeRequest):
            entries = await log.range(msg.author, msg.from_seq, msg.limit)
            out, size = [], 0
            for e in entries[: msg.limit]:
                size += len(e)
                if size > RangeResponse.MAX_SIZE - 8192:
                    break
                out.append(e)
            reply = RangeResponse(net=net, author=msg.author, entries=tuple(out))
        else:
            raise AemError(errors.WRONG_OBJECT, f"unexpected {msg.TYPE} from the sync client")
        with deadline(READ_TIMEOUT_S, "sync reply"):
            await write_frame(stream, reply.encode())
    return served
