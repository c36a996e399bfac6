"""Byzantine peers for multi-node tests: identities that follow the byte
format and break the rules, built from the project's own code.

Each hostile peer is an ``aemd.p2p`` host in the test process (the shell the
daemon uses), signing real cards, ads, entries and receipts. What it serves
by sync goes through the project's own ``aemd.sync.sync_server`` over an
in-memory feed set (:class:`Feeds`), so it can show different peers
different branches, or entries no honest store would keep.

    async with p2p.open_p2p(key.seed, LOCAL) as host:
        peer = ByzPeer(host, key, net)
        peer.serve_sync()
        peer.views = {"*": Feeds([e0, e1]), other_peer_id: Feeds([e0x])}   # a fork, split by peer
        host.set_stream_handler(task_protocol_id(net), refuse_then_claim(key, net, log, claims))
        subs = await peer.join([honest.addr])
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import trio

from aemd.framing import read_frame, read_frame_or_eof, write_frame
from aemd.sync import sync_server
from crypto.hashing import H
from crypto.keys import SigningKey
from protocol.entry import Entry, make_entry
from protocol.mesh import HostAdvertisement, NodeCard
from protocol.sync import topic
from protocol.task import InferenceWorkReceipt, SpendAuthorization, TaskPacket
from protocol.taskwire import TaskAccepted, TaskRefused, TaskRequest, TaskResult, decode_reply

LOCAL = ["/ip4/127.0.0.1/tcp/0"]


def addrs_of(host) -> tuple[str, ...]:
    """A p2p host's listen addresses without the /p2p/ suffix, as a card lists them."""
    return tuple(a.split("/p2p/")[0] for a in host.listen_multiaddrs())


def card(key: SigningKey, net: bytes, addrs: tuple[str, ...], now: int, ttl: int = 600) -> NodeCard:
    return NodeCard(net=net, node=key.public, addrs=addrs, gpu="", vram_mb=0, ram_mb=0, locality="",
                    policies=(), account=key.public, load=0, issued_at=now, expires_at=now + ttl,
                    sig=b"").signed(key)


def ad(key: SigningKey, net: bytes, *, kind: str, domain: str, price: int, now: int,
       expires_at: int | None = None, capsule: bytes | None = None) -> HostAdvertisement:
    return HostAdvertisement(net=net, host=key.public, capsule_id=H(capsule or b"cap" + key.public + domain.encode()),
                             kind=kind, domain=domain, tags=(), price=price, roles=("inference",), availability=100,
                             max_concurrency=4, required_receipts=(), issued_at=now,
                             expires_at=now + 600 if expires_at is None else expires_at, sig=b"").signed(key)


class Feeds:
    """An in-memory log for ``sync_server`` (the LogAccess it reads):
    whatever entries it is given, valid or not, chained or forked."""

    def __init__(self, entries: list[Entry] = ()) -> None:
        self.by_author: dict[bytes, list[Entry]] = {}
        for e in entries:
            self.add(e)

    def add(self, e: Entry) -> None:
        feed = self.by_author.setdefault(e.author, [])
        feed.append(e)
        feed.sort(key=lambda x: x.seq)

    async def frontiers(self) -> dict[bytes, tuple[int, bytes]]:
        return {a: (f[-1].seq, f[-1].id) for a, f in self.by_author.items() if f}

    async def range(self, author: bytes, from_seq: int, limit: int) -> list[bytes]:
        return [e.encode() for e in self.by_author.get(author, []) if e.seq >= from_seq][:limit]


class ByzPeer:
    """One hostile identity: its libp2p host, its key, what it serves."""

    def __init__(self, host, key: SigningKey, net: bytes) -> None:
        self.host, self.key, self.net = host, key, net
        self.views: dict[str, Feeds] = {"*": Feeds()}
        self.served: dict[str, int] = {}          # sync sessions answered, per peer id
        self.ranges: set[tuple[str, bytes]] = set()   # (peer id, author) of every range served

    @property
    def peer_id(self) -> str:
        return self.host.peer_id

    def view(self, peer: str) -> Feeds:
        return self.views.get(peer, self.views["*"])

    def serve_sync(self) -> None:
        from protocol.sync import sync_protocol_id

        peer_self = self

        class Session:                  # the peer's view, noting what it asked for
            def __init__(self, peer: str) -> None:
                self.peer, self.feeds = peer, peer_self.view(peer)

            async def frontiers(self):
                return await self.feeds.frontiers()

            async def range(self, author: bytes, from_seq: int, limit: int) -> list[bytes]:
                out = await self.feeds.range(author, from_seq, limit)
                if out:
                    peer_self.ranges.add((self.peer, author))
                return out

        async def handler(stream, peer: str) -> None:
            self.served[peer] = self.served.get(peer, 0) + 1
            await sync_server(stream, Session(peer), self.net)
        self.host.set_stream_handler(sync_protocol_id(self.net), handler)

    async def join(self, addrs: list[str], topics: tuple[str, ...] = ("cards", "ads", "heads")) -> list:
        """Subscribe to the mesh's topics, then connect; returns the subscriptions."""
        subs = [await self.host.subscribe(topic(self.net, t)) for t in topics]
        for a in addrs:
            await self.host.connect(a)
        return subs

    async def gossip(self, name: str, data: bytes) -> None:
        await self.host.publish(topic(self.net, name), data)


