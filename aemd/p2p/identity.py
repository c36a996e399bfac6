"""Identity: the node's Ed25519 key as the libp2p host key, and peer ids.

The peer id is stable (it follows from the node key) and equals
:func:`peer_id_from_public` of it; ``libp2p.save_keypair``/``load_keypair``
(fixed path) are not used. Peer ids cross the API as base58 strings.
"""

from __future__ import annotations

from typing import Any

import multiaddr
from libp2p.crypto.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from libp2p.crypto.keys import KeyPair
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr

from protocol.errors import BAD_KEY, BAD_VALUE, AemError


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
