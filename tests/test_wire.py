"""Properties of every wire object: canonical round trips, signatures that
break on any changed byte, and decoders that only ever raise AemError."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crypto import domains
from protocol import canonical, errors
from protocol.admission import AdmissionReport
from protocol.entry import ENTRY_KINDS, Entry, make_entry
from protocol.errors import AemError
from protocol.genesis import Genesis, Grant, Limits, MintRate
from protocol.mesh import ExpertCapsuleManifest, HostAdvertisement, NodeCard
from protocol.receipts import Challenge, ContributionReceipt, Transfer
from protocol.task import (InferenceWorkReceipt, ReceiptAck, RouteTrace, SpendAuthorization,
                           TaskPacket)
from protocol.sync import (Frontiers, HeadAnnouncement, RangeRequest, RangeResponse, SyncDone,
                           decode_sync_message)
from protocol.taskwire import (TaskAccepted, TaskChunk, TaskRefused, TaskRequest, TaskResult,
                               decode_reply)
from tests import vectors, wirekit

SIGNED = [Genesis, NodeCard, HostAdvertisement, ExpertCapsuleManifest, TaskPacket,
          SpendAuthorization, InferenceWorkReceipt, ReceiptAck, ContributionReceipt,
          AdmissionReport, Challenge, Transfer, RouteTrace, Entry]
RECORDS = [Grant, MintRate, Limits]
# Unsigned messages: sync stream, gossip heads, task stream.
MESSAGES = [HeadAnnouncement, Frontiers, RangeRequest, RangeResponse, SyncDone,
            TaskRequest, TaskRefused, TaskAccepted, TaskChunk, TaskResult]
PROPS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                        HealthCheck.filter_too_much])


def _verify(obj):
    obj.verify(obj.network() or None)


@pytest.mark.parametrize("cls", SIGNED + RECORDS + MESSAGES, ids=lambda c: c.__name__)
@PROPS
@given(data=st.data())
def test_round_trip_is_byte_identical(cls, data):
    obj = data.draw(wirekit.objects(cls))
    b = obj.encode()
    back = cls.decode(b)
    assert back == obj
    assert back.encode() == b
    if cls in SIGNED:
        _verify(back)


@pytest.mark.parametrize("cls", SIGNED, ids=lambda c: c.__name__)
@PROPS
@given(data=st.data())
def test_any_flipped_byte_fails_verification(cls, data):
    obj = data.draw(wirekit.objects(cls))
    b = bytearray(obj.encode())
    i = data.draw(st.integers(0, len(b) - 1))
    b[i] ^= data.draw(st.integers(1, 255))
    with pytest.raises(AemError):
        _verify(cls.decode(bytes(b)))


@pytest.mark.parametrize("cls", SIGNED + RECORDS + MESSAGES, ids=lambda c: c.__name__)
@settings(max_examples=60, deadline=None)
@given(junk=st.binary(max_size=300))
def test_random_bytes_only_raise_typed_errors(cls, junk):
    with pytest.raises(AemError):
        cls.decode(junk)


@pytest.mark.parametrize("cls", SIGNED + MESSAGES, ids=lambda c: c.__name__)
@settings(max_examples=60, deadline=None)
@given(value=wirekit.msgpack_values)
def test_random_msgpack_values_only_raise_typed_errors(cls, value):
    data = msgpack.packb(value, use_bin_type=True)
    with pytest.raises(AemError):
        cls.decode(data)


@pytest.mark.parametrize("cls", SIGNED, ids=lambda c: c.__name__)
@PROPS
@given(data=st.data())
def test_mutated_maps_are_refused(cls, data):
    """A valid object's map with one key added, removed or retyped."""
    obj = data.draw(wirekit.objects(cls))
    m = obj.to_map()
    key = data.draw(st.sampled_from(sorted(m)))
    how = data.draw(st.sampled_from(["drop", "add", "retype"]))
    if how == "drop":
        del m[key]
        want = {errors.MISSING_FIELD, errors.WRONG_OBJECT}
    elif how == "add":
        m["zz_extra"] = 1
        want = {errors.UNKNOWN_FIELD}
    else:
        m[key] = [m[key]]
        want = {errors.BAD_TYPE, errors.WRONG_OBJECT}
    with pytest.raises(AemError) as exc:
        cls.decode(canonical.encode(m))
    assert exc.value.code in want


