"""Ed25519 wrappers and the hash function."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crypto.hashing import HASH_LEN, H
from crypto.keys import SigningKey, is_valid_public, verify_raw
from protocol.errors import BAD_KEY, BAD_SIGNATURE, BAD_VALUE, AemError

# RFC 8032 section 7.1, TEST 1 (empty message).
RFC8032_SEED = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
RFC8032_PUBLIC = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
RFC8032_SIG = bytes.fromhex(
    "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
)

KEY = SigningKey.generate()


def _code(fn, *args) -> str:
    with pytest.raises(AemError) as ei:
        fn(*args)
    return ei.value.code


def _flip(b: bytes, bit: int) -> bytes:
    out = bytearray(b)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


def test_hash_is_sha256() -> None:
    assert HASH_LEN == 32
    assert H(b"abc") == hashlib.sha256(b"abc").digest()
    assert len(H(b"")) == HASH_LEN


def test_rfc8032_vector() -> None:
    key = SigningKey.from_seed(RFC8032_SEED)
    assert key.seed == RFC8032_SEED
    assert key.public == RFC8032_PUBLIC
    assert key.sign_raw(b"") == RFC8032_SIG
    verify_raw(RFC8032_PUBLIC, b"", RFC8032_SIG)


def test_generate_and_from_seed_agree() -> None:
    key = SigningKey.generate()
    assert len(key.seed) == 32 and len(key.public) == 32
    again = SigningKey.from_seed(key.seed)
    assert again.public == key.public
    assert again == key
    assert SigningKey.generate() != key


def test_repr_hides_seed() -> None:
    assert KEY.seed.hex() not in repr(KEY)
    assert KEY.public.hex() in repr(KEY)


@settings(max_examples=100)
@given(msg=st.binary(max_size=256))
def test_round_trip(msg: bytes) -> None:
    sig = KEY.sign_raw(msg)
    assert len(sig) == 64
    verify_raw(KEY.public, msg, sig)
    verify_raw(bytearray(KEY.public), memoryview(msg), bytearray(sig))


@settings(max_examples=100)
@given(msg=st.binary(min_size=1, max_size=256), data=st.data())
def test_message_bit_flip_fails(msg: bytes, data: st.DataObject) -> None:
    sig = KEY.sign_raw(msg)
    bit = data.draw(st.integers(0, len(msg) * 8 - 1))
    assert _code(verify_raw, KEY.public, _flip(msg, bit), sig) == BAD_SIGNATURE


def test_every_signature_bit_flip_fails() -> None:
    msg = b"aem signature bit flips"
    sig = KEY.sign_raw(msg)
    for bit in range(64 * 8):
        assert _code(verify_raw, KEY.public, msg, _flip(sig, bit)) == BAD_SIGNATURE


def test_every_public_key_bit_flip_fails() -> None:
    msg = b"aem key bit flips"
    sig = KEY.sign_raw(msg)
    for bit in range(32 * 8):
        # A flipped key either stops being a curve point or is someone else's key.
        assert _code(verify_raw, _flip(KEY.public, bit), msg, sig) in (BAD_KEY, BAD_SIGNATURE)


def test_other_key_fails() -> None:
    sig = KEY.sign_raw(b"m")
    assert _code(verify_raw, SigningKey.generate().public, b"m", sig) == BAD_SIGNATURE


@pytest.mark.parametrize("n", [0, 1, 31, 33, 64])
def test_bad_key_length(n: int) -> None:
    sig = KEY.sign_raw(b"m")
    assert _code(verify_raw, bytes(n), b"m", sig) == BAD_KEY
    assert not is_valid_public(bytes(n))
    assert _code(SigningKey.from_seed, bytes(n)) == BAD_KEY


@pytest.mark.parametrize("junk", [None, "00" * 32, 7, [0] * 32])
def test_non_bytes_key(junk: object) -> None:
    sig = KEY.sign_raw(b"m")
    assert _code(verify_raw, junk, b"m", sig) == BAD_KEY
    assert not is_valid_public(junk)
    assert _code(SigningKey.from_seed, junk) == BAD_KEY


@pytest.mark.parametrize("n", [0, 1, 63, 65, 128])
def test_bad_signature_length(n: int) -> None:
    assert _code(verify_raw, KEY.public, b"m", bytes(n)) == BAD_SIGNATURE
    assert _code(verify_raw, KEY.public, b"m", None) == BAD_SIGNATURE


def test_non_bytes_message() -> None:
    sig = KEY.sign_raw(b"m")
    assert _code(verify_raw, KEY.public, "m", sig) == BAD_VALUE
    assert _code(KEY.sign_raw, "m") == BAD_VALUE


def test_non_canonical_point_is_bad_key() -> None:
    # y = p is the non-canonical encoding of y = 0, which RFC 8032 rejects.
    y_is_p = (2**255 - 19).to_bytes(32, "little")
    assert not is_valid_public(y_is_p)
    assert _code(verify_raw, y_is_p, b"m", bytes(64)) == BAD_KEY


def test_generated_keys_are_valid_points() -> None:
    for _ in range(50):
        assert is_valid_public(SigningKey.generate().public)


@settings(max_examples=100)
@given(b=st.binary(min_size=32, max_size=32))
def test_random_key_bytes_never_escape(b: bytes) -> None:
    # About half of all 32-byte strings are not points; those must be BAD_KEY,
    # the rest a plain signature failure.
    code = _code(verify_raw, b, b"m", KEY.sign_raw(b"m")) if b != KEY.public else BAD_SIGNATURE
    assert code == (BAD_SIGNATURE if is_valid_public(b) else BAD_KEY)
