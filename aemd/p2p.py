"""The networking shell: one py-libp2p host, its whole life, its sharp edges hidden.

This module moves bytes. It knows nothing of aem's wire objects: the caller
supplies topic validators, stream handlers and what to publish. Everything it
starts runs inside the ``async with open_p2p(...)`` block, i.e. inside the
caller's nursery tree, and stops when the block ends; peer ids cross the API as
base58 strings, failures as :class:`~protocol.errors.AemError`.

Public face::

    async with open_p2p(seed32, ["/ip4/127.0.0.1/tcp/0"], validators={...}) as node:
        node.peer_id, node.listen_multiaddrs()
        await node.connect(maddr); node.connected_peers(); await node.disconnect(pid)
        events = node.peer_events()              # CONNECTED / DISCONNECTED, bounded
        async with await node.subscribe(topic) as sub:
            async for origin, data in sub: ...
        await node.publish(topic, data)
        node.set_topic_validator(topic, fn)      # fn(forwarder_peer_id, data) -> bool
        node.mesh_peers(topic); node.topic_peers(topic)
        node.set_stream_handler(proto, handler)  # handler(stream, remote_peer_id); per-peer
                                                 # limits, idle/session deadlines, frame budget
        stream = await node.open_stream(pid, proto)   # or: async with node.stream(pid, proto)
        node.penalize(pid); node.ban(pid, seconds); node.unban(pid)
        nursery.start_soon(keep_connected, node, bootstrap_maddrs)  # redial loop

Frames on streams: :mod:`aemd.framing` (``write_frame``/``read_frame``).

Sharp edges of py-libp2p 0.8.1 handled here (measured on these machines or read
in its source; see also /work/shared/STACK-NOTES.md):

Start and stop
  * Pubsub and GossipSub are started *before* ``host.run()``; otherwise an
    inbound pubsub stream during start crashes the host (``'Pubsub' object has
    no attribute '_manager'``) and a Pubsub created after a connection never
    sees that peer. Topic validators given to :func:`open_p2p` are installed
    before the host listens, so no message slips past them at start.
  * Leaving ``host.run()`` does not reliably close connections: the block ends
    with ``await host.close()``, shielded and bounded by ``close_timeout``, so
    a cancelled caller still releases sockets.
  * ``host.connect`` waits ~250 ms (happy-eyeballs timer) unless
    ``ConnectionConfig(max_connections_per_peer=1)``: set.
  * libp2p runs some work in trio *system* tasks (the TCP listener's nursery,
    identify after connect). They are not ours to own; ``host.close()`` cancels
    them, and the tests check that none is left after the block.
  * The swarm's auto-connector tries to hold the midpoint of the connection
    watermarks (150 connections by default) by dialing every peer in the
    peerstore every 30 s and after each disconnect, with the global ``random``.
    It redials peers the caller disconnected or banned. It is switched off
    (``P2PConfig.auto_connect``); :func:`keep_connected` is the dial policy.
  * The swarm retries a failed dial 3 times (0.1/0.2/0.4 s, global random
    jitter) inside one ``connect``; set to ``P2PConfig.dial_retries`` (0), since
    :func:`keep_connected` owns retries and their (injectable) jitter.

Listening
  * libp2p's TCP listener sets SO_REUSEPORT, so a second node on a taken port
    starts without error and the kernel splits inbound connections between
    the two. :func:`open_p2p` probes each address first (``AemError(UNAVAILABLE)``).
  * ``Swarm.listen`` swallows bind failures (it logs at debug and returns
    False) and drops the failed listener without closing it: its system task
    lives until the process ends. The node checks that every address is
    listening, and closes every listener the swarm created on exit.
  * A ``/dns4/…`` listen address is not resolved: it binds every interface.
    Listen addresses must be ``/ip4|ip6/<ip>/tcp/<port>``.
  * A node closed and restarted on the same port and seed is the same peer at
    the same address: peers redial it (see Dialing).

Dialing
  * After all addresses of a peer fail, the swarm refuses to dial it for 60 s
    (negative cache, ``recently failed all addresses``), which outlives a
    restart. :meth:`P2PNode.connect` calls ``swarm.unblock_peer(peer_id)``
    before every dial. The built-in bootstrap gives up after 3 failures;
    :func:`keep_connected` redials with bounded exponential backoff + jitter.

Identity
  * The host key is the node's Ed25519 seed (:func:`host_key_pair`), so the
    peer id is stable and equals :func:`peer_id_from_public` of the node key.
    ``libp2p.save_keypair``/``load_keypair`` (fixed path) are not used.

GossipSub
  * Spam protection allows 10 msg/s per forwarder per topic, *own publishes
    included*, then drops silently and penalises the neighbour: raised to
    ``max_messages_per_topic_per_second`` (1000). :meth:`P2PNode.publish`
    mirrors the same 1-second window for own publishes and raises
    ``AemError(REFUSED)`` instead of the silent drop.
  * Outbound RPCs over 1 MiB (the whole RPC: payload, signature, key, topic,
    signed peer record) are dropped while ``publish()`` returns OK.
    :meth:`P2PNode.publish` refuses payloads above ``MAX_PUBLISH_BYTES``
    (1 000 000, leaving ~48 KiB for the envelope) with ``AemError(TOO_LARGE)``.
  * A node whose own validator rejects its publish gets no error:
    :meth:`P2PNode.publish` runs the topic's validator first and raises
    ``AemError(REFUSED)``.
  * The per-subscription buffer (32) and the per-peer outbound queue (32)
    drop quietly when full. The subscription channel is replaced by one of
    ``subscription_buffer`` slots (drops are counted in
    :attr:`Subscription.dropped`); peer queues are enlarged to
    ``peer_queue_size`` as Pubsub creates them (a dict hook on
    ``pubsub.peer_queues``, since ``RpcQueue()`` binds its size at definition).
  * Own publishes come back on one's own subscription: filtered out unless
    ``subscribe(topic, include_own=True)``.
  * GossipSub's default heartbeat is 120 s (the spec's is 1 s): set to
    ``heartbeat_interval`` (1 s) so the mesh repairs itself after churn. Its
    adaptive gossip (on by default) then rewrites the interval from a
    "network health" score, to 30-60 s after ~30 s (``gossipsub.py`` ~2852,
    measured): switched off, and its heartbeat step replaced by one that keeps
    the configured value (:func:`_apply_gossip_quirks`).
  * The message cache is re-sent to every new subscriber
    (``send_recent_messages``, ~726) and served on IWANT without re-running
    the topic validators: cards and ads that expired while cached would reach
    new peers, who count them against us. Both read through ``mcache.get``,
    which is wrapped to re-validate each message and hand out none that now
    fails (``P2PNode.stale_not_resent`` counts them).
  * An inbound RPC over 1 MiB is dropped inside libp2p (``MessageTooLarge``,
    logged, stream reset) before any validator: the read function is wrapped
    so the sender is penalised (10 points; ``P2PNode.oversized_rpcs``).
  * A ban blacklists the peer in pubsub, whose teardown task does
    ``del pubsub.peers[peer]`` after an await: if the peer's read loop removed
    it meanwhile, the KeyError fails the Pubsub service and the node (measured
    with a ban triggered by an oversized RPC). The teardown is replaced by the
    same steps, tolerant of the race.
  * These patch internals: each checks that what it touches exists, and a
    libp2p other than :data:`VERIFIED_LIBP2P` is logged once
    (tests/test_mesh_abuse.py measures each quirk).
  * Message ids are (origin, seqno) and the seqno counter starts at
    ``int(time.time())`` and counts up by one per message, so a node that
    published more messages than seconds elapsed, then restarted, reuses
    seqnos that peers still remember (seen-cache TTL 120 s): its new messages
    are dropped as duplicates (measured: 50 messages, restart, the next one is
    lost), and later GossipSub's equivocation check (same origin+seqno, other
    data) rejects them and penalises the origin. The counter starts at
    ``time.time_ns()`` instead (test: restarted publisher is heard).
  * A *sync* topic validator that raises is not caught by py-libp2p (only
    async ones are): the exception fails the Pubsub service and takes the
    whole node down (measured). Validators are wrapped: an exception counts
    as a rejection and is logged. A rejection stops delivery and forwarding,
    and (``penalize_invalid``) penalises the forwarder.
  * Each inbound pubsub message is handled in its own task: no order between
    messages (even from one peer) and no backpressure. A node forwards only
    the topics it subscribes to.
  * Peer scoring exists but is inert by default (all thresholds ``-inf``,
    weights 0). :meth:`P2PNode.penalize` keeps its own decaying points; at
    ``ban_threshold`` the peer is banned for ``ban_seconds``: put on
    ``pubsub``'s blacklist (its pubsub stream is reset and its messages,
    forwarded or original, dropped), disconnected, refused on our stream
    protocols and redials, and taken off the blacklist when the ban expires.
  * A fresh identity costs nothing, so bans also count per remote IP: at most
    ``max_connections_per_ip`` connections from one address, and once
    ``ip_ban_after`` distinct peers from one address are banned, a new peer
    from it is banned on connect until those bans end. Peers behind one NAT
    share that fate (``ip_ban_after=0`` turns it off). Tests on 127.0.0.1
    see every peer on one address: they ban fewer peers than that, or set it.
  * Topic validators see the forwarding neighbour; the subscription sees the
    origin. The forwarder of each validated message is remembered (bounded)
    and given as :attr:`Subscription.last_forwarder`, so tables can count
    what each neighbour delivered.

Streams
  * An exception raised by a raw stream handler propagates through the
    connection's nursery into the swarm service and takes the whole host down
    (measured: it surfaces out of the ``async with``). Handlers are wrapped:
    errors are logged, the stream is reset, and at most ``max_concurrent``
    handlers run per protocol and ``max_per_peer`` per protocol per peer
    (further streams are reset at once; over the per-peer limit the peer is
    also penalised). A reset can reach the client before its protocol
    negotiation finishes, so a failing handler shows up either in
    ``open_stream`` or in the first read.
  * Slowloris: an idle stream would hold a slot for as long as the
    handler's own deadline, unpenalised. Handlers get a guarded stream: a
    read with no byte for ``idle_timeout`` fails, a frame must arrive at a
    minimum pace once its header has, the bytes of unfinished frames are
    budgeted per peer and in all, and a ``session_timeout`` ends the handler;
    each costs the peer ``stream_abuse_points``.
  * Yamux's receive window grows to 16 MB per stream when the reader keeps
    up; what a peer can park in a node is bounded by the per-peer stream
    limit times that, and by the frame budget for what the node has read.
  * Framing: see :mod:`aemd.framing` (``read_varint_prefixed_bytes`` fails
    above ~6.8 MB).

Events
  * Network notifees are awaited inline on the connection path (inside
    ``add_conn``), so a slow notifee stalls every connection. Ours only does
    ``send_nowait`` into bounded channels (overflow counted, not blocking).
    With several connections to one peer (a simultaneous dial) libp2p reports
    each; :meth:`P2PNode.peer_events` reports a peer's first connection and
    its last disconnection only.

Logging
  * libp2p's logger has no handler and ``propagate=False``, so its warnings go
    to Python's last-resort handler as raw stderr lines. :func:`quiet_libp2p_logging`
    sets the level and lets records propagate to the application's handlers.
  * libp2p logs routine churn at ERROR: every disconnect racing identify or
    the pubsub stream gives ~4 ERROR records ("Failed to open stream",
    "MultiselectClient handshake: write failed", "Error in handle_incoming:
    Broken pipe"), and so does each ``open_stream`` of an unsupported
    protocol, which the caller already gets as an AemError. The default level
    is therefore CRITICAL (``P2PConfig.libp2p_log_level``; use ERROR or
    WARNING when debugging the stack).
"""

