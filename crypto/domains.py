"""Every signing domain of aem, and the one function that builds signable bytes.

A signature is Ed25519 over

    "aem-sig-v1" || 0x00 || u8(len(tag)) || tag || u8(len(net)) || net || body

where ``tag`` is the object's type name (ASCII), ``net`` the 32-byte network id
(empty for the genesis, which defines it) and ``body`` the canonical msgpack
of the object without its ``sig`` field. The length prefixes make the
concatenation unambiguous, so a signature made for one type or one network
can never verify as another. Nothing else in aem builds bytes to sign.
"""

from __future__ import annotations

from crypto.keys import verify_raw
from protocol import errors
from protocol.errors import AemError

PREFIX = b"aem-sig-v1\x00"

# The type tags that may be signed. An object type missing here cannot be
# signed or verified, which keeps this list the complete inventory.
TAGS = frozenset({
    "genesis",
    "node_card",
    "host_ad",
    "capsule_manifest",
    "task",
    "spend_auth",
    "inference_receipt",
    "receipt_ack",
    "contribution",
    "contribution_attest",   # a verifier's attestation of a measured delta
    "admission",
    "challenge",
    "dispute",
    "transfer",
    "route_trace",
    "entry",
    "checkpoint",            # an author's signed Merkle root of its log (protocol/checkpoint.py)
})


def signable(tag: str, net: bytes, body: bytes) -> bytes:
    if tag not in TAGS:
        raise AemError(errors.BAD_VALUE, f"no signing domain for {tag!r}")
    if len(net) not in (0, 32):
        raise AemError(errors.BAD_VALUE, "network id must be 32 bytes")
    t = tag.encode("ascii")
    return PREFIX + bytes([len(t)]) + t + bytes([len(net)]) + net + body


def verify(public: bytes, message: bytes, sig: bytes) -> None:
    """Verify an Ed25519 signature over bytes built by :func:`signable`."""
    verify_raw(public, message, sig)
