"""Creating and loading a node: identity key, config, genesis in its home."""

from __future__ import annotations

import shutil
from pathlib import Path

from aemd.config import TEMPLATE, load_config
from aemd.home import Home
from aemd.keyfile import read_keystore, write_keystore
from crypto.keys import SigningKey
from ledger.atomicfile import atomic_write  # the one atomic write (kept importable here)
from protocol import errors
from protocol.errors import AemError
from protocol.genesis import Genesis

MAX_GENESIS_FILE = Genesis.MAX_SIZE


def read_genesis_file(path: Path) -> Genesis:
    """Load and verify a genesis file (its canonical bytes)."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_GENESIS_FILE + 1)
    except OSError as exc:
        raise AemError(errors.NOT_FOUND, f"cannot read genesis {path}: {exc.strerror}") from None
    g = Genesis.decode(data)
    g.verify()
    return g


def init_home(home: Home, genesis_file: Path | None, passphrase: str | None) -> SigningKey:
    """Create the home (mode 0700), an identity and a config; never overwrite
    an existing identity, since losing it loses the node's credits."""
    if home.root.exists() and not home.root.is_dir():
        raise AemError(errors.CONFIG, f"{home.root} is a file, not a directory; give another --home")
    for parent in home.root.parents:
        if parent.exists():
            if not parent.is_dir():
                raise AemError(errors.CONFIG, f"{parent} is a file; {home.root} cannot be created under it")
            break
    home.root.mkdir(parents=True, exist_ok=True, mode=0o700)
    if home.keystore.exists():
        key = read_keystore(home.keystore, passphrase)
    else:
        key = SigningKey.generate()
        write_keystore(home.keystore, key, passphrase)
    if not home.config.exists():
        atomic_write(home.config, TEMPLATE.encode())
    if genesis_file is not None:
        g = read_genesis_file(genesis_file)
        if home.genesis.exists() and read_genesis_file(home.genesis).network_id != g.network_id:
            raise AemError(errors.CONFIG, f"{home.root} already belongs to another network; use a new home")
        shutil.copyfile(genesis_file, home.genesis)
    return key


def load_node(home: Home, passphrase: str | None) -> tuple[SigningKey, Genesis, dict]:
    """Identity, genesis and config of an initialised home."""
    home.require_initialised()
    key = read_keystore(home.keystore, passphrase)
    if not home.genesis.exists():
        raise AemError(errors.NOT_FOUND,
                       f"{home.root} has joined no network; run `aemd init --home {home.root} --genesis FILE`")
    return key, read_genesis_file(home.genesis), load_config(home.config)