from __future__ import annotations

import importlib.metadata
import inspect
import logging
import math
import random
import socket
import time
import weakref
from collections import Counter, OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

import multiaddr
import trio
from libp2p import new_host
from libp2p.abc import INetConn, INetStream, INetwork, INotifee
from libp2p.crypto.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from libp2p.crypto.keys import KeyPair
from libp2p.custom_types import TProtocol
from libp2p.network.config import ConnectionConfig, RetryConfig
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.pubsub.gossipsub import PROTOCOL_ID, PROTOCOL_ID_V11, PROTOCOL_ID_V12, GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.tools.anyio_service import background_trio_service

from protocol.errors import (
    BAD_KEY,
    BAD_VALUE,
    REFUSED,
    TIMEOUT,
    TOO_LARGE,
    UNAVAILABLE,
    AemError,
)

__all__ = [
    "CONNECTED",
    "DISCONNECTED",
    "MAX_PUBLISH_BYTES",
    "P2PConfig",
    "P2PNode",
    "PeerEvent",
    "StreamHandler",
    "Subscription",
    "Validator",
    "backoff_delay",
    "host_key_pair",
    "keep_connected",
    "open_p2p",
    "peer_id_from_public",
    "public_from_peer_id",
    "quiet_libp2p_logging",
]

log = logging.getLogger("aemd.p2p")

#: libp2p's limit for one outbound pubsub RPC (payload plus envelope).
PUBSUB_RPC_LIMIT = 1024 * 1024
#: Largest payload :meth:`P2PNode.publish` accepts: under the RPC limit with
#: room for signature, key, topic, seqno and the signed peer record.
MAX_PUBLISH_BYTES = 1_000_000

CONNECTED = "connected"
DISCONNECTED = "disconnected"

#: ``fn(forwarder_peer_id, data) -> bool`` (or an async function returning bool).
Validator = Callable[[str, bytes], "bool | Awaitable[bool]"]
#: ``async handler(stream, remote_peer_id)``; the stream is reset or closed after it returns.
StreamHandler = Callable[[INetStream, str], Awaitable[None]]


class PeerEvent(NamedTuple):
    """A peer's first connection (``CONNECTED``) or its last one closing (``DISCONNECTED``)."""

    kind: str
    peer_id: str


