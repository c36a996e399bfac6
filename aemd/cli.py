"""`aemd`: the aem daemon. `aemd init` makes a node, `aemd start` runs it."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from aemd.cliutil import add_global_options, run_main

COMMAND_MODULES = ["aemd.cmd_init", "aemd.cmd_node", "aemd.cmd_demo"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aemd",
        description="The aem daemon: one node of the Accretive Expert Mesh, a peer-to-peer "
                    "network of small expert models served by the people who host them.",
        epilog="Run `aemd COMMAND --help` for the options of each command.",
    )
    add_global_options(parser)
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register_aemd(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
