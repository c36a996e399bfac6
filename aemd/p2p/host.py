"""The host: one py-libp2p host's whole life, its connections and peer events,
and the penalties and bans it enforces.

:class:`P2PNode` is the façade a node holds (``async with open_p2p(...)``):
its pubsub methods are :class:`~aemd.p2p.pubsub.PubsubMixin`, its stream
methods :class:`~aemd.p2p.streams.StreamsMixin`; the decisions on penalties
and bans are the pure :class:`~aemd.p2p.peerscore.PeerScore`, this module
applies them. Why each libp2p setting and patch: :mod:`aemd.p2p.quirks`.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, OrderedDict, deque
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, NamedTuple

import multiaddr
import trio
from libp2p import new_host
from libp2p.abc import INetConn, INetStream, INetwork, INotifee
from libp2p.network.config import ConnectionConfig, RetryConfig
from libp2p.peer.id import ID
from libp2p.pubsub.gossipsub import PROTOCOL_ID, PROTOCOL_ID_V11, PROTOCOL_ID_V12, GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.tools.anyio_service import background_trio_service

from aemd.p2p.identity import _parse_p2p_multiaddr, _parse_peer_id, host_key_pair
from aemd.p2p.peerscore import PeerScore
from aemd.p2p.pubsub import PubsubMixin, Subscription, Validator
from aemd.p2p.quirks import (
    _LIVE_NODES,
    _PeerQueues,
    _apply_gossip_quirks,
    _no_auto_connect,
    _parse_listen_addr,
    _probe_listen_addrs,
    _track_listeners,
    check_libp2p_version,
    quiet_libp2p_logging,
)
from aemd.p2p.settings import P2PConfig
from aemd.p2p.streams import StreamsMixin
from protocol.errors import BAD_VALUE, REFUSED, TIMEOUT, UNAVAILABLE, AemError

log = logging.getLogger("aemd.p2p")

CONNECTED = "connected"
DISCONNECTED = "disconnected"


class PeerEvent(NamedTuple):
    """A peer's first connection (``CONNECTED``) or its last one closing (``DISCONNECTED``)."""

    kind: str
    peer_id: str


class _Notifee(INotifee):
    """Network notifee: counts connections per peer; never blocks (awaited inline by libp2p)."""

    def __init__(self, node: P2PNode) -> None:
        self._node = node

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        self._node._conn_opened(conn)

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        self._node._conn_closed(conn)

    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        return None

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        return None

    async def listen(self, network: INetwork, maddr: multiaddr.Multiaddr) -> None:
        return None

    async def listen_close(self, network: INetwork, maddr: multiaddr.Multiaddr) -> None:
        return None


# ---------------------------------------------------------------------------
# The node