# -- task-stream behaviours --------------------------------------------------------

def refuse_then_claim(key: SigningKey, net: bytes, log: Callable[[Entry], None], claims: list) -> Callable:
    """A host that refuses every task, then logs its own receipt for the
    authorisation it was shown, at its maximum charge, with Lamport clock 0
    (first in any order with history)."""
    async def handler(stream, peer: str) -> None:
        req = TaskRequest.decode(await read_frame(stream, 64 << 20))
        await write_frame(stream, TaskRefused(code="REFUSED", detail="busy").encode())
        a, now = req.spend_auth, int(time.time())
        r = InferenceWorkReceipt(net=net, host=key.public, payer=a.payer, task_hash=a.task_hash,
                                 capsule_id=req.capsule_id, spend_auth=a, charge=a.max_charge,
                                 output_hash=H(b"nothing"), tokens_out=0, started_at=now, finished_at=now,
                                 sig=b"").signed(key)
        if not claims:                               # one feed entry (seq 0) is enough
            e = make_entry(key, net, 0, b"", 0, now, r)
            claims.append(e)
            log(e)
    return handler


def overcharge(key: SigningKey, net: bytes, accept_at: int, log: Callable[[Entry], None], logged: list) -> Callable:
    """A host that answers task_accepted(accept_at) and returns a receipt at
    the authorisation's maximum, which it also logs in its own feed."""
    async def handler(stream, peer: str) -> None:
        req = TaskRequest.decode(await read_frame(stream, 64 << 20))
        await write_frame(stream, TaskAccepted(price=accept_at).encode())
        now = int(time.time())
        r = InferenceWorkReceipt(net=net, host=key.public, payer=req.task.payer, task_hash=req.task.id,
                                 capsule_id=req.capsule_id, spend_auth=req.spend_auth,
                                 charge=req.spend_auth.max_charge, output_hash=H(b"ok"), tokens_out=1,
                                 started_at=now, finished_at=now, sig=b"").signed(key)
        if not logged:
            e = make_entry(key, net, 0, b"", 0, now, r)
            logged.append(e)
            log(e)
        await write_frame(stream, TaskResult(output=b"ok", tokens_out=1, receipt=r).encode())
    return handler


async def stall(stream, peer: str) -> None:
    """A host that takes the request and never answers."""
    await read_frame(stream, 64 << 20)
    await trio.sleep_forever()


# -- a hostile payer ---------------------------------------------------------------

def code_request(net: bytes, payer: SigningKey, host: bytes, capsule: bytes, price: int, *, repo_tar: bytes,
                 patch: str, test_cmd: tuple[str, ...], now: int | None = None) -> TaskRequest:
    """A well-formed code-patch request with its own authorisation for ``host`` at ``price``."""
    now = now or int(time.time())
    task = TaskPacket(net=net, payer=payer.public, nonce=os.urandom(16), kind="code_patch", domain="python",
                      tags=(), prompt="", max_tokens=0, temperature_milli=0, seed=0, repo_tar=repo_tar,
                      repo_hash=H(repo_tar), patch=patch, test_cmd=tuple(test_cmd), max_price=price,
                      latency_budget_ms=0, created_at=now, sig=b"").signed(payer)
    auth = SpendAuthorization(net=net, payer=payer.public, host=host, spend_key=os.urandom(32),
                              task_hash=task.id, max_charge=price, expires_at=now + 600, sig=b"").signed(payer)
    return TaskRequest(capsule_id=capsule, task=task, spend_auth=auth)


async def send_task(host, peer_id: str, net: bytes, req: TaskRequest, timeout: float = 60.0) -> str:
    """Send one request; the first reply's kind ("accepted", "refused", ...)
    or "reset" when the stream is refused or cut. On acceptance, read on to
    the result so the host is not left holding a half-read stream."""
    from protocol.taskwire import MAX_REPLY, task_protocol_id
    try:
        with trio.fail_after(timeout):
            stream = await host.open_stream(peer_id, task_protocol_id(net))
            await write_frame(stream, req.encode())
            first = decode_reply(await read_frame(stream, MAX_REPLY))
            if isinstance(first, TaskAccepted):
                while (frame := await read_frame_or_eof(stream, MAX_REPLY)) is not None:
                    if isinstance(decode_reply(frame), TaskResult):
                        return "result"
                return "accepted"
            return type(first).__name__
    except Exception as exc:           # refused, reset, cut or timed out: all the same to a hostile client
        return f"reset:{type(exc).__name__}"
