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
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable

import trio

from aemd import nodecontrol, p2p
from aemd.capsules import LocalCapsule, load_capsules
from aemd.checkpoints import CheckpointService
from aemd.config import Config
from aemd.control import serve_control
from aemd.home import Home
from aemd.hostbook import HostBook
from aemd.meshview import MeshTable, RateGate, lifetime_problem
from aemd.metrics import Metrics
from aemd.storeaccess import StoreAccess
from aemd.sync import SyncStats, sync_client, sync_server
from crypto.keys import SigningKey
from ledger.atomicfile import atomic_write
from protocol import errors
from protocol.checkpoint import checkpoint_topic
from protocol.errors import AemError
from protocol.genesis import Genesis
from protocol.mesh import HostAdvertisement, NodeCard
from protocol.schema import Signed
from protocol.sync import FORK_HEAD, Frontier, HeadAnnouncement, sync_protocol_id, topic

log = logging.getLogger("aemd.node")

MAX_KNOWN_PEERS = 256
CONNECT_ANNOUNCE_DELAY_S = 1.0    # let the new peer's subscriptions arrive first
# Sync server limits (specs/sync-protocol.md §2-3): slots in all and per peer
# (a peer runs one session with us at a time; 2 leaves room for a reconnect),
# 30 s to the next request, and a whole session at most 120 s (a longer
# catch-up continues in the next session, from where this one stopped).
SYNC_MAX_STREAMS = 16
SYNC_MAX_STREAMS_PER_PEER = 2
SYNC_IDLE_S = 30.0
SYNC_SESSION_S = 120.0
# Head-triggered syncs per announcer: a burst of 8, then one every 2 s.
HEAD_SYNC_BURST = 8
HEAD_SYNC_RATE = 0.5
MAX_LEARNED_DIALS = 8             # connections we open to peers learned from NodeCards
LEARNED_REDIAL_S = 60.0           # least time between two dials of one learned peer
MAX_WITHDRAWN = 4096              # withdrawn (host, capsule) ads remembered
WITHDRAW_FLUSH_S = 0.5            # time given to withdrawals to leave before the host closes


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
    bootstrap_check_s: float = 10.0     # grace before a bootstrap peer not reached is logged
    max_learned_dials: int = MAX_LEARNED_DIALS
    n_gpu_layers: Any = 0               # [llama] n_gpu_layers: an int or "auto"
    checkpoint_interval_s: float = 300  # [checkpoint] interval_s; 0: sign none of our own

    @classmethod
    def from_config(cls, cfg: Config | Mapping, listen: list[str] | None,
                    bootstrap: list[str] | None) -> "NodeOptions":
        if not isinstance(cfg, Config):      # plain dicts of the TOML shape still work
            cfg = Config.from_dict(cfg)
        return cls(
            listen=listen or list(cfg.node.listen),
            bootstrap=list(cfg.node.bootstrap) + list(bootstrap or []),
            card_interval_s=cfg.gossip.card_interval_s,
            card_ttl_s=cfg.gossip.card_ttl_s,
            sync_interval_s=cfg.sync.interval_s,
            sync_batch=cfg.sync.batch,
            max_invalid_per_peer=cfg.gossip.max_invalid_per_peer,
            mdns=cfg.node.mdns,
            capacity=dict(cfg.capacity),
            n_gpu_layers=cfg.llama.n_gpu_layers,
            checkpoint_interval_s=cfg.checkpoint.interval_s,
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
        # What this node has seen of hosts (failures, reachability, settled
        # work); the mesh table evicts by it, the task router filters by it.
        self.hostbook = HostBook()
        self.mesh = MeshTable(max_lifetime_s=genesis.limits.max_announce_lifetime_s,
                              standing=self.hostbook.standing)
        self.store: StoreAccess | None = None
        self.p2p: p2p.P2PNode | None = None
        self.capsules: list[LocalCapsule] = []
        self.control_handlers: dict[str, Any] = {}
        self.stream_handlers: dict[str, Any] = {}
        self.load = 0
        self.metrics = Metrics()      # this node's Prometheus registry (served at /metrics)
        self.api_url = ""             # http://HOST:PORT once aemd.api has bound its socket
        self.started = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._syncing: set[str] = set()
        self._resync: set[str] = set()
        self._announce_now = trio.Event()
        self._announce_delay = CONNECT_ANNOUNCE_DELAY_S
        self._rng = random.Random()
        self.sync_sessions = 0
        self.heads_nowhere = 0
        self._head_gate = RateGate(HEAD_SYNC_RATE, HEAD_SYNC_BURST)
        self.topics = {name: topic(self.net, name) for name in ("cards", "ads", "heads")}
        self.topics["checkpoints"] = checkpoint_topic(self.net)
        self.checkpoints: CheckpointService | None = None   # opened by run()
        self.sync_proto = sync_protocol_id(self.net)
        self._extensions: list[Callable[["Node", trio.Nursery], Any]] = []
        self._closers: list[Callable[[], None]] = []
        self._dialled: dict[str, float] = {}       # learned peer -> when we last dialled it
        self._withdrawn: dict[tuple[bytes, bytes], tuple[int, int]] = {}   # (host, capsule) -> (issued, expires)
        self._last_ad_issued = 0
        self._stopping = False
        self.gpu_layers: dict[bytes, int] = {}     # capsule id -> layers offloaded as loaded

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
        store.observe_replay = self.metrics.replay_seconds.observe
        # Only capsules whose model file is still the manifest's are served.
        self.capsules = await trio.to_thread.run_sync(load_capsules, self.home)
        self.checkpoints = CheckpointService(self, self.opts.checkpoint_interval_s)
        self.add_closer(self.checkpoints.close)
        validators = {
            self.topics["cards"]: self._validate_card,
            self.topics["ads"]: self._validate_ad,
            self.topics["heads"]: self._validate_head,
            self.topics["checkpoints"]: self._validate_checkpoint,
        }
        validators = self.metrics.watch_validators(validators, {t: n for n, t in self.topics.items()})
        cfg = p2p.P2PConfig(ban_threshold=float(self.opts.max_invalid_per_peer), enable_mdns=self.opts.mdns)
        async with p2p.open_p2p(self.key.seed, self.opts.listen, validators=validators, config=cfg) as host:
            self.p2p = host
            host.set_stream_handler(self.sync_proto, self._serve_sync, max_concurrent=SYNC_MAX_STREAMS,
                                    max_per_peer=SYNC_MAX_STREAMS_PER_PEER, idle_timeout=SYNC_IDLE_S,
                                    session_timeout=SYNC_SESSION_S)
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                subs = {name: await host.subscribe(t) for name, t in self.topics.items()}
                nursery.start_soon(self._read_cards, subs["cards"])
                nursery.start_soon(self._read_ads, subs["ads"])
                nursery.start_soon(self._read_heads, subs["heads"])
                nursery.start_soon(self.checkpoints.read, subs["checkpoints"])
                if self.opts.checkpoint_interval_s > 0:
                    nursery.start_soon(self.checkpoints.announce_loop)
                nursery.start_soon(self._peer_events, host.peer_events())
                nursery.start_soon(self._announce_loop)
                nursery.start_soon(self._anti_entropy_loop)
                await nursery.start(serve_control, self.home.socket, self._control_handlers())
                for ext in self._extensions:
                    ext(self, nursery)
                bootstrap = self._usable_bootstrap()
                if bootstrap:
                    nursery.start_soon(self._keep_bootstrap, bootstrap)
                    nursery.start_soon(self._watch_bootstrap, bootstrap)
                nursery.start_soon(self._warm_start)
                if self.opts.mdns:
                    nursery.start_soon(self._dial_discovered, host.discovered_peers())
                self.started.set()
                task_status.started(self)
                # Runs until cancelled; the nursery waits for its loops.

    def _usable_bootstrap(self) -> list[str]:
        """The bootstrap entries that parse as /.../p2p/PEER_ID; a warning for
        each one that does not, so one typo never costs the whole list."""
        good = []
        for addr in self.opts.bootstrap:
            try:
                p2p._parse_p2p_multiaddr(addr)
                p2p.public_from_peer_id(addr.rsplit("/p2p/", 1)[1])
            except (AemError, IndexError) as exc:
                log.warning("bootstrap entry %r skipped: %s", str(addr)[:200],
                            getattr(exc, "detail", "no /p2p/PEER_ID"))
                continue
            if addr not in good:
                good.append(addr)
        return good

    async def _keep_bootstrap(self, addrs: list[str]) -> None:
        try:
            await p2p.keep_connected(self.p2p, addrs, base_delay=0.5, max_delay=30.0)
        except AemError as exc:
            log.warning("bootstrap list unusable: %s", exc)

    async def _watch_bootstrap(self, addrs: list[str]) -> None:
        """A word in the log for each bootstrap peer that we cannot reach, or
        that is reachable but not on our network (it is not subscribed to our
        topics, whose names carry the network id), and again when that changes.
        The redialling itself is keep_connected's."""
        peers: dict[str, list[str]] = {}
        for a in addrs:
            pid = a.rsplit("/p2p/", 1)[1]
            if pid != self.p2p.peer_id:
                peers.setdefault(pid, []).append(a)
        said: dict[str, str] = {}
        while True:
            await trio.sleep(self.opts.bootstrap_check_s)
            ours = set(self.p2p.topic_peers(self.topics["cards"]))
            for pid, where in peers.items():
                if not self.p2p.is_connected(pid):
                    state = "unreachable"
                elif pid not in ours:
                    state = "foreign"
                else:
                    state = "ok"
                if said.get(pid, "ok") != state:
                    if state == "unreachable":
                        log.warning("bootstrap peer %s unreachable at %s (still retrying)",
                                    pid, ", ".join(where))
                    elif state == "foreign":
                        log.warning("bootstrap peer %s is connected but not on network %s "
                                    "(another network's node, or not an aem node)", pid, self.net.hex()[:16])
                    else:
                        log.info("bootstrap peer %s reached", pid)
                said[pid] = state

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

    async def _dial_one_of(self, pid: str, addrs: list[str], how: str, timeout: float) -> bool:
        """Dial ``pid`` at the first of ``addrs`` that answers; each failure is
        logged with ``how`` the address was learned."""
        for addr in addrs:
            if self.p2p.is_connected(pid):
                return True
            with trio.move_on_after(timeout):
                try:
                    await self.p2p.connect(addr)
                    log.info("dialled %s (%s)", pid, how)
                    return True
                except AemError as exc:
                    log.info("%s peer %s at %s: %s", how, pid, addr, exc)
        return False

    async def _dial_discovered(self, found: trio.MemoryReceiveChannel) -> None:
        """Connect to peers that mDNS finds on the LAN (opt-in: [node] mdns)."""
        async with found:
            async for pid, addrs in found:
                await self._dial_one_of(pid, addrs[:8], "mdns", 5)

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
        now = self.now()
        obj.verify(self.net, now=now)
        # Bounded lifetime (genesis limit), no far-future issued_at: any key can
        # sign a card or ad, so none may be remembered for long unsigned again.
        problem = lifetime_problem(obj.issued_at, obj.expires_at, now,
                                   self.genesis.limits.max_announce_lifetime_s)
        if problem:
            raise AemError(errors.BAD_VALUE, f"{obj.TYPE}: {problem}")
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

    def _validate_checkpoint(self, peer: str, data: bytes) -> bool:
        return self.checkpoints is not None and self.checkpoints.validate(peer, data)

    async def _read_cards(self, sub: p2p.Subscription) -> None:
        async with sub:
            async for _origin, data in sub:
                self.metrics.gossip_in.labels("cards").inc()
                try:
                    card = NodeCard.decode(data)
                except AemError:
                    continue
                if self.mesh.offer_card(card, self.now(), via=sub.last_forwarder):
                    self._remember_peers()
                    self._maybe_dial_learned(card)

    def _maybe_dial_learned(self, card: NodeCard) -> None:
        """Dial a node we learned of from its NodeCard, so that nodes which
        share one bootstrap peer do not stay a star: while we hold fewer than
        ``max_learned_dials`` connections, at most once per LEARNED_REDIAL_S."""
        if card.node == self.key.public or self._nursery is None:
            return
        pid = p2p.peer_id_from_public(card.node)
        if self.p2p.is_connected(pid) or self.p2p.is_banned(pid):
            return
        if len(self.p2p.connected_peers()) >= self.opts.max_learned_dials:
            return
        t = time.monotonic()
        if t - self._dialled.get(pid, -LEARNED_REDIAL_S) < LEARNED_REDIAL_S:
            return
        if len(self._dialled) >= MAX_KNOWN_PEERS:
            self._dialled = {k: v for k, v in self._dialled.items() if t - v < LEARNED_REDIAL_S}
            if len(self._dialled) >= MAX_KNOWN_PEERS:
                return
        addrs = [f"{a}/p2p/{pid}" for a in card.addrs
                 if "/ip4/0.0.0.0/" not in a and "/ip6/::/" not in a and "/p2p/" not in a][:4]
        if not addrs:
            return
        self._dialled[pid] = t
        self._nursery.start_soon(self._dial_learned, pid, addrs)

    async def _dial_learned(self, pid: str, addrs: list[str]) -> None:
        await self._dial_one_of(pid, addrs, "learned from its card", 10)

    async def _read_ads(self, sub: p2p.Subscription) -> None:
        async with sub:
            async for _origin, data in sub:
                self.metrics.gossip_in.labels("ads").inc()
                try:
                    ad = HostAdvertisement.decode(data)
                except AemError:
                    continue
                if self._ad_withdrawn(ad):
                    continue
                self.mesh.offer_ad(ad, self.now(), via=sub.last_forwarder)

    def _ad_withdrawn(self, ad: HostAdvertisement) -> bool:
        """A withdrawal (availability 0) drops the host's ad for that capsule
        and blocks older ones (a gossip cache may re-send them) until it
        expires; see specs/sync-protocol.md section 2."""
        key = (ad.host, ad.capsule_id)
        seen, until = self._withdrawn.get(key, (None, 0))
        if seen is not None and self.now() >= until:
            del self._withdrawn[key]               # the withdrawal itself has expired
            seen = None
        if ad.availability > 0:
            return seen is not None and ad.issued_at <= seen
        if seen is not None and seen >= ad.issued_at:
            return True
        old = self.mesh.ads.get(key)
        if old is not None and old.issued_at < ad.issued_at:
            self.mesh.withdraw_ads(ad.host, {c for h, c in self.mesh.ads if h == ad.host and c != ad.capsule_id})
        if len(self._withdrawn) >= MAX_WITHDRAWN:
            for k in sorted(self._withdrawn, key=lambda k: self._withdrawn[k][1])[: MAX_WITHDRAWN // 4]:
                del self._withdrawn[k]
        self._withdrawn[key] = (ad.issued_at, ad.expires_at)
        log.info("host %s withdrew capsule %s", p2p.peer_id_from_public(ad.host), ad.capsule_id.hex()[:16])
        return True

    async def withdraw_ads(self) -> None:
        """Before a clean stop (while the host still runs: once the node's
        nursery is cancelled, libp2p's own tasks stop with it): tell the mesh
        our ads are gone (availability 0, issued after every ad we announced),
        so routers stop choosing us now rather than when the ads expire.
        Bounded; best effort: a peer that misses it drops the ad at expiry."""
        self._stopping = True               # no announcement may re-advertise after this
        if self.p2p is None or not self.capsules or not self.p2p.connected_peers():
            return
        with trio.move_on_after(2 * WITHDRAW_FLUSH_S + 1):
            await self._withdraw_ads()

    async def withdraw_capsules(self, caps: list[LocalCapsule]) -> None:
        """Withdraw the ads of capsules the user removed while the node runs."""
        if caps and self.p2p is not None and self.p2p.connected_peers():
            await self._withdraw_ads(caps, flush=False)

    async def _withdraw_ads(self, caps: list[LocalCapsule] | None = None, flush: bool = True) -> None:
        now = max(self.now(), self._last_ad_issued + 1)
        sent = 0
        for ad in self.my_ads(issued_at=now, availability=0, capsules=caps):
            try:
                await self.p2p.publish(self.topics["ads"], ad.encode())
                self.metrics.gossip_out.labels("ads").inc()
                sent += 1
            except AemError as exc:
                log.info("withdrawing %s: %s", ad.capsule_id.hex()[:16], exc)
        if sent:
            log.info("withdrew %d ads", sent)
            if flush:
                await trio.sleep(WITHDRAW_FLUSH_S)   # the publish is queued; let it leave

    async def _read_heads(self, sub: p2p.Subscription) -> None:
        async with sub:
            async for origin, data in sub:
                self.metrics.gossip_in.labels("heads").inc()
                try:
                    ann = HeadAnnouncement.decode(data)
                except AemError:
                    continue
                fr = ann.frontier
                mine = (await self.store.frontiers()).get(fr.author)
                if fr.head == FORK_HEAD:
                    # Fork evidence: worth a session even when our branch is
                    # longer, unless we already hold a fork at or below it.
                    if mine is not None and mine[1] == FORK_HEAD and mine[0] <= fr.seq:
                        continue
                elif mine is not None and (mine[0] > fr.seq or (mine[0] == fr.seq and mine[1] == fr.head)):
                    continue
                peers = self.p2p.connected_peers()
                if not peers:
                    continue
                # An announcement costs its sender one message and us a sync
                # session: per announcer a few at once, then a steady rate
                # (anti-entropy still catches up whatever is skipped).
                if origin in peers:
                    if self._head_gate.allow(origin, self.opts.clock()):
                        self._start_sync(origin, only=fr)   # just that author, from its author
                elif self._head_gate.allow("", self.opts.clock()):   # relayed: one budget for all
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
            issued_at=now, expires_at=now + self._announce_ttl(), sig=b"",
            gpu_layers=min(1 << 16, sum(self.gpu_layers.values())),
        ).signed(self.key)

    def _announce_ttl(self) -> int:
        """Our cards' and ads' lifetime: the configured TTL within the network's cap."""
        return max(1, min(int(self.opts.card_ttl_s), self.genesis.limits.max_announce_lifetime_s))

    def gpu_layers_for(self, cap: LocalCapsule) -> int:
        """The n_gpu_layers to load ``cap`` with, from ``[llama] n_gpu_layers``
        (an int, -1 for all, or "auto": what fits in the GPU's free memory),
        and what it offloads recorded for the NodeCard and `aemctl status`.
        A build without GPU offload gets 0 (and a warning), so the card never
        claims layers that run on the CPU. Blocking (reads the GGUF header,
        runs nvidia-smi): call it from the thread that loads the model."""
        from aemd import gpu
        setting = self.opts.n_gpu_layers
        supported = gpu.offload_supported()
        if setting != 0 and not supported:
            log.warning("[llama] n_gpu_layers = %r, but this llama.cpp build has no GPU offload: "
                        "running on the CPU (see README, GPU)", setting)
            self.gpu_layers[cap.id] = 0
            return 0
        n_layers = gpu.model_layers(cap.serving.path) if setting != 0 else None
        free = [g.free_mb for g in gpu.detect_gpus()]
        try:
            size = cap.manifest.size_bytes or os.path.getsize(cap.serving.path)
        except OSError:
            size = 0
        n = gpu.resolve_layers(setting, n_layers, size, supported, max(free) if free else None)
        self.gpu_layers[cap.id] = gpu.offloaded(n, n_layers)
        if setting == "auto":
            log.info("capsule %s: %d of %s layers on the GPU (auto)", cap.id.hex()[:16], n,
                     n_layers if n_layers is not None else "?")
        return n

    def my_ads(self, *, issued_at: int | None = None, availability: int = 100,
               capsules: list[LocalCapsule] | None = None) -> list[HostAdvertisement]:
        """Our ads, one per capsule; a capsule whose settings cannot make a
        valid ad (a hand-edited file, an older version's limits) is skipped
        with a warning: a bad capsule file must never stop the node."""
        now = self.now() if issued_at is None else issued_at
        out = []
        for cap in self.capsules if capsules is None else capsules:
            m = cap.manifest
            try:
                out.append(HostAdvertisement(
                    net=self.net, host=self.key.public, capsule_id=cap.id, kind=m.kind,
                    domain=m.domain, tags=m.tags, price=cap.serving.price, roles=cap.serving.roles,
                    availability=availability, max_concurrency=cap.serving.max_concurrency,
                    required_receipts=(), issued_at=now, expires_at=now + self._announce_ttl(),
                    sig=b"", model=m.name[:128], size_bytes=m.size_bytes,
                    quantization=m.quantization).signed(self.key))
            except (AemError, TypeError, ValueError) as exc:
                log.warning("capsule %s not advertised: %s", cap.id.hex()[:16], exc)
        if out:
            self._last_ad_issued = max(self._last_ad_issued, now)
        return out

    async def announce(self) -> None:
        """Publish our card and ads now (and keep our own table current)."""
        if self._stopping:
            return
        card = self.my_card()
        self.mesh.offer_card(card, self.now())
        ads = self.my_ads()
        self.mesh.withdraw_ads(self.key.public, {a.capsule_id for a in ads})
        for ad in ads:
            self.mesh.offer_ad(ad, self.now())
        try:
            await self.p2p.publish(self.topics["cards"], card.encode())
            self.metrics.gossip_out.labels("cards").inc()
            for ad in ads:
                await self.p2p.publish(self.topics["ads"], ad.encode())
                self.metrics.gossip_out.labels("ads").inc()
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
                    log.info("peer joined %s (%d connected)", ev.peer_id, len(self.p2p.connected_peers()))
                    self._start_sync(ev.peer_id)
                    self.reannounce_soon()
                elif ev.kind == p2p.DISCONNECTED:
                    log.info("peer left %s (%d connected)", ev.peer_id, len(self.p2p.connected_peers()))

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
        lacking = False
        if only is not None:
            mine = (await self.store.frontiers()).get(only.author)
            lacking = mine is None or mine[0] < only.seq or (mine[0] == only.seq and mine[1] != only.head)
        try:
            async with self.p2p.stream(peer, self.sync_proto) as stream:
                stats = await sync_client(stream, self.store, self.net, self.opts.sync_batch, only=only)
        except AemError as exc:
            log.info("sync with %s: %s", peer, exc)
            return None
        self.sync_sessions += 1
        self.metrics.synced(stats.added)
        if lacking and stats.received == 0:
            # It announced an entry we lack and, asked for it, served nothing:
            # a head that leads nowhere (specs/sync-protocol.md §2).
            self.heads_nowhere += 1
            self.p2p.penalize(peer, 1.0, "announced a head it does not serve")
        if stats.rejected:
            self.p2p.penalize(peer, float(self.opts.max_invalid_per_peer), "served invalid log entries")
        if stats.added:
            await self._announce_heads(sorted(stats.authors))
        return stats

    async def _serve_sync(self, stream, peer: str) -> None:
        # The session deadline is the p2p wrapper's (session_timeout): a peer
        # that keeps a session alive with a request every few seconds still
        # loses its slot after SYNC_SESSION_S (and is penalised).
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
                self.metrics.gossip_out.labels("heads").inc()
            except AemError as exc:
                log.info("head announcement: %s", exc)

    async def append(self, obj: Signed):
        """Author a new entry: stored first, then announced."""
        entry = await self.store.append_local(self.key, obj, self.now())
        await self._announce_heads([self.key.public])
        return entry

    # -- control socket ---------------------------------------------------------------

    def _control_handlers(self) -> dict:
        handlers = nodecontrol.handlers(self)
        if self.checkpoints is not None:
            handlers.update(self.checkpoints.handlers())
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