class P2PNode(PubsubMixin, StreamsMixin):
    """A running libp2p host with pubsub; made by :func:`open_p2p`, valid inside its block."""

    def __init__(self, host: Any, pubsub: Pubsub, gossipsub: GossipSub, config: P2PConfig) -> None:
        self._host = host
        self._pubsub = pubsub
        self._gossipsub = gossipsub
        self._config = config
        self._id = host.get_id()
        self.peer_id: str = self._id.to_base58()
        self._running = False
        # Connections, as the notifee saw them: peer -> {id(conn): conn}.
        self._conns: dict[ID, dict[int, Any]] = {}
        self._disconnect_waiters: dict[ID, trio.Event] = {}
        self._event_sends: list[trio.MemorySendChannel[PeerEvent]] = []
        self._discovery_hooks: list[Any] = []
        self.events_dropped = 0
        # Pubsub.
        self._subs: dict[str, Subscription] = {}
        self._validators: dict[str, Validator] = {}
        self._own_publish_times: dict[str, deque[float]] = {}
        # Streams.
        self._handler_active: dict[str, int] = {}
        self._handler_peer_active: dict[tuple[str, ID], int] = {}
        self._buffered: dict[ID, int] = {}     # bytes of incomplete inbound frames per peer
        self._buffered_total = 0
        self.stream_abuse = 0
        # Which neighbour delivered each validated message: (origin, seqno) -> forwarder.
        self._forwarders: OrderedDict[tuple[bytes, bytes], str] = OrderedDict()
        self.stale_not_resent = 0       # cached messages no longer valid, not re-sent
        self.oversized_rpcs = 0
        # Remote IPs: live connections per IP, and the last IP of each peer.
        self._conn_ip: dict[int, str] = {}
        self._ip_conns: Counter[str] = Counter()
        self._peer_ips: dict[ID, str] = {}
        self._last_seen: dict[ID, float] = {}   # peer -> when its last connection closed (trio clock)
        # Penalties and bans, per peer and per IP (pure; trio clock passed in).
        self._score = PeerScore(ban_threshold=config.ban_threshold, ban_seconds=config.ban_seconds,
                                penalty_half_life=config.penalty_half_life,
                                max_tracked_peers=config.max_tracked_peers,
                                ip_ban_after=config.ip_ban_after)
        self._pending_disconnects: set[ID] = set()
        self._wake = trio.Event()

    # -- addresses and connections ------------------------------------------

    @property
    def config(self) -> P2PConfig:
        return self._config

    def listen_multiaddrs(self) -> list[str]:
        """Full dialable addresses ``/ip4/…/tcp/PORT/p2p/PEERID`` (real port when bound to 0)."""
        return [f"{addr}/p2p/{self.peer_id}" for addr in self._host.get_transport_addrs()]

    def connected_peers(self) -> list[str]:
        return sorted(pid.to_base58() for pid in self._conns)

    def is_connected(self, peer_id: str) -> bool:
        return _parse_peer_id(peer_id) in self._conns

    def seen_ago(self, peer_id: str) -> float | None:
        """Seconds since ``peer_id`` was last connected (0 while connected; None: never seen)."""
        pid = _parse_peer_id(peer_id)
        if pid in self._conns:
            return 0.0
        at = self._last_seen.get(pid)
        return None if at is None else max(0.0, trio.current_time() - at)

    async def connect(self, maddr: str) -> str:
        """Dial a ``/…/p2p/<peer id>`` multiaddr; returns the peer id once connected.

        Clears the swarm's 60 s negative dial cache for that peer first. Raises
        AemError: BAD_VALUE (address), REFUSED (self, or banned), TIMEOUT
        (``dial_timeout``), UNAVAILABLE (dial failed).
        """
        _, info = _parse_p2p_multiaddr(maddr)
        pid = info.peer_id
        if pid == self._id:
            raise AemError(REFUSED, "refusing to dial self")
        if self.is_banned(pid.to_base58()):
            raise AemError(REFUSED, f"peer {pid} is banned")
        self._host.get_network().unblock_peer(pid)
        try:
            with trio.fail_after(self._config.dial_timeout):
                await self._host.connect(info)
        except trio.TooSlowError:
            raise AemError(TIMEOUT, f"dial {maddr} took over {self._config.dial_timeout:g} s") from None
        except Exception as exc:
            raise AemError(UNAVAILABLE, f"dial {maddr} failed: {type(exc).__name__}: {exc}") from exc
        return pid.to_base58()

    async def disconnect(self, peer_id: str) -> None:
        """Close every connection to ``peer_id`` (bounded by ``close_timeout``)."""
        pid = _parse_peer_id(peer_id)
        with trio.move_on_after(self._config.close_timeout):
            try:
                await self._host.disconnect(pid)
            except Exception as exc:
                log.debug("disconnect %s: %s", pid, exc)

    async def wait_disconnected(self, peer_id: str) -> None:
        """Return once ``peer_id`` has no connection (at once if it has none now)."""
        pid = _parse_peer_id(peer_id)
        if pid not in self._conns:
            return
        event = self._disconnect_waiters.get(pid)
        if event is None:
            event = self._disconnect_waiters[pid] = trio.Event()
        await event.wait()

    def discovered_peers(self, buffer: int = 64) -> trio.MemoryReceiveChannel[tuple[str, list[str]]]:
        """Peers found by mDNS (``P2PConfig.enable_mdns``) as ``(peer_id, dialable
        multiaddrs)``, until the node closes. libp2p reports them from
        zeroconf's own thread through a process-wide hook; they are handed
        to trio here and the hook is removed when the channel closes."""
        from libp2p.discovery.events.peerDiscovery import peerDiscovery
        send, recv = trio.open_memory_channel[tuple[str, list[str]]](buffer)
        token = trio.lowlevel.current_trio_token()
        own = self._id

        def on_found(info: Any) -> None:
            if info.peer_id == own:
                return
            pid = info.peer_id.to_base58()
            addrs = [f"{a}/p2p/{pid}" for a in info.addrs if "/p2p/" not in str(a)]
            try:
                token.run_sync_soon(_send_or_drop, send, (pid, addrs))
            except trio.RunFinishedError:
                pass

        peerDiscovery.register_peer_discovered_handler(on_found)
        self._discovery_hooks.append((on_found, send))
        return recv

    def peer_events(self, buffer: int | None = None) -> trio.MemoryReceiveChannel[PeerEvent]:
        """A new bounded channel of :class:`PeerEvent`, from now until the node closes.

        Each call gets its own channel (fan-out). A full channel drops events
        (counted in ``events_dropped``); closing the receive side unsubscribes.
        """
        size = self._config.event_buffer if buffer is None else buffer
        if size <= 0:
            raise AemError(BAD_VALUE, "peer_events buffer must be positive")
        send, recv = trio.open_memory_channel[PeerEvent](size)
        if not self._running:
            send.close()
        else:
            self._event_sends.append(send)
        return recv

    def _emit(self, event: PeerEvent) -> None:
        for send in list(self._event_sends):
            try:
                send.send_nowait(event)
            except trio.WouldBlock:
                self.events_dropped += 1
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._event_sends.remove(send)

    def _conn_opened(self, conn: Any) -> None:
        try:
            pid = conn.muxed_conn.peer_id
        except AttributeError:
            return
        conns = self._conns.setdefault(pid, {})
        first = not conns
        conns[id(conn)] = conn
        ip = _remote_ip(conn)
        if ip is not None:
            self._conn_ip[id(conn)] = ip
            self._ip_conns[ip] += 1
            self._peer_ips[pid] = ip
            if len(self._peer_ips) > self._config.max_tracked_peers:   # bounded: forget the gone
                for gone in [p for p in self._peer_ips if p not in self._conns][: len(self._peer_ips) // 2]:
                    del self._peer_ips[gone]
        if first:
            self._emit(PeerEvent(CONNECTED, pid.to_base58()))
        if not self._score.has_ban(pid) and ip is not None:
            if self._ip_banned(ip):
                # A fresh identity from an address whose peers keep getting banned.
                self.ban(pid.to_base58(), reason=f"connection from banned address {ip}")
            elif self._ip_conns[ip] > self._config.max_connections_per_ip:
                log.info("refusing %s: over %d connections from %s", pid,
                         self._config.max_connections_per_ip, ip)
                self._pending_disconnects.add(pid)
                self._wake.set()
        if self._score.has_ban(pid):
            self._pending_disconnects.add(pid)
            self._wake.set()

    def _conn_closed(self, conn: Any) -> None:
        try:
            pid = conn.muxed_conn.peer_id
        except AttributeError:
            return
        ip = self._conn_ip.pop(id(conn), None)
        if ip is not None:
            self._ip_conns[ip] -= 1
            if self._ip_conns[ip] <= 0:
                del self._ip_conns[ip]
        conns = self._conns.get(pid)
        if conns is None or conns.pop(id(conn), None) is None:
            return
        if not conns:
            del self._conns[pid]
            self._last_seen[pid] = trio.current_time()
            if len(self._last_seen) > self._config.max_tracked_peers:
                oldest = sorted(self._last_seen, key=self._last_seen.__getitem__)
                for gone in oldest[: len(oldest) // 2]:
                    del self._last_seen[gone]
            self._emit(PeerEvent(DISCONNECTED, pid.to_base58()))
            waiter = self._disconnect_waiters.pop(pid, None)
            if waiter is not None:
                waiter.set()

    # -- penalties and bans -----------------------------------------------------
    # The decisions are the pure PeerScore's (on the trio clock); here they
    # become effects: pubsub blacklist, disconnect, refused streams and dials.

    def penalize(self, peer_id: str, points: float = 1.0, reason: str = "") -> bool:
        """Add penalty points (decaying, half-life ``penalty_half_life``).

        At ``ban_threshold`` the peer is banned for ``ban_seconds``. Returns
        True if this call banned it.
        """
        pid = _parse_peer_id(peer_id)
        if pid == self._id or not points > 0:
            return False
        result = self._score.penalize(pid, points, trio.current_time())
        log.debug("penalize %s +%g -> %g (%s)", pid, points, result.points, reason)
        if result.banned:
            self.ban(peer_id, reason=reason or "penalty threshold")
            return True
        return False

    def penalty(self, peer_id: str) -> float:
        """Current (decayed) penalty points of ``peer_id``."""
        return self._score.points(_parse_peer_id(peer_id), trio.current_time())

    def penalties(self) -> dict[str, float]:
        """Every tracked peer's current penalty points."""
        return {pid.to_base58(): points  # type: ignore[attr-defined]
                for pid, points in self._score.all_points(trio.current_time()).items()}

    def banned(self) -> list[str]:
        """Peers whose ban is in force."""
        return sorted(pid.to_base58() for pid in self._score.banned(trio.current_time()))  # type: ignore[attr-defined]

    def ban(self, peer_id: str, seconds: float | None = None, reason: str = "") -> None:
        """Ban ``peer_id`` for ``seconds`` (default ``ban_seconds``): pubsub
        blacklist, disconnect, refuse its streams and our dials to it."""
        pid = _parse_peer_id(peer_id)
        if pid == self._id:
            return
        duration = self._config.ban_seconds if seconds is None else float(seconds)
        self._score.ban(pid, trio.current_time(), duration, ip=self._peer_ips.get(pid))
        log.info("ban %s for %gs: %s", pid, duration, reason)
        if self._running:
            try:
                self._pubsub.add_to_blacklist(pid)
            except Exception as exc:
                log.debug("blacklist %s: %s", pid, exc)
        if pid in self._conns:
            self._pending_disconnects.add(pid)
        self._wake.set()

    def unban(self, peer_id: str) -> None:
        pid = _parse_peer_id(peer_id)
        self._score.unban(pid)
        self._unblock(pid)

    def _ip_banned(self, ip: str) -> bool:
        """Whether ``ip_ban_after`` distinct peers from ``ip`` are banned now."""
        return self._score.ip_banned(ip, trio.current_time())

    def is_address_banned(self, ip: str) -> bool:
        return self._ip_banned(ip)

    def _lift_ban(self, pid: ID) -> None:
        self._score.lift(pid)
        self._unblock(pid)

    def _unblock(self, pid: ID) -> None:
        self._pending_disconnects.discard(pid)
        try:
            self._pubsub.remove_from_blacklist(pid)
        except Exception as exc:
            log.debug("unblacklist %s: %s", pid, exc)

    def is_banned(self, peer_id: str) -> bool:
        return self._is_banned_id(_parse_peer_id(peer_id))

    def _is_banned_id(self, pid: ID) -> bool:
        return self._score.is_banned(pid, trio.current_time())

    async def _housekeeping(self) -> None:
        """Disconnect banned peers, lift expired bans. Runs for the node's life."""
        while True:
            self._wake = trio.Event()
            pending, self._pending_disconnects = self._pending_disconnects, set()
            for pid in pending:
                # Even a ban that has already run out by now (a short one, a
                # slow loop) disconnects once; only an explicit unban cancels.
                await self.disconnect(pid.to_base58())
            for pid in self._score.expired(trio.current_time()):
                self._lift_ban(pid)  # type: ignore[arg-type]
            next_expiry = self._score.next_expiry()
            with trio.move_on_at(next_expiry):
                await self._wake.wait()

    # -- internals -----------------------------------------------------------------

    def _require_running(self) -> None:
        if not self._running:
            raise AemError(UNAVAILABLE, "p2p node is not running")

    def _close_channels(self) -> None:
        if self._discovery_hooks:
            from libp2p.discovery.events.peerDiscovery import peerDiscovery
            for hook, send in self._discovery_hooks:
                peerDiscovery.unregister_peer_discovered_handler(hook)
                send.close()
            self._discovery_hooks.clear()
        for send in self._event_sends:
            send.close()
        self._event_sends.clear()
        for sub in list(self._subs.values()):
            sub._sender.close()
        self._subs.clear()
        for event in self._disconnect_waiters.values():
            event.set()
        self._disconnect_waiters.clear()


def _remote_ip(conn: Any) -> str | None:
    """The remote IP address of a libp2p connection, or None if it cannot be told."""
    try:
        for ma in conn.get_transport_addresses():
            for proto in ("ip4", "ip6"):
                try:
                    return str(ma.value_for_protocol(proto))
                except Exception:
                    continue
    except Exception:
        pass
    try:
        addr = conn.muxed_conn.secured_conn.get_remote_address()
        if addr:
            return str(addr[0])
    except Exception:
        pass
    return None


def _send_or_drop(send: trio.MemorySendChannel, item: Any) -> None:
    try:
        send.send_nowait(item)
    except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
        pass


def _single_leaf(exc: BaseException) -> BaseException:
    """The only exception inside (nested) exception groups, else ``exc`` itself.

    trio nurseries always wrap errors in ExceptionGroups; a context manager
    built from nested nurseries would hand its caller a group of a group of
    the caller's own AemError. One leaf is unwrapped; several stay a group.
    """
    current = exc
    while isinstance(current, BaseExceptionGroup) and len(current.exceptions) == 1:
        current = current.exceptions[0]
    return exc if isinstance(current, BaseExceptionGroup) else current


# ---------------------------------------------------------------------------
# Opening a node


@asynccontextmanager
async def open_p2p(
    seed32: bytes,
    listen_addrs: Sequence[str],
    *,
    validators: Mapping[str, Validator] | None = None,
    config: P2PConfig | None = None,
) -> AsyncIterator[P2PNode]:
    """Run a libp2p host (TCP, Noise, Yamux) with GossipSub for the block's duration.

    ``seed32`` is the node's Ed25519 seed (the peer id follows from it);
    ``listen_addrs`` are multiaddr strings (``/ip4/127.0.0.1/tcp/0`` for any
    port); ``validators`` maps topics to validators installed before the host
    listens. On exit the host is closed (connections, listeners, libp2p's own
    tasks) and every subscription and event channel ends. Start-up failures
    (bad address, port in use) raise AemError(BAD_VALUE / UNAVAILABLE).
    """
    cfg = config or P2PConfig()
    check_libp2p_version()   # the quirk handling patches internals: refuse an unchecked libp2p
    if cfg.libp2p_log_level is not None:
        quiet_libp2p_logging(cfg.libp2p_log_level)
    key_pair = host_key_pair(seed32)
    if isinstance(listen_addrs, str) or not listen_addrs:
        raise AemError(BAD_VALUE, "listen_addrs must be a non-empty list of multiaddrs")
    maddrs = [_parse_listen_addr(a) for a in listen_addrs]
    _probe_listen_addrs(maddrs)
    conn_cfg = ConnectionConfig(
        max_connections_per_peer=1,
        max_connections=cfg.max_connections,
        high_watermark=cfg.max_connections,
        low_watermark=min(100, cfg.max_connections),
        min_connections=0,
        dial_timeout=cfg.dial_timeout,
    )
    host = new_host(key_pair=key_pair, connection_config=conn_cfg, listen_addrs=maddrs,
                    enable_mDNS=cfg.enable_mdns)
    swarm = host.get_network()
    swarm.retry_config = RetryConfig(max_retries=cfg.dial_retries)
    listeners = _track_listeners(swarm)
    if not cfg.auto_connect:
        swarm.auto_connector.maybe_connect = _no_auto_connect  # type: ignore[method-assign]

    gossipsub = GossipSub(
        protocols=[PROTOCOL_ID_V12, PROTOCOL_ID_V11, PROTOCOL_ID],
        degree=cfg.gossip_degree,
        degree_low=cfg.gossip_degree_low,
        degree_high=cfg.gossip_degree_high,
        heartbeat_interval=cfg.heartbeat_interval,
        spam_protection_enabled=True,
        max_messages_per_topic_per_second=cfg.max_messages_per_topic_per_second,
        adaptive_gossip_enabled=False,   # it rewrites the heartbeat: see module docstring
    )
    pubsub = Pubsub(host, gossipsub, strict_signing=True)
    pubsub.peer_queues = _PeerQueues(cfg.peer_queue_size)
    pubsub.counter = time.time_ns()  # see module docstring: seqno reuse after restart

    node = P2PNode(host, pubsub, gossipsub, cfg)
    _apply_gossip_quirks(node)
    _LIVE_NODES.add(node)
    swarm.register_notifee(_Notifee(node))
    for topic, fn in (validators or {}).items():
        node.set_topic_validator(topic, fn)

    yielded = False
    try:
        async with trio.open_nursery() as nursery:
            try:
                async with background_trio_service(pubsub), background_trio_service(gossipsub), \
                        host.run(listen_addrs=maddrs):
                    try:
                        if len(host.get_transport_addrs()) < len(maddrs):
                            raise AemError(UNAVAILABLE, f"cannot listen on all of {list(listen_addrs)!r}")
                        node._running = True
                        nursery.start_soon(node._housekeeping)
                        yielded = True
                        yield node
                    finally:
                        node._running = False
                        with trio.CancelScope(shield=True), trio.move_on_after(cfg.close_timeout):
                            await host.close()
                            for listener in listeners:  # incl. ones a failed listen() orphaned
                                await listener.close()
            finally:
                node._running = False
                _LIVE_NODES.discard(node)
                node._close_channels()
                nursery.cancel_scope.cancel()
    except BaseException as exc:
        leaf = _single_leaf(exc)
        if yielded or isinstance(leaf, (AemError, trio.Cancelled)) or not isinstance(leaf, Exception):
            if leaf is exc:
                raise
            raise leaf from None  # one error inside nested nurseries: give the caller that error
        raise AemError(UNAVAILABLE, f"cannot start p2p host on {list(listen_addrs)!r}: {leaf}") from leaf
