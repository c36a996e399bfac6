"""Ed25519 keys: thin wrappers over ``cryptography``.

These sign and verify raw bytes. Nothing outside ``crypto/`` should call
``sign_raw`` or ``verify_raw`` directly: signable bytes are built, with their
domain tag, in ``crypto/domains.py``.
"""

from __future__ import annotations

import functools
import hmac

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from protocol.errors import BAD_KEY, BAD_SIGNATURE, BAD_VALUE, AemError

SEED_LEN = 32
PUBLIC_LEN = 32
SIGNATURE_LEN = 64

# Curve constants for the point decoding of RFC 8032 section 5.1.3.
_P = 2**255 - 19
_D = (-121665 * pow(121666, _P - 2, _P)) % _P
_SQRT_M1 = pow(2, (_P - 1) // 4, _P)


class SigningKey:
    """An Ed25519 private key. Construct with :meth:`generate` or :meth:`from_seed`."""

    __slots__ = ("_private", "public")

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._private = private
        self.public: bytes = private.public_key().public_bytes_raw()

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> SigningKey:
        """The key whose RFC 8032 private seed is ``seed`` (32 bytes)."""
        if not isinstance(seed, (bytes, bytearray, memoryview)) or len(seed) != SEED_LEN:
            raise AemError(BAD_KEY, f"an Ed25519 seed is {SEED_LEN} bytes")
        return cls(Ed25519PrivateKey.from_private_bytes(bytes(seed)))

    @property
    def seed(self) -> bytes:
        """The raw 32-byte private seed. Handle with care: it is the identity."""
        return self._private.private_bytes_raw()

    def sign_raw(self, msg: bytes) -> bytes:
        """A 64-byte Ed25519 signature over exactly ``msg`` (no domain tag added)."""
        if not isinstance(msg, (bytes, bytearray, memoryview)):
            raise AemError(BAD_VALUE, "can only sign bytes")
        return self._private.sign(bytes(msg))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SigningKey):
            return NotImplemented
        return hmac.compare_digest(self.seed, other.seed)

    def __hash__(self) -> int:
        return hash(self.public)

    def __repr__(self) -> str:
        # Never the seed: reprs end up in logs and tracebacks.
        return f"SigningKey(public={self.public.hex()})"


def _is_canonical_point(b: bytes) -> bool:
    """Whether ``b`` decodes to a curve point per RFC 8032 section 5.1.3.

    OpenSSL accepts any 32 bytes as a public key and only fails at verify
    time; decoding here lets a malformed key be named BAD_KEY when it arrives.
    """
    y = int.from_bytes(b, "little") & ((1 << 255) - 1)
    sign = b[31] >> 7
    if y >= _P:
        return False
    u = (y * y - 1) % _P
    v = (_D * y * y + 1) % _P
    x = (u * pow(v, 3, _P) * pow(u * pow(v, 7, _P), (_P - 5) // 8, _P)) % _P
    vx2 = (v * x * x) % _P
    if vx2 == u:
        pass
    elif vx2 == (-u) % _P:
        x = (x * _SQRT_M1) % _P
    else:
        return False
    return not (x == 0 and sign == 1)


@functools.lru_cache(maxsize=4096)
def _public_key(public: bytes) -> Ed25519PublicKey:
    # Ledger replay verifies many signatures by few authors; caching the decoded
    # key spares the point check. Only successes are cached (lru_cache does not
    # cache exceptions), and the key is immutable, so nothing stale can be served.
    if not _is_canonical_point(public):
        raise AemError(BAD_KEY, "public key is not a valid Ed25519 point")
    return Ed25519PublicKey.from_public_bytes(public)


def _as_bytes(b: object) -> bytes | None:
    if isinstance(b, bytes):
        return b
    if isinstance(b, (bytearray, memoryview)):
        return bytes(b)
    return None


def is_valid_public(b: object) -> bool:
    """Whether ``b`` is 32 bytes encoding a valid Ed25519 public key."""
    pb = _as_bytes(b)
    if pb is None or len(pb) != PUBLIC_LEN:
        return False
    try:
        _public_key(pb)
    except AemError:
        return False
    return True


def verify_raw(public: bytes, msg: bytes, sig: bytes) -> None:
    """Check an Ed25519 signature over exactly ``msg``.

    Raises AemError BAD_KEY for a malformed public key, BAD_SIGNATURE for a
    signature that is malformed or does not verify, BAD_VALUE for a non-bytes
    message.
    """
    pb = _as_bytes(public)
    if pb is None or len(pb) != PUBLIC_LEN:
        raise AemError(BAD_KEY, f"an Ed25519 public key is {PUBLIC_LEN} bytes")
    sb = _as_bytes(sig)
    if sb is None or len(sb) != SIGNATURE_LEN:
        raise AemError(BAD_SIGNATURE, f"an Ed25519 signature is {SIGNATURE_LEN} bytes")
    mb = _as_bytes(msg)
    if mb is None:
        raise AemError(BAD_VALUE, "can only verify a signature over bytes")
    key = _public_key(pb)
    try:
        key.verify(sb, mb)
    except InvalidSignature:
        raise AemError(BAD_SIGNATURE, "signature does not verify") from None
