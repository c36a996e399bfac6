"""`aemd init`: create a node's identity and config, and join a network."""

from __future__ import annotations

import argparse
from pathlib import Path

from aemd.cliutil import add_home, add_json, print_json
from aemd.home import Home, read_passphrase, resolve_home
from aemd.identity import init_home, read_genesis_file


def register_aemd(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "init", help="create a node identity and config (and join a network)",
        description="Create the node's home directory with an Ed25519 identity (keystore file, "
                    "mode 0600), a documented config.toml, and, with --genesis, the network it "
                    "joins. Running it again keeps the existing identity.")
    add_home(p)
    p.add_argument("--genesis", metavar="FILE", help="genesis file of the network to join")
    p.add_argument("--passphrase-file", metavar="FILE",
                   help="encrypt the identity with the passphrase in FILE (or set AEM_PASSPHRASE)")
    add_json(p)
    p.set_defaults(func=_init)


def _init(args: argparse.Namespace) -> int:
    home = Home(resolve_home(args.home))
    key = init_home(home, Path(args.genesis) if args.genesis else None,
                    read_passphrase(args.passphrase_file))
    net = read_genesis_file(home.genesis).network_id.hex() if home.genesis.exists() else None
    info = {"home": str(home.root), "account": key.public.hex(), "network_id": net,
            "config": str(home.config)}
    if args.json:
        print_json(info)
    else:
        print(f"node home   {home.root}")
        print(f"account     {key.public.hex()}")
        print(f"config      {home.config}")
        print(f"network id  {net or '(none yet: pass --genesis FILE)'}")
    return 0
