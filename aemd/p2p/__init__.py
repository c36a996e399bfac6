"""The networking shell: one py-libp2p host, its whole life, its sharp edges hidden.

This package moves bytes. It knows nothing of aem's wire objects: the caller
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


Where each concept lives (a newcomer's map; every name is importable from
``aemd.p2p``, which is the only import the rest of aemd needs):

    host.py       P2PNode, open_p2p: the host's life, connections, peer events,
                  and applying penalties and bans
    pubsub.py     subscriptions, validators, publishing (a P2PNode mixin)
    streams.py    served-stream limits and deadlines, opening streams (a mixin)
    peerscore.py  penalties and bans as a pure table (no trio, no libp2p)
    identity.py   the host key from the node seed, peer ids, /p2p/ multiaddrs
    redial.py     keep_connected: the redial loop with backoff and jitter
    settings.py   P2PConfig: every limit and timer, with its default
    quirks.py     py-libp2p's sharp edges, the patches for them, the version check
"""

from __future__ import annotations

from aemd.p2p.host import CONNECTED, DISCONNECTED, P2PNode, PeerEvent, _single_leaf, open_p2p
from aemd.p2p.identity import (
    _parse_p2p_multiaddr,
    _parse_peer_id,
    host_key_pair,
    peer_id_from_public,
    public_from_peer_id,
)
from aemd.p2p.peerscore import PeerScore, Penalty
from aemd.p2p.pubsub import Subscription, Validator
from aemd.p2p.quirks import (
    VERIFIED_LIBP2P,
    _parse_listen_addr,
    _probe_listen_addrs,
    check_libp2p_version,
    libp2p_version,
    quiet_libp2p_logging,
)
from aemd.p2p.redial import backoff_delay, keep_connected
from aemd.p2p.settings import MAX_PUBLISH_BYTES, PUBSUB_RPC_LIMIT, P2PConfig
from aemd.p2p.streams import StreamHandler

__all__ = [
    "CONNECTED",
    "DISCONNECTED",
    "MAX_PUBLISH_BYTES",
    "PUBSUB_RPC_LIMIT",
    "VERIFIED_LIBP2P",
    "P2PConfig",
    "P2PNode",
    "PeerEvent",
    "PeerScore",
    "Penalty",
    "StreamHandler",
    "Subscription",
    "Validator",
    "backoff_delay",
    "check_libp2p_version",
    "host_key_pair",
    "keep_connected",
    "libp2p_version",
    "open_p2p",
    "peer_id_from_public",
    "public_from_peer_id",
    "quiet_libp2p_logging",
]
# Private names other aemd modules and tests reach for, kept importable here.
_PRIVATE_REEXPORTS = (_parse_p2p_multiaddr, _parse_peer_id, _parse_listen_addr,
                      _probe_listen_addrs, _single_leaf)
