"""The sync protocol's limits agree with each other: the largest message each
encoder can produce decodes under the limit its reader applies, and the
frontiers list is sorted with one record per author (specs/sync-protocol.md
section 3)."""

from __future__ import annotations

import pytest

from aemd import sync as client
from aemd.framing import MAX_FRAME_LEN
from protocol import errors
from protocol.entry import MAX_ENTRY
from protocol.errors import AemError
from protocol.genesis import DEFAULT_LIMITS
from protocol.sync import (FRONTIER_MAX_BYTES, MAX_AUTHORS, MAX_BATCH, MAX_BATCH_BYTES, MAX_SEQ,
                           READ_LIMIT, REPLY_LIMIT, REQUEST_LIMIT, Frontier, Frontiers,
                           HeadAnnouncement, RangeRequest, RangeResponse, SyncDone,
                           decode_sync_message)

NET = b"\x07" * 32


def _key(i: int) -> bytes:
    return i.to_bytes(32, "big")


def test_largest_frontier_record_fits_its_budget():
    fr = Frontier(author=b"\xff" * 32, seq=MAX_SEQ, head=b"\xff" * 32)
    from protocol import canonical
    assert len(canonical.encode(fr.to_map())) == FRONTIER_MAX_BYTES


def test_largest_frontiers_message_decodes_where_it_is_read():
    frs = tuple(Frontier(author=_key(i), seq=MAX_SEQ, head=b"\xee" * 32) for i in range(MAX_AUTHORS))
    msg = Frontiers(net=NET, frontiers=frs)
    data = msg.encode()                  # the encoder accepts it ...
    assert len(data) <= Frontiers.MAX_SIZE
    # ... and both readers accept it: the server reading a request, the
    # client reading the reply, and the dispatching decoder.
    assert len(data) <= REQUEST_LIMIT and len(data) <= REPLY_LIMIT
    assert client.FRONTIERS_LIMIT >= len(data)
    back = decode_sync_message(data)
    assert isinstance(back, Frontiers) and len(back.frontiers) == MAX_AUTHORS


def test_largest_range_response_decodes_where_it_is_read():
    each = MAX_BATCH_BYTES // MAX_BATCH
    assert each <= MAX_ENTRY
    msg = RangeResponse(net=NET, author=_key(1), entries=tuple(b"\xab" * each for _ in range(MAX_BATCH)))
    data = msg.encode()
    assert len(data) <= RangeResponse.MAX_SIZE <= REPLY_LIMIT
    assert client.RANGE_LIMIT >= len(data)
    assert isinstance(decode_sync_message(data), RangeResponse)
    # One byte more of entries is refused by the message itself.
    with pytest.raises(AemError) as e:
        RangeResponse(net=NET, author=_key(1), entries=(b"\xab" * (each + 1),) + msg.entries[1:])
    assert e.value.code == errors.TOO_LARGE


def test_requests_and_small_messages_fit():
    for m in (RangeRequest(net=NET, author=_key(1), from_seq=MAX_SEQ, limit=MAX_BATCH), SyncDone(net=NET)):
        data = m.encode()
        assert len(data) <= type(m).MAX_SIZE <= REQUEST_LIMIT
        assert decode_sync_message(data) == m
    ann = HeadAnnouncement(net=NET, frontier=Frontier(author=b"\xff" * 32, seq=MAX_SEQ, head=b"\xff" * 32),
                           lamport=2**62)
    assert len(ann.encode()) <= HeadAnnouncement.MAX_SIZE <= DEFAULT_LIMITS.max_gossip_bytes


def test_limits_are_ordered():
    assert READ_LIMIT == max(REQUEST_LIMIT, REPLY_LIMIT) <= MAX_FRAME_LEN
    assert DEFAULT_LIMITS.max_sync_batch <= MAX_BATCH
    assert client.MAX_REQUESTS_PER_SESSION >= client.MAX_FORK_CHECKS * 52   # 2 + 49 probes + 1 each


@pytest.mark.parametrize("order", ["descending", "duplicate"])
def test_frontiers_must_be_sorted_and_unique(order):
    a, b = _key(1), _key(2)
    authors = (b, a) if order == "descending" else (a, a)
    frs = tuple(Frontier(author=x, seq=1, head=b"\x01" * 32) for x in authors)
    with pytest.raises(AemError) as e:
        Frontiers(net=NET, frontiers=frs)
    assert e.value.code == errors.BAD_VALUE
    # A peer's bytes with that list are refused the same way.
    good = Frontiers(net=NET, frontiers=(Frontier(author=a, seq=1, head=b"\x01" * 32),
                                         Frontier(author=b, seq=1, head=b"\x01" * 32)))
    from protocol import canonical
    m = good.to_map()
    m["frontiers"] = [x.to_map() for x in frs]
    with pytest.raises(AemError) as e:
        decode_sync_message(canonical.encode(m))
    assert e.value.code == errors.BAD_VALUE
