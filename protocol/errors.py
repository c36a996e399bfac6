"""The one error family of aem.

Every failure that a peer or a user can cause is an :class:`AemError` with a
stable string ``code``. Callers branch on the code, the CLI prints
``code: message``, and tests assert on the code, never on message text.
"""

from __future__ import annotations


class AemError(Exception):
    """A typed, expected failure: bad input, a refused operation, a missing file.

    ``code`` is one of the constants below (upper-case, stable across versions).
    ``detail`` is a short human-readable explanation.
    """

    def __init__(self, code: str, detail: str = "") -> None:
        self.code = code
        self.detail = detail
        super().__init__(f"{code}: {detail}" if detail else code)


# Decoding and validation of wire objects.
TOO_LARGE = "TOO_LARGE"                # input longer than the object's size limit
BAD_ENCODING = "BAD_ENCODING"          # not decodable msgpack, bad UTF-8, ext types
NOT_CANONICAL = "NOT_CANONICAL"        # decodes, but re-encoding gives other bytes
TRAILING_BYTES = "TRAILING_BYTES"      # bytes left after one complete value
TOO_DEEP = "TOO_DEEP"                  # nesting beyond the limit
FLOAT_FORBIDDEN = "FLOAT_FORBIDDEN"    # a float anywhere
BAD_TYPE = "BAD_TYPE"                  # a field of the wrong msgpack type
UNKNOWN_FIELD = "UNKNOWN_FIELD"        # a key the schema does not name
MISSING_FIELD = "MISSING_FIELD"        # a key the schema requires is absent
BAD_VALUE = "BAD_VALUE"                # right type, value out of range or malformed
WRONG_OBJECT = "WRONG_OBJECT"          # `type` or `version` is not the one expected

# Signatures, keys and identity.
BAD_SIGNATURE = "BAD_SIGNATURE"
BAD_KEY = "BAD_KEY"
WRONG_NETWORK = "WRONG_NETWORK"        # object names another genesis id
EXPIRED = "EXPIRED"
BAD_PASSPHRASE = "BAD_PASSPHRASE"
KEYSTORE = "KEYSTORE"                  # keystore file unreadable or malformed

# Merkle proofs.
BAD_PROOF = "BAD_PROOF"

# Log store and ledger.
BAD_CHAIN = "BAD_CHAIN"                # prev hash or seq does not link
EQUIVOCATION = "EQUIVOCATION"
STORE = "STORE"                        # store file missing, locked, corrupt
INVARIANT = "INVARIANT"                # a ledger invariant failed: a bug, never bad input

# Node, CLI, config.
CONFIG = "CONFIG"
NOT_FOUND = "NOT_FOUND"
NO_NODE = "NO_NODE"                    # no daemon answers on the control socket
REFUSED = "REFUSED"
TIMEOUT = "TIMEOUT"
UNAVAILABLE = "UNAVAILABLE"
INTERNAL = "INTERNAL"                  # an unexpected failure (a bug), reported instead of crashing