def test_size_limit_is_checked_before_decoding():
    with pytest.raises(AemError) as exc:
        Transfer.decode(b"\x00" * (Transfer.MAX_SIZE + 1))
    assert exc.value.code == errors.TOO_LARGE


def test_signature_does_not_cross_types_or_networks():
    objs = vectors.build()
    net = vectors.genesis().network_id
    other = bytes(32)
    t = objs["transfer"]
    # The same object moved to another network keeps no valid signature.
    with pytest.raises(AemError) as exc:
        t.verify(other)
    assert exc.value.code == errors.WRONG_NETWORK
    with pytest.raises(AemError) as exc:
        t.replace(net=other).verify(other)
    assert exc.value.code == errors.BAD_SIGNATURE
    # A signature over the same body is only valid under its own type tag.
    body = t.signable()[len(domains.signable("transfer", net, b"")):]
    for tag in sorted(domains.TAGS - {"transfer"}):
        with pytest.raises(AemError):
            domains.verify(t.sender, domains.signable(tag, net, body), t.sig)
    # A spend authorisation's signature reused as a task's: refused.
    auth, task = objs["spend_auth"], objs["task"]
    with pytest.raises(AemError):
        task.replace(sig=auth.sig).verify(net)
    # An entry signature does not verify the payload it wraps, nor the reverse.
    entry = objs["entry"]
    with pytest.raises(AemError):
        objs["inference_receipt"].replace(sig=entry.sig).verify(net)


def test_nested_spend_auth_is_verified():
    objs = vectors.build()
    r = objs["inference_receipt"]
    forged_auth = r.spend_auth.replace(max_charge=r.spend_auth.max_charge + 1)
    bad = r.replace(spend_auth=forged_auth).signed(vectors.BOB)
    with pytest.raises(AemError) as exc:
        bad.verify(r.net)
    assert exc.value.code == errors.BAD_SIGNATURE


def test_entry_payload_must_name_its_network():
    objs = vectors.build()
    t = objs["transfer"]
    other = bytes([1]) * 32
    e = make_entry(vectors.ALICE, other, 0, b"", 1, 1, t)
    with pytest.raises(AemError) as exc:
        e.payload()
    assert exc.value.code == errors.WRONG_NETWORK
    assert set(ENTRY_KINDS) >= {"transfer", "inference_receipt", "challenge", "contribution"}


def test_expired_objects_are_refused():
    card = vectors.build()["node_card"]
    card.verify(card.net, now=card.expires_at - 1)
    with pytest.raises(AemError) as exc:
        card.verify(card.net, now=card.expires_at)
    assert exc.value.code == errors.EXPIRED


@settings(max_examples=100, deadline=None)
@given(junk=st.binary(max_size=300) | wirekit.msgpack_values.map(lambda v: msgpack.packb(v, use_bin_type=True)))
def test_stream_dispatchers_only_raise_typed_errors(junk):
    for fn in (decode_sync_message, decode_reply):
        try:
            fn(junk)
        except AemError:
            pass


@PROPS
@given(data=st.data())
def test_stream_dispatchers_round_trip(data):
    for cls, fn in ((data.draw(st.sampled_from([Frontiers, RangeRequest, RangeResponse, SyncDone])),
                     decode_sync_message),
                    (data.draw(st.sampled_from([TaskRefused, TaskAccepted, TaskChunk, TaskResult])), decode_reply)):
        obj = data.draw(wirekit.objects(cls))
        assert fn(obj.encode()) == obj
