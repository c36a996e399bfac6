"""A hostile peer speaking the real protocol to real nodes.

The hostile peer is a libp2p host in the test process (aemd.p2p, the same
shell the daemon uses). It gossips forged, oversized, expired and
wrong-network cards, ads and announcements, and answers sync with entries that
fail verification. Two honest `aemd start` processes must store and forward
none of it, penalise it, and keep replicating their own entries.
"""

from __future__ import annotations

import os
import time

import pytest
import trio

from aemd import control, p2p
from aemd.framing import read_frame_or_eof, write_frame
from crypto.hashing import H
from crypto.keys import SigningKey
from protocol.entry import make_entry
from protocol.errors import AemError
from protocol.mesh import HostAdvertisement, NodeCard
from protocol.receipts import Transfer
from protocol.sync import (Frontier, Frontiers, HeadAnnouncement, RangeRequest, RangeResponse,
                           decode_sync_message, sync_protocol_id, topic)
from tests.nodekit import Mesh, until


def _card(key, net, now, **kw):
    fields = dict(net=net, node=key.public, addrs=(), gpu="evil", vram_mb=1, ram_mb=1, locality="",
                  policies=(), account=key.public, load=0, issued_at=now, expires_at=now + 300, sig=b"")
    fields.update(kw)
    return NodeCard(**fields).signed(key)


def _ad(key, net, now, **kw):
    fields = dict(net=net, host=key.public, capsule_id=H(os.urandom(8)), kind="gguf", domain="evil",
                  tags=(), price=1, roles=("inference",), availability=100, max_concurrency=1,
                  required_receipts=(), issued_at=now, expires_at=now + 300, sig=b"")
    fields.update(kw)
    return HostAdvertisement(**fields).signed(key)


async def _call(node, cmd, args=None):
    return await trio.to_thread.run_sync(lambda: control.call(node.home.socket, cmd, args or {}))


@pytest.mark.trio
async def test_hostile_peer_is_ignored_and_penalised(tmp_path):
    mesh = Mesh(tmp_path, 2)
    try:
        await trio.to_thread.run_sync(mesh.start_line)
        a, b = mesh.nodes
        net = mesh.genesis.network_id
        evil = SigningKey.generate()
        now = int(time.time())
        other_net = H(b"another network")

        bad_entries_served = 0
        gossip_done = trio.Event()   # serve bad entries only after the gossip, or the ban hides it

        async def serve_bad_sync(stream, peer):
            """Claims a long feed, then serves forged and foreign entries."""
            nonlocal bad_entries_served
            victim = SigningKey.generate()
            await gossip_done.wait()
            while True:
                frame = await read_frame_or_eof(stream, 1 << 20)
                if frame is None:
                    return
                msg = decode_sync_message(frame)
                if isinstance(msg, Frontiers):
                    await write_frame(stream, Frontiers(net=net, frontiers=(
                        Frontier(author=victim.public, seq=9, head=H(b"x")),)).encode())
                elif isinstance(msg, RangeRequest):
                    t = Transfer(net=net, sender=victim.public, recipient=evil.public, amount=10**9,
                                 nonce=os.urandom(16), created_at=now, sig=b"").signed(victim)
                    good = make_entry(victim, net, 0, b"", 1, now, t)
                    forged = good.replace(sig=bytes(64)).encode()
                    foreign = make_entry(victim, other_net, 0, b"", 1, now, t.replace(net=other_net).signed(victim))
                    entries = (forged, foreign.encode(), b"\x93garbage")
                    bad_entries_served += len(entries)
                    await write_frame(stream, RangeResponse(net=net, author=victim.public,
                                                            entries=entries).encode())
                else:
                    return

        cfg = p2p.P2PConfig(penalize_invalid=False)
        async with p2p.open_p2p(evil.seed, ["/ip4/127.0.0.1/tcp/0"], config=cfg) as host:
            host.set_stream_handler(sync_protocol_id(net), serve_bad_sync)
            subs = [await host.subscribe(topic(net, t)) for t in ("cards", "ads", "heads")]
            await host.connect(a.addr)
            # Published before a has grafted us into its mesh, the gossip would go nowhere.
            await until("a in our gossip mesh of every topic",
                        lambda: all(a.peer_id in host.mesh_peers(topic(net, t)) for t in ("cards", "ads", "heads")),
                        timeout=30)

            forged_card = _card(evil, net, now).replace(gpu="forged")         # signature no longer matches
            expired_card = _card(evil, net, now - 1000, expires_at=now - 10)
            foreign_card = _card(evil, other_net, now)
            payloads = [
                ("cards", forged_card.encode()),
                ("cards", expired_card.encode()),
                ("cards", foreign_card.encode()),
                ("cards", b"\xc4" + os.urandom(40_000)),                        # oversized junk
                ("ads", _ad(evil, net, now).replace(price=0).encode()),         # forged
                ("ads", _ad(evil, other_net, now).encode()),                    # wrong network
                ("ads", _ad(evil, net, now - 1000, expires_at=now - 1).encode()),  # expired
                ("heads", HeadAnnouncement(net=other_net, frontier=Frontier(
                    author=evil.public, seq=1, head=H(b"h")), lamport=1).encode()),
            ]
            for name, data in payloads:
                # Bypass our own validator-free publish checks: these must be judged by the honest nodes.
                await host._pubsub.publish(topic(net, name), data)
            await until("a to judge the card and the ad", lambda: a.log_has("invalid card") and a.log_has("invalid ad"),
                        timeout=30)
            gossip_done.set()

            # The honest node pulls from us (on connect, or now that we ask it
            # to) and gets only bad entries.
            try:
                await _call(a, "sync_now")
            except AemError:
                pass              # the session with us fails: what is judged below
            await until("a to pull our entries", lambda: bad_entries_served > 0, timeout=60)

            async def judged() -> bool:
                st = await _call(a, "status")
                return host.peer_id in st["banned"] or st["penalties"].get(host.peer_id, 0) > 0
            await until("a to penalise us", judged, timeout=60)

            # Honest nodes keep working: a transfer on b reaches a.
            await _call(b, "transfer", {"to": a.account.hex(), "amount": 5})

            async def replicated() -> bool:
                return (await _call(a, "status"))["log_entries"] == 1
            await until("b's transfer on a", replicated, timeout=60)

            for node in (a, b):
                st = await _call(node, "status")
                assert st["log_entries"] == 1                   # nothing of the hostile peer's stored
                peers = await _call(node, "peers")
                assert evil.public.hex() not in {p.get("node") for p in peers}
                ads = await _call(node, "ads")
                assert all(ad["host"] != evil.public.hex() for ad in ads)
                replay = await _call(node, "ledger_replay")
                assert evil.public.hex() not in replay["balances"]
            st = await _call(a, "status")
            assert host.peer_id in st["banned"], st
            # The gossip was judged (and refused) by a's validators, not lost on the way.
            log = a.log_path.read_text()
            assert "invalid card" in log and "invalid ad" in log
            for s in subs:
                await s.aclose()
    except BaseException:
        print(mesh.logs())
        raise
    finally:
        await trio.to_thread.run_sync(mesh.close)
