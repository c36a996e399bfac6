"""A simulated aem node: what ``aemd/node.py`` does with gossip and sync,
over the simulated network, driving the real sync sessions
(protocol/syncsession.py) and the real gossip checks.

Mirrors of the daemon's decisions, each named after its original:

* gossip validation (``Node._decode_checked``, ``_validate_head``): size
  limit, decode, signature and network, lifetime (``aemd.meshview``);
  valid ads go into a real :class:`aemd.meshview.MeshTable`;
* ``_read_heads``: a head we lack starts a sync with its announcer,
  ``only=`` that frontier, rate-limited by a real ``RateGate``; a relayed
  one a full sync with a random peer;
* ``_start_sync`` / ``_sync_task``: one session per peer, bounded re-runs;
* ``sync_with``: penalties for invalid entries and for heads that lead
  nowhere, head announcements for what a session stored;
* the anti-entropy loop, the announce loop, redial of known peers.

The pubsub is GossipSub-like: each node keeps a mesh of about ``degree``
peers (GRAFT/PRUNE keep it symmetric, between ``degree_low`` and
``degree_high``), publishes and forwards each new message once to its mesh
peers, and drops a message id it has seen. Message ids are (origin, seqno),
as libp2p's default, unless the mesh is built with ``msg_id="content"``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from aemd.meshview import MeshTable, RateGate, lifetime_problem
from crypto.hashing import H
from protocol.errors import AemError
from protocol.mesh import HostAdvertisement
from protocol.sync import FORK_HEAD, Frontier, HeadAnnouncement
from protocol.syncsession import sync_client, sync_server
from tests.sim.core import SECOND
from tests.sim.drive import Runner
from tests.sim.net import Network, Stream

HEAD_SYNC_BURST = 8          # aemd/node.py
# Decoded HeadAnnouncements by their bytes, shared by every node: decoding is
# a pure function of the bytes (a frozen dataclass, never mutated), and the
# same announcement reaches every node of a mesh.
_HEADS: dict[bytes, HeadAnnouncement] = {}
_HEADS_MAX = 200_000
HEAD_SYNC_RATE = 0.5
SYNC = "sync"


@dataclass
class NodeConfig:
    degree: int = 6
    degree_low: int = 4
    degree_high: int = 12
    sync_interval_s: float = 10.0
    sync_batch: int = 512
    announce_interval_s: float = 90.0
    ad_ttl_s: int = 600
    redial_s: float = 5.0
    max_invalid_per_peer: int = 20
    ban_threshold: float = 10.0
    ban_seconds: float = 600.0
    penalty_half_life: float = 600.0
    verify_us: int = 100           # simulated CPU per entry inserted
    seen_ttl_s: float = 120.0
    msg_id: str = "origin"         # or "content": H(data), one id for identical bytes
    sync_on_connect: bool = True
    # The daemon announces the heads of every author a sync session stored
    # (Node.sync_with); a scale study may turn that off to see what it costs.
    announce_synced: bool = True
    anti_entropy: bool = True


class Score:
    """Decaying penalty points and timed bans (the rules of aemd.p2p.peerscore)."""

    def __init__(self, cfg: NodeConfig) -> None:
        self.cfg = cfg
        self.points: dict[int, tuple[float, float]] = {}
        self.bans: dict[int, float] = {}

    def penalize(self, peer: int, pts: float, now: float) -> bool:
        p, at = self.points.get(peer, (0.0, now))
        total = p * math.pow(0.5, (now - at) / self.cfg.penalty_half_life) + pts
        self.points[peer] = (total, now)
        if total >= self.cfg.ban_threshold and peer not in self.bans:
            self.bans[peer] = now + self.cfg.ban_seconds
            return True
        return False

    def banned(self, peer: int, now: float) -> bool:
        until = self.bans.get(peer)
        if until is None:
            return False
        if now >= until:
            del self.bans[peer]
            return False
        return True


class SimNode:
    def __init__(self, mesh: Any, key, log, role: str, cfg: NodeConfig) -> None:
        self.mesh = mesh
        self.net: Network = mesh.net
        self.sim = mesh.sim
        self.genesis = mesh.genesis
        self.netid = mesh.genesis.network_id
        self.key, self.log, self.role, self.cfg = key, log, role, cfg
        self.public = key.public
        self.id = self.net.add(self)
        self.alive = True
        self.epoch = 0
        self.known: list[int] = []           # peers it dials at start and after a heal
        self.hostile: str | None = None
        self.ads: list[HostAdvertisement] = []   # own ads (hosts), re-signed each announce round
        self.capsule = H(b"sim-capsule" + self.public)
        # Counters that survive a crash (the scale bench reads them).
        self.sessions_ok = 0
        self.sessions_failed = 0
        self.heads_nowhere = 0
        self.crashes = 0
        self._volatile()

    def _volatile(self) -> None:
        """Everything a crash loses."""
        self.mesh_peers: set[int] = set()
        self.seen: dict[Any, float] = {}
        self.table = MeshTable(max_lifetime_s=self.genesis.limits.max_announce_lifetime_s)
        self.syncing: set[int] = set()
        from tests.sim.tasks import HostService
        self.task_host = HostService(self)     # reservations die with the process
        self.resync: set[int] = set()
        self.gate = RateGate(HEAD_SYNC_RATE, HEAD_SYNC_BURST)
        self.score = Score(self.cfg)
        self.pseq = 0
        self.ae_turn = 0

    # -- time and timers -----------------------------------------------------------

    @property
    def wall(self) -> int:
        """This node's clock, Unix seconds (the simulated time after T0)."""
        return self.mesh.t0 + int(self.sim.now)

    def later(self, delay_s: float, fn: Callable[..., Any], *args: Any) -> None:
        """A timer that dies with the node (a crash bumps the epoch)."""
        self.sim.at(int(delay_s * SECOND), self._fire, self.epoch, fn, args)

    def _fire(self, epoch: int, fn, args) -> None:
        if self.alive and epoch == self.epoch and not self.mesh.stopping:
            fn(*args)

    def target(self, name: str) -> Any:
        if name == "task payer":
            from tests.sim.tasks import PayerService
            return PayerService()
        return self.log

    # -- lifecycle ------------------------------------------------------------------------

    def on_start(self) -> None:
        self.epoch += 1
        self._volatile()
        self.redial()
        if self.cfg.anti_entropy:
            self.later(self.cfg.sync_interval_s * (0.75 + 0.5 * self.sim.rng.random()), self._anti_entropy)
        self.later(self.cfg.redial_s, self._redial_loop)
        if self.role == "host" and self.hostile is None:
            self.later(0.05 + self.sim.rng.random() * 0.1, self._announce_loop)
        if self.hostile is not None:
            self.later(1.0, self._hostile_loop)

    def _hostile_loop(self) -> None:
        from tests.sim import hostile
        hostile.gossip(self)
        self.later(5.0, self._hostile_loop)

    def on_crash(self) -> None:
        self.crashes += 1
        self.epoch += 1
        for r in [r for r in self.net.runners.values() if r.node is self]:
            r.kill("crash")
        self._volatile()

    def redial(self) -> None:
        for p in self.known:
            if p not in self.net.conns[self.id] and not self.score.banned(p, self.sim.now):
                self.net.dial(self.id, p)

    def _redial_loop(self) -> None:
        if len(self.net.conns[self.id]) < min(len(self.known), self.cfg.degree):
            self.redial()
        self.later(self.cfg.redial_s, self._redial_loop)

    def on_connect(self, peer: int) -> None:
        if self.score.banned(peer, self.sim.now):
            self.net.disconnect(self.id, peer, "banned")
            return
        if len(self.mesh_peers) < self.cfg.degree:
            self._graft(peer)
        if self.cfg.sync_on_connect and self.hostile is None:
            self.start_sync(peer)
        if self.ads and self.hostile is None:
            # Node.reannounce_soon: a new peer gets our ads without waiting a round.
            self.later(0.5, self._publish_ads, False)

    def on_disconnect(self, peer: int) -> None:
        self.mesh_peers.discard(peer)
        if len(self.mesh_peers) < self.cfg.degree_low:
            for p in self.net.peers(self.id):
                if p not in self.mesh_peers and len(self.mesh_peers) < self.cfg.degree:
                    self._graft(p)

    # -- pubsub ------------------------------------------------------------------------------

    def _graft(self, peer: int) -> None:
        self.mesh_peers.add(peer)
        self.net.control(self.id, peer, "graft")

    def on_control(self, frm: int, what: str) -> None:
        if what == "graft":
            if len(self.mesh_peers) >= self.cfg.degree_high or self.score.banned(frm, self.sim.now):
                self.net.control(self.id, frm, "prune")
            else:
                self.mesh_peers.add(frm)
        elif what == "prune":
            self.mesh_peers.discard(frm)

    def _targets(self, exclude: tuple[int, ...] = ()) -> list[int]:
        peers = self.mesh_peers if self.mesh_peers else set(self.net.conns[self.id])
        return sorted(p for p in peers if p not in exclude and p in self.net.conns[self.id])

    def publish(self, topic: str, data: bytes) -> None:
        self.pseq += 1
        mid = (self.id, self.pseq) if self.cfg.msg_id == "origin" else H(data)
        self._remember(mid)
        for p in self._targets():
            self.net.gossip(self.id, p, (topic, mid, self.id, data))

    def _remember(self, mid: Any) -> None:
        now = self.sim.now
        self.seen[mid] = now
        if len(self.seen) > 4096:
            for k in [k for k, t in self.seen.items() if now - t > self.cfg.seen_ttl_s]:
                del self.seen[k]

    def on_gossip(self, frm: int, msg: tuple) -> None:
        topic, mid, origin, data = msg
        if self.score.banned(frm, self.sim.now):
            return
        if mid in self.seen:
            self.net.count("gossip_dup", 0)
            return
        self._remember(mid)
        obj = self._validate(topic, data)
        if obj is None:
            self.penalize(frm, 1.0, f"invalid {topic} gossip")
            return
        if self.hostile is None:
            for p in self._targets(exclude=(frm, origin)):
                self.net.gossip(self.id, p, msg)
        if topic == "ads":
            self._read_ad(obj, frm)
        elif topic == "heads":
            self._read_head(obj, origin)

    def _validate(self, topic: str, data: bytes) -> Any:
        """Node._decode_checked and Node._validate_head: None when invalid."""
        try:
            if topic == "heads":
                if len(data) > HeadAnnouncement.MAX_SIZE:
                    return None
                ann = _HEADS.get(data)
                if ann is None:
                    ann = HeadAnnouncement.decode(data)      # raises on bad bytes: not memoised
                    if len(_HEADS) >= _HEADS_MAX:
                        _HEADS.clear()
                    _HEADS[data] = ann
                return ann if ann.net == self.netid else None
            if len(data) > self.genesis.limits.max_gossip_bytes:
                return None
            ad = HostAdvertisement.decode(data)
            now = self.wall
            ad.verify(self.netid, now=now)
            if lifetime_problem(ad.issued_at, ad.expires_at, now, self.genesis.limits.max_announce_lifetime_s):
                return None
            return ad
        except AemError:
            return None

    def _read_ad(self, ad: HostAdvertisement, frm: int) -> None:
        if self.table.offer_ad(ad, self.wall, via=str(frm)):
            if self.mesh.ad_hook is not None:
                self.mesh.ad_hook(self, ad)
            self.sim.note("ad", self.id, ad.host, ad.issued_at)

    def _read_head(self, ann: HeadAnnouncement, origin: int) -> None:
        """Node._read_heads."""
        fr = ann.frontier
        mine = self.log.frontiers().get(fr.author)
        if fr.head == FORK_HEAD:
            if mine is not None and mine[1] == FORK_HEAD and mine[0] <= fr.seq:
                return
        elif mine is not None and (mine[0] > fr.seq or (mine[0] == fr.seq and mine[1] == fr.head)):
            return
        peers = self.net.peers(self.id)
        if not peers:
            return
        if origin in peers:
            if self.gate.allow(str(origin), self.sim.now):
                self.start_sync(origin, only=fr)
        elif self.gate.allow("", self.sim.now):
            self.start_sync(self.sim.rng.choice(peers))

    # -- own announcements ---------------------------------------------------------------------

    def make_ad(self, issued_at: int, availability: int = 100) -> HostAdvertisement:
        return HostAdvertisement(
            net=self.netid, host=self.public, capsule_id=self.capsule, kind="gguf", domain="code",
            tags=("sim",), price=1_000, roles=("inference",), availability=availability, max_concurrency=4,
            required_receipts=(), issued_at=issued_at, expires_at=issued_at + self.cfg.ad_ttl_s,
            sig=b"").signed(self.key)

    def _publish_ads(self, fresh: bool) -> None:
        if fresh or not self.ads:
            self.ads = [self.make_ad(self.wall)]
        for ad in self.ads:
            self.table.offer_ad(ad, self.wall, via="self")
            self.publish("ads", ad.encode())

    def _announce_loop(self) -> None:
        self._publish_ads(True)
        self.later(self.cfg.announce_interval_s, self._announce_loop)

    def announce_heads(self, authors: list[bytes]) -> None:
        """Node._announce_heads."""
        fr = self.log.frontiers()
        lamport = self.log.max_lamport()
        for author in authors[:64]:
            if author not in fr:
                continue
            seq, head = fr[author]
            ann = HeadAnnouncement(net=self.netid, frontier=Frontier(author=author, seq=seq, head=head),
                                   lamport=lamport)
            self.publish("heads", ann.encode())

    def append(self, obj) -> Any:
        """Node.append: author an entry, then announce it. None if refused."""
        try:
            e = self.log.append_local(self.key, obj, self.wall)
        except AemError as exc:
            self.sim.note("append-refused", self.id, exc.code)
            return None
        self.sim.note("append", self.id, e.seq, e.id)
        self.mesh.on_stored(self, [e.id])
        self.announce_heads([self.public])
        return e

    # -- penalties --------------------------------------------------------------------------------

    def penalize(self, peer: int, pts: float, why: str) -> None:
        self.sim.note("penalize", self.id, peer, pts, why)
        if self.score.penalize(peer, pts, self.sim.now):
            self.sim.note("ban", self.id, peer)
            self.mesh.bans.append((self.id, peer, why))
            self.net.disconnect(self.id, peer, "banned")

    # -- sync ----------------------------------------------------------------------------------------

    def start_sync(self, peer: int, only: Frontier | None = None) -> None:
        """Node._start_sync."""
        if self.mesh.stopping or not self.alive:
            return
        if peer in self.syncing:
            self.resync.add(peer)
            return
        self.syncing.add(peer)
        self._sync_round(peer, only, 0)

    def _sync_round(self, peer: int, only: Frontier | None, n: int) -> None:
        self.resync.discard(peer)
        lacking = False
        if only is not None:
            mine = self.log.frontiers().get(only.author)
            lacking = mine is None or mine[0] < only.seq or (mine[0] == only.seq and mine[1] != only.head)
        stream = self.net.open_stream(self.id, peer, SYNC)
        if stream is None:
            self.syncing.discard(peer)
            return
        epoch = self.epoch

        def done(stats, err) -> None:
            if not self.alive or epoch != self.epoch:
                return
            self._sync_done(peer, stats, err, lacking)
            if peer in self.resync and n < 3 and peer in self.net.conns[self.id] and not self.mesh.stopping:
                self._sync_round(peer, None, n + 1)     # a re-run is a full session
            else:
                self.syncing.discard(peer)
                self.resync.discard(peer)

        gen = sync_client(self.netid, None, batch=self.cfg.sync_batch, only=only)
        Runner(self.net, self, gen, stream, self.id, "sync client", done, self._cost).start()

    def _sync_done(self, peer: int, stats, err: AemError | None, lacking: bool) -> None:
        if err is not None:
            self.sessions_failed += 1
            return
        self.sessions_ok += 1
        if lacking and stats.received == 0:
            self.heads_nowhere += 1
            self.penalize(peer, 1.0, "announced a head it does not serve")
        if stats.rejected:
            self.penalize(peer, float(self.cfg.max_invalid_per_peer), "served invalid log entries")
        if stats.added:
            self.mesh.on_stored(self, None)
            if self.cfg.announce_synced:
                self.announce_heads(sorted(stats.authors))

    def _cost(self, op: str, args: tuple, result: Any) -> int:
        if op == "insert_batch":
            self.mesh.on_insert_call(self)
            return self.cfg.verify_us * len(args[0])
        return 0

    def accept(self, stream: Stream) -> None:
        """An inbound stream: serve it (Node._serve_sync)."""
        if not self.alive:
            stream.do_reset("node down")
            return
        if stream.proto == "task" and self.hostile is None:
            from tests.sim import tasks
            tasks.serve(self, stream)
        elif stream.proto == SYNC:
            gen = self.mesh.server_session(self)
            Runner(self.net, self, gen, stream, self.id, "sync server", lambda r, e: None, None).start()
        else:
            stream.do_reset("no handler")

    def _anti_entropy(self) -> None:
        """Node._anti_entropy_loop."""
        peers = self.net.peers(self.id)
        if peers and self.hostile is None:
            self.start_sync(peers[self.ae_turn % len(peers)])
            self.ae_turn += 1
        self.later(self.cfg.sync_interval_s * (0.75 + 0.5 * self.sim.rng.random()), self._anti_entropy)


def default_server(node: SimNode):
    return sync_server(node.netid)
