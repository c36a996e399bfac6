"""Log replication's two ends as sans-I/O sessions (protocol/session.py):
``sync_client`` pulls from one peer, ``sync_server`` answers one peer
(specs/sync-protocol.md, "Session vectors").

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

The ``Call`` ops, the whole of what sync needs of the log (the LogAccess of
``aemd/sync.py``):

* ``frontiers()`` -> ``dict[author, (seq, head)]``: the newest entry held of
  each author (``FORK_HEAD`` as head for a forked author).
* ``range(author, from_seq, limit)`` -> ``list[bytes]``: canonical entries of
  ``author`` from ``from_seq``, in seq order, at most ``limit`` (server only).
* ``linked_ids(pairs)`` -> ``dict[(author, seq), set[id]]``: the ids of the
  linked entries at each ``(author, seq)`` of the list ``pairs``.
* ``insert_batch(entries)`` -> ``(added, rejected)``: verify and store;
  how many were newly stored, how many were invalid.

A clean end of stream where a frame is due is ``AemError(UNAVAILABLE)``,
raised here (the driver only reports it as ``None``); every other
``AemError`` (a wrong message, a wrong network) ends the session the same
way. Only the end of the session, ``SyncDone``, is a best-effort ``Send``: the
entries are stored by then, and a peer that has already gone must not turn
the session's outcome into a failure.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from crypto.hashing import H
from protocol import errors
from protocol.entry import Entry
from protocol.errors import AemError
from protocol.session import Call, Recv, Send, Session
from protocol.sync import (MAX_BATCH, MAX_BATCH_BYTES, REQUEST_LIMIT, Frontier, Frontiers, RangeRequest,
                           RangeResponse, SyncDone, decode_sync_message, leaves_chain, plan_checks, plan_fetch)

MAX_REQUESTS_PER_SESSION = 10_000
MAX_FORK_CHECKS = 64           # authors whose divergence one session resolves
PIPELINE = 4                   # range requests in flight on one stream
READ_TIMEOUT_S = 30.0          # each read and each write of a session
DONE_TIMEOUT_S = 5.0           # the final SyncDone, written on a best-effort basis
FRONTIERS_LIMIT = Frontiers.MAX_SIZE
RANGE_LIMIT = RangeResponse.MAX_SIZE

LocalFrontiers = dict[bytes, tuple[int, bytes]]


@dataclass
class SyncStats:
    requests: int = 0
    received: int = 0
    added: int = 0
    rejected: int = 0
    authors: set = field(default_factory=set)    # authors with newly stored entries
    checks: int = 0                              # divergences looked into
    forks_sent: int = 0                          # entries stored as the peer's side of a fork


def frontier_list(fr: LocalFrontiers) -> tuple[Frontier, ...]:
    return tuple(Frontier(author=a, seq=s, head=h) for a, (s, h) in sorted(fr.items()))


class _Bad(Exception):
    """The peer served something that is not an entry: stop the session."""


def _peek(data: bytes) -> Entry:
    try:
        return Entry.decode(data)
    except AemError:
        raise _Bad() from None


def _frame(data: bytes | None) -> bytes:
    # The driver reports a clean end of stream as None; where a reply is due
    # it is a failure, as it always was (aemd.framing.read_frame).
    if data is None:
        raise AemError(errors.UNAVAILABLE, "stream closed before a frame arrived")
    return data


def sync_client(net: bytes, local: LocalFrontiers | None = None, *, batch: int = MAX_BATCH,
                only: Frontier | None = None) -> Session:
    """Pull from the peer everything it has that we lack; with ``only`` (from
    a head announcement), just that author up to that entry, without the
    frontier exchange, which grows with the number of authors. Then look into
    every author whose chain on the peer leaves ours, and fetch the entry
    where it does (evidence of a fork). Returns :class:`SyncStats`.

    ``local`` is our frontiers; when None (what the daemon passes) the
    session asks for them with ``Call("frontiers")`` as its first action."""
    stats = SyncStats()
    batch = max(1, min(batch, MAX_BATCH))
    if local is None:
        local = yield Call("frontiers")
    if only is not None:
        remote_frontiers: tuple[Frontier, ...] = (only,)
    else:
        yield Send(Frontiers(net=net, frontiers=frontier_list(local)).encode(), READ_TIMEOUT_S, "sync frontiers")
        remote = decode_sync_message(_frame((yield Recv(FRONTIERS_LIMIT, READ_TIMEOUT_S, "sync frontiers"))))
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
                yield Send(RangeRequest(net=net, author=author, from_seq=from_seq, limit=limit).encode(),
                           READ_TIMEOUT_S, "sync range request")
                in_flight.append((author, from_seq, limit))
            if not in_flight:
                break
            author, from_seq, limit = in_flight.popleft()
            resp = yield from _read_range(net, author, limit)
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
                if not (yield from _insert(pending, pending_authors, stats)):
                    pending = []
                    break  # a peer serving bad entries gets no more of our time this session
                pending, pending_authors = [], set()
        if pending:  # the session's request limit stopped the loop with entries in hand
            yield from _insert(pending, pending_authors, stats)
        if not stats.rejected:
            yield from _check_divergence(net, suspects, lookups, stats)
    except _Bad:
        stats.rejected += 1
    yield Send(SyncDone(net=net).encode(), DONE_TIMEOUT_S, "sync done", best_effort=True)
    return stats


def _insert(entries: list[bytes], authors: set[bytes], stats: SyncStats) -> Session:
    """Insert a batch; False when the peer served invalid entries."""
    if not entries:
        return True
    added, rejected = yield Call("insert_batch", (entries,))
    stats.added += added
    stats.rejected += rejected
    if added:
        stats.authors |= authors
    return not rejected


def _read_range(net: bytes, author: bytes, limit: int) -> Session:
    resp = decode_sync_message(_frame((yield Recv(RANGE_LIMIT, READ_TIMEOUT_S, "sync range"))))
    if not isinstance(resp, RangeResponse) or resp.net != net or resp.author != author:
        raise AemError(errors.WRONG_OBJECT, "peer answered a range request with something else")
    if len(resp.entries) > limit:
        raise AemError(errors.BAD_VALUE, "peer sent more entries than asked")
    return resp.entries


def _ours(author: bytes, seq: int) -> Session:
    return (yield Call("linked_ids", ([(author, seq)],))).get((author, seq), set())


def _ask(net: bytes, author: bytes, seq: int, limit: int, stats: SyncStats) -> Session:
    """One request, answered before the next is sent: the peer's entries of
    ``author`` at exactly ``seq`` as ``(bytes, Entry)`` pairs (None when the
    session's budget is spent)."""
    if stats.requests >= MAX_REQUESTS_PER_SESSION:
        return None
    stats.requests += 1
    yield Send(RangeRequest(net=net, author=author, from_seq=seq, limit=limit).encode(),
               READ_TIMEOUT_S, "sync range request")
    got = yield from _read_range(net, author, limit)
    stats.received += len(got)
    out = []
    for data in got:
        e = _peek(data)
        if e.author != author:
            raise _Bad()
        if e.seq == seq:
            out.append((data, e))
    return out


def _check_divergence(net: bytes, suspects: list[tuple[bytes, int]], lookups: list[tuple[bytes, int, bytes]],
                      stats: SyncStats) -> Session:
    """Find, for each author whose chain on the peer may leave ours, the
    least seq where it does, and store the peer's entry there: it links to
    our chain just below, so the store records the fork, whatever the
    lengths of the two branches (specs/sync-protocol.md section 3, step 3)."""
    if lookups:
        ours = yield Call("linked_ids", ([(a, s) for a, s, _ in lookups],))
        for a, s, head in lookups:
            if head not in ours.get((a, s), ()):
                suspects.append((a, s))
    seen: set[bytes] = set()
    for author, k in suspects:
        if author in seen or len(seen) >= MAX_FORK_CHECKS:
            continue
        seen.add(author)
        stats.checks += 1
        found = yield from _find_divergence(net, author, k, stats)
        if found and (yield from _insert(found, {author}, stats)):
            stats.forks_sent += len(found)
        elif found:
            return


def _find_divergence(net: bytes, author: bytes, k: int, stats: SyncStats) -> Session:
    """The peer's entries at the least seq <= k where its chain of ``author``
    is not ours; [] when it is ours at k after all, or the peer stops
    answering consistently."""
    theirs = yield from _ask(net, author, k, 2, stats)
    if not theirs:
        return []
    mine = yield from _ours(author, k)
    alien = [(d, e) for d, e in theirs if H(d) not in mine]
    if not alien:
        return []
    # The common case: the peer's other entry at k sits on our chain at k-1.
    below = (yield from _ours(author, k - 1)) if k > 0 else set()
    if k == 0 or any(e.prev in below for _, e in alien):
        return [d for d, _ in alien]
    # Otherwise the chains part lower down: binary search for the least seq
    # d at which the peer's entry is not ours. Below d they agree (entries
    # are hash-linked), so the peer's entry at d links to ours at d-1.
    lo, hi, found = 0, k - 1, alien
    while lo <= hi:
        m = (lo + hi) // 2
        got = yield from _ask(net, author, m, 1, stats)
        if not got:
            return []
        if H(got[0][0]) in (yield from _ours(author, m)):
            lo = m + 1
        else:
            hi, found = m - 1, got
    d = found[0][1].seq
    if d != k:
        both = yield from _ask(net, author, d, 2, stats)   # both sides, if the peer forked there
        mine = yield from _ours(author, d)
        found = [(x, e) for x, e in (both or found) if H(x) not in mine]
    return [x for x, _ in found]


def sync_server(net: bytes) -> Session:
    """Answer one peer's sync session until it is done (SyncDone or a clean
    end of stream); returns the requests served."""
    served = 0
    while served < MAX_REQUESTS_PER_SESSION + 2:
        frame = yield Recv(REQUEST_LIMIT, READ_TIMEOUT_S, "sync request")
        if frame is None:
            return served
        msg = decode_sync_message(frame)
        if getattr(msg, "net", None) != net:
            raise AemError(errors.WRONG_NETWORK, "sync message for another network")
        served += 1
        if isinstance(msg, SyncDone):
            return served
        if isinstance(msg, Frontiers):
            reply = Frontiers(net=net, frontiers=frontier_list((yield Call("frontiers"))))
        elif isinstance(msg, RangeRequest):
            entries = yield Call("range", (msg.author, msg.from_seq, msg.limit))
            out, size = [], 0
            # The byte cap is the server's own: a response over it would be
            # refused by the client's reader anyway.
            for e in entries[: msg.limit]:
                size += len(e)
                if size > MAX_BATCH_BYTES:
                    break
                out.append(e)
            reply = RangeResponse(net=net, author=msg.author, entries=tuple(out))
        else:
            raise AemError(errors.WRONG_OBJECT, f"unexpected {msg.TYPE} from the sync client")
        yield Send(reply.encode(), READ_TIMEOUT_S, "sync reply")
    return served
