"""Hostile peers for the simulator: sync servers that misbehave, and the
gossip a hostile node sends. Each is a sans-I/O session like the real ones,
so the same driver runs it.

Modes:

* ``garbage`` -- claims every author a little further than it holds and
  serves non-entries (random bytes) for the ranges;
* ``forged`` -- the same, but serves real entries with broken signatures;
* ``wrongnet`` -- answers with the frontiers of another network;
* ``flood`` -- answers every frame with a stream of unsolicited frames;
* ``silent`` -- accepts the stream and never answers (the client's read
  deadline ends it);
* ``heads`` -- serves honestly but announces heads it does not have.

Every hostile node also gossips ads with broken signatures.
"""

from __future__ import annotations

from crypto.hashing import H
from protocol.entry import Entry
from protocol.session import Recv, Send
from protocol.sync import (REQUEST_LIMIT, Frontier, Frontiers, HeadAnnouncement, RangeRequest, RangeResponse,
                           decode_sync_message)
from protocol.syncsession import frontier_list, sync_server

MODES = ("garbage", "forged", "wrongnet", "flood", "silent", "heads")
FLOOD_FRAMES = 32


def server(node, mode: str):
    """The sync server session a hostile node runs for every inbound stream."""
    if mode == "heads":
        return sync_server(node.netid)
    return _hostile(node, mode)


def _inflated(node) -> tuple[Frontier, ...]:
    fr = dict(node.log.frontiers())
    return tuple(Frontier(author=a, seq=s + 3, head=H(b"fake" + a)) for a, (s, _) in sorted(fr.items()))


def _hostile(node, mode: str):
    net = node.netid
    rng = node.sim.rng
    served = 0
    while served < 10_000:
        frame = yield Recv(REQUEST_LIMIT, 30.0, "hostile request")
        if frame is None:
            return served
        served += 1
        if mode == "silent":
            continue
        try:
            msg = decode_sync_message(frame)
        except Exception:
            return served
        if mode == "wrongnet":
            other = H(b"another network")
            yield Send(Frontiers(net=other, frontiers=frontier_list(node.log.frontiers())).encode())
            continue
        if mode == "flood":
            for _ in range(FLOOD_FRAMES):
                yield Send(Frontiers(net=net, frontiers=_inflated(node)).encode(), best_effort=True)
            continue
        if isinstance(msg, Frontiers):
            yield Send(Frontiers(net=net, frontiers=_inflated(node)).encode())
        elif isinstance(msg, RangeRequest):
            n = min(msg.limit, 4)
            if mode == "garbage":
                entries = tuple(rng.randbytes(rng.randint(1, 300)) for _ in range(n))
            else:
                real = node.log.range(msg.author, max(0, msg.from_seq - 1), n) or node.log.range(msg.author, 0, n)
                entries = tuple(_forge(d) for d in real) or tuple(rng.randbytes(64) for _ in range(n))
            yield Send(RangeResponse(net=net, author=msg.author, entries=entries).encode())
        else:
            return served
    return served


def _forge(data: bytes) -> bytes:
    e = Entry.decode(data)
    return e.replace(sig=bytes([e.sig[0] ^ 1]) + e.sig[1:]).encode()


def gossip(node) -> None:
    """What a hostile node gossips each round: an ad with a broken signature,
    and (mode ``heads``) a head it does not serve."""
    ad = node.make_ad(node.wall)
    bad = ad.replace(sig=bytes([ad.sig[0] ^ 1]) + ad.sig[1:])
    node.publish("ads", bad.encode())
    if node.hostile == "heads":
        author = node.sim.rng.choice(node.mesh.nodes).public
        ann = HeadAnnouncement(net=node.netid, frontier=Frontier(author=author, seq=1_000, head=H(b"nowhere")),
                               lamport=1)
        node.publish("heads", ann.encode())
