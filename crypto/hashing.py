"""The one hash function of aem: SHA-256.

Every id, Merkle node and state root is ``H`` of some bytes, so changing the hash
means changing this file and nothing else.
"""

from __future__ import annotations

import hashlib

HASH_LEN = 32


def H(data: bytes) -> bytes:  # noqa: N802 (the name is the notation used in specs/)
    """SHA-256 of ``data``: 32 bytes."""
    return hashlib.sha256(data).digest()
