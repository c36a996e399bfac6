"""One aem node: the trio nursery that owns the libp2p host, gossip, log
sync, the control socket and (through ``services``) task serving.

Everything here is the I/O shell around pure parts: the mesh table
(``aemd.meshview``), the sync planner and messages (``protocol.sync``), the log
store and replay (``ledger``). Each long-running loop is a method that only
needs the node's state, started in one nursery by :meth:`Node.run`; when that
nursery is cancelled (SIGINT, SIGTERM, a test leaving its block) every loop
stops, the host closes, and the store is closed after its last write.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import trio

from aemd import p2p
from aemd.capsules import LocalCapsule, list_capsules
from aemd.control import serve_control
from aemd.home import Home
from aemd.identity import atomic_write
from aemd.meshview import MeshTable
from aemd.storeaccess import StoreAccess
from aemd.sync import SyncStats, sync_client, sync_server
from crypto.keys import SigningKey
from protocol import errors
from protocol.errors import AemError
from protocol.genesis import Genesis
from protocol.mesh import HostAdvertisement, NodeCard
from protocol.schema import Signed
from protocol.sync import Frontier, HeadAnnouncement, sync_protocol_id, topic

log = logging.getLogger("aemd.node")

MAX_KNOWN_PEERS = 256
CONNECT_ANNOUNCE_DELAY_S = 1.0    # let the new peer's subscriptions arrive first


@dataclass
class NodeOptions:
    listen: list[str]
    bootstrap: list[str]
    card_interval_s: float = 60
    card_ttl_s: int = 300
    sync_interval_s: float = 30
    sync_batch: int = 512
    max_invalid_per_peer: int = 20
    mdns: bool = False
    capacity: dict = field(default_factory=dict)
    clock: Callable[[], float] = time.time

    @classmethod
    def from_config(cls, cfg: dict, listen: list[str] | None, bootstrap: list[str] | None) -> "NodeOptions":
        return cls(
            listen=listen or list(cfg["node"]["listen"]),
            bootstrap=list(cfg["node"]["bootstrap"]) + list(bootstrap or []),
            card_interval_s=cfg["gossip"]["card_interval_s"],
            card_ttl_s=cfg["gossip"]["card_ttl_s"],
            sync_interval_s=cfg["sync"]["interval_s"],
            sync_batch=cfg["sync"]["batch"],
            max_invalid_per_peer=cfg["gossip"]["max_invalid_per_peer"],
            mdns=cfg["node"]["mdns"],
            capacity=dict(cfg["capacity"]),
        )


def _ram_mb() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1 << 20)
    except (ValueError, OSError):
        return 0


class HomeLock:
    """An exclusive lock on the home, so two daemons never share one store."""

    def __init__(self, home: Home) -> None:
        self.path = home.root / "aemd.lock"
        self.fd: int | None = None

    def __enter__(self) -> "HomeLock":
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise AemError(errors.REFUSED, f"another aemd is already running with home {self.path.parent}") from None
        os.ftruncate(self.fd, 0)
        os.write(self.fd, str(os.getpid()).encode())
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.fd is not None:
            os.close(self.fd)


class Node:
    def __init__(self, home: Home, key: SigningKey, genesis: Genesis, opts: NodeOptions) -> None:
        self.home, self.key, self.genesis, self.opts = home, key, genesis, opts
        self.net = genesis.network_id
        self.mesh = MeshTable()
        self.store: StoreAccess | None = None
        self.p2p: p2p.P2PNode | None = None
        self.capsules: list[LocalCapsule] = []
        self.control_handlers: dict[str, Any] = {}
        self.stream_handlers: dict[str, Any] = {}
        self.load = 0
        self.started = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._syncing: set[str] = set()
        self._resync: set[str] = set()
        self._announce_now = trio.Event()
        self._announce_delay = CONNECT_ANNOUNCE_DELAY_S
        self._rng = random.Random()
        self.sync_sessions = 0
        self.topics = {name: topic(self.net, name) for name in ("cards", "ads", "heads")}
        self.sync_proto = sync_protocol_id(self.net)
        self._extensions: list[Callable[["Node", trio.Nursery], Any]] = []
        self._closers: list[Callable[[], None]] = []

    # -- time -----------------------------------------------------------------

    def now(self) -> int:
        return int(self.opts.clock())

    # -- extension points (task serving registers here) ------------------------

    def add_extension(self, start: Callable[["Node", trio.Nursery], Any]) -> None:
        """``start(node, nursery)`` runs once the host is up, inside the node's nursery."""
        self._extensions.append(start)

    def add_closer(self, fn: Callable[[], None]) -> None:
        """``fn()`` runs when the node stops, after the host has closed."""
        self._closers.append(fn)

    # -- running ----------------------------------------------------------------

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        with HomeLock(self.home):
            store = StoreAccess.open(self.home.store, self.genesis)
            try:
                await self._run(store, task_status)
            finally:
                for fn in self._closers:
                    try:
                        fn()
                    except Exception:  # a closer's failure must not keep the store open
                        log.exception("closing")
                with trio.CancelScope(shield=True):
                    await store.close()

    async def _run(self, store: StoreAccess, task_status) -> None:
        self.store = store
        self.capsules = list_capsules(self.home)
        validators = {
            self.topics["cards"]: self._validate_card,
            self.topics["ads"]: self._validate_ad,
            self.topics["heads"]: self._validate_head,
        }
        cfg = p2p.P2PConfig(ban_threshold=float(self.opts.max_invalid_per_peer), enable_mdns=self.opts.mdns)
        async with p2p.open_p2p(self.key.seed, self.opts.listen, validators=validators, config=cfg) as host:
            self.p2p = host
            host.set_stream_handler(self.sync_proto, self._serve_sync, max_concurrent=16)
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                subs = {name: await host.subscribe(t) for name, t in self.topics.items()}
                nursery.start_soon(self._read_cards, subs["cards"])
                nursery.start_soon(self._read_ads, subs["ads"])
                nursery.start_soon(self._read_heads, subs["heads"])
                nursery.start_soon(self._peer_events, host.peer_events())
                nursery.start_soon(self._announce_loop)
                nursery.start_soon(self._anti_entropy_loop)
                await nursery.start(serve_control, self.home.socket, self._control_handlers())
                for ext in self._extensions:
                    ext(self, nursery)
                if self.opts.bootstrap:
                    nursery.start_soon(self._keep_bootstrap)
                nursery.start_soon(self._warm_start)
                if self.opts.mdns:
                    nursery.start_soon(self._dial_discovered, host.discovered_peers())
                self.started.set()
                task_status.started(self)
                # Runs until cancelled; the nursery waits for its loops.

    async def _keep_bootstrap(self) -> None:
        try:
            await p2p.keep_connected(self.p2p, self.opts.bootstrap, base_delay=0.5, max_delay=30.0)
        except AemError as exc:
            log.warning("bootstrap list unusable: %s", exc)

    async def _warm_start(self) -> None:
        """Redial the peers learned on earlier runs (once; bootstrap peers are kept)."""
        try:
            known = json.loads(self.home.peers.read_text())
        except (OSError, ValueError):
            return
        if not isinstance(known, list):
            return
        for addr in known[:MAX_KNOWN_PEERS]:
            if isinstance(addr, str) and addr not in self.opts.bootstrap:
                with trio.move_on_after(5):
                    try:
                        await self.p2p.connect(addr)
                    except AemError:
                        pass

    async def _dial_discovered(self, found: trio.MemoryReceiveChannel) -> None:
        """Connect to peers that mDNS finds on the LAN (opt-in: [node] mdns)."""
        async with found:
            async for pid, addrs in found:
                if self.p2p.is_connected(pid):
                    continue
                for addr in addrs[:8]:
                    with trio.move_on_after(5):
                        try:
                            await self.p2p.connect(addr)
                            log.info("mdns: connected to %s", pid)
                            break
                        except AemError as exc:
                            log.info("mdns: %s at %s: %s", pid, addr, exc)

    def _remember_peers(self) -> None:
        addrs = []
        for card in sorted(self.mesh.cards.values(), key=lambda c: -c.issued_at):
            if card.node == self.key.public:
                continue
            pid = p2p.peer_id_from_public(card.node)
            for a in card.addrs:
                if "/ip4/0.0.0.0/" not in a:
                    addrs.append(a if "/p2p/" in a else f"{a}/p2p/{pid}")
        try:
            atomic_write(self.home.peers, json.dumps(addrs[:MAX_KNOWN_PEERS]).encode(), 0o600)
        except OSError as exc:
            log.debug("cannot save peers: %s", exc)

    # -- gossip -----------------------------------------------------------------

    def _decode_checked(self, cls: type[Signed], data: bytes) -> Signed:
        if len(data) > self.genesis.limits.max_gossip_bytes:
            raise AemError(errors.TOO_LARGE, "gossip message over the network limit")
        obj = cls.decode(data)
        obj.verify(self.net, now=self.now())
        return obj

    def _validate_card(self, peer: str, data: bytes) -> bool:
        try:
            self._decode_checked(NodeCard, data)
            return True
        except AemError as exc:
            log.info("invalid card from %s: %s", peer, exc)
            return False

    def _validate_ad(self, peer: str, data: bytes) -> bool:
        try:
            self._decode_checked(HostAdvertisement, data)
            return True
        except AemError as exc:
            log.info("invalid ad from %s: %s", peer, exc)
            return False

    def _validate_head(self, peer: str, data: bytes) -> bool:
        try:
            if len(data) > HeadAnnouncement.MAX_SIZE:
                return False
            return HeadAnnouncement.decode(data).net == self.net
        except AemError:
            return False

    async def _read_cards(self, sub: p2p.Subscription) -> None:
        async with sub:
            async for _origin, data in sub:
                try:
                    card = NodeCard.decode(data)
                except AemError:
                    continue
                if self.mesh.offer_card(card, self.now()):
                    self._remember_peers()

    async def _read_ads(self, sub: p2p.Subscription) -> None:
        async with sub:
            async for _origin, data in sub:
                try:
                    self.mesh.offer_ad(HostAdvertisement.decode(data), self.now())
                except AemError:
                    continue

    async def _read_heads(self, sub: p2p.Subscription) -> None:
        async with sub:
            async for origin, data in sub:
                try:
                    ann = HeadAnnouncement.decode(data)
                except AemError:
                    continue
                fr = ann.frontier
                mine = (await self.store.frontiers()).get(fr.author)
                if mine is not None and (mine[0] > fr.seq or (mine[0] == fr.seq and mine[1] == fr.head)):
                    continue
                peers = self.p2p.connected_peers()
                if not peers:
                    continue
                if origin in peers:
                    self._start_sync(origin, only=fr)   # just that author, from its author
                else:
                    self._start_sync(self._rng.choice(peers))

    def my_card(self) -> NodeCard:
        now = self.now()
        cap = self.opts.capacity
        return NodeCard(
            net=self.net, node=self.key.public,
            addrs=tuple(a.split("/p2p/")[0] for a in self.p2p.listen_multiaddrs())[:16],
            gpu=str(cap.get("gpu", ""))[:64], vram_mb=int(cap.get("vram_mb", 0)),
            ram_mb=int(cap.get("ram_mb") or _ram_mb()), locality=str(cap.get("locality", ""))[:32],
            policies=(), account=self.key.public, load=min(100, self.load),
            issued_at=now, expires_at=now + max(1, int(self.opts.card_ttl_s)), sig=b"",
        ).signed(self.key)

    def my_ads(self) -> list[HostAdvertisement]:
        now = self.now()
        out = []
        for cap in self.capsules:
            m = cap.manifest
            out.append(HostAdvertisement(
                net=self.net, host=self.key.public, capsule_id=cap.id, kind=m.kind,
                domain=m.domain, tags=m.tags, price=cap.serving.price, roles=cap.serving.roles,
                availability=100, max_concurrency=cap.serving.max_concurrency,
                required_receipts=(), issued_at=now, expires_at=now + max(1, int(self.opts.card_ttl_s)),
                sig=b"").signed(self.key))
        return out

    async def announce(self) -> None:
        """Publish our card and ads now (and keep our own table current)."""
        card = self.my_card()
        self.mesh.offer_card(card, self.now())
        ads = self.my_ads()
        self.mesh.withdraw_ads(self.key.public, {a.capsule_id for a in ads})
        for ad in ads:
            self.mesh.offer_ad(ad, self.now())
        try:
            await self.p2p.publish(self.topics["cards"], card.encode())
            for ad in ads:
                await self.p2p.publish(self.topics["ads"], ad.encode())
        except AemError as exc:
            log.info("announce: %s", exc)

    def reannounce_soon(self, *, coalesce: bool = True) -> None:
        """Announce before the next interval: after a short pause that gathers
        a burst of new connections into one announcement, or at once (a
        capsule added or removed by the user)."""
        self._announce_delay = CONNECT_ANNOUNCE_DELAY_S if coalesce else 0.0
        self._announce_now.set()

    async def _announce_loop(self) -> None:
        while True:
            await self.announce()
            self.mesh.expire(self.now())
            self._announce_now = trio.Event()
            with trio.move_on_after(self.opts.card_interval_s):
                await self._announce_now.wait()
                await trio.sleep(self._announce_delay)

    # -- peers and sync -------------------------------------------------------------

    async def _peer_events(self, events: trio.MemoryReceiveChannel) -> None:
        async with events:
            async for ev in events:
                if ev.kind == p2p.CONNECTED:
                    self._start_sync(ev.peer_id)
                    self.reannounce_soon()

    def _start_sync(self, peer: str, only: Frontier | None = None) -> None:
        if peer in self._syncing:
            self._resync.add(peer)
            return
        self._syncing.add(peer)
        self._nursery.start_soon(self._sync_task, peer, only)

    async def _sync_task(self, peer: str, only: Frontier | None) -> None:
        try:
            for _ in range(4):  # bounded re-runs when more was announced meanwhile
                self._resync.discard(peer)
                await self.sync_with(peer, only=only)
                only = None     # a re-run is a full session
                if peer not in self._resync:
                    break
        finally:
            self._syncing.discard(peer)

    async def sync_with(self, peer: str, only: Frontier | None = None) -> SyncStats | None:
        """One pull session from ``peer`` (of one author with ``only``);
        failures are logged, not raised."""
        try:
            async with self.p2p.stream(peer, self.sync_proto) as stream:
                stats = await sync_client(stream, self.store, self.net, self.opts.sync_batch, only=only)
        except AemError as exc:
            log.info("sync with %s: %s", peer, exc)
            return None
        self.sync_sessions += 1
        if stats.rejected:
            self.p2p.penalize(peer, float(self.opts.max_invalid_per_peer), "served invalid log entries")
        if stats.added:
            await self._announce_heads(sorted(stats.authors))
        return stats

    async def _serve_sync(self, stream, peer: str) -> None:
        await sync_server(stream, self.store, self.net)

    async def _anti_entropy_loop(self) -> None:
        turn = 0
        while True:
            await trio.sleep(self.opts.sync_interval_s * (0.75 + 0.5 * self._rng.random()))
            peers = sorted(self.p2p.connected_peers())
            if peers:
                self._start_sync(peers[turn % len(peers)])
                turn += 1

    async def _announce_heads(self, authors: list[bytes] | None = None) -> None:
        fr = await self.store.frontiers()
        lamport = await self.store.max_lamport()
        for author in (authors if authors is not None else sorted(fr))[:64]:
            if author not in fr:
                continue
            seq, head = fr[author]
            ann = HeadAnnouncement(net=self.net, frontier=Frontier(author=author, seq=seq, head=head),
                                   lamport=lamport)
            try:
                await self.p2p.publish(self.topics["heads"], ann.encode())
            except AemError as exc:
                log.info("head announcement: %s", exc)

    async def append(self, obj: Signed):
        """Author a new entry: stored first, then announced."""
        entry = await self.store.append_local(self.key, obj, self.now())
        await self._announce_heads([self.key.public])
        return entry

    # -- control socket ---------------------------------------------------------------

    def _control_handlers(self) -> dict:
        from aemd import nodecontrol
        handlers = nodecontrol.handlers(self)
        handlers.update(self.control_handlers)
        return handlers

    def status(self) -> dict:
        return {
            "peer_id": self.p2p.peer_id,
            "account": self.key.public.hex(),
            "addrs": self.p2p.listen_multiaddrs(),
            "network_id": self.net.hex(),
            "network_name": self.genesis.network_name,
            "peers_connected": len(self.p2p.connected_peers()),
            "cards_known": len(self.mesh.cards),
            "ads_known": len(self.mesh.ads),
            "capsules": len(self.capsules),
            "load": self.load,
            "sync_sessions": self.sync_sessions,
            "penalties": {k: round(v, 3) for k, v in self.p2p.penalties().items()},
            "banned": self.p2p.banned(),
            "pid": os.getpid(),
        }

