"""The networking shell's limits and timers (:class:`P2PConfig`), with their defaults.

Why each default is what it is: see :mod:`aemd.p2p.quirks` (most of them
undo a libp2p default that loses messages quietly).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from protocol.errors import BAD_VALUE, AemError

#: libp2p's limit for one outbound pubsub RPC (payload plus envelope).
PUBSUB_RPC_LIMIT = 1024 * 1024
#: Largest payload :meth:`P2PNode.publish` accepts: under the RPC limit with
#: room for signature, key, topic, seqno and the signed peer record.
MAX_PUBLISH_BYTES = 1_000_000


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
