"""The keystore file: round trips, permissions, and refusal of bad files."""

from __future__ import annotations

import json
import os
import stat
import unicodedata
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crypto.keys import SigningKey
from aemd.keyfile import keystore_is_encrypted, read_keystore, write_keystore
from protocol.errors import BAD_PASSPHRASE, KEYSTORE, AemError

posix_only = pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX")

KEY = SigningKey.generate()
PASS = "correct horse battery staple"


def _code(fn, *args) -> str:
    with pytest.raises(AemError) as ei:
        fn(*args)
    return ei.value.code


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _write_raw(path: Path, data: bytes) -> None:
    """Put arbitrary bytes at ``path`` with mode 0600, as a test fixture."""
    if path.exists():
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


@pytest.fixture(scope="module")
def encrypted_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    # scrypt at n=2**15 costs tens of milliseconds; encrypt once per module.
    path = tmp_path_factory.mktemp("ks") / "enc.json"
    write_keystore(path, KEY, PASS)
    return path.read_bytes()


@posix_only
def test_plain_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    write_keystore(path, KEY, None)
    assert _mode(path) == 0o600
    assert not keystore_is_encrypted(path)
    assert read_keystore(path) == KEY
    # A passphrase offered for a plain file is not needed, and not an error.
    assert read_keystore(path, "anything") == KEY
    doc = json.loads(path.read_bytes())
    assert doc["public"] == KEY.public.hex()
    assert doc["seed"] == KEY.seed.hex()


@posix_only
def test_encrypted_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    write_keystore(str(path), KEY, PASS)
    assert _mode(path) == 0o600
    assert keystore_is_encrypted(path)
    assert KEY.seed.hex() not in path.read_text()
    assert read_keystore(path, PASS) == KEY


@posix_only
def test_mode_is_0600_under_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        write_keystore(tmp_path / "k", KEY, None)
    finally:
        os.umask(old)
    assert _mode(tmp_path / "k") == 0o600


def test_atomic_replace_leaves_no_temp_files(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    write_keystore(path, KEY, None)
    other = SigningKey.generate()
    write_keystore(path, other, None)
    assert read_keystore(path) == other
    assert sorted(p.name for p in tmp_path.iterdir()) == ["node.key"]


def test_wrong_or_missing_passphrase(tmp_path: Path, encrypted_bytes: bytes) -> None:
    path = tmp_path / "k"
    _write_raw(path, encrypted_bytes)
    assert _code(read_keystore, path, "wrong") == BAD_PASSPHRASE
    assert _code(read_keystore, path, None) == BAD_PASSPHRASE
    assert _code(read_keystore, path, "") == BAD_PASSPHRASE
    assert _code(read_keystore, path, 42) == BAD_PASSPHRASE
    assert _code(read_keystore, path, "\udcff") == BAD_PASSPHRASE


def test_passphrase_unicode_normalisation(tmp_path: Path) -> None:
    path = tmp_path / "k"
    composed = "caf\u00e9"
    write_keystore(path, KEY, composed)
    assert read_keystore(path, unicodedata.normalize("NFD", composed)) == KEY


def test_empty_passphrase_refused_on_write(tmp_path: Path) -> None:
    assert _code(write_keystore, tmp_path / "k", KEY, "") == BAD_PASSPHRASE
    assert not (tmp_path / "k").exists()


def test_missing_file_and_directory(tmp_path: Path) -> None:
    assert _code(read_keystore, tmp_path / "absent") == KEYSTORE
    assert _code(keystore_is_encrypted, tmp_path / "absent") == KEYSTORE
    assert _code(read_keystore, tmp_path) == KEYSTORE
    assert _code(write_keystore, tmp_path / "no" / "such" / "dir", KEY, None) == KEYSTORE


@posix_only
@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o620, 0o602, 0o700 | 0o044])
def test_file_open_to_group_or_others_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "k"
    write_keystore(path, KEY, None)
    os.chmod(path, mode)
    assert _code(read_keystore, path) == KEYSTORE
    assert _code(keystore_is_encrypted, path) == KEYSTORE
    os.chmod(path, 0o600)
    assert read_keystore(path) == KEY


@posix_only
def test_fifo_refused_without_hanging(tmp_path: Path) -> None:
    path = tmp_path / "fifo"
    os.mkfifo(path, 0o600)
    assert _code(read_keystore, path) == KEYSTORE


