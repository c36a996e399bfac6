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

MAX_AUTHORS = 100_000          # frontier entries in one message
MAX_BATCH = 512                # entries in one range response
MAX_BATCH_BYTES = 8 << 20      # bytes of entries in one range response
PROTOCOL_VERSION = 1


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
    """Sync step 1, both directions: every author a node holds."""
    TYPE = "frontiers"
    MAX_SIZE = 64 + MAX_AUTHORS * 90
    net: bytes = f(HASH)
    frontiers: tuple = f(ListOf(Obj(Frontier), MAX_AUTHORS))


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
    MAX_SIZE = MAX_BATCH_BYTES + 4096
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


def decode_sync_message(data: bytes) -> WireObject:
    """Decode any sync-stream message by its ``type`` (AemError otherwise)."""
    return decode_one_of(data, SYNC_MESSAGES, RangeResponse.MAX_SIZE)


def plan_fetch(local: dict[bytes, tuple[int, bytes]], remote: tuple[Frontier, ...],
               batch: int) -> list[tuple[bytes, int, int]]:
    """What to ask a peer for, given both frontiers: for each author the peer
    has further than we do, the range after our head; where both hold the same
    seq with different heads (a fork), that one entry, to keep as evidence.

    Returns ``(author, from_seq, limit)`` triples in a deterministic order.
    """
    plan: list[tuple[bytes, int, int]] = []
    for fr in sorted(remote, key=lambda x: x.author):
        mine = local.get(fr.author)
        if mine is None:
            plan.append((fr.author, 0, min(batch, fr.seq + 1)))
        elif fr.seq > mine[0]:
            plan.append((fr.author, mine[0] + 1, min(batch, fr.seq - mine[0])))
        elif fr.seq == mine[0] and fr.head != mine[1]:
            # Both sides of a fork at that seq: the range holds ours and theirs.
            plan.append((fr.author, fr.seq, 2))
    return plan
