"""Messages of log replication: gossip head announcements and the sync stream.

Gossip carries only :class:`HeadAnnouncement` (a few hundred bytes); entries
move over the sync stream in bounded batches. None of these messages is
signed: everything they carry is either a signed entry (verified on insert)
or a hint that only causes a bounded fetch. See specs/sync-protocol.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from protocol import errors
from protocol.entry import MAX_ENTRY
from protocol.errors import AemError
from protocol.schema import HASH, KEY, Bytes, ListOf, Obj, UInt, WireObject, decode_one_of, f

# The limits of the sync protocol, in one place. Every message class derives
# its MAX_SIZE from them, readers use the MAX_SIZE of the message they expect
# (or READ_LIMIT when any may come), and tests/test_ledger_sync_limits.py
# checks that the largest message each encoder can produce decodes under the
# limit its reader applies.
MAX_AUTHORS = 100_000          # frontier entries in one message
MAX_BATCH = 512                # entries in one range response
MAX_BATCH_BYTES = 8 << 20      # bytes of entries in one range response
MAX_SEQ = 2**48                # largest seq of an entry (protocol/entry.py)
FRONTIER_MAX_BYTES = 94        # canonical bytes of one Frontier record at its largest
MESSAGE_OVERHEAD = 128         # bytes around the list in frontiers / range (type, version, net, author)
ENTRY_OVERHEAD = 5             # msgpack header of one bin in a range (bin32)
PROTOCOL_VERSION = 1

# The head a store reports, in its frontiers and head announcements, for an
# author it has seen fork: with `seq` = the fork seq. No entry has this id,
# so every peer that is not frozen at or below that seq sees a mismatch and
# fetches the two entries there (specs/sync-protocol.md section 3).
FORK_HEAD = b"\x00" * 32


def sync_protocol_id(network_id: bytes) -> str:
    return f"/aem/{network_id.hex()}/sync/{PROTOCOL_VERSION}"


def topic(network_id: bytes, name: str) -> str:
    """Gossip topic names: cards, ads and heads, all scoped by the network id."""
    if name not in ("cards", "ads", "heads"):
        raise AemError(errors.BAD_VALUE, f"no topic {name!r}")
    return f"/aem/{network_id.hex()}/{name}/1"


@dataclass(frozen=True)
class Frontier(WireObject):
    """The newest entry a node holds of one author: its seq and id."""
    author: bytes = f(KEY)
    seq: int = f(UInt(0, 2**48))
    head: bytes = f(HASH)


@dataclass(frozen=True)
class HeadAnnouncement(WireObject):
    """Gossiped after a node stores new entries of an author."""
    TYPE = "head"
    MAX_SIZE = 512
    net: bytes = f(HASH)
    frontier: Frontier = f(Obj(Frontier))
    lamport: int = f(UInt(0, 2**62))


@dataclass(frozen=True)
class Frontiers(WireObject):
    """Sync step 1, both directions: every author a node holds, sorted by
    author key, one record per author."""
    TYPE = "frontiers"
    MAX_SIZE = MESSAGE_OVERHEAD + MAX_AUTHORS * FRONTIER_MAX_BYTES
    net: bytes = f(HASH)
    frontiers: tuple = f(ListOf(Obj(Frontier), MAX_AUTHORS))

    def _validate(self) -> None:
        prev = None
        for fr in self.frontiers:
            if prev is not None and fr.author <= prev:
                raise AemError(errors.BAD_VALUE, "frontiers: authors not in ascending order, or repeated")
            prev = fr.author


@dataclass(frozen=True)
class RangeRequest(WireObject):
    """Sync step 2: entries of ``author`` from ``from_seq``, at most ``limit``."""
    TYPE = "range_req"
    MAX_SIZE = 256
    net: bytes = f(HASH)
    author: bytes = f(KEY)
    from_seq: int = f(UInt(0, 2**48))
    limit: int = f(UInt(1, MAX_BATCH))


@dataclass(frozen=True)
class RangeResponse(WireObject):
    """Sync step 3: consecutive entries of one author, in seq order, as their
    canonical bytes; fewer than asked when the sender has no more."""
    TYPE = "range"
    MAX_SIZE = MAX_BATCH_BYTES + MAX_BATCH * ENTRY_OVERHEAD + MESSAGE_OVERHEAD
    net: bytes = f(HASH)
    author: bytes = f(KEY)
    entries: tuple = f(ListOf(Bytes(max_len=MAX_ENTRY), MAX_BATCH))

    def _validate(self) -> None:
        if sum(len(e) for e in self.entries) > MAX_BATCH_BYTES:
            raise AemError(errors.TOO_LARGE, "range: batch over the byte limit")


@dataclass(frozen=True)
class SyncDone(WireObject):
    """Sync end: the client needs nothing more."""
    TYPE = "done"
    MAX_SIZE = 64
    net: bytes = f(HASH)


SYNC_MESSAGES = {c.TYPE: c for c in (Frontiers, RangeRequest, RangeResponse, SyncDone)}
# What each side may receive: the server only requests, the client only replies.
REQUEST_LIMIT = max(Frontiers.MAX_SIZE, RangeRequest.MAX_SIZE, SyncDone.MAX_SIZE)
REPLY_LIMIT = max(Frontiers.MAX_SIZE, RangeResponse.MAX_SIZE)
READ_LIMIT = max(c.MAX_SIZE for c in SYNC_MESSAGES.values())


def decode_sync_message(data: bytes) -> WireObject:
    """Decode any sync-stream message by its ``type`` (AemError otherwise),
    each type under its own size limit."""
    return decode_one_of(data, SYNC_MESSAGES, READ_LIMIT)


def plan_fetch(local: dict[bytes, tuple[int, bytes]], remote: tuple[Frontier, ...],
               batch: int) -> list[tuple[bytes, int, int]]:
    """What to ask a peer for, given both frontiers: for each author the peer
    has further than we do, the range after our head; where both hold the same
    seq with different heads, the two entries there (ours and theirs, or both
    of a fork). Nothing for an author we have seen fork: we are frozen there,
    and a fork of it further down is found by :func:`plan_checks`.

    Returns ``(author, from_seq, limit)`` triples in a deterministic order.
    """
    plan: list[tuple[bytes, int, int]] = []
    for fr in sorted(remote, key=lambda x: x.author):
        mine = local.get(fr.author)
        if mine is None:
            plan.append((fr.author, 0, min(batch, fr.seq + 1)))
        elif mine[1] == FORK_HEAD:
            continue
        elif fr.seq > mine[0]:
            plan.append((fr.author, mine[0] + 1, min(batch, fr.seq - mine[0])))
        elif fr.seq == mine[0] and fr.head != mine[1]:
            plan.append((fr.author, fr.seq, 2))
    return plan


def plan_checks(local: dict[bytes, tuple[int, bytes]], remote: tuple[Frontier, ...]
                ) -> tuple[list[tuple[bytes, int]], list[tuple[bytes, int, bytes]]]:
    """Where the peer's chain of an author may leave ours, which a plain
    "who is further" comparison does not show (specs/sync-protocol.md
    section 3, step 3).

    Returns ``(suspects, lookups)``: ``(author, seq)`` pairs at which the
    peer's entry is known to differ from ours, or may, and ``(author, seq,
    head)`` triples where the peer is behind us: if ``head`` is not our
    linked entry at that seq, the pair becomes a suspect.
    """
    suspects: list[tuple[bytes, int]] = []
    lookups: list[tuple[bytes, int, bytes]] = []
    for fr in sorted(remote, key=lambda x: x.author):
        mine = local.get(fr.author)
        theirs_forked = fr.head == FORK_HEAD
        if mine is None:
            if theirs_forked:
                suspects.append((fr.author, fr.seq))
            continue
        seq, head = mine
        if head == FORK_HEAD:
            # Frozen at seq already: only a fork further down changes anything.
            if fr.seq < seq:
                if theirs_forked:
                    suspects.append((fr.author, fr.seq))
                else:
                    lookups.append((fr.author, fr.seq, fr.head))
        elif theirs_forked and fr.seq >= seq:
            suspects.append((fr.author, fr.seq))
        elif fr.seq < seq:
            if theirs_forked:
                suspects.append((fr.author, fr.seq))
            else:
                lookups.append((fr.author, fr.seq, fr.head))
    return suspects, lookups


def leaves_chain(mine: tuple[int, bytes] | None, seq: int, eid: bytes, prev: bytes) -> bool:
    """Whether a peer's entry (its seq, id and prev) shows the peer's chain
    leaving ours at or below our head: another entry at our head's seq, or
    the entry after it not linking to our head."""
    if mine is None or mine[1] == FORK_HEAD:
        return False
    head_seq, head = mine
    return (seq == head_seq and eid != head) or (seq == head_seq + 1 and prev != head)