@dataclass(frozen=True)
class P2PConfig:
    """Every limit and timer of the networking shell, with its default."""

    # GossipSub mesh (degrees as in the GossipSub spec) and heartbeat, seconds.
    gossip_degree: int = 6
    gossip_degree_low: int = 4
    gossip_degree_high: int = 12
    heartbeat_interval: int = 1
    #: Per forwarder per topic, own publishes included (libp2p default: 10).
    max_messages_per_topic_per_second: float = 1000.0
    #: Slots per subscription (libp2p: 32); overflow is dropped and counted.
    subscription_buffer: int = 1024
    #: Slots per peer outbound pubsub queue (libp2p: 32).
    peer_queue_size: int = 1024
    max_publish_bytes: int = MAX_PUBLISH_BYTES
    # Connections.
    max_connections: int = 300
    dial_timeout: float = 10.0
    #: Swarm-internal retries per dial (libp2p: 3); keep_connected retries instead.
    dial_retries: int = 0
    auto_connect: bool = False
    stream_open_timeout: float = 10.0
    #: Default cap of concurrently running handlers per stream protocol.
    max_concurrent_streams: int = 64
    #: Default cap per protocol *per peer*: one peer cannot take a protocol's slots.
    max_streams_per_peer: int = 4
    #: A handler's read that gets no byte for this long fails (TIMEOUT) and
    #: penalises the peer (idle streams held open: slowloris).
    stream_idle_timeout: float = 15.0
    #: Once a frame's header has arrived, its body must arrive within
    #: ``stream_idle_timeout + length / frame_min_bytes_per_s`` (a trickle fails).
    frame_min_bytes_per_s: int = 64 * 1024
    #: Bytes of incomplete inbound frames held at once, per peer and in all.
    max_buffered_per_peer: int = 32 << 20
    max_buffered_total: int = 256 << 20
    #: Penalty points for each stream abuse (idle, trickled frame, buffer
    #: budget, session or request deadline): a few incidents ban a slowloris
    #: peer, an honest peer on a bad link rarely has one.
    stream_abuse_points: float = 4.0
    #: Points for a stream refused over the per-peer limit: cheap to refuse,
    #: and an honest payer may briefly have more tasks for one host.
    stream_overflow_points: float = 0.1
    #: Points for an inbound pubsub RPC over 1 MiB (libp2p never sends one).
    oversized_rpc_points: float = 10.0
    #: Connections at once from one remote IP address (any number of peer ids).
    max_connections_per_ip: int = 32
    #: Once this many distinct peers from one IP are banned, every new
    #: connection from that IP is refused until the last of those bans ends
    #: (a fresh identity costs nothing; an address costs something). 0: off.
    ip_ban_after: int = 3
    # Peer events: slots per peer_events() channel.
    event_buffer: int = 256
    # Penalties: points decay with this half-life; at the threshold, a ban.
    ban_threshold: float = 10.0
    ban_seconds: float = 600.0
    penalty_half_life: float = 600.0
    max_tracked_peers: int = 10_000
    #: Penalise (1 point) the forwarder of a message a topic validator rejects.
    penalize_invalid: bool = True
    #: Bound on ``host.close()`` and on each disconnect.
    close_timeout: float = 5.0
    #: Level for the "libp2p" logger tree; None leaves logging alone. CRITICAL
    #: because libp2p logs routine churn at ERROR (see module docstring).
    libp2p_log_level: int | None = logging.CRITICAL
    #: Announce and discover peers on the LAN with mDNS (zeroconf, UDP 5353).
    enable_mdns: bool = False

    def __post_init__(self) -> None:
        positive = {
            "gossip_degree": self.gossip_degree,
            "heartbeat_interval": self.heartbeat_interval,
            "max_messages_per_topic_per_second": self.max_messages_per_topic_per_second,
            "subscription_buffer": self.subscription_buffer,
            "peer_queue_size": self.peer_queue_size,
            "max_publish_bytes": self.max_publish_bytes,
            "max_connections": self.max_connections,
            "dial_timeout": self.dial_timeout,
            "stream_open_timeout": self.stream_open_timeout,
            "max_concurrent_streams": self.max_concurrent_streams,
            "max_streams_per_peer": self.max_streams_per_peer,
            "stream_idle_timeout": self.stream_idle_timeout,
            "frame_min_bytes_per_s": self.frame_min_bytes_per_s,
            "max_buffered_per_peer": self.max_buffered_per_peer,
            "max_buffered_total": self.max_buffered_total,
            "max_connections_per_ip": self.max_connections_per_ip,
            "event_buffer": self.event_buffer,
            "ban_threshold": self.ban_threshold,
            "ban_seconds": self.ban_seconds,
            "penalty_half_life": self.penalty_half_life,
            "max_tracked_peers": self.max_tracked_peers,
            "close_timeout": self.close_timeout,
        }
        for name, value in positive.items():
            if not value > 0:
                raise AemError(BAD_VALUE, f"P2PConfig.{name} must be positive, got {value!r}")
        if not self.gossip_degree_low <= self.gossip_degree <= self.gossip_degree_high:
            raise AemError(BAD_VALUE, "P2PConfig needs gossip_degree_low <= gossip_degree"
                                      " <= gossip_degree_high")
        if self.max_publish_bytes > MAX_PUBLISH_BYTES:
            raise AemError(BAD_VALUE, f"max_publish_bytes above {MAX_PUBLISH_BYTES}"
                                      " would be dropped silently by libp2p")
        if self.dial_retries < 0:
            raise AemError(BAD_VALUE, "P2PConfig.dial_retries must be >= 0")
        if min(self.ip_ban_after, self.stream_abuse_points, self.stream_overflow_points,
               self.oversized_rpc_points) < 0:
            raise AemError(BAD_VALUE, "P2PConfig ip_ban_after and penalty points must be >= 0")


# ---------------------------------------------------------------------------
# Identity


def quiet_libp2p_logging(level: int = logging.CRITICAL) -> None:
    """Set the ``libp2p`` logger tree to ``level`` and route it to the app's handlers."""
    lg = logging.getLogger("libp2p")
    lg.setLevel(level)
    lg.propagate = True


def host_key_pair(seed32: bytes) -> KeyPair:
    """A libp2p Ed25519 ``KeyPair`` from the node's raw 32-byte Ed25519 seed."""
    if not isinstance(seed32, (bytes, bytearray)) or len(seed32) != 32:
        raise AemError(BAD_KEY, "host key seed must be 32 bytes")
    priv = Ed25519PrivateKey.from_bytes(bytes(seed32))
    return KeyPair(priv, priv.get_public_key())


def peer_id_from_public(pub32: bytes) -> str:
    """The base58 libp2p peer id of a raw 32-byte Ed25519 public key."""
    if not isinstance(pub32, (bytes, bytearray)) or len(pub32) != 32:
        raise AemError(BAD_KEY, "Ed25519 public key must be 32 bytes")
    try:
        key = Ed25519PublicKey.from_bytes(bytes(pub32))
    except Exception as exc:
        raise AemError(BAD_KEY, f"not an Ed25519 public key: {exc}") from exc
    return ID.from_pubkey(key).to_base58()


def _parse_peer_id(peer_id: str | ID) -> ID:
    if isinstance(peer_id, ID):
        return peer_id
    if not isinstance(peer_id, str) or not peer_id or len(peer_id) > 128:
        raise AemError(BAD_VALUE, f"not a peer id: {peer_id!r}")
    try:
        pid = ID.from_base58(peer_id)
    except Exception as exc:
        raise AemError(BAD_VALUE, f"not a base58 peer id: {peer_id!r}") from exc
    if pid.to_base58() != peer_id:
        raise AemError(BAD_VALUE, f"not a canonical peer id: {peer_id!r}")
    return pid


def public_from_peer_id(peer_id: str) -> bytes:
    """The raw Ed25519 public key inlined in a peer id (inverse of :func:`peer_id_from_public`)."""
    key = _parse_peer_id(peer_id).extract_public_key()
    if not isinstance(key, Ed25519PublicKey):
        raise AemError(BAD_KEY, f"peer id {peer_id} does not inline an Ed25519 key")
    raw = key.to_bytes()
    if len(raw) != 32:
        raise AemError(BAD_KEY, f"peer id {peer_id} inlines a {len(raw)}-byte key")
    return raw


