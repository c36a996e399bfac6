"""The node's home directory: where its identity, config, genesis, store and
control socket live, and how each path is found.

Resolution order for the home: ``--home`` beats ``AEM_HOME`` beats the default
``$XDG_DATA_HOME/aem`` (``~/.local/share/aem``). Everything a node owns is in
that one directory, so several nodes on one machine (a demo mesh, the tests)
just use several homes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from protocol import errors
from protocol.errors import AemError

ENV_HOME = "AEM_HOME"
ENV_PASSPHRASE = "AEM_PASSPHRASE"


def default_home() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "aem"


def resolve_home(arg: str | None) -> Path:
    if arg:
        return Path(arg).expanduser().absolute()
    env = os.environ.get(ENV_HOME)
    if env:
        return Path(env).expanduser().absolute()
    return default_home()


@dataclass(frozen=True)
class Home:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.toml"

    @property
    def keystore(self) -> Path:
        return self.root / "identity.key"

    @property
    def genesis(self) -> Path:
        return self.root / "genesis.aem"

    @property
    def store(self) -> Path:
        return self.root / "store.sqlite"

    @property
    def socket(self) -> Path:
        return self.root / "control.sock"

    @property
    def capsules(self) -> Path:
        return self.root / "capsules"

    @property
    def peers(self) -> Path:
        return self.root / "peers.json"

    def require_initialised(self) -> None:
        if not self.keystore.exists():
            raise AemError(errors.NOT_FOUND,
                           f"no node identity in {self.root}; run `aemd init --home {self.root}` first")


def read_passphrase(passphrase_file: str | None) -> str | None:
    """The keystore passphrase from a file or ``AEM_PASSPHRASE``, if any."""
    if passphrase_file:
        try:
            return Path(passphrase_file).read_text().rstrip("\n") or None
        except OSError as exc:
            raise AemError(errors.CONFIG, f"cannot read passphrase file: {exc.strerror}") from None
    return os.environ.get(ENV_PASSPHRASE) or None
