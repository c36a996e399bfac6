"""Payments that only the host that did the work can take (specs/ledger.md
§5.3-5.5, specs/task-protocol.md §2-3).

- the ledger: an authorisation names its one host and price; the receipt the
  payer acknowledged wins its spend key whatever its Lamport clock or arrival
  order; a payer disputes receipts it never acknowledged;
- the host: it reserves the price of every task it accepted and has not
  logged, atomically with the spend-key check;
- the payer: it refuses a receipt above the accepted price, never acknowledges
  it, and bounds what a host may stream;
- the attack of a host that refuses a task and logs a receipt for it anyway,
  on real nodes.
"""

from __future__ import annotations

import os
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crypto.hashing import H
from ledger import reasons
from ledger.replay import replay
from protocol import errors, tasksession
from protocol.entry import make_entry
from tests.ledgerkit import MICRO, T0, WINDOW, TestNet

G = 1_000 * MICRO          # each ledgerkit user's grant
AS_OF = T0 + 10 * WINDOW   # every window over


def run(net: TestNet, entries, as_of=AS_OF, **kw):
    return replay(net.genesis, [e if isinstance(e, bytes) else e.encode() for e in entries], as_of,
                  check=True, **kw)


def bal(r, k):
    return r.balances.get(k.public, (0, 0))


def total(r) -> int:
    return sum(a + p for a, p in r.balances.values())


