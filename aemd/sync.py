"""Log replication over one libp2p stream (specs/sync-protocol.md).

Pull-based: the side that opens the stream (the client) sends its Frontiers,
the server answers with its own, and the client then asks for the ranges it
is missing in bounded batches, verifying every entry on insert. Each side
pulls for itself, so two nodes that connect both run a session.

Seqs alone say who is further, not whether both hold one chain: an author
that signed ``[e0, e1]`` for some nodes and ``[e0']`` for others looks
merely behind or ahead. So the client then looks into every author whose
chain on the peer may leave its own (``protocol.sync.plan_checks``, and the
first entries of each range), finds the least seq where it does by binary
search, and stores the peer's entry there: it links just below, and the
store records the fork. A forked author's frontier is the fork head, which
makes every other peer fetch the evidence in turn.

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
from crypto.hashing import H
from protocol import errors
from protocol.entry import Entry
from protocol.errors import AemError
from protocol.sync import (MAX_BATCH, MAX_BATCH_BYTES, REQUEST_LIMIT, Frontier, Frontiers,
                           RangeRequest, RangeResponse, SyncDone, decode_sync_message,
                           leaves_chain, plan_checks, plan_fetch)

MAX_REQUESTS_PER_SESSION = 10_000
MAX_FORK_CHECKS = 64           # authors whose divergence one session resolves
PIPELINE = 4                   # range requests in flight on one stream
READ_TIMEOUT_S = 30.0
FRONTIERS_LIMIT = Frontiers.MAX_SIZE
RANGE_LIMIT = RangeResponse.MAX_SIZE


class LogAccess(Protocol):
    """What sync needs of the log store (async, so it can run in a thread)."""

    async def frontiers(self) -> dict[bytes, tuple[int, bytes]]: ...

    async def range(self, author: bytes, from_seq: int, limit: int) -> list[bytes]: ...

    async def linked_ids(self, pairs: list[tuple[bytes, int]]) -> dict[tuple[bytes, int], set[bytes]]:
        """Ids of the linked entries at each (author, seq)."""
        ...

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
    checks: int = 0                              # divergences looked into
    forks_sent: int = 0                          # entries stored as the peer's side of a fork


def _frontier_list(fr: dict[bytes, tuple[int, bytes]]) -> tuple[Frontier, ...]:
    return tuple(Frontier(author=a, seq=s, head=h) for a, (s, h) in sorted(fr.items()))


class _Bad(Exception):
    """The peer served something that is not an entry: stop the session."""


def _peek(data: bytes) -> Entry:
    try:
        return Entry.decode(data)
    except AemError:
        raise _Bad() from None


async def sync_client(stream, log: LogAccess, net: bytes, batch: int = MAX_BATCH, *,
                      only: Frontier | None = None) -> SyncStats:
    """Pull from the peer on ``stream`` everything it has that we lack; with
    ``only`` (from a head announcement), just that author up to that entry,
    without the frontier exchange, which grows with the number of authors.
    Then look into every author whose chain on the peer leaves ours, and
    fetch the entry where it does (evidence of a fork)."""
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
    suspects, lookups = plan_checks(local, remote_frontiers)
    suspect_set = set(suspects)
    queue = deque(plan_fetch(local, remote_frontiers, batch))
    # Up to PIPELINE requests in flight (the server answers in order), and
    # small responses merged into one insert: with many authors of few
    # entries each, a request per round trip and a commit per author would
    # cost far more than the entries themselves.
    in_flight: deque[tuple[bytes, int, int]] = deque()
    pending: list[bytes] = []
    pending_authors: set[bytes] = set()
    try:
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
            resp = await _read_range(stream, net, author, limit)
            got = len(resp)
            stats.received += got
            if got:
                pending.extend(resp)
                pending_authors.add(author)
                mine = local.get(author)
                if mine is not None and from_seq <= mine[0] + 1 and (author, mine[0]) not in suspect_set:
                    # The first entries show whether the peer's chain continues ours.
                    for data in resp[:2]:
                        e = _peek(data)
                        if leaves_chain(mine, e.seq, H(data), e.prev):
                            suspect_set.add((author, mine[0]))
                            suspects.append((author, mine[0]))
                            break
            nxt = from_seq + got
            # Keep going while the peer had a full batch and more to give.
            if got == limit and nxt <= targets.get(author, -1):
                queue.append((author, nxt, min(batch, targets[author] - nxt + 1)))
            if len(pending) >= batch or not (queue or in_flight):
                if not await _insert(log, pending, pending_authors, stats):
                    pending = []
                    break  # a peer serving bad entries gets no more of our time this session
                pending, pending_authors = [], set()
        if pending:  # the session's request limit stopped the loop with entries in hand
            await _insert(log, pending, pending_authors, stats)
        if not stats.rejected:
            await _check_divergence(stream, log, net, suspects, lookups, stats)
    except _Bad:
        stats.rejected += 1
    with trio.move_on_after(5):
        await write_frame(stream, SyncDone(net=net).encode())
    return stats


async def _insert(log: LogAccess, entries: list[bytes], authors: set[bytes], stats: SyncStats) -> bool:
    """Insert a batch; False when the peer served invalid entries."""
    if not entries:
        return True
    added, rejected = await log.insert_batch(entries)
    stats.added += added
    stats.rejected += rejected
    if added:
        stats.authors |= authors
    return not rejected


async def _read_range(stream, net: bytes, author: bytes, limit: int) -> tuple[bytes, ...]:
    with deadline(READ_TIMEOUT_S, "sync range"):
        resp = decode_sync_message(await read_frame(stream, RANGE_LIMIT))
    if not isinstance(resp, RangeResponse) or resp.net != net or resp.author != author:
        raise AemError(errors.WRONG_OBJECT, "peer answered a range request with something else")
    if len(resp.entries) > limit:
        raise AemError(errors.BAD_VALUE, "peer sent more entries than asked")
    return resp.entries


async def _ask(stream, net: bytes, author: bytes, seq: int, limit: int,
               stats: SyncStats) -> list[tuple[bytes, Entry]] | None:
    """One request, answered before the next is sent: the peer's entries of
    ``author`` at exactly ``seq`` (None when the session's budget is spent)."""
    if stats.requests >= MAX_REQUESTS_PER_SESSION:
        return None
    stats.requests += 1
    with deadline(READ_TIMEOUT_S, "sync range request"):
        await write_frame(stream, RangeRequest(net=net, author=author, from_seq=seq, limit=limit).encode())
    got = await _read_range(stream, net, author, limit)
    stats.received += len(got)
    out = []
    for data in got:
        e = _peek(data)
        if e.author != author:
            raise _Bad()
        if e.seq == seq:
            out.append((data, e))
    return out


async def _check_divergence(stream, log: LogAccess, net: bytes, suspects: list[tuple[bytes, int]],
                            lookups: list[tuple[bytes, int, bytes]], stats: SyncStats) -> None:
    """Find, for each author whose chain on the peer may leave ours, the
    least seq where it does, and store the peer's entry there: it links to
    our chain just below, so the store records the fork, whatever the
    lengths of the two branches (specs/sync-protocol.md section 3, step 3)."""
    if lookups:
        ours = await log.linked_ids([(a, s) for a, s, _ in lookups])
        for a, s, head in lookups:
            if head not in ours.get((a, s), ()):
                suspects.append((a, s))
    seen: set[bytes] = set()
    for author, k in suspects:
        if author in seen or len(seen) >= MAX_FORK_CHECKS:
            continue
        seen.add(author)
        stats.checks += 1
        found = await _find_divergence(stream, log, net, author, k, stats)
        if found and await _insert(log, found, {author}, stats):
            stats.forks_sent += len(found)
        elif found:
            return


async def _find_divergence(stream, log: LogAccess, net: bytes, author: bytes, k: int,
                           stats: SyncStats) -> list[bytes]:
    """The peer's entries at the least seq <= k where its chain of ``author``
    is not ours; [] when it is ours at k after all, or the peer stops
    answering consistently."""
    async def ours(seq: int) -> set[bytes]:
        return (await log.linked_ids([(author, seq)])).get((author, seq), set())

    theirs = await _ask(stream, net, author, k, 2, stats)
    if not theirs:
        return []
    mine = await ours(k)
    alien = [(d, e) for d, e in theirs if H(d) not in mine]
    if not alien:
        return []
    # The common case: the peer's other entry at k sits on our chain at k-1.
    below = await ours(k - 1) if k > 0 else set()
    if k == 0 or any(e.prev in below for _, e in alien):
        return [d for d, _ in alien]
    # Otherwise the chains part lower down: binary search for the least seq
    # d at which the peer's entry is not ours. Below d they agree (entries
    # are hash-linked), so the peer's entry at d links to ours at d-1.
    lo, hi, found = 0, k - 1, alien
    while lo <= hi:
        m = (lo + hi) // 2
        got = await _ask(stream, net, author, m, 1, stats)
        if not got:
            return []
        if H(got[0][0]) in await ours(m):
            lo = m + 1
        else:
            hi, found = m - 1, got
    d = found[0][1].seq
    if d != k:
        both = await _ask(stream, net, author, d, 2, stats)   # both sides, if the peer forked there
        mine = await ours(d)
        found = [(x, e) for x, e in (both or found) if H(x) not in mine]
    return [x for x, _ in found]


async def sync_server(stream, log: LogAccess, net: bytes) -> int:
    """Answer one peer's sync session until it is done; returns requests served."""
    served = 0
    while served < MAX_REQUESTS_PER_SESSION + 2:
        with deadline(READ_TIMEOUT_S, "sync request"):
            frame = await read_frame_or_eof(stream, REQUEST_LIMIT)
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
                if size > MAX_BATCH_BYTES:
                    break
                out.append(e)
            reply = RangeResponse(net=net, author=msg.author, entries=tuple(out))
        else:
            raise AemError(errors.WRONG_OBJECT, f"unexpected {msg.TYPE} from the sync client")
        with deadline(READ_TIMEOUT_S, "sync reply"):
            await write_frame(stream, reply.encode())
    return served
