"""`aemctl doctor`: is this machine ready to run a node, and what to fix.

Each check returns a status (``ok``, ``warn``, ``fail``, or ``skip`` when it
cannot run, e.g. no node for the clock check), a one-line finding and, when
not ok, a fix. The command exits 4 (problems found) when any check warns or
fails, 0 otherwise, so a script or a service's ExecStartPre can gate on it.

Checks: the home (identity, network), the code-patch sandbox (bubblewrap or
unshare, GNU patch), GPU offload (the llama.cpp build against the config and
the GPUs present), the ports (the configured listen addresses free, or held by
this node), clock skew against peers (their NodeCards' issued_at against our
clock, when a node runs), and the disk space of the home.
"""

from __future__ import annotations

import argparse
import copy
import shutil
import socket
import time
from dataclasses import asdict, dataclass
from typing import Callable

from aemd import control, gpu
from aemd.cliutil import EXIT_OK, EXIT_PROBLEMS, add_home, add_json, print_json
from aemd.config import DEFAULTS, load_config
from aemd.home import Home, resolve_home
from protocol.errors import AemError

DISK_FAIL_MB = 512          # below this the store and models cannot grow
DISK_WARN_MB = 2048
SKEW_WARN_S = 30            # a card issued this far in our future: that clock (or ours) is off
SKEW_FAIL_S = 300           # the gossip validators' tolerance: beyond it the cards are refused
STATUS_ORDER = ("ok", "skip", "warn", "fail")

CUDA_WHEEL = ('CMAKE_ARGS="-DGGML_CUDA=on" pip install --force-reinstall --no-binary llama-cpp-python '
              'llama-cpp-python==0.3.36')
METAL_WHEEL = ('CMAKE_ARGS="-DGGML_METAL=on" pip install --force-reinstall --no-binary llama-cpp-python '
               'llama-cpp-python==0.3.36')


@dataclass(frozen=True)
class Check:
    name: str
    status: str            # ok | warn | fail | skip
    detail: str
    fix: str = ""


# -- the checks ---------------------------------------------------------------------

def check_home(home: Home) -> Check:
    if home.root.exists() and not home.root.is_dir():
        return Check("home", "fail", f"{home.root} is a file", "use another --home")
    if not home.keystore.exists():
        return Check("home", "fail", f"no identity in {home.root}", f"aemd init --home {home.root}")
    if not home.genesis.exists():
        return Check("home", "fail", f"{home.root} has joined no network",
                     f"aemd init --home {home.root} --genesis FILE")
    return Check("home", "ok", f"{home.root}: identity and network present")


def check_sandbox() -> Check:
    from aemd.executors.codepatch import available_isolation
    level = available_isolation()
    if shutil.which("patch") is None:
        return Check("sandbox", "fail", f"isolation {level}; GNU patch missing: code-patch tasks cannot run",
                     "apt-get install patch")
    if level == "bwrap":
        return Check("sandbox", "ok", "bubblewrap: no network, only the task tree visible and writable")
    if level == "unshare":
        return Check("sandbox", "warn", "unshare only: no network, but the host's files stay readable "
                                        "to a task's tests", "apt-get install bubblewrap")
    return Check("sandbox", "fail", "no sandbox works here: the node refuses code-patch tasks",
                 "apt-get install bubblewrap (or allow unprivileged user namespaces)")


def check_gpu(cfg: dict) -> Check:
    setting = cfg["llama"]["n_gpu_layers"]
    supported = gpu.offload_supported()
    gpus = gpu.detect_gpus()
    seen = ", ".join(f"{g.name} ({g.free_mb}/{g.total_mb} MB free)" for g in gpus)
    if supported is None:
        return Check("gpu", "fail", "llama-cpp-python cannot be imported", "pip install llama-cpp-python==0.3.36")
    if not supported:
        if setting != 0:
            return Check("gpu", "fail", f"n_gpu_layers = {setting!r}, but this llama.cpp build has no GPU "
                                        "offload: models run on the CPU", f"{CUDA_WHEEL} (Apple: {METAL_WHEEL})")
        if gpus:
            return Check("gpu", "warn", f"CPU-only llama.cpp build on a machine with {seen}", CUDA_WHEEL)
        return Check("gpu", "ok", "CPU only: no GPU offload in this build, no GPU found")
    where = seen or "GPU memory unknown (no nvidia-smi)"
    if setting == 0:
        return Check("gpu", "warn", f"GPU offload available ({where}) but n_gpu_layers = 0",
                     'set [llama] n_gpu_layers = "auto" in config.toml')
    if setting == "auto" and not gpus:
        return Check("gpu", "warn", "n_gpu_layers = \"auto\" cannot size the offload: GPU memory unknown",
                     "set [llama] n_gpu_layers to a number of layers (-1: all)")
    return Check("gpu", "ok", f"GPU offload with n_gpu_layers = {setting!r}; {where}")


def _host_port(addr: str) -> tuple[int, str, int] | None:
    """(family, host, port) of ``/ip4/H/tcp/P`` or ``/ip6/H/tcp/P``; None otherwise."""
    parts = addr.strip("/").split("/")
    if len(parts) < 4 or parts[0] not in ("ip4", "ip6") or parts[2] != "tcp":
        return None
    try:
        port = int(parts[3])
    except ValueError:
        return None
    return (socket.AF_INET if parts[0] == "ip4" else socket.AF_INET6), parts[1], port