def retry(net: TestNet, payer, thief, honest, thief_price=MICRO, honest_price=MICRO // 4, at=T0):
    """One task, two authorisations with the same spend key: the cheap host
    (``thief``) refused and logs a receipt anyway; ``honest`` did the work."""
    sk, task = os.urandom(32), H(os.urandom(8))
    a_thief = net.spend_auth(payer, thief_price, at + 600, task, sk, host=thief)
    a_honest = net.spend_auth(payer, honest_price, at + 600, task, sk, host=honest)
    stolen = net.receipt(thief, payer, thief_price, at, auth=a_thief)
    paid = net.receipt(honest, payer, honest_price, at, auth=a_honest)
    return stolen, paid


# -- the ledger ---------------------------------------------------------------------

def test_a_receipt_pays_only_the_host_named_and_at_most_its_price():
    from crypto import domains
    from protocol import canonical
    from protocol.entry import Entry
    net = TestNet(n_users=3)
    payer, a, b = net.users
    auth_b = net.spend_auth(payer, MICRO, T0 + 600, host=b)
    # a takes b's authorisation and signs a receipt for it: the bytes are
    # well-formed, but the body is refused, so a is paid nothing.
    m = net.receipt(a, payer, MICRO, auth=auth_b.replace(host=a.public).signed(payer)).to_map()
    m["spend_auth"] = auth_b.to_map()
    del m["sig"]
    m["sig"] = a.sign_raw(domains.signable("inference_receipt", net.net, canonical.encode(m)))
    e = Entry(net=net.net, author=a.public, seq=0, prev=b"", lamport=0, ts=T0, kind="inference_receipt",
              body=canonical.encode(m), sig=b"").signed(a)
    res = run(net, [e])
    assert res.rejected[e.id] == errors.BAD_VALUE
    assert bal(res, payer) == (G, 0) and bal(res, a) == (G, 0)
    with pytest.raises(errors.AemError):                      # nor can b charge above max_charge
        net.receipt(b, payer, MICRO + 1, auth=auth_b)


def test_the_acknowledged_receipt_wins_over_an_earlier_one_with_lamport_0():
    net = TestNet(n_users=3)
    payer, thief, honest = net.users
    stolen, paid = retry(net, payer, thief, honest)
    e_stolen = net.append(thief, stolen, lamport=0)
    e_paid = net.append(honest, paid)
    e_ack = net.append(payer, net.ack(payer, paid.id, T0 + 10), ts=T0 + 10)
    r = run(net, [e_paid, e_ack, e_stolen])
    assert r.rejected[e_stolen.id] == reasons.ACKED_ELSEWHERE
    assert e_paid.id not in r.rejected and e_ack.id not in r.rejected
    assert bal(r, honest) == (G + MICRO // 4, 0) and bal(r, thief) == (G, 0)
    assert bal(r, payer) == (G - MICRO // 4, 0)
    # Without the ack the first in replay order wins (that is why the payer acks).
    r0 = run(net, [e_paid, e_stolen])
    assert r0.rejected[e_paid.id] == reasons.SPEND_KEY_USED and bal(r0, thief) == (G + MICRO, 0)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lamport=st.integers(0, 2**40), seed=st.integers(0, 2**32 - 1), split=st.integers(0, 5),
       dispute=st.booleans())
def test_honest_acked_receipt_wins_for_any_order_and_clock(lamport, seed, split, dispute):
    """Whatever the attacker's Lamport clock, the arrival order and how the
    entries reach a node (all at once or continued from a checkpoint), the
    honest acknowledged receipt is paid, the attacker nothing, the payer
    charged once; conservation holds throughout (check=True)."""
    net = TestNet(n_users=4)
    payer, thief, honest, other = net.users
    noise = [net.append(other, net.transfer(other, payer, 1 + i)) for i in range(3)]
    stolen, paid = retry(net, payer, thief, honest)
    e_stolen = net.append(thief, stolen, lamport=lamport)
    e_paid = net.append(honest, paid, ts=T0 + 5)
    e_ack = net.append(payer, net.ack(payer, paid.id, T0 + 10), ts=T0 + 10)
    es = noise + [e_stolen, e_paid, e_ack]
    if dispute:
        es.append(net.append(payer, net.dispute(payer, stolen.id, T0 + 11), ts=T0 + 11))
    random.Random(seed).shuffle(es)
    full = run(net, es)
    ck = None
    for part in (es[:split], es[split:]):
        inc = run(net, part, checkpoint=ck) if ck is not None else run(net, part)
        ck = inc.checkpoint
    for r in (full, inc):
        assert bal(r, honest) == (G + MICRO // 4, 0)
        assert bal(r, thief) == (G, 0)
        assert bal(r, payer) == (G - MICRO // 4 + 6, 0)
        assert total(r) == r.granted + r.minted
        assert r.rejected[e_stolen.id] in (reasons.ACKED_ELSEWHERE, reasons.SPEND_KEY_USED)
    assert inc.state_root == full.state_root


def test_dispute_voids_an_unacknowledged_receipt_and_refunds_the_payer():
    net = TestNet(n_users=3)
    payer, host, other = net.users
    r = net.receipt(host, payer, 2 * MICRO)
    e = net.append(host, r)
    d = net.append(payer, net.dispute(payer, r.id, T0 + 60), ts=T0 + 60)
    res = run(net, [e, d])
    assert e.id not in res.rejected and d.id not in res.rejected
    assert bal(res, payer) == (G, 0) and bal(res, host) == (G, 0)       # never settles
    assert res.disputes(payer.public) == 1 and res.disputes(payer.public, host.public) == 1
    assert res.disputes(payer.public, other.public) == 0
    # The dispute is the payer's word alone: it does not count against the host's record.
    assert res.receipt_record().get(host.public, (0, 0)) == (0, 0)
    # A dispute that comes first in the order voids the receipt the moment it applies.
    net2 = TestNet(n_users=2)
    payer2, host2 = net2.users
    r2 = net2.receipt(host2, payer2, 2 * MICRO)
    d2 = net2.append(payer2, net2.dispute(payer2, r2.id, T0 + 1), lamport=0)
    e2 = net2.append(host2, r2, lamport=5)
    res2 = run(net2, [e2, d2])
    assert e2.id not in res2.rejected and d2.id not in res2.rejected
    assert bal(res2, payer2) == (G, 0) and bal(res2, host2) == (G, 0)
    assert [ev[0] for ev in res2.events] == ["void"]


def test_dispute_refusals():
    net = TestNet(n_users=3, n_verifiers=1, quorum=1)
    payer, host, other = net.users
    v = net.verifiers[0]
    acked = net.receipt(host, payer, MICRO)
    late = net.receipt(host, payer, MICRO)
    challenged = net.receipt(host, payer, MICRO)
    es = [net.append(host, x) for x in (acked, late, challenged)]
    settle = T0 + 5 + 600 + WINDOW      # max(finished_at, expiry) + window
    es.append(net.append(v, net.challenge(v, challenged.id, T0 + 30), ts=T0 + 30))
    cases = [
        (net.append(payer, net.dispute(payer, acked.id, T0 + 40), ts=T0 + 40), reasons.DISPUTE_ACKED),
        (net.append(payer, net.dispute(payer, H(b"nothing"), T0 + 41), ts=T0 + 41), reasons.DISPUTE_NO_RECEIPT),
        (net.append(other, net.dispute(other, late.id, T0 + 42), ts=T0 + 42), reasons.NOT_PAYER),
        (net.append(payer, net.dispute(payer, late.id, settle), ts=settle), reasons.DISPUTE_LATE),
        (net.append(payer, net.dispute(payer, challenged.id, T0 + 43), ts=T0 + 43), reasons.ALREADY_CHALLENGED),
        (net.append(host, net.dispute(payer, late.id, T0 + 44), ts=T0 + 44), reasons.WRONG_AUTHOR),
    ]
    # The ack comes after the dispute in every order: it still shields its receipt.
    ack = net.append(payer, net.ack(payer, acked.id, settle + 1), ts=settle + 1)
    res = run(net, es + [d for d, _ in cases] + [ack])
    assert [res.rejected.get(d.id) for d, _ in cases] == [c for _, c in cases]
    assert bal(res, host) == (G + 2 * MICRO, 0)          # acked and late settle; challenged voided
    assert bal(res, payer) == (G - 2 * MICRO, 0)


# -- the host: reservations ----------------------------------------------------------

PRICE = 200_000           # the code-patch capsule's price (0.2 credits)


def _aemctl(home, *args):
    import subprocess

    from tests.nodekit import BIN
    out = subprocess.run([str(BIN / "aemctl"), *args, "--home", str(home.root)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def _code_request(net, payer, host: bytes, capsule: bytes, spend_key: bytes | None = None, now=None):
    import time

    from protocol.task import SpendAuthorization, TaskPacket
    from protocol.taskwire import TaskRequest
    now = now or int(time.time())
    task = TaskPacket(net=net, payer=payer.public, nonce=os.urandom(16), kind="code_patch", domain="python",
                      tags=(), prompt="", max_tokens=0, temperature_milli=0, seed=0, repo_tar=b"",
                      repo_hash=H(b""), patch="", test_cmd=("true",), max_price=PRICE, latency_budget_ms=0,
                      created_at=now, sig=b"").signed(payer)
    auth = SpendAuthorization(net=net, payer=payer.public, host=host, spend_key=spend_key or os.urandom(32),
                              task_hash=task.id, max_charge=PRICE, expires_at=now + 600, sig=b"").signed(payer)
    return TaskRequest(capsule_id=capsule, task=task, spend_auth=auth)


@pytest.fixture
def host_node(tmp_path):
    """A real node (the daemon's own Node and TaskService, run in this process)
    hosting the code-patch verifier at 0.2, and a payer key funded with
    exactly one task's price."""
    import json

    from aemd import services
    from aemd.config import load_config
    from aemd.node import Node, NodeOptions
    from crypto.keys import SigningKey
    from tests.nodekit import Mesh
    payer = SigningKey.generate()
    mesh = Mesh(tmp_path, 1, extra_grants={payer.public: PRICE})
    home = mesh.nodes[0].home
    capsule = bytes.fromhex(json.loads(_aemctl(home, "expert", "add", "--code-patch", "--domain", "python",
                                               "--price", "0.2", "--json"))["capsule_id"])
    cfg = load_config(home.config)
    node = Node(home, mesh.nodes[0].key, mesh.genesis, NodeOptions.from_config(cfg, None, None))
    svc = services.install(node, cfg)
    return node, svc, payer, capsule


async def _admit_all(svc, reqs):
    import trio
    out: list = [None] * len(reqs)

    async def one(i, req):
        try:
            out[i] = await svc._admit(req)
        except errors.AemError as exc:
            out[i] = exc
    async with trio.open_nursery() as n:
        for i, req in enumerate(reqs):
            n.start_soon(one, i, req)
    return out


def _run_node(node, fn):
    import trio

    async def main():
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run)
            try:
                with trio.fail_after(60):
                    return await fn()
            finally:
                nursery.cancel_scope.cancel()
    return trio.run(main)


def test_host_reserves_the_price_of_every_accepted_task(host_node):
    """16 tasks at once from a payer holding one task's price: exactly one is
    admitted; the same authorisation twice at the same instant: at most once;
    a reservation ends with its task."""
    node, svc, payer, capsule = host_node
    net, me = node.net, node.key.public

    async def scenario():
        reqs = [_code_request(net, payer, me, capsule) for _ in range(16)]
        res = await _admit_all(svc, reqs)
        ok = [i for i, r in enumerate(res) if not isinstance(r, errors.AemError)]
        assert len(ok) == 1, res
        refused = [r for r in res if isinstance(r, errors.AemError)]
        assert all(r.code == errors.REFUSED and "held by its tasks in progress" in r.detail for r in refused)
        assert svc._reserved == {payer.public: PRICE}
        # The task ends without a receipt: its price is free again.
        first = reqs[ok[0]]
        await svc._release(payer.public, first.spend_auth.spend_key, PRICE)
        assert svc._reserved == {} and not svc._in_flight

        # One authorisation sent twice at the same instant: admitted once.
        same = _code_request(net, payer, me, capsule)
        res = await _admit_all(svc, [same, same])
        assert sum(not isinstance(r, errors.AemError) for r in res) == 1, res
        assert any(isinstance(r, errors.AemError) and "already being worked on" in r.detail for r in res)
        await svc._release(payer.public, same.spend_auth.spend_key, PRICE)

        # An authorisation made out to another host is refused before anything else.
        other = _code_request(net, payer, os.urandom(32), capsule)
        res = await _admit_all(svc, [other])
        assert isinstance(res[0], errors.AemError) and "another host" in res[0].detail
    _run_node(node, scenario)


def test_host_refuses_a_payer_who_disputed_its_receipts(host_node):
    from protocol.receipts import Dispute
    from protocol.task import InferenceWorkReceipt
    node, svc, payer, capsule = host_node
    net, me = node.net, node.key.public

    async def scenario():
        import time
        now = int(time.time())
        req = _code_request(net, payer, me, capsule, now=now)
        assert not isinstance((await _admit_all(svc, [req]))[0], errors.AemError)
        await svc._release(payer.public, req.spend_auth.spend_key, PRICE)
        r = InferenceWorkReceipt(net=net, host=me, payer=payer.public, task_hash=req.task.id,
                                 capsule_id=capsule, spend_auth=req.spend_auth, charge=PRICE // 2,
                                 output_hash=H(b"report"), tokens_out=0, started_at=now, finished_at=now,
                                 sig=b"").signed(node.key)
        await node.append(r)
        d = Dispute(net=net, payer=payer.public, receipt_id=r.id, reason="never received", created_at=now,
                    sig=b"").signed(payer)
        added, bad = await node.store.insert_batch([make_entry(payer, net, 0, b"", 0, now, d).encode()])
        assert (added, bad) == (1, 0)
        ledger = await node.store.ledger(now)
        assert ledger.disputes(payer.public, me) == 1 and ledger.available(payer.public) == PRICE
        res = await _admit_all(svc, [_code_request(net, payer, me, capsule, now=now)])
        assert isinstance(res[0], errors.AemError) and "disputed 1 of this host's receipts" in res[0].detail
    _run_node(node, scenario)


# -- the payer: hostile hosts written with the p2p layer ------------------------------

def test_payer_refuses_an_overcharge_and_bounds_a_host_that_streams_forever(tmp_path):
    """Two hostile hosts (aemd.p2p, the daemon's own shell) against a real
    payer node in this process: one accepts at 0.10 and returns a receipt
    charging 1.00 (its authorisation's maximum); one streams 16 KiB chunks
    without end. The payer acknowledges neither, cuts the streamer off at the
    task's own bound, forwards a bounded number of events, and disputes the
    over-charging receipt when it reaches its log."""
    import time

    import trio

    from aemd import p2p, services, tasks
    from aemd.config import load_config
    from aemd.framing import read_frame, write_frame
    from aemd.node import Node, NodeOptions
    from crypto.keys import SigningKey
    from protocol.mesh import HostAdvertisement, NodeCard
    from protocol.sync import topic
    from protocol.task import InferenceWorkReceipt
    from protocol.taskwire import (MAX_CHUNK, TaskAccepted, TaskChunk, TaskRequest, TaskResult,
                                   task_protocol_id)
    from tests.nodekit import Mesh

    mesh = Mesh(tmp_path, 1)
    home = mesh.nodes[0].home
    cfg = load_config(home.config)
    payer = Node(home, mesh.nodes[0].key, mesh.genesis, NodeOptions.from_config(cfg, None, None))
    svc = services.install(payer, cfg)
    net = payer.net
    greedy, streamer = SigningKey.generate(), SigningKey.generate()
    sent = {"bytes": 0, "chunks": 0}
    logged: list[InferenceWorkReceipt] = []

    def card(key, host, now):
        return NodeCard(net=net, node=key.public, addrs=tuple(a.split("/p2p/")[0] for a in host.listen_multiaddrs()),
                        gpu="", vram_mb=0, ram_mb=0, locality="", policies=(), account=key.public, load=0,
                        issued_at=now, expires_at=now + 600, sig=b"").signed(key)

    def host_ad(key, domain, price, now):
        return HostAdvertisement(net=net, host=key.public, capsule_id=H(domain.encode() + key.public), kind="gguf",
                                 domain=domain, tags=(), price=price, roles=("inference",), availability=100,
                                 max_concurrency=4, required_receipts=(), issued_at=now, expires_at=now + 600,
                                 sig=b"").signed(key)

    async def greedy_serve(stream, peer: str) -> None:
        req = TaskRequest.decode(await read_frame(stream, 1 << 20))
        await write_frame(stream, TaskAccepted(price=100_000).encode())
        now = int(time.time())
        r = InferenceWorkReceipt(net=net, host=greedy.public, payer=req.task.payer, task_hash=req.task.id,
                                 capsule_id=req.capsule_id, spend_auth=req.spend_auth,
                                 charge=req.spend_auth.max_charge, output_hash=H(b"ok"), tokens_out=1,
                                 started_at=now, finished_at=now, sig=b"").signed(greedy)
        logged.append(r)
        await write_frame(stream, TaskResult(output=b"ok", tokens_out=1, receipt=r).encode())

    async def stream_serve(stream, peer: str) -> None:
        req = TaskRequest.decode(await read_frame(stream, 1 << 20))
        await write_frame(stream, TaskAccepted(price=1).encode())
        size = MAX_CHUNK if req.task.domain == "stream" else 16      # "drip": many small chunks
        chunk = TaskChunk(data=b"x" * size).encode()
        while True:                                   # until the payer hangs up
            await write_frame(stream, chunk)
            sent["bytes"] += MAX_CHUNK
            sent["chunks"] += 1

    events: list[dict] = []

    async def collect(event: dict) -> None:
        events.append(event)

    async def wait_until(cond, what):
        from tests.nodekit import until
        await until(what, cond, timeout=30)

    async def main():
        proto = task_protocol_id(net)
        async with trio.open_nursery() as nursery:
            await nursery.start(payer.run)
            async with p2p.open_p2p(greedy.seed, ["/ip4/127.0.0.1/tcp/0"]) as g, \
                    p2p.open_p2p(streamer.seed, ["/ip4/127.0.0.1/tcp/0"]) as s:
                g.set_stream_handler(proto, greedy_serve)
                s.set_stream_handler(proto, stream_serve)
                cards_t, ads_t = topic(net, "cards"), topic(net, "ads")
                subs = [await h.subscribe(t) for h in (g, s) for t in (cards_t, ads_t)]
                for h in (g, s):
                    await h.connect(payer.p2p.listen_multiaddrs()[0])
                await wait_until(lambda: all(payer.p2p.peer_id in h.mesh_peers(t)
                                             for h in (g, s) for t in (cards_t, ads_t)), "gossip mesh")
                now = int(time.time())
                for key, h, domain, price in ((greedy, g, "greedy", 1_000_000), (streamer, s, "stream", 1),
                                              (streamer, s, "drip", 1)):
                    await h.publish(cards_t, card(key, h, now).encode())
                    await h.publish(ads_t, host_ad(key, domain, price, now).encode())
                await wait_until(lambda: len(payer.mesh.ads) == 3, "ads in the payer's table")

                base = {"kind": "text", "prompt": "hi", "max_tokens": 4, "max_price": 2_000_000}
                with pytest.raises(errors.AemError) as over, trio.fail_after(60):
                    await svc.submit(dict(base, domain="greedy"), collect)
                assert over.value.code == errors.UNAVAILABLE
                trace = svc.traces.get(over.value.detail.split("trace ")[1][:16])
                assert [a.outcome for a in trace.attempts] == ["bad_value"]
                assert "accepted the task at 0.1" in trace.attempts[0].detail
                assert await payer.store.count() == 0            # no ack, nothing logged

                with pytest.raises(errors.AemError) as cut, trio.fail_after(60):
                    await svc.submit(dict(base, domain="stream"), collect)
                trace = svc.traces.get(cut.value.detail.split("trace ")[1][:16])
                assert [a.outcome for a in trace.attempts] == ["too_large"]
                max_bytes, max_chunks = tasksession.output_bound(tasks.build_task(payer, dict(base, domain="stream")))
                assert (max_bytes, max_chunks) == (4 * tasksession.MAX_TOKEN_BYTES, 4 + tasksession.CHUNK_SLACK)
                chunks = [e for e in events if e.get("event") == "chunk"]
                assert len(chunks) <= max_chunks and sum(len(e["data"]) for e in chunks) <= max_bytes
                # The host could only push what the stream's window held before the payer hung up.
                print("streamer wrote", sent, "payer forwarded", len(chunks), "chunk events")
                assert sent["bytes"] < 8 * 1024 * 1024, sent
                # Small chunks: cut off by their count, each forwarded at most once.
                events.clear()
                with pytest.raises(errors.AemError) as drip, trio.fail_after(60):
                    await svc.submit(dict(base, domain="drip"), collect)
                trace = svc.traces.get(drip.value.detail.split("trace ")[1][:16])
                assert [a.outcome for a in trace.attempts] == ["too_large"]
                chunks = [e for e in events if e.get("event") == "chunk"]
                assert len(chunks) == max_chunks, len(chunks)

                # The over-charging receipt reaches the payer's log (as by sync): disputed.
                [r] = logged
                from protocol.entry import make_entry as mk
                added, bad = await payer.store.insert_batch([mk(greedy, net, 0, b"", 0, now, r).encode()])
                assert (added, bad) == (1, 0)
                async def disputed() -> bool:                 # the receipt, then the payer's dispute
                    return await payer.store.count() >= 2
                await wait_until(disputed, "the payer's dispute in its log")
                ledger = await payer.store.ledger(int(time.time()))
                assert ledger.challenged(r.id) and ledger.disputes(payer.key.public, greedy.public) == 1
                assert ledger.available(payer.key.public) == mesh.genesis.grants[0].amount
                for sub in subs:
                    await sub.aclose()
            nursery.cancel_scope.cancel()

    trio.run(main)


# -- the attack of issue "payment taken without work", on real nodes -----------------

async def _has_ads(call, node, n: int) -> bool:
    return len(await call(node, "ads")) >= n


@pytest.mark.trio
async def test_a_host_that_refuses_cannot_take_the_payment(tmp_path):
    """Three real `aemd start` processes: n0 pays, n1 hosts the code-patch
    verifier at 0.25, n2 only watches. An attacker (a libp2p host in this
    process) advertises the same service at 0.10, so it is tried first; it
    refuses the task, then logs its own receipt for the authorisation it was
    shown, at its maximum charge, with Lamport clock 0 (first in any order),
    and serves it by sync. Every node's replay pays n1 its 0.25, the attacker
    nothing; the payer is charged 0.25 once, and disputes the stolen receipt."""
    import json
    import shlex
    import subprocess
    import time

    import trio

    from aemd import control, p2p
    from aemd.executors import FIXTURE_TEST_COMMAND, fixture_patch
    from aemd.executors.fixtures import fixture_dir
    from aemd.framing import read_frame_or_eof, write_frame
    from crypto.keys import SigningKey
    from protocol.mesh import HostAdvertisement, NodeCard
    from protocol.sync import (Frontier, Frontiers, RangeRequest, RangeResponse, decode_sync_message,
                               sync_protocol_id, topic)
    from protocol.taskwire import task_protocol_id
    from tests import byzkit
    from tests.nodekit import BIN, Mesh, until

    grant = 1_000_000_000
    mesh = Mesh(tmp_path, 3, grant=grant)
    payer, honest, watcher = mesh.nodes
    net = mesh.genesis.network_id
    thief = SigningKey.generate()
    stolen: list = []              # the attacker's one entry, once it has logged it

    def call(node, cmd, args=None):
        return trio.to_thread.run_sync(lambda: control.call(node.home.socket, cmd, args or {}))

    async def serve_sync(stream, peer: str) -> None:
        while (frame := await read_frame_or_eof(stream, 1 << 20)) is not None:
            msg = decode_sync_message(frame)
            if isinstance(msg, Frontiers):
                mine = tuple(Frontier(author=thief.public, seq=0, head=e.id) for e in stolen)
                await write_frame(stream, Frontiers(net=net, frontiers=mine).encode())
            elif isinstance(msg, RangeRequest):
                entries = tuple(e.encode() for e in stolen if msg.author == thief.public)
                await write_frame(stream, RangeResponse(net=net, author=msg.author, entries=entries).encode())
            else:
                return

    out = subprocess.run([str(BIN / "aemctl"), "expert", "add", "--code-patch", "--domain", "python",
                          "--price", "0.25", "--json", "--home", str(honest.home.root)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    try:
        await trio.to_thread.run_sync(mesh.start_line)
        # Some history first, so the honest host's receipt has a Lamport clock
        # above 0 and the attacker's entry sorts first on every node.
        await call(watcher, "transfer", {"to": payer.account.hex(), "amount": 5})

        async def honest_has_it() -> bool:
            await call(honest, "sync_now")          # pull it now rather than at the next round
            return (await call(honest, "status"))["log_entries"] >= 1
        await until("the transfer on the honest host", honest_has_it, timeout=60)
        async with p2p.open_p2p(thief.seed, ["/ip4/127.0.0.1/tcp/0"]) as evil:
            evil.set_stream_handler(task_protocol_id(net),
                                    byzkit.refuse_then_claim(thief, net, lambda e: None, stolen))
            evil.set_stream_handler(sync_protocol_id(net), serve_sync)
            cards_t, ads_t = topic(net, "cards"), topic(net, "ads")
            subs = [await evil.subscribe(t) for t in (cards_t, ads_t)]
            await evil.connect(payer.addr)
            await until("the payer in our gossip mesh",
                        lambda: all(payer.peer_id in evil.mesh_peers(t) for t in (cards_t, ads_t)), timeout=60)
            with trio.fail_after(60):
                now = int(time.time())
                addrs = tuple(a.split("/p2p/")[0] for a in evil.listen_multiaddrs())
                card = NodeCard(net=net, node=thief.public, addrs=addrs, gpu="", vram_mb=0, ram_mb=0,
                                locality="", policies=(), account=thief.public, load=0, issued_at=now,
                                expires_at=now + 600, sig=b"").signed(thief)
                ad = HostAdvertisement(net=net, host=thief.public, capsule_id=H(b"stolen"), kind="code_patch",
                                       domain="python", tags=(), price=100_000, roles=("inference",),
                                       availability=100, max_concurrency=4, required_receipts=(),
                                       issued_at=now, expires_at=now + 600, sig=b"").signed(thief)
                while len(await call(payer, "ads")) < 2:        # the honest ad and the attacker's
                    # Gossip is best effort: re-sent until the payer holds it, as a host re-announces.
                    await evil.publish(cards_t, card.encode())
                    await evil.publish(ads_t, ad.encode())
                    with trio.move_on_after(0.5):             # then sent again
                        await until("the attacker's ad at the payer", lambda: _has_ads(call, payer, 2))

            patch = tmp_path / "good.patch"
            patch.write_text(fixture_patch("good"))
            done = await trio.to_thread.run_sync(lambda: subprocess.run(
                [str(BIN / "aemctl"), "submit-task", "--domain", "python", "--patch", str(patch),
                 "--repo", str(fixture_dir() / "repo"), "--test-cmd", shlex.join(FIXTURE_TEST_COMMAND),
                 "--max-price", "1", "--json", "--home", str(payer.home.root)],
                capture_output=True, text=True, timeout=300))
            assert done.returncode == 0, done.stderr
            res = json.loads(done.stdout)
            assert res["host"] == honest.account.hex() and res["price"] == 250_000 and res["attempts"] == 2
            assert stolen, "the attacker was never tried"

            # the transfer, the honest receipt, the payer's ack, the stolen receipt, its dispute
            async def agreed():
                for n in mesh.nodes:
                    try:
                        await call(n, "sync_now")        # pull now rather than at the next round
                    except errors.AemError:
                        pass
                rs = [await call(n, "ledger_replay") for n in mesh.nodes]
                return all(r["entries"] == 5 for r in rs) and len({r["state_root"] for r in rs}) == 1 and rs
            rs = await until("five entries and one state root on every node", agreed, timeout=120)
            for r in rs:
                bal = r["balances"]
                assert thief.public.hex() not in bal
                assert bal[honest.account.hex()] == {"available": grant, "pending": 250_000}
                assert bal[payer.account.hex()] == {"available": grant - 250_000 + 5, "pending": 0}
                codes = {x["entry"]: x["code"] for x in r["rejected"]}
                assert codes == {stolen[0].id.hex(): "ACKED_ELSEWHERE"}, codes
            for s in subs:
                await s.aclose()
    except BaseException:
        print(mesh.logs())
        raise
    finally:
        await trio.to_thread.run_sync(mesh.close)


def test_host_admits_a_retry_that_a_refusing_host_charged_first(host_node):
    """A host that refused the task logs a receipt for its own authorisation
    (same spend key) before the retry reaches the honest host: the honest host
    still takes the retry, since the payer's ack of its receipt will win. Once
    the payer acknowledged a receipt for the key, the key is spent for all."""
    from crypto.keys import SigningKey
    from protocol.task import InferenceWorkReceipt, ReceiptAck, SpendAuthorization
    node, svc, payer, capsule = host_node
    net, me = node.net, node.key.public
    thief = SigningKey.generate()

    async def scenario():
        import time
        now = int(time.time())
        req = _code_request(net, payer, me, capsule, now=now)
        a = req.spend_auth
        theirs = SpendAuthorization(net=net, payer=payer.public, host=thief.public, spend_key=a.spend_key,
                                    task_hash=a.task_hash, max_charge=0, expires_at=a.expires_at,
                                    sig=b"").signed(payer)
        stolen = InferenceWorkReceipt(net=net, host=thief.public, payer=payer.public, task_hash=a.task_hash,
                                      capsule_id=H(b"x"), spend_auth=theirs, charge=0, output_hash=H(b"x"),
                                      tokens_out=0, started_at=now, finished_at=now, sig=b"").signed(thief)
        assert await node.store.insert_batch([make_entry(thief, net, 0, b"", 0, now, stolen).encode()]) == (1, 0)
        ledger = await node.store.ledger(now)
        assert ledger.spend_key_used(payer.public, a.spend_key)
        res = await _admit_all(svc, [req])
        assert not isinstance(res[0], errors.AemError), res
        await svc._release(payer.public, a.spend_key, PRICE)
        ack = ReceiptAck(net=net, payer=payer.public, receipt_id=stolen.id, accepted=True, created_at=now,
                         sig=b"").signed(payer)
        assert await node.store.insert_batch([make_entry(payer, net, 0, b"", 1, now, ack).encode()]) == (1, 0)
        res = await _admit_all(svc, [req])
        assert isinstance(res[0], errors.AemError) and "already been charged" in res[0].detail
    _run_node(node, scenario)


def test_payer_disputes_receipts_it_never_accepted_on_insert(tmp_path):
    """Receipts that reach the payer's log later (sync): one for work it never
    accepted is disputed; one it accepted before a crash kept it from logging
    the ack (its route trace says so) is acknowledged instead."""
    import time

    from aemd import services
    from aemd.config import load_config
    from aemd.node import Node, NodeOptions
    from crypto.keys import SigningKey
    from protocol.task import InferenceWorkReceipt, RouteTrace, SpendAuthorization
    from tests.nodekit import Mesh, until

    mesh = Mesh(tmp_path, 1)
    home, key = mesh.nodes[0].home, mesh.nodes[0].key
    cfg = load_config(home.config)
    node = Node(home, key, mesh.genesis, NodeOptions.from_config(cfg, None, None))
    svc = services.install(node, cfg)
    net, host = node.net, SigningKey.generate()

    def receipt(now):
        auth = SpendAuthorization(net=net, payer=key.public, host=host.public, spend_key=os.urandom(32),
                                  task_hash=H(os.urandom(8)), max_charge=MICRO, expires_at=now + 600,
                                  sig=b"").signed(key)
        return InferenceWorkReceipt(net=net, host=host.public, payer=key.public, task_hash=auth.task_hash,
                                    capsule_id=H(b"c"), spend_auth=auth, charge=MICRO, output_hash=H(b"o"),
                                    tokens_out=1, started_at=now, finished_at=now, sig=b"").signed(host)

    async def scenario():
        now = int(time.time())
        never, accepted = receipt(now), receipt(now)
        svc.traces.put(RouteTrace(net=net, router=key.public, task_id=accepted.task_hash, candidates=(),
                                  attempts=(), chosen=host.public, outcome="ok", receipt_id=accepted.id,
                                  created_at=now, sig=b"").signed(key))
        first = make_entry(host, net, 0, b"", 0, now, never)
        entries = [first, make_entry(host, net, 1, first.id, 1, now, accepted)]
        assert await node.store.insert_batch([e.encode() for e in entries]) == (2, 0)

        async def answered() -> bool:                  # a dispute and an ack, appended by the payer
            return await node.store.count() >= 4
        await until("the payer's dispute and ack", answered, timeout=30)
        ledger = await node.store.ledger(int(time.time()))
        assert ledger.challenged(never.id) and ledger.disputes(key.public, host.public) == 1
        assert ledger.acknowledged(accepted.id, key.public) and not ledger.challenged(accepted.id)
        assert ledger.balances[host.public] == (0, MICRO)      # the accepted one stays pending for the host
    _run_node(node, scenario)
