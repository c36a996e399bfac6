"""The keystore file that holds a node's Ed25519 seed.

A small JSON document, version 1::

    {"version": 1, "public": "<64 hex>", "kdf": null, "seed": "<64 hex>"}

or, with a passphrase::

    {"version": 1, "public": "<64 hex>",
     "kdf": {"name": "scrypt", "n": 32768, "r": 8, "p": 1, "salt": "<32 hex>"},
     "cipher": {"name": "chacha20-poly1305", "nonce": "<24 hex>"},
     "ciphertext": "<96 hex>"}

The passphrase (UTF-8, NFC-normalised) goes through scrypt to a 32-byte key;
ChaCha20-Poly1305 seals the seed with the public key as associated data, so a
file whose public key was swapped does not open. The file is created 0600 and
replaced atomically, and a file that group or others can access is refused.
"""

from __future__ import annotations

import json
import re
import secrets
import unicodedata
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from crypto.keys import PUBLIC_LEN, SEED_LEN, SigningKey
from protocol.errors import BAD_PASSPHRASE, KEYSTORE, AemError

VERSION = 1
SCRYPT_N = 2**15
SCRYPT_R = 8
SCRYPT_P = 1
SALT_LEN = 16
NONCE_LEN = 12
KEY_LEN = 32
TAG_LEN = 16

# A keystore is a few hundred bytes; anything much larger is not one.
MAX_FILE_BYTES = 64 * 1024
# Bounds on the KDF parameters a file may ask for, so that a planted file cannot
# make reading it take minutes or gigabytes (memory is about 128 * n * r bytes).
MAX_SCRYPT_N = 2**20
MIN_SCRYPT_N = 2**10
MAX_SCRYPT_R = 32
MAX_SCRYPT_P = 16
MAX_SCRYPT_MEM = 256 * 1024 * 1024

_CIPHER_NAME = "chacha20-poly1305"
_KDF_NAME = "scrypt"


def _hex_re(nbytes: int) -> re.Pattern[str]:
    return re.compile(f"[0-9a-f]{{{2 * nbytes}}}")


_PUBLIC_RE = _hex_re(PUBLIC_LEN)
_SEED_RE = _hex_re(SEED_LEN)
_SALT_RE = _hex_re(SALT_LEN)
_NONCE_RE = _hex_re(NONCE_LEN)
_CIPHERTEXT_RE = _hex_re(SEED_LEN + TAG_LEN)


def _passphrase_bytes(passphrase: str) -> bytes:
    if not isinstance(passphrase, str):
        raise AemError(BAD_PASSPHRASE, "passphrase must be a string")
    try:
        # The same passphrase typed on two systems may arrive composed or decomposed.
        return unicodedata.normalize("NFC", passphrase).encode("utf-8")
    except UnicodeEncodeError:
        raise AemError(BAD_PASSPHRASE, "passphrase is not valid Unicode text") from None


