"""The quirk notebook: py-libp2p's sharp edges and the workarounds for them.

Every monkeypatch of libp2p internals lives here, with the measurement that
made it necessary. The workarounds that live elsewhere (in the host, pubsub
and stream modules) are listed too, so this is the one page to re-read when
libp2p changes: :func:`check_libp2p_version` refuses to start on a version
not in :data:`VERIFIED_LIBP2P`.

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
    libp2p other than :data:`VERIFIED_LIBP2P` is refused at start
    (:func:`check_libp2p_version`; tests/test_mesh_abuse.py measures each
    quirk, re-run it before adding a version).
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
import logging
import os
import socket
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import multiaddr
from libp2p.peer.id import ID

from protocol.errors import BAD_VALUE, UNAVAILABLE, AemError

if TYPE_CHECKING:
    from aemd.p2p.host import P2PNode

log = logging.getLogger("aemd.p2p")

#: py-libp2p versions whose internals the quirk handling below was checked
#: against (tests/test_mesh_abuse.py measures each quirk).
VERIFIED_LIBP2P = ("0.8.1",)
#: Set to 1 to run on a libp2p version the quirks were not checked against
#: (then run tests/test_mesh_abuse.py and add the version above).
UNVERIFIED_ENV = "AEM_ALLOW_UNVERIFIED_LIBP2P"
_LIVE_NODES: weakref.WeakSet[P2PNode] = weakref.WeakSet()
_version_warned = False


def libp2p_version() -> str:
    try:
        return importlib.metadata.version("libp2p")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def check_libp2p_version(version: str | None = None) -> str:
    """The installed libp2p version, or AemError(UNAVAILABLE) if the quirks
    here were not verified against it.

    The workarounds patch libp2p internals; on another version they may patch
    nothing (each logs when what it touches is missing) or the wrong thing, and
    the node would lose messages silently. Failing loudly at start is cheaper
    than that; ``AEM_ALLOW_UNVERIFIED_LIBP2P=1`` overrides (logged once).
    """
    global _version_warned
    version = libp2p_version() if version is None else version
    if version in VERIFIED_LIBP2P:
        return version
    if os.environ.get(UNVERIFIED_ENV) == "1":
        if not _version_warned:
            _version_warned = True
            log.warning("libp2p %s: quirk handling was verified against %s; check tests/test_mesh_abuse.py",
                        version, ", ".join(VERIFIED_LIBP2P))
        return version
    raise AemError(UNAVAILABLE, f"libp2p {version} is not one the aem quirk handling was verified"
                                f" against ({', '.join(VERIFIED_LIBP2P)}); run tests/test_mesh_abuse.py"
                                f" and add it to VERIFIED_LIBP2P, or set {UNVERIFIED_ENV}=1")


def quiet_libp2p_logging(level: int = logging.CRITICAL) -> None:
    """Set the ``libp2p`` logger tree to ``level`` and route it to the app's handlers."""
    lg = logging.getLogger("libp2p")
    lg.setLevel(level)
    lg.propagate = True


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


async def _no_auto_connect() -> None:
    return None


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
    other than :data:`VERIFIED_LIBP2P` is refused before the host is made
    (:func:`check_libp2p_version`, called by ``open_p2p``), since these are
    internals (re-run the tests that measure them).
    """
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
