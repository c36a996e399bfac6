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
from protocol import errors
from protocol.errors import AemError


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
                   help="log verbosity (default from config: info)")
    p.set_defaults(func=_start)


def _start(args: argparse.Namespace) -> int:
    home = Home(resolve_home(args.home))
    if home.root.exists() and not home.root.is_dir():
        raise AemError(errors.CONFIG, f"{home.root} is a file, not a node home")
    key, genesis, cfg = load_node(home, read_passphrase(args.passphrase_file))
    setup_logging(args.log_level or cfg["node"]["log_level"])
    if cfg["verifier"]["enabled"] and key.public not in genesis.verifiers:
        # Before anything starts (even before the home lock): a config mistake, said once.
        raise AemError(errors.CONFIG, f"[verifier] enabled = true in {home.config}, but this node's account "
                                      f"{key.public.hex()[:16]}... is not one of the genesis verifiers; only "
                                      "they measure capsules for admission (set enabled = false)")
    from aemd.node import HomeLock, Node, NodeOptions  # libp2p loads only for the daemon, not for aemctl
    with HomeLock(home):
        pass  # a second `aemd start` on a live home: one line now, before anything starts
    _warn_gpu(cfg)
    node = Node(home, key, genesis, NodeOptions.from_config(cfg, args.listen, args.bootstrap))
    from aemd import services  # task serving: executors, router, task protocol
    svc = services.install(node, cfg)
    from aemd import verifier  # artefact serving, admission commands, the verifier role ([verifier])
    verifier.install(node, cfg, svc.traces)
    from aemd import growth  # contributions: the attest stream ([verifier]) and `aemctl contribute`
    growth.install(node, cfg)
    from aemd import api  # the HTTP API, status page and metrics ([api]); a bad section stops here
    api.install(node, cfg, svc)
    try:
        trio.run(_serve, node)
    except BaseExceptionGroup as group:
        # The node's nurseries wrap a start-up failure (port in use, bad
        # address, locked home) in groups: hand run_main the one error inside.
        leaf = _only_error(group)
        if leaf is None:
            raise
        raise leaf from None
    return 0


def _warn_gpu(cfg: dict) -> None:
    if cfg["llama"]["n_gpu_layers"] == 0:
        return
    from aemd import gpu
    if not gpu.offload_supported():
        logging.getLogger("aemd.node").warning(
            "[llama] n_gpu_layers = %r, but this llama.cpp build has no GPU offload: models run "
            "on the CPU (README: GPU; `aemctl doctor`)", cfg["llama"]["n_gpu_layers"])


def _only_error(group: BaseExceptionGroup) -> BaseException | None:
    leaves: list[BaseException] = []

    def walk(e: BaseException) -> None:
        if isinstance(e, BaseExceptionGroup):
            for x in e.exceptions:
                walk(x)
        elif not isinstance(e, trio.Cancelled):
            leaves.append(e)
    walk(group)
    aem = [e for e in leaves if isinstance(e, AemError)]
    return aem[0] if aem else (leaves[0] if len(leaves) == 1 else None)


async def _serve(node) -> None:
    async with trio.open_nursery() as nursery:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            await nursery.start(node.run)
            st = node.status()
            print(f"aemd {st['network_name']} {st['network_id'][:16]}", flush=True)
            print(f"peer id  {st['peer_id']}", flush=True)
            for a in st["addrs"]:
                print(f"listen   {a}", flush=True)
            if node.api_url:
                print(f"api      {node.api_url}/v1  (status page {node.api_url}/)", flush=True)
            print(f"control  {node.home.socket}", flush=True)
            async for _ in signals:
                print("stopping", flush=True)
                await node.withdraw_ads()   # while the host still runs: routers drop us now
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
    as_of = st.get("state_root_as_of")
    when = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(as_of)) if isinstance(as_of, int) else "now"
    print(f"state root   {st['state_root']}  (replay as of {when}, the newest entry)")
    g = st.get("gpu")
    if isinstance(g, dict):
        build = {True: "GPU offload", False: "CPU only", None: "unknown"}[g.get("offload_supported")]
        mem = ", ".join(f"{x['name']} {x['free_mb']}/{x['total_mb']} MB free" for x in g.get("gpus", [])) \
            or "GPU memory unknown"
        print(f"gpu          llama.cpp build: {build}; {mem}; {g.get('layers_offloaded', 0)} layers offloaded "
              f"(n_gpu_layers = {g.get('n_gpu_layers')!r})")
    bal = st.get("balance")
    if bal:
        nxt = bal.get("next_settlement")
        print(f"balance      {fmt_credits(bal['available'])} available, {fmt_credits(bal['pending'])} pending"
              + (f" (next settlement: {fmt_credits(nxt['amount'])} in {nxt['in_s']} s)" if nxt else ""))
    print(f"api          {st.get('api') or 'off'}")
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
              f"vram {p['vram_mb']} MB  gpu layers {p.get('gpu_layers', 0)}  {p['locality'] or ''}")
    return 0


def _ads(args: argparse.Namespace) -> int:
    ads = _call(args, "ads")
    if args.json:
        print_json(ads)
        return 0
    if not ads:
        print("no advertisements known")
    for a in ads:
        model = a.get("model") or "-"
        if a.get("size_bytes"):
            model += f" ({_size(a['size_bytes'])}{', ' + a['quantization'] if a.get('quantization') else ''})"
        print(f"{a['capsule_id'][:16]}  {a['kind']:10}  {a['domain']:16}  {fmt_credits(a['price'])} cr  "
              f"{model}  host {a['peer_id']}")
    return 0


def _size(n: int) -> str:
    for unit, k in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= k:
            return f"{n / k:.1f} {unit}"
    return f"{n} B"


def _connect(args: argparse.Namespace) -> int:
    res = _call(args, "connect", {"addr": args.addr})
    if args.json:
        print_json(res)
    elif res.get("already_connected"):
        print(f"already connected to {res['peer_id']}; {args.addr} was not dialled")
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