def _parse_p2p_multiaddr(maddr: str) -> tuple[multiaddr.Multiaddr, Any]:
    """``/ip4/../tcp/../p2p/<id>`` -> (Multiaddr, PeerInfo); BAD_VALUE otherwise."""
    if not isinstance(maddr, str) or len(maddr) > 1024:
        raise AemError(BAD_VALUE, f"not a multiaddr: {maddr!r}")
    try:
        ma = multiaddr.Multiaddr(maddr)
        info = info_from_p2p_addr(ma)
    except Exception as exc:
        raise AemError(BAD_VALUE, f"not a /p2p/ multiaddr: {maddr!r} ({exc})") from exc
    return ma, info


# ---------------------------------------------------------------------------
# Pubsub plumbing


class _PeerQueues(dict):  # type: ignore[type-arg]
    """``pubsub.peer_queues`` that enlarges each per-peer ``RpcQueue`` as it is added."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def __setitem__(self, key: Any, queue: Any) -> None:
        inner = getattr(queue, "_queue", None)
        if inner is not None and isinstance(getattr(inner, "max_size", None), int):
            inner.max_size = max(inner.max_size, self.size)
        else:  # a libp2p change: say so rather than silently keep the 32-slot queue
            log.warning("cannot enlarge pubsub peer queue (libp2p internals changed)")
        super().__setitem__(key, queue)


class _CountingSend:
    """Stands in for a subscription's send channel in ``pubsub.subscribed_topics_send``.

    Pubsub calls ``send_nowait`` (dropping on ``trio.WouldBlock``) and ``aclose``.
    """

    def __init__(self, send: trio.MemorySendChannel[Any]) -> None:
        self._send = send
        self.dropped = 0

    def send_nowait(self, msg: Any) -> None:
        try:
            self._send.send_nowait(msg)
        except trio.WouldBlock:
            self.dropped += 1
            raise
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.dropped += 1

    def close(self) -> None:
        self._send.close()

    async def aclose(self) -> None:
        await self._send.aclose()


class Subscription:
    """Messages of one topic as ``(origin_peer_id, data)``; an async iterator.

    Ends when unsubscribed (:meth:`aclose`, or leaving ``async with``) or when the
    node closes. ``dropped`` counts messages lost to a full buffer: read promptly.
    """

    def __init__(self, node: P2PNode, topic: str, recv: trio.MemoryReceiveChannel[Any],
                 sender: _CountingSend, include_own: bool) -> None:
        self._node = node
        self.topic = topic
        self._recv = recv
        self._sender = sender
        self._include_own = include_own
        self._own_id = node._host.get_id().to_bytes()
        #: The neighbour that delivered the message last returned (its origin if unknown).
        self.last_forwarder = ""

    @property
    def dropped(self) -> int:
        return self._sender.dropped

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> tuple[str, bytes]:
        while True:
            try:
                msg = await self._recv.receive()
            except (trio.EndOfChannel, trio.ClosedResourceError):
                raise StopAsyncIteration from None
            if not self._include_own and msg.from_id == self._own_id:
                continue
            origin = ID(msg.from_id).to_base58()
            self.last_forwarder = self._node._forwarders.pop((bytes(msg.from_id), bytes(msg.seqno)), origin)
            return origin, bytes(msg.data)

    async def aclose(self) -> None:
        await self._node._unsubscribe(self.topic, self)

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


# ---------------------------------------------------------------------------
# Connection tracking


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


async def _no_auto_connect() -> None:
    return None


class _GuardedStream:
    """The stream a served handler sees (see :meth:`P2PNode.set_stream_handler`).

    Reads fail after ``idle`` seconds without a byte; it is the
    :class:`aemd.framing.FramePolicy` of its frames (pace, byte budget per
    peer and in all); every abuse penalises the peer once per stream. Writes,
    close and reset go to the libp2p stream unchanged.
    """

    def __init__(self, stream: INetStream, node: P2PNode, pid: ID, idle: float) -> None:
        self._stream = stream
        self._node = node
        self._pid = pid
        self._idle = idle
        self.muxed_conn = stream.muxed_conn
        self.frame_policy = self
        self.abused: str | None = None

    async def read(self, n: int | None = None) -> bytes:
        with trio.move_on_after(self._idle):
            return await self._stream.read(n)
        self.abuse(f"no data for {self._idle:g} s")
        raise AemError(TIMEOUT, f"peer sent nothing for {self._idle:g} s")

    async def write(self, data: bytes) -> None:
        await self._stream.write(data)

    async def close(self) -> None:
        await self._stream.close()

    async def reset(self) -> None:
        await self._stream.reset()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    # FramePolicy
    def frame_deadline(self, length: int) -> float:
        return self._idle + length / self._node._config.frame_min_bytes_per_s

    def take(self, n: int) -> None:
        node, cfg = self._node, self._node._config
        mine = node._buffered.get(self._pid, 0)
        if mine + n > cfg.max_buffered_per_peer or node._buffered_total + n > cfg.max_buffered_total:
            self.abuse("inbound frames over the buffer budget")
            raise AemError(TOO_LARGE, "too many bytes of unfinished frames from this peer")
        node._buffered[self._pid] = mine + n
        node._buffered_total += n

    def give(self, n: int) -> None:
        node = self._node
        left = node._buffered.get(self._pid, 0) - n
        if left > 0:
            node._buffered[self._pid] = left
        else:
            node._buffered.pop(self._pid, None)
        node._buffered_total = max(0, node._buffered_total - n)

    def abuse(self, reason: str) -> None:
        if self.abused is None:
            self.abused = reason
            log.info("stream abuse by %s: %s", self._pid, reason)
            self._node._stream_abuse(self._pid, reason)


# ---------------------------------------------------------------------------
# The node


class P2PNode:
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
        # Remote IPs: live connections per IP, and banned peers per IP (-> ban end).
        self._conn_ip: dict[int, str] = {}
        self._ip_conns: Counter[str] = Counter()
        self._peer_ips: dict[ID, str] = {}
        self._ip_bans: dict[str, dict[ID, float]] = {}
        self._last_seen: dict[ID, float] = {}   # peer -> when its last connection closed (trio clock)
        # Penalties and bans (trio clock).
        self._points: dict[ID, tuple[float, float]] = {}  # peer -> (points, at)
        self._bans: dict[ID, float] = {}  # peer -> until
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
        if pid not in self._bans and ip is not None:
            if self._ip_banned(ip):
                # A fresh identity from an address whose peers keep getting banned.
                self.ban(pid.to_base58(), reason=f"connection from banned address {ip}")
            elif self._ip_conns[ip] > self._config.max_connections_per_ip:
                log.info("refusing %s: over %d connections from %s", pid,
                         self._config.max_connections_per_ip, ip)
                self._pending_disconnects.add(pid)
                self._wake.set()
        if pid in self._bans:
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

    # -- pubsub ---------------------------------------------------------------

    def set_topic_validator(self, topic: str, fn: Validator) -> None:
        """Install ``fn(forwarder_peer_id, data) -> bool`` for ``topic`` (replaces any).

        ``fn`` may be sync or async (async ones time out after 5 s: rejection).
        It runs on every message before delivery and forwarding, own publishes
        included; False or an exception rejects (not delivered, not forwarded,
        forwarder penalised when ``penalize_invalid``).
        """
        _check_topic(topic)
        is_async = inspect.iscoroutinefunction(fn)
        node = self

        def rejected(forwarder: ID) -> None:
            if node._config.penalize_invalid and forwarder != node._id:
                node.penalize(forwarder.to_base58(), 1.0, f"invalid message on {topic}")

        if is_async:
            async def validator(forwarder: ID, msg: Any) -> bool:
                try:
                    ok = bool(await fn(forwarder.to_base58(), bytes(msg.data)))  # type: ignore[misc]
                except Exception:
                    log.warning("validator for %s raised; message rejected", topic, exc_info=True)
                    ok = False
                if not ok:
                    rejected(forwarder)
                else:
                    node._note_forwarder(msg, forwarder)
                return ok
        else:
            def validator(forwarder: ID, msg: Any) -> bool:  # type: ignore[misc]
                try:
                    ok = bool(fn(forwarder.to_base58(), bytes(msg.data)))
                except Exception:
                    log.warning("validator for %s raised; message rejected", topic, exc_info=True)
                    ok = False
                if not ok:
                    rejected(forwarder)
                else:
                    node._note_forwarder(msg, forwarder)
                return ok

        self._validators[topic] = fn
        self._pubsub.set_topic_validator(topic, validator, is_async)

    def _note_forwarder(self, msg: Any, forwarder: ID) -> None:
        # Bounded: a message whose subscription never reads it is forgotten.
        key = (bytes(msg.from_id), bytes(msg.seqno))
        self._forwarders[key] = forwarder.to_base58()
        while len(self._forwarders) > 4 * self._config.subscription_buffer:
            self._forwarders.popitem(last=False)

    def _still_valid(self, msg: Any) -> bool:
        """Whether a cached message still passes its topics' (sync) validators now."""
        for t in msg.topicIDs:
            fn = self._validators.get(t)
            if fn is None or inspect.iscoroutinefunction(fn):
                continue  # an async validator cannot run inside libp2p's sync cache lookup
            try:
                if not fn(self.peer_id, bytes(msg.data)):
                    return False
            except Exception:
                return False
        return True

    def remove_topic_validator(self, topic: str) -> None:
        self._validators.pop(topic, None)
        self._pubsub.remove_topic_validator(topic)

    async def subscribe(self, topic: str, *, include_own: bool = False) -> Subscription:
        """Join ``topic``; returns a :class:`Subscription` (one per topic at a time).

        Own publishes are skipped unless ``include_own``. Raises AemError(REFUSED)
        if this node already holds a subscription to ``topic``.
        """
        _check_topic(topic)
        self._require_running()
        if topic in self._subs:
            raise AemError(REFUSED, f"already subscribed to {topic!r}")
        lsub = await self._pubsub.subscribe(topic)
        send, recv = trio.open_memory_channel[Any](self._config.subscription_buffer)
        sender = _CountingSend(send)
        old_send = self._pubsub.subscribed_topics_send[topic]
        self._pubsub.subscribed_topics_send[topic] = sender  # type: ignore[assignment]
        # Move what arrived while subscribe() awaited (no await in between: nothing is lost).
        while True:
            try:
                msg = lsub.receive_channel.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
            try:
                sender.send_nowait(msg)
            except trio.WouldBlock:
                pass
        old_send.close()
        lsub.receive_channel = recv  # keep libp2p's subscription object consistent
        sub = Subscription(self, topic, recv, sender, include_own)
        self._subs[topic] = sub
        return sub

    async def _unsubscribe(self, topic: str, sub: Subscription) -> None:
        if self._subs.get(topic) is not sub:
            return
        del self._subs[topic]
        if self._running:
            try:
                await self._pubsub.unsubscribe(topic)
            except Exception as exc:
                log.debug("unsubscribe %s: %s", topic, exc)
        sub._sender.close()

    def topic_peers(self, topic: str) -> list[str]:
        """Peers known to be subscribed to ``topic``."""
        return sorted(p.to_base58() for p in self._pubsub.peer_topics.get(topic, ()))

    def mesh_peers(self, topic: str) -> list[str]:
        """Peers in this node's GossipSub mesh for ``topic`` (where a publish goes)."""
        return sorted(p.to_base58() for p in self._gossipsub.mesh.get(topic, ()))

    async def publish(self, topic: str, data: bytes) -> None:
        """Publish ``data`` on ``topic`` (signed by the host key).

        Raises AemError: TOO_LARGE (over ``max_publish_bytes``, which libp2p would
        drop silently), REFUSED (own validator rejects it, or own rate above
        ``max_messages_per_topic_per_second``, both silent drops in libp2p),
        UNAVAILABLE (pubsub failed). Returning does not mean any peer got it.
        """
        _check_topic(topic)
        self._require_running()
        if not isinstance(data, (bytes, bytearray)):
            raise AemError(BAD_VALUE, f"publish data must be bytes, not {type(data).__name__}")
        if len(data) > self._config.max_publish_bytes:
            raise AemError(TOO_LARGE, f"{len(data)} bytes > publish limit {self._config.max_publish_bytes}")
        data = bytes(data)
        fn = self._validators.get(topic)
        if fn is not None:
            try:
                verdict = fn(self.peer_id, data)
                if inspect.isawaitable(verdict):
                    verdict = await verdict
            except Exception as exc:
                raise AemError(REFUSED, f"own validator for {topic!r} raised: {exc}") from exc
            if not verdict:
                raise AemError(REFUSED, f"own validator for {topic!r} rejects this message")
        self._check_own_rate(topic)
        try:
            await self._pubsub.publish(topic, data)
        except AemError:
            raise
        except Exception as exc:
            raise AemError(UNAVAILABLE, f"publish on {topic!r} failed: {type(exc).__name__}: {exc}") from exc

    def _check_own_rate(self, topic: str) -> None:
        # Same window and clock as GossipSub._check_spam_protection, run first, so
        # whenever libp2p would drop our own publish we have already refused it.
        limit = self._config.max_messages_per_topic_per_second
        now = time.time()
        times = self._own_publish_times.setdefault(topic, deque())
        while times and times[0] <= now - 1.0:
            times.popleft()
        if len(times) >= limit:
            raise AemError(REFUSED, f"own publish rate on {topic!r} above {limit:g}/s")
        times.append(now)

    # -- streams --------------------------------------------------------------

    def set_stream_handler(self, protocol_id: str, handler: StreamHandler, *,
                           max_concurrent: int | None = None, max_per_peer: int | None = None,
                           idle_timeout: float | None = None,
                           session_timeout: float | None = None) -> None:
        """Serve ``protocol_id`` with ``async handler(stream, remote_peer_id)``.

        The handler's exceptions are logged and the stream reset; when it
        returns the stream is closed. Streams from banned peers, streams beyond
        ``max_concurrent`` running handlers, and streams beyond ``max_per_peer``
        running handlers of one peer are reset at once (the last also
        penalised). The handler gets a guarded stream: a read that waits more
        than ``idle_timeout`` for a byte fails with AemError(TIMEOUT), frames
        are paced and their bytes budgeted (:mod:`aemd.framing`), and the whole
        handler is cancelled after ``session_timeout`` (None: no limit); each
        of these penalises the peer (``stream_abuse_points``).
        """
        _check_protocol(protocol_id)
        cfg = self._config
        limit = cfg.max_concurrent_streams if max_concurrent is None else max_concurrent
        per_peer = cfg.max_streams_per_peer if max_per_peer is None else max_per_peer
        idle = cfg.stream_idle_timeout if idle_timeout is None else idle_timeout
        if limit <= 0 or per_peer <= 0:
            raise AemError(BAD_VALUE, "max_concurrent and max_per_peer must be positive")
        if not idle > 0 or (session_timeout is not None and not session_timeout > 0):
            raise AemError(BAD_VALUE, "idle_timeout and session_timeout must be positive")
        node = self

        async def wrapped(stream: INetStream) -> None:
            try:
                pid = stream.muxed_conn.peer_id
            except AttributeError:
                await _reset_quietly(stream)
                return
            if node._is_banned_id(pid) or node._handler_active.get(protocol_id, 0) >= limit:
                await _reset_quietly(stream)
                return
            slot = (protocol_id, pid)
            if node._handler_peer_active.get(slot, 0) >= per_peer:
                # Refused at once, so cheap: a small penalty (an honest payer may
                # briefly have more tasks for one host), enough to ban a flood.
                node._stream_abuse(pid, f"more than {per_peer} concurrent {protocol_id} streams",
                                   node._config.stream_overflow_points)
                await _reset_quietly(stream)
                return
            node._handler_active[protocol_id] = node._handler_active.get(protocol_id, 0) + 1
            node._handler_peer_active[slot] = node._handler_peer_active.get(slot, 0) + 1
            guarded = _GuardedStream(stream, node, pid, idle)
            ok = False
            try:
                with trio.move_on_after(math.inf if session_timeout is None else session_timeout) as scope:
                    await handler(guarded, pid.to_base58())  # type: ignore[arg-type]
                    ok = True
                if scope.cancelled_caught:
                    guarded.abuse(f"{protocol_id} session longer than {session_timeout:g} s")
            except AemError as exc:
                log.debug("%s handler for %s: %s", protocol_id, pid, exc)
                if exc.code == TIMEOUT:      # a deadline of the handler's own that the peer missed
                    guarded.abuse(f"{protocol_id}: {exc.detail}")
            except Exception:
                log.warning("%s handler for %s raised", protocol_id, pid, exc_info=True)
            finally:
                node._handler_active[protocol_id] -= 1
                node._handler_peer_active[slot] -= 1
                if node._handler_peer_active[slot] <= 0:
                    del node._handler_peer_active[slot]
                if ok:
                    await _close_quietly(stream, node._config.close_timeout)
                else:
                    await _reset_quietly(stream)

        self._host.set_stream_handler(TProtocol(protocol_id), wrapped)

    def _stream_abuse(self, pid: ID, reason: str, points: float | None = None) -> None:
        self.stream_abuse += 1
        self.penalize(pid.to_base58(), self._config.stream_abuse_points if points is None else points, reason)

    def buffered_bytes(self, peer_id: str | None = None) -> int:
        """Bytes of incomplete inbound frames held now (of one peer, or in all)."""
        if peer_id is None:
            return self._buffered_total
        return self._buffered.get(_parse_peer_id(peer_id), 0)

    def remove_stream_handler(self, protocol_id: str) -> None:
        self._host.remove_stream_handler(TProtocol(protocol_id))

    async def open_stream(self, peer_id: str, protocol_id: str) -> INetStream:
        """Open a stream to ``peer_id`` speaking ``protocol_id``; the caller closes it.

        Dials through the peerstore if not connected. Raises AemError: REFUSED
        (banned), TIMEOUT (``stream_open_timeout``), UNAVAILABLE (no connection,
        protocol not supported, stream failure).
        """
        _check_protocol(protocol_id)
        self._require_running()
        pid = _parse_peer_id(peer_id)
        if self._is_banned_id(pid):
            raise AemError(REFUSED, f"peer {pid} is banned")
        try:
            with trio.fail_after(self._config.stream_open_timeout):
                return await self._host.new_stream(pid, [TProtocol(protocol_id)])
        except trio.TooSlowError:
            raise AemError(TIMEOUT, f"opening {protocol_id} to {pid} took too long") from None
        except Exception as exc:
            raise AemError(UNAVAILABLE,
                           f"opening {protocol_id} to {pid} failed: {type(exc).__name__}: {exc}") from exc

    @asynccontextmanager
    async def stream(self, peer_id: str, protocol_id: str) -> AsyncIterator[INetStream]:
        """``open_stream`` as a context manager: closed on success, reset on error."""
        s = await self.open_stream(peer_id, protocol_id)
        try:
            yield s
        except BaseException:
            await _reset_quietly(s)
            raise
        else:
            await _close_quietly(s, self._config.close_timeout)

    # -- penalties and bans -----------------------------------------------------

    def penalize(self, peer_id: str, points: float = 1.0, reason: str = "") -> bool:
        """Add penalty points (decaying, half-life ``penalty_half_life``).

        At ``ban_threshold`` the peer is banned for ``ban_seconds``. Returns
        True if this call banned it.
        """
        pid = _parse_peer_id(peer_id)
        if pid == self._id or not points > 0:
            return False
        now = trio.current_time()
        total = self._decayed_points(pid, now) + float(points)
        self._points[pid] = (total, now)
        if len(self._points) > self._config.max_tracked_peers:
            self._evict_points(now)
        log.debug("penalize %s +%g -> %g (%s)", pid, points, total, reason)
        if total >= self._config.ban_threshold and pid not in self._bans:
            self.ban(peer_id, reason=reason or "penalty threshold")
            return True
        return False

    def penalty(self, peer_id: str) -> float:
        """Current (decayed) penalty points of ``peer_id``."""
        return self._decayed_points(_parse_peer_id(peer_id), trio.current_time())

    def penalties(self) -> dict[str, float]:
        """Every tracked peer's current penalty points."""
        now = trio.current_time()
        return {pid.to_base58(): self._decayed_points(pid, now) for pid in self._points}

    def banned(self) -> list[str]:
        """Peers whose ban is in force."""
        return sorted(pid.to_base58() for pid in self._bans if self._is_banned_id(pid))

    def _decayed_points(self, pid: ID, now: float) -> float:
        entry = self._points.get(pid)
        if entry is None:
            return 0.0
        points, at = entry
        return points * math.pow(0.5, max(0.0, now - at) / self._config.penalty_half_life)

    def _evict_points(self, now: float) -> None:
        # Keep the table bounded: forget the least-penalised half.
        ranked = sorted(self._points, key=lambda p: self._decayed_points(p, now))
        for pid in ranked[: len(ranked) // 2]:
            if pid not in self._bans:
                del self._points[pid]

    def ban(self, peer_id: str, seconds: float | None = None, reason: str = "") -> None:
        """Ban ``peer_id`` for ``seconds`` (default ``ban_seconds``): pubsub
        blacklist, disconnect, refuse its streams and our dials to it."""
        pid = _parse_peer_id(peer_id)
        if pid == self._id:
            return
        duration = self._config.ban_seconds if seconds is None else float(seconds)
        until = trio.current_time() + duration
        self._bans[pid] = max(until, self._bans.get(pid, until))
        ip = self._peer_ips.get(pid)
        if ip is not None and self._config.ip_ban_after > 0:
            banned_here = self._ip_bans.setdefault(ip, {})
            banned_here[pid] = self._bans[pid]
            if len(self._ip_bans) > self._config.max_tracked_peers:
                self._prune_ip_bans()
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
        self._lift_ban(pid)
        for banned_here in self._ip_bans.values():
            banned_here.pop(pid, None)

    def _ip_banned(self, ip: str) -> bool:
        """Whether ``ip_ban_after`` distinct peers from ``ip`` are banned now."""
        need = self._config.ip_ban_after
        banned_here = self._ip_bans.get(ip)
        if need <= 0 or not banned_here:
            return False
        now = trio.current_time()
        for pid in [p for p, until in banned_here.items() if until <= now]:
            del banned_here[pid]
        if not banned_here:
            del self._ip_bans[ip]
            return False
        return len(banned_here) >= need

    def is_address_banned(self, ip: str) -> bool:
        return self._ip_banned(ip)

    def _prune_ip_bans(self) -> None:
        now = trio.current_time()
        for ip in list(self._ip_bans):
            self._ip_bans[ip] = {p: u for p, u in self._ip_bans[ip].items() if u > now}
            if not self._ip_bans[ip]:
                del self._ip_bans[ip]

    def _lift_ban(self, pid: ID) -> None:
        self._bans.pop(pid, None)
        self._pending_disconnects.discard(pid)
        self._points.pop(pid, None)
        try:
            self._pubsub.remove_from_blacklist(pid)
        except Exception as exc:
            log.debug("unblacklist %s: %s", pid, exc)

    def is_banned(self, peer_id: str) -> bool:
        return self._is_banned_id(_parse_peer_id(peer_id))

    def _is_banned_id(self, pid: ID) -> bool:
        until = self._bans.get(pid)
        return until is not None and until > trio.current_time()

    async def _housekeeping(self) -> None:
        """Disconnect banned peers, lift expired bans. Runs for the node's life."""
        while True:
            self._wake = trio.Event()
            pending, self._pending_disconnects = self._pending_disconnects, set()
            for pid in pending:
                # Even a ban that has already run out by now (a short one, a
                # slow loop) disconnects once; only an explicit unban cancels.
                await self.disconnect(pid.to_base58())
            now = trio.current_time()
            for pid, until in list(self._bans.items()):
                if until <= now:
                    self._lift_ban(pid)
            next_expiry = min(self._bans.values(), default=math.inf)
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


def _check_topic(topic: str) -> None:
    if not isinstance(topic, str) or not topic or len(topic) > 256:
        raise AemError(BAD_VALUE, f"bad topic: {topic!r}")


def _check_protocol(protocol_id: str) -> None:
    if not isinstance(protocol_id, str) or not protocol_id.startswith("/") or len(protocol_id) > 256:
        raise AemError(BAD_VALUE, f"bad protocol id: {protocol_id!r}")


async def _reset_quietly(stream: INetStream) -> None:
    with trio.CancelScope(shield=True), trio.move_on_after(1.0):
        try:
            await stream.reset()
        except Exception:
            pass


async def _close_quietly(stream: INetStream, timeout: float) -> None:
    with trio.CancelScope(shield=True), trio.move_on_after(timeout):
        try:
            await stream.close()
        except Exception:
            pass


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


#: py-libp2p versions whose internals the quirk handling below was checked
#: against (tests/test_mesh_abuse.py measures each quirk).
VERIFIED_LIBP2P = ("0.8.1",)
_LIVE_NODES: weakref.WeakSet[P2PNode] = weakref.WeakSet()
_version_warned = False


def libp2p_version() -> str:
    try:
        return importlib.metadata.version("libp2p")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _apply_gossip_quirks(node: P2PNode) -> None:
    """Pin what py-libp2p's GossipSub would otherwise change behind our back.

    * Heartbeat: adaptive gossip (on by default in 0.8.1) rewrites
      ``heartbeat_interval`` from network health, to 30-60 s after ~30 s
      whatever was configured. It is off (constructor) and its heartbeat
      step is replaced by a no-op, so the interval stays the configured one.
    * Message cache: ``send_recent_messages`` re-sends the cache window to
      every new subscriber and IWANT answers from the cache, neither
      re-running the topic validators, so expired cards and ads would reach
      peers that then count them against us. Both read through
      ``mcache.get``; it is wrapped to re-validate each message first (sync
      validators; :meth:`P2PNode._still_valid`) and hand out none that fails.
    * Oversized inbound RPCs (> 1 MiB) are dropped inside libp2p
      (``MessageTooLarge``) before any validator runs; the read function is
      wrapped to penalise the sending peer (:func:`_install_oversize_watch`).

    Each patch checks that the internals it touches exist; a libp2p version
    other than :data:`VERIFIED_LIBP2P` is logged once, since these are
    internals (re-run the tests that measure them).
    """
    global _version_warned
    version = libp2p_version()
    if version not in VERIFIED_LIBP2P and not _version_warned:
        _version_warned = True
        log.warning("libp2p %s: quirk handling was verified against %s; check tests/test_mesh_abuse.py",
                    version, ", ".join(VERIFIED_LIBP2P))
    gs = node._gossipsub
    configured = node._config.heartbeat_interval
    if hasattr(gs, "adaptive_gossip_enabled"):
        gs.adaptive_gossip_enabled = False
    if hasattr(gs, "_adapt_heartbeat_parameters"):
        def keep_heartbeat(health: float) -> None:
            gs.heartbeat_interval = configured
        gs._adapt_heartbeat_parameters = keep_heartbeat
    gs.heartbeat_interval = configured
    if hasattr(gs, "heartbeat_interval_base"):
        gs.heartbeat_interval_base = configured
    mcache = getattr(gs, "mcache", None)
    original_get = getattr(mcache, "get", None)
    if original_get is None:
        log.warning("cannot re-validate the gossip cache (libp2p internals changed)")
    else:
        def get_if_valid(mid: bytes) -> Any:
            msg = original_get(mid)
            if msg is not None and not node._still_valid(msg):
                node.stale_not_resent += 1
                return None
            return msg
        mcache.get = get_if_valid
    _install_oversize_watch()
    # Blacklisting (every ban) tears the peer's pubsub stream down in a task
    # that awaits the reset and then does ``del pubsub.peers[peer]``; if the
    # stream's read loop has meanwhile removed the peer itself (a dead stream,
    # an oversized RPC), that ``del`` raises KeyError and takes the Pubsub
    # service, and with it the node, down (measured). Same steps, tolerant.
    pubsub = node._pubsub
    if hasattr(pubsub, "_teardown_if_connected") and hasattr(pubsub, "_forget_all_subscriptions"):
        async def teardown_if_connected(peer_id: ID) -> None:
            stream = pubsub.peers.get(peer_id)
            if stream is not None:
                try:
                    await stream.reset()
                except Exception:
                    pass
                if pubsub.peers.get(peer_id) is stream:
                    del pubsub.peers[peer_id]
            pubsub._forget_all_subscriptions(peer_id)
        pubsub._teardown_if_connected = teardown_if_connected  # type: ignore[method-assign]
    else:
        log.warning("cannot guard pubsub blacklist teardown (libp2p internals changed)")


_oversize_installed = False


def _install_oversize_watch() -> None:
    """Penalise a peer whose inbound pubsub RPC libp2p drops as too large.

    ``Pubsub.continuously_read_stream`` reads with the module-level
    ``read_varint_prefixed_bytes_limited``, catches ``MessageTooLarge``, logs
    and resets the stream: no validator, no penalty. The module function is
    wrapped once per process; the node owning the connection (one process
    may run several) is found by its connections.
    """
    global _oversize_installed
    if _oversize_installed:
        return
    import libp2p.pubsub.pubsub as pubsub_mod
    from libp2p.io.exceptions import MessageTooLarge
    original = getattr(pubsub_mod, "read_varint_prefixed_bytes_limited", None)
    if original is None:
        log.warning("cannot watch oversized gossip (libp2p internals changed)")
        return

    async def read_limited(reader: Any, max_length: int) -> bytes:
        try:
            return await original(reader, max_length)
        except MessageTooLarge:
            muxed = getattr(reader, "muxed_conn", None)
            pid = getattr(muxed, "peer_id", None)
            for node in list(_LIVE_NODES):
                if pid is not None and any(getattr(c, "muxed_conn", None) is muxed
                                           for c in node._conns.get(pid, {}).values()):
                    node.oversized_rpcs += 1
                    node.penalize(pid.to_base58(), node._config.oversized_rpc_points,
                                  "pubsub RPC over the 1 MiB limit")
            raise

    pubsub_mod.read_varint_prefixed_bytes_limited = read_limited  # type: ignore[assignment]
    _oversize_installed = True


def _parse_listen_addr(addr: str) -> multiaddr.Multiaddr:
    """``/ip4/<ip>/tcp/<port>`` or ``/ip6/<ip>/tcp/<port>``, else BAD_VALUE.

    libp2p would take more (and quietly: a ``/dns4/…`` listen address binds
    every interface, a failed bind only logs), so only plain TCP on an IP
    address is accepted.
    """
    if not isinstance(addr, str) or len(addr) > 256:
        raise AemError(BAD_VALUE, f"bad listen address: {addr!r}")
    try:
        ma = multiaddr.Multiaddr(addr)
        names = [p.name for p in ma.protocols()]
    except Exception as exc:
        raise AemError(BAD_VALUE, f"bad listen address {addr!r}: {exc}") from exc
    if names not in (["ip4", "tcp"], ["ip6", "tcp"]):
        raise AemError(BAD_VALUE, f"listen address must be /ip4|ip6/<ip>/tcp/<port>: {addr!r}")
    return ma


def _probe_listen_addrs(maddrs: Sequence[multiaddr.Multiaddr]) -> None:
    """UNAVAILABLE if we cannot listen on an address: not a local IP, or port taken.

    libp2p's TCP listener sets SO_REUSEPORT (for hole punching), so a second
    node on a taken port starts without error and the kernel splits inbound
    connections between the two. A probe bind without SO_REUSEPORT (but with
    SO_REUSEADDR, so a restart past TIME_WAIT connections works) fails on a
    port that has a listener, and on an IP this machine does not have. Best
    effort: a race with another starter remains.
    """
    for ma in maddrs:
        proto = ma.protocols()[0].name
        family = socket.AF_INET if proto == "ip4" else socket.AF_INET6
        host = ma.value_for_protocol(proto)
        port = int(ma.value_for_protocol("tcp"))
        probe = socket.socket(family, socket.SOCK_STREAM)
        try:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
        except OSError as exc:
            raise AemError(UNAVAILABLE, f"cannot listen on {ma}: {exc.strerror or exc}") from None
        finally:
            probe.close()


def _track_listeners(swarm: Any) -> list[Any]:
    """Record every listener the swarm creates, so all get closed.

    ``Swarm.listen`` drops a listener whose bind failed without closing it,
    and its system task (``TCPListener._run_server``) then lives until the
    process ends. Listener ``close()`` is idempotent.
    """
    created: list[Any] = []
    manager = getattr(swarm, "transport_manager", None)
    original = getattr(manager, "add_listen_addr", None)
    if original is None:
        log.warning("cannot track libp2p listeners (libp2p internals changed)")
        return created

    def add_listen_addr(*args: Any, **kwargs: Any) -> Any:
        listener = original(*args, **kwargs)
        if listener is not None:
            created.append(listener)
        return listener

    manager.add_listen_addr = add_listen_addr
    return created


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
# Staying connected


def backoff_delay(failures: int, base_delay: float, max_delay: float, rng: random.Random) -> float:
    """Delay before the next dial after ``failures`` consecutive failures.

    Exponential (``base_delay * 2**failures``, capped at ``max_delay``) with
    "equal jitter": uniformly in [d/2, d], so peers spread out but never
    hammer a dead address.
    """
    d = min(max_delay, base_delay * (2.0 ** min(max(failures, 0), 32)))
    return d / 2 + rng.uniform(0.0, d / 2)


async def keep_connected(
    node: P2PNode,
    multiaddrs: Sequence[str],
    *,
    base_delay: float = 0.5,
    max_delay: float = 30.0,
    stop_event: trio.Event | None = None,
    rng: random.Random | None = None,
    max_attempts: int | None = None,
) -> None:
    """Keep a connection to each peer named in ``multiaddrs`` until ``stop_event`` is set.

    Addresses are ``/…/p2p/<peer id>``; several for one peer are tried in
    turn, and the node's own id is skipped (one bootstrap list can serve every
    node). Per peer: dial at once if not connected; after a failed attempt
    (every address failed) wait :func:`backoff_delay` (growing with
    consecutive failures, jitter from ``rng``) and retry; when a connection
    drops, wait ``backoff_delay(failures)`` and redial, where a connection
    that lived less than ``max_delay`` counts as a failure (a flapping peer
    backs off too) and a longer one resets the count. Every dial clears the
    swarm's 60 s negative dial cache first (:meth:`P2PNode.connect`). Banned
    peers are not dialed until the ban ends. ``max_attempts`` (consecutive
    failures per peer) bounds the effort; None retries until stopped.
    Returns when ``stop_event`` is set, when every peer has exhausted
    ``max_attempts``, or when the node closes; cancellation works as usual.
    """
    if not 0 < base_delay <= max_delay:
        raise AemError(BAD_VALUE, "keep_connected needs 0 < base_delay <= max_delay")
    if max_attempts is not None and max_attempts <= 0:
        raise AemError(BAD_VALUE, "max_attempts must be positive")
    targets: dict[str, list[str]] = {}
    for maddr in multiaddrs:
        _, info = _parse_p2p_multiaddr(maddr)
        peer_id = info.peer_id.to_base58()
        if peer_id != node.peer_id and maddr not in targets.setdefault(peer_id, []):
            targets[peer_id].append(maddr)
    targets = {pid: addrs for pid, addrs in targets.items() if addrs}
    rng = rng if rng is not None else random.Random()
    stop = stop_event if stop_event is not None else trio.Event()

    async def watch_stop(scope: trio.CancelScope) -> None:
        await stop.wait()
        scope.cancel()

    async def dial_any(peer_id: str, addrs: list[str]) -> bool:
        for maddr in addrs:
            try:
                await node.connect(maddr)
                return True
            except AemError as exc:
                log.debug("dial %s failed: %s", maddr, exc)
        return False

    async def keep_one(peer_id: str, addrs: list[str]) -> None:
        failures = 0
        while node._running:
            if node.is_connected(peer_id):
                since = trio.current_time()
                await node.wait_disconnected(peer_id)
                failures = 0 if trio.current_time() - since >= max_delay else failures + 1
            elif not node.is_banned(peer_id) and await dial_any(peer_id, addrs):
                if node.is_connected(peer_id):
                    continue
                failures += 1  # connected and dropped at once: back off, no tight loop
            else:
                failures += 1
            if max_attempts is not None and failures >= max_attempts:
                log.info("giving up on %s after %d failures", peer_id, failures)
                return
            await trio.sleep(backoff_delay(failures, base_delay, max_delay, rng))

    try:
        async with trio.open_nursery() as outer:
            outer.start_soon(watch_stop, outer.cancel_scope)
            async with trio.open_nursery() as inner:
                for peer_id, addrs in targets.items():
                    inner.start_soon(keep_one, peer_id, addrs)
            outer.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        leaf = _single_leaf(group)
        if leaf is group:
            raise
        raise leaf from None