def _free(family: int, host: str, port: int) -> str | None:
    """None if we could listen there, else why not."""
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
        return None
    except OSError as exc:
        return exc.strerror or str(exc)
    finally:
        s.close()


def check_ports(cfg: dict, status: dict | None) -> Check:
    ours = set()
    if status is not None:
        for a in status.get("addrs", []):
            hp = _host_port(a.split("/p2p/")[0])
            if hp:
                ours.add(hp[2])
        api_url = status.get("api")
        if isinstance(api_url, str) and api_url.rpartition(":")[2].isdigit():
            ours.add(int(api_url.rpartition(":")[2]))
    wanted = list(cfg["node"]["listen"])
    api = cfg.get("api", {})
    if api.get("enabled") and isinstance(api.get("listen"), str) and ":" in api["listen"]:
        host, _, port = api["listen"].rpartition(":")
        wanted.append(f"/ip4/{host}/tcp/{port}" if ":" not in host else f"/ip6/{host.strip('[]')}/tcp/{port}")
    problems, fine = [], []
    for addr in wanted:
        hp = _host_port(addr)
        if hp is None:
            problems.append(f"{addr}: not /ip4|ip6/HOST/tcp/PORT")
            continue
        family, host, port = hp
        if port == 0:
            fine.append(f"{addr} (any free port)")
        elif status is not None and port in ours:
            fine.append(f"{addr} (this node)")
        else:
            why = _free(family, host, port)
            (problems.append(f"{addr}: {why}") if why else fine.append(f"{addr} free"))
    if problems:
        return Check("ports", "fail", "; ".join(problems),
                     "stop the program holding the port, or set [node] listen / [api] listen in config.toml")
    return Check("ports", "ok", ", ".join(fine) or "nothing to listen on")


def check_clock(peers: list | None, now: float) -> Check:
    if peers is None:
        return Check("clock", "skip", "no node running: skew against peers not measured")
    cards = [p for p in peers if p.get("node")]
    if not cards:
        return Check("clock", "skip", "no peer cards yet: skew not measured")
    # A card is re-issued every card_interval_s, so it may be old; a card
    # from our future is the one sign we can read without doubt.
    ahead = max((int(p["issued_at"]) - int(now), p["peer_id"]) for p in cards)
    if ahead[0] > SKEW_FAIL_S:
        return Check("clock", "fail", f"{ahead[1]}'s card is {ahead[0]} s in our future: its cards and ads "
                                      f"are refused (limit {SKEW_FAIL_S} s)",
                     "synchronise the clocks (systemd-timesyncd, chrony or ntpd) here and there")
    if ahead[0] > SKEW_WARN_S:
        return Check("clock", "warn", f"{ahead[1]}'s card is {ahead[0]} s in our future",
                     "synchronise the clocks (systemd-timesyncd, chrony or ntpd)")
    return Check("clock", "ok", f"{len(cards)} peer cards, none from our future (+{max(ahead[0], 0)} s at most)")


def check_disk(home: Home, usage: Callable = shutil.disk_usage) -> Check:
    p = home.root
    while not p.exists() and p != p.parent:
        p = p.parent
    free_mb = usage(p).free // (1 << 20)
    fix = f"free space on the file system of {p}, or move the home (--home, $AEM_HOME)"
    if free_mb < DISK_FAIL_MB:
        return Check("disk", "fail", f"{free_mb} MB free at {p}", fix)
    if free_mb < DISK_WARN_MB:
        return Check("disk", "warn", f"{free_mb} MB free at {p}", fix)
    return Check("disk", "ok", f"{free_mb} MB free at {p}")


# -- the command ---------------------------------------------------------------------

def run_checks(home: Home) -> list[Check]:
    checks = [check_home(home)]
    try:
        cfg = load_config(home.config)       # the defaults when there is none
    except AemError as exc:
        checks.append(Check("config", "fail", exc.detail, f"edit {home.config}"))
        cfg = copy.deepcopy(DEFAULTS)
    status = peers = None
    if home.socket.exists():
        try:
            status = control.call(home.socket, "status", timeout=15)
            peers = control.call(home.socket, "peers", timeout=15)
        except AemError:
            status = peers = None
    checks += [check_sandbox(), check_gpu(cfg), check_ports(cfg, status),
               check_clock(peers, time.time()), check_disk(home)]
    return checks


def register_ctl(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "doctor", help="check this machine for running a node, with a fix for each problem",
        description="Check the node's home, the code-patch sandbox, GPU offload, the listen ports, "
                    "clock skew against peers (when a node runs) and disk space. Each check prints "
                    "ok, warn, fail or skip and, for a problem, how to fix it. Exit 4 when a check "
                    "warns or fails.")
    add_home(p)
    add_json(p)
    p.set_defaults(func=_doctor)


def _doctor(args: argparse.Namespace) -> int:
    checks = run_checks(Home(resolve_home(args.home)))
    problems = any(c.status in ("warn", "fail") for c in checks)
    if args.json:
        print_json({"ok": not problems, "checks": [asdict(c) for c in checks]})
    else:
        for c in checks:
            print(f"{c.status:4}  {c.name:8} {c.detail}")
            if c.fix and c.status != "ok":
                print(f"      {'':8} fix: {c.fix}")
    return EXIT_PROBLEMS if problems else EXIT_OK