@pytest.mark.parametrize("passphrase", [None, PASS])
def test_every_truncation_is_keystore(tmp_path: Path, encrypted_bytes: bytes, passphrase: str | None) -> None:
    path = tmp_path / "k"
    if passphrase is None:
        write_keystore(path, KEY, None)
        data = path.read_bytes()
    else:
        data = encrypted_bytes
    for cut in range(len(data)):
        _write_raw(path, data[:cut])
        if data[:cut].rstrip() == data.rstrip():
            continue  # only trailing whitespace lost: still the whole document
        assert _code(read_keystore, path, passphrase) == KEYSTORE, cut


@settings(max_examples=100, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=2048))
def test_garbage_is_keystore(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "k"
    _write_raw(path, data)
    assert _code(read_keystore, path, PASS) == KEYSTORE
    assert _code(keystore_is_encrypted, path) == KEYSTORE


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=70),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)


@settings(max_examples=100, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(["version", "public", "kdf", "seed", "extra"]), value=_json)
def test_mutated_plain_document_is_keystore(tmp_path: Path, field: str, value: object) -> None:
    doc = {"version": 1, "public": KEY.public.hex(), "kdf": None, "seed": KEY.seed.hex()}
    if doc.get(field, object()) == value and type(doc.get(field)) is type(value):
        return
    doc[field] = value
    path = tmp_path / "k"
    _write_raw(path, json.dumps(doc).encode())
    assert _code(read_keystore, path) == KEYSTORE


def _edit(tmp_path: Path, encrypted_bytes: bytes, edit) -> Path:
    doc = json.loads(encrypted_bytes)
    edit(doc)
    path = tmp_path / "k"
    _write_raw(path, json.dumps(doc).encode())
    return path


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: d["kdf"].__setitem__("n", 2**30),  # would take gigabytes
        lambda d: d["kdf"].__setitem__("n", 3 * 2**14),  # not a power of two
        lambda d: d["kdf"].__setitem__("r", 0),
        lambda d: d["kdf"].__setitem__("p", 10**6),
        lambda d: d["kdf"].__setitem__("n", 2.0**15),
        lambda d: d["kdf"].__setitem__("name", "argon2id"),
        lambda d: d["kdf"].__setitem__("salt", "00"),
        lambda d: d["cipher"].__setitem__("name", "aes-gcm"),
        lambda d: d["cipher"].__setitem__("nonce", d["cipher"]["nonce"].upper()),
        lambda d: d.__setitem__("ciphertext", d["ciphertext"][:-2]),
        lambda d: d.__setitem__("seed", KEY.seed.hex()),
        lambda d: d.pop("cipher"),
        lambda d: d.__setitem__("version", 2),
        lambda d: d.__setitem__("version", True),
    ],
)
def test_malformed_encrypted_document_is_keystore(tmp_path: Path, encrypted_bytes: bytes, edit) -> None:
    path = _edit(tmp_path, encrypted_bytes, edit)
    assert _code(read_keystore, path, PASS) == KEYSTORE


def test_tampered_ciphertext_or_public_does_not_open(tmp_path: Path, encrypted_bytes: bytes) -> None:
    def flip_ct(d: dict) -> None:
        ct = bytearray.fromhex(d["ciphertext"])
        ct[0] ^= 1
        d["ciphertext"] = ct.hex()

    path = _edit(tmp_path, encrypted_bytes, flip_ct)
    assert _code(read_keystore, path, PASS) == BAD_PASSPHRASE
    # The public key is the AEAD's associated data, so swapping it breaks the tag.
    other = SigningKey.generate().public.hex()
    path = _edit(tmp_path, encrypted_bytes, lambda d: d.__setitem__("public", other))
    assert _code(read_keystore, path, PASS) == BAD_PASSPHRASE


def test_plain_public_key_mismatch_is_keystore(tmp_path: Path) -> None:
    doc = {"version": 1, "public": SigningKey.generate().public.hex(), "kdf": None, "seed": KEY.seed.hex()}
    path = tmp_path / "k"
    _write_raw(path, json.dumps(doc).encode())
    assert _code(read_keystore, path) == KEYSTORE


def test_oversized_file_is_keystore(tmp_path: Path) -> None:
    path = tmp_path / "k"
    _write_raw(path, b" " * (65 * 1024))
    assert _code(read_keystore, path) == KEYSTORE
