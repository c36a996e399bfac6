"""`aemd start` and the `aemctl` commands that talk to a running node:
status, peers, ads, transfer."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time

import trio

from aemd import control
from aemd.cliutil import add_home, add_json, fmt_credits, print_json
from aemd.cmd_genesis import parse_credits, parse_key
from aemd.home import Home, read_passphrase, resolve_home
from aemd.identity import load_node


class _KeyValueFormatter(logging.Formatter):
    """One line per event: time, level, component, message; easy to grep and parse."""

    def format(self, record: logging.LogRecord) -> str:
        t = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        msg = record.getMessage()
        if record.exc_info and record.levelno >= logging.ERROR:
            msg += " " + self.formatException(record.exc_info).replace("\n", " | ")
        return f"{t}Z level={record.levelname.lower()} at={record.name} msg={msg!r}"


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_KeyValueFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.WARNING))


def register_aemd(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "start", help="run the node until interrupted",
        description="Run this node: join the mesh, gossip its NodeCard and HostAdvertisements, "
                    "replicate the receipt log, serve tasks for its capsules, and answer aemctl on "
                    "the control socket <home>/control.sock. Stops cleanly on Ctrl-C or SIGTERM.")
    add_home(p)
    p.add_argument("--listen", action="append", metavar="MULTIADDR",
                   help="address to listen on, e.g. /ip4/127.0.0.1/tcp/4001 (repeatable; "
                        "default from config: /ip4/0.0.0.0/tcp/4001)")
    p.add_argument("--bootstrap", action="append", metavar="MULTIADDR",
                   help="peer to dial and keep, /ip4/HOST/tcp/PORT/p2p/PEER_ID (repeatable; "
                        "added to the config's list)")
    p.add_argument("--passphrase-file", metavar="FILE", help="passphrase of an encrypted identity")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                   help="log verbosity (default from config: warning)")
    p.set_defaults(func=_start)


def _start(args: argparse.Namespace) -> int:
    home = Home(resolve_home(args.home))
    key, genesis, cfg = load_node(home, read_passphrase(args.passphrase_file))
    setup_logging(args.log_level or cfg["node"]["log_level"])
    from aemd.node import Node, NodeOptions  # libp2p loads only for the daemon, not for aemctl
    node = Node(home, key, genesis, NodeOptions.from_config(cfg, args.listen, args.bootstrap))
    from aemd import services  # task serving: executors, router, task protocol
    services.install(node, cfg)
    trio.run(_serve, node)
    return 0


async def _serve(node) -> None:
    async with trio.open_nursery() as nursery:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            await nursery.start(node.run)
            st = node.status()
            print(f"aemd {st['network_name']} {st['network_id'][:16]}", flush=True)
            print(f"peer id  {st['peer_id']}", flush=True)
            for a in st["addrs"]:
                print(f"listen   {a}", flush=True)
            print(f"control  {node.home.socket}", flush=True)
            async for _ in signals:
                print("stopping", flush=True)
                nursery.cancel_scope.cancel()
                break


# -- aemctl -------------------------------------------------------------------

def _call(args: argparse.Namespace, cmd: str, cargs: dict | None = None, **kw):
    home = Home(resolve_home(args.home))
    return control.call(home.socket, cmd, cargs or {}, **kw)


def register_ctl(sub: argparse._SubParsersAction) -> None:
    for name, func, short, long in (
        ("status", _status, "the running node's identity, network, peers and log",
         "Show the running node's peer id, addresses, network, connected peers, log size and "
         "ledger state root."),
        ("peers", _peers, "peers known to the running node, with their NodeCards",
         "List the mesh's nodes the running node knows from gossip (valid, unexpired NodeCards), "
         "and connected peers without one."),
        ("ads", _ads, "HostAdvertisements of the mesh",
         "List the valid, unexpired HostAdvertisements (expert capsules on offer) that the running "
         "node knows, its own included."),
    ):
        p = sub.add_parser(name, help=short, description=long)
        add_home(p)
        add_json(p)
        p.set_defaults(func=func)

    p = sub.add_parser("connect", help="dial a peer now",
                       description="Have the running node dial a peer (it is not kept after a restart; "
                                   "use --bootstrap or the config for that).")
    p.add_argument("addr", metavar="MULTIADDR", help="/ip4/HOST/tcp/PORT/p2p/PEER_ID")
    add_home(p)
    add_json(p)
    p.set_defaults(func=_connect)

    p = sub.add_parser("transfer", help="send credits to another account",
                       description="Append a signed Transfer from this node's account to the log; "
                                   "it replicates to every peer.")
    p.add_argument("--to", required=True, metavar="ACCOUNT", help="recipient public key (hex)")
    p.add_argument("--amount", required=True, metavar="CREDITS", help="credits, up to 6 decimals")
    add_home(p)
    add_json(p)
    p.set_defaults(func=_transfer)


def _status(args: argparse.Namespace) -> int:
    st = _call(args, "status")
    if args.json:
        print_json(st)
        return 0
    print(f"peer id      {st['peer_id']}")
    print(f"account      {st['account']}")
    print(f"network      {st['network_name']} ({st['network_id']})")
    for a in st["addrs"]:
        print(f"listen       {a}")
    print(f"peers        {st['peers_connected']} connected, {st['cards_known']} cards, {st['ads_known']} ads")
    print(f"log          {st['log_entries']} entries")
    print(f"state root   {st['state_root']}")
    return 0


def _peers(args: argparse.Namespace) -> int:
    peers = _call(args, "peers")
    if args.json:
        print_json(peers)
        return 0
    if not peers:
        print("no peers known")
    for p in peers:
        if p.get("node") is None:
            print(f"{p['peer_id']}  connected, no card yet")
            continue
        flag = "connected" if p["connected"] else "via gossip"
        print(f"{p['peer_id']}  {flag:10}  load {p['load']:3}%  gpu {p['gpu'] or '-'}  "
              f"vram {p['vram_mb']} MB  {p['locality'] or ''}")
    return 0


def _ads(args: argparse.Namespace) -> int:
    ads = _call(args, "ads")
    if args.json:
        print_json(ads)
        return 0
    if not ads:
        print("no advertisements known")
    for a in ads:
        print(f"{a['capsule_id'][:16]}  {a['kind']:10}  {a['domain']:16}  {fmt_credits(a['price'])} cr  "
              f"host {a['peer_id']}")
    return 0


def _connect(args: argparse.Namespace) -> int:
    res = _call(args, "connect", {"addr": args.addr})
    if args.json:
        print_json(res)
    else:
        print(f"connected to {res['peer_id']}")
    return 0


def _transfer(args: argparse.Namespace) -> int:
    res = _call(args, "transfer", {"to": parse_key(args.to).hex(), "amount": parse_credits(args.amount)})
    if args.json:
        print_json(res)
    else:
        print(f"appended transfer {res['transfer_id']} as entry {res['seq']}")
    return 0