def _derive(passphrase: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    secret = _passphrase_bytes(passphrase)
    try:
        return Scrypt(salt=salt, length=KEY_LEN, n=n, r=r, p=p).derive(secret)
    except (ValueError, MemoryError) as e:
        raise AemError(KEYSTORE, f"scrypt failed: {e}") from None


def encode_keystore(key: SigningKey, passphrase: str | None) -> bytes:
    """The keystore document for ``key``, sealed when ``passphrase`` is given."""
    if not isinstance(key, SigningKey):
        raise AemError(KEYSTORE, "a keystore holds a SigningKey")
    doc: dict[str, Any] = {"version": VERSION, "public": key.public.hex()}
    if passphrase is None:
        doc["kdf"] = None
        doc["seed"] = key.seed.hex()
    else:
        if passphrase == "":
            # An empty passphrase gives the look of encryption and none of its worth.
            raise AemError(BAD_PASSPHRASE, "empty passphrase; pass None for an unencrypted keystore")
        salt = secrets.token_bytes(SALT_LEN)
        nonce = secrets.token_bytes(NONCE_LEN)
        k = _derive(passphrase, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
        ct = ChaCha20Poly1305(k).encrypt(nonce, key.seed, key.public)
        doc["kdf"] = {"name": _KDF_NAME, "n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P, "salt": salt.hex()}
        doc["cipher"] = {"name": _CIPHER_NAME, "nonce": nonce.hex()}
        doc["ciphertext"] = ct.hex()
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode("ascii")



#: The name this module used before the file I/O moved to aemd.keyfile.
_encode = encode_keystore


def _bad(path: str, why: str) -> AemError:
    return AemError(KEYSTORE, f"keystore {path} is malformed: {why}")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _hex_field(obj: dict[str, Any], name: str, pattern: re.Pattern[str], path: str) -> bytes:
    v = obj.get(name)
    if not isinstance(v, str) or not pattern.fullmatch(v):
        raise _bad(path, f"{name!r} is not {pattern.pattern}")
    return bytes.fromhex(v)


def _parse(raw: bytes, path: str) -> dict[str, Any]:
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):
        raise _bad(path, "not a JSON document") from None
    if not isinstance(doc, dict):
        raise _bad(path, "not a JSON object")
    if doc.get("version") != VERSION or not _is_int(doc.get("version")):
        raise _bad(path, f"unsupported version {doc.get('version')!r}")
    kdf = doc.get("kdf", "missing")
    out: dict[str, Any] = {"public": _hex_field(doc, "public", _PUBLIC_RE, path)}
    if kdf is None:
        if set(doc) != {"version", "public", "kdf", "seed"}:
            raise _bad(path, "unexpected or missing fields")
        out["seed"] = _hex_field(doc, "seed", _SEED_RE, path)
        return out
    if set(doc) != {"version", "public", "kdf", "cipher", "ciphertext"}:
        raise _bad(path, "unexpected or missing fields")
    if not isinstance(kdf, dict) or set(kdf) != {"name", "n", "r", "p", "salt"} or kdf["name"] != _KDF_NAME:
        raise _bad(path, "kdf must be scrypt with n, r, p and salt")
    n, r, p = kdf["n"], kdf["r"], kdf["p"]
    if not (_is_int(n) and _is_int(r) and _is_int(p)):
        raise _bad(path, "scrypt parameters must be integers")
    if (
        not MIN_SCRYPT_N <= n <= MAX_SCRYPT_N
        or n & (n - 1)
        or not 1 <= r <= MAX_SCRYPT_R
        or not 1 <= p <= MAX_SCRYPT_P
        or 128 * n * r * p > MAX_SCRYPT_MEM
    ):
        raise _bad(path, "scrypt parameters out of bounds")
    cipher = doc["cipher"]
    if not isinstance(cipher, dict) or set(cipher) != {"name", "nonce"} or cipher["name"] != _CIPHER_NAME:
        raise _bad(path, f"cipher must be {_CIPHER_NAME} with a nonce")
    out["kdf"] = (_hex_field(kdf, "salt", _SALT_RE, path), n, r, p)
    out["nonce"] = _hex_field(cipher, "nonce", _NONCE_RE, path)
    out["ciphertext"] = _hex_field(doc, "ciphertext", _CIPHERTEXT_RE, path)
    return out


def decode_keystore(raw: bytes, passphrase: str | None = None, name: str = "keystore") -> SigningKey:
    """The signing key in the keystore document ``raw``.

    ``name`` (the file's path) only goes into error messages. Raises AemError
    KEYSTORE for a malformed document, BAD_PASSPHRASE when it is encrypted and
    the passphrase is missing or wrong. A passphrase given for an unencrypted
    document is ignored.
    """
    if len(raw) > MAX_FILE_BYTES:
        raise AemError(KEYSTORE, f"keystore {name} is too large to be a keystore")
    doc = _parse(raw, name)
    spath = name
    public: bytes = doc["public"]
    if "seed" in doc:
        seed: bytes = doc["seed"]
    else:
        if passphrase is None:
            raise AemError(BAD_PASSPHRASE, f"keystore {spath} is encrypted; a passphrase is needed")
        salt, n, r, p = doc["kdf"]
        k = _derive(passphrase, salt, n, r, p)
        try:
            seed = ChaCha20Poly1305(k).decrypt(doc["nonce"], doc["ciphertext"], public)
        except InvalidTag:
            # Poly1305 cannot tell a wrong passphrase from a tampered file.
            raise AemError(BAD_PASSPHRASE, f"wrong passphrase for keystore {spath} (or the file was altered)") from None
    key = SigningKey.from_seed(seed)
    if key.public != public:
        raise AemError(KEYSTORE, f"keystore {spath}: stored public key does not match the seed")
    return key


def is_encrypted(raw: bytes, name: str = "keystore") -> bool:
    """Whether the keystore document ``raw`` needs a passphrase (KEYSTORE if malformed)."""
    if len(raw) > MAX_FILE_BYTES:
        raise AemError(KEYSTORE, f"keystore {name} is too large to be a keystore")
    return "seed" not in _parse(raw, name)

