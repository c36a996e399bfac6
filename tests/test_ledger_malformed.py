"""Malformed input on which two honest implementations could disagree
(specs/ledger.md sections 1, 7 and 13):

- a boolean never passes as an integer, anywhere on the wire (in Python
  ``True == 1``, so a msgpack ``true`` used to pass as ``version`` 1);
- which code refuses a malformed entry does not enter the state root: only
  *that* it was refused does;
- a non-empty ``prev`` at seq 0 makes an entry envelope-invalid (in no feed).
"""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crypto import domains
from ledger.facts import Context, examine
from ledger.replay import replay
from ledger.state import state_root
from protocol import canonical
from protocol.admission import AdmissionReport
from protocol.entry import Entry, make_entry
from protocol.errors import AemError
from protocol.genesis import Genesis, Grant, Limits, MintRate
from protocol.mesh import ExpertCapsuleManifest, HostAdvertisement, NodeCard
from protocol.receipts import Challenge, ContributionReceipt, Transfer
from protocol.sync import Frontiers, HeadAnnouncement, RangeRequest, RangeResponse, SyncDone
from protocol.task import InferenceWorkReceipt, ReceiptAck, RouteTrace, SpendAuthorization, TaskPacket
from protocol.taskwire import TaskAccepted, TaskChunk, TaskRefused, TaskRequest, TaskResult
from tests import wirekit
from tests.ledgerkit import T0, TestNet

CLASSES = [Genesis, NodeCard, HostAdvertisement, ExpertCapsuleManifest, TaskPacket,
           SpendAuthorization, InferenceWorkReceipt, ReceiptAck, ContributionReceipt,
           AdmissionReport, Challenge, Transfer, RouteTrace, Entry, Grant, MintRate, Limits,
           HeadAnnouncement, Frontiers, RangeRequest, RangeResponse, SyncDone,
           TaskRequest, TaskRefused, TaskAccepted, TaskChunk, TaskResult]
PROPS = settings(max_examples=30, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def _int_paths(v, path=()):
    """Every position in a decoded map that holds an integer (not a bool)."""
    if type(v) is int:
        yield path
    elif type(v) is dict:
        for k, x in v.items():
            yield from _int_paths(x, path + (k,))
    elif type(v) is list:
        for i, x in enumerate(v):
            yield from _int_paths(x, path + (i,))


def _set(v, path, new):
    if not path:
        return new
    v = v.copy()
    v[path[0]] = _set(v[path[0]], path[1:], new)
    return v


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@PROPS
@given(data=st.data())
def test_a_bool_never_passes_as_an_int(cls, data):
    obj = data.draw(wirekit.objects(cls))
    m = msgpack.unpackb(obj.encode(), raw=False)
    paths = list(_int_paths(m))
    if not paths:
        return
    path = data.draw(st.sampled_from(paths))
    old = m
    for p in path:
        old = old[p]
    bad = canonical.encode(_set(m, path, bool(old) if old in (0, 1) else True))
    with pytest.raises(AemError):
        cls.decode(bad)


@pytest.mark.parametrize("cls", [c for c in CLASSES if c.TYPE], ids=lambda c: c.__name__)
@PROPS
@given(data=st.data())
def test_version_true_is_refused(cls, data):
    """The case that used to pass: ``version: true`` read as 1."""
    obj = data.draw(wirekit.objects(cls))
    m = msgpack.unpackb(obj.encode(), raw=False)
    m["version"] = True
    with pytest.raises(AemError) as e:
        cls.decode(canonical.encode(m))
    assert e.value.code == "WRONG_OBJECT"


def _signed_entry(key, net: bytes, m: dict) -> bytes:
    """An entry map signed as given, whatever it holds."""
    m = dict(m, sig=b"")
    del m["sig"]
    sig = key.sign_raw(domains.signable("entry", net, canonical.encode(m)))
    return canonical.encode(dict(m, sig=sig))


def _with_body(net: TestNet, key, body: bytes, seq: int = 0, prev: bytes = b"", ts: int = T0) -> bytes:
    e = net.append(key, net.transfer(key, net.users[1], 1), ts=ts)
    m = msgpack.unpackb(e.encode(), raw=False)
    m.update(body=body, seq=seq, prev=prev)
    return _signed_entry(key, net.net, m)


def test_version_true_in_a_body_refuses_the_entry():
    net = TestNet(n_users=3)
    a = net.users[0]
    t = net.transfer(a, net.users[1], 5)
    m = msgpack.unpackb(t.encode(), raw=False)
    m["version"] = True
    body = canonical.encode(m)
    data = _with_body(net, a, body)
    f = examine(data, Context.of(net.genesis))
    assert f.author == a.public and f.code is not None      # body-invalid: in the feed, refused
    r = replay(net.genesis, [data], T0 + 10)
    assert r.applied == 0 and r.rejected[Entry.decode(data).id] == f.code
    assert r.balances[a.public][0] == net.grant              # the transfer did not apply


def test_malformed_bodies_are_refused_and_the_code_does_not_enter_the_root():
    """Entries whose refusal code depends on the order in which an
    implementation checks their faults: all refused, and any choice of
    codes gives the same state root."""
    net = TestNet(n_users=3)
    a, b = net.users[0], net.users[1]
    t = msgpack.unpackb(net.transfer(a, b, 5).encode(), raw=False)
    no_type = {k: v for k, v in t.items() if k != "type"}
    two_wrong = dict(t, amount=-1, recipient=b"\x01")           # two bad fields at once
    too_long = dict(t, nonce=b"\x00" * 300)                       # over-long bytes
    int_key = msgpack.packb({1: 2, **t}, use_bin_type=True)       # a map key that is not a str
    bodies = [canonical.encode(no_type), canonical.encode(two_wrong), canonical.encode(too_long),
              int_key, b"\xc1"]
    net2, a2 = net, a
    chain, prev = [], b""
    for i, body in enumerate(bodies):
        m = msgpack.unpackb(make_entry(a2, net2.net, i, prev, i + 1, T0 + i,
                                       net2.transfer(a2, net2.users[1], 1)).encode(), raw=False)
        m["body"] = body
        d = _signed_entry(a2, net2.net, m)
        chain.append(d)
        prev = Entry.decode(d).id
    good = make_entry(a2, net2.net, len(bodies), prev, 99, T0 + 50, net2.transfer(a2, net2.users[1], 7))
    r = replay(net2.genesis, chain + [good.encode()], T0 + 100)
    ids = [Entry.decode(d).id for d in chain]
    assert set(ids) <= set(r.rejected)                   # every malformed one refused
    assert good.id not in r.rejected                     # and the feed goes on after them
    root = r.state_root
    view = r.checkpoint.state.copy()
    view.rejected = {i: "ANY_OTHER_CODE" for i in view.rejected}
    assert state_root(view, net2.net, T0 + 100, r.frozen) == root


def test_prev_at_seq_0_makes_the_entry_envelope_invalid():
    net = TestNet(n_users=3)
    a = net.users[0]
    e = net.append(a, net.transfer(a, net.users[1], 1))
    m = msgpack.unpackb(e.encode(), raw=False)
    m["prev"] = b"\x05" * 32
    data = _signed_entry(a, net.net, m)
    f = examine(data, Context.of(net.genesis))
    assert f.author is None and f.code == "BAD_CHAIN"    # in no feed: cannot fork or block the author
    r = replay(net.genesis, [data, e.encode()], T0 + 10)
    assert e.id not in r.rejected and r.frozen == {}
