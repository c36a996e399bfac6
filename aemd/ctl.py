"""`aemctl`: the command-line client of an aem node.

Each command group lives in its own ``cmd_*`` module with a ``register_ctl``
function; this module only assembles them.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from aemd.cliutil import add_global_options, run_main

COMMAND_MODULES = ["aemd.cmd_genesis", "aemd.cmd_node", "aemd.cmd_task", "aemd.cmd_admission", "aemd.cmd_ledger", "aemd.cmd_evidence", "aemd.cmd_traces", "aemd.doctor",
                   "aemd.cmd_contribute"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aemctl",
        description="Control and inspect an aem node: networks, ledger, peers, experts, tasks.",
        epilog="Run `aemctl COMMAND --help` for the options of each command. "
               "Exit codes: 0 ok, 1 failed, 2 usage, 3 no node running, 4 problems found, 5 timeout.",
    )
    add_global_options(parser)
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register_ctl(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
