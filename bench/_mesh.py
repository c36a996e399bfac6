"""Shared helpers of the mesh benchmarks (bench/gossip.py, task_overhead.py, idle.py).

- :func:`make_homes`: a fresh network under a temporary root: one initialised
  home per node, a genesis (with grants to every node, or one given, e.g. a
  ledgerkit network's), and one config.toml for all.
- :class:`Proc`: one node as its own OS process, either the real
  ``aemd start`` or this file's ``run`` command (below), on a port chosen up
  front, so a whole line of nodes can start at once, each bootstrapping to its
  predecessor. Every wait is bounded; :meth:`Proc.stop` SIGTERMs and reaps.
- ``python bench/_mesh.py run --home H --events FILE [--bootstrap MADDR]
  [--sync-target N]``: exactly what ``aemd start`` runs (``load_node``,
  ``NodeOptions.from_config``, ``services.install``, ``Node.run``), plus three
  observation hooks that append one JSON line per event to FILE:

  * ``pub``: the node starts publishing one of its own HostAdvertisements (the
    first time for a capsule id), wrapped around ``P2PNode.publish``;
  * ``ad``: another host's advertisement enters this node's mesh table for the
    first time, wrapped around ``MeshTable.offer_ad`` (called by the node's
    gossip reader after the topic validator accepted it);
  * ``sync_start`` (the first sync session begins) and ``synced`` (the entries
    added by sync reach N), wrapped around ``Node.sync_with`` and
    ``StoreAccess.insert_batch``.

  Times are ``time.monotonic_ns()``: CLOCK_MONOTONIC is one clock for every
  process on a Linux machine, so times taken in different node processes and
  in the benchmark are directly comparable. A hook costs one small file write.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BIN = Path(sys.executable).parent
LOOPBACK = "127.0.0.1"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def now_ns() -> int:
    return time.monotonic_ns()


def pct(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by linear interpolation; values need not be sorted."""
    v = sorted(values)
    if not v:
        return float("nan")
    k = (len(v) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def wait_for(what: str, fn: Callable[[], Any], timeout: float, every: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = fn()
            if last:
                return last
        except Exception as exc:  # noqa: BLE001 - a node not up yet, a file not written yet
            last = exc
        time.sleep(every)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}; last: {last!r}")


def config_text(*, card_interval_s: int = 60, sync_interval_s: int = 30, llama: dict | None = None,
                log_level: str = "warning") -> str:
    lines = ["[node]", f'listen = ["/ip4/{LOOPBACK}/tcp/0"]', f'log_level = "{log_level}"',
             "[gossip]", f"card_interval_s = {card_interval_s}",
             "[sync]", f"interval_s = {sync_interval_s}"]
    if llama:
        lines.append("[llama]")
        lines += [f"{k} = {v}" for k, v in llama.items()]
    return "\n".join(lines) + "\n"


def make_homes(root: Path, n: int, *, config: str, genesis=None, grant: int = 1_000_000_000_000):
    """``n`` initialised homes under ``root`` on one network: (homes, keys, genesis).
    Without ``genesis``, a fresh one granting ``grant`` micro-credits to each node."""
    from aemd.home import Home
    from aemd.identity import atomic_write, init_home
    from crypto.keys import SigningKey
    from protocol.genesis import DEFAULT_LIMITS, Genesis, Grant, MintRate

    homes = [Home(root / f"n{i}") for i in range(n)]
    keys = [init_home(h, None, None) for h in homes]
    if genesis is None:
        founder, verifier = SigningKey.generate(), SigningKey.generate()
        genesis = Genesis(
            network_name="bench", created_at=int(time.time()) - 60, founder=founder.public,
            verifiers=(verifier.public,), quorum=1,
            grants=tuple(Grant(account=a, amount=grant) for a in sorted(k.public for k in keys)),
            challenge_window=3600, mint_rates=(MintRate(basis="accepted_delta", micro_per_unit=10_000),),
            max_mint_per_receipt=10**12, limits=DEFAULT_LIMITS, sig=b"").signed(founder)
    gfile = root / "genesis.aem"
    atomic_write(gfile, genesis.encode())
    for h in homes:
        init_home(h, gfile, None)
        atomic_write(h.config, config.encode())
    return homes, keys, genesis


class Proc:
    """One node process on a port chosen before it starts."""

    def __init__(self, home, key, *, runner: bool = True) -> None:
        from aemd import p2p
        self.home, self.key, self.runner = home, key, runner
        self.port = free_port()
        self.peer_id = p2p.peer_id_from_public(key.public)
        self.addr = f"/ip4/{LOOPBACK}/tcp/{self.port}/p2p/{self.peer_id}"
        self.events_path = home.root / "events.jsonl"
        self.log_path = home.root / "stderr.log"
        self.proc: subprocess.Popen | None = None
        self._ready = False

    def spawn(self, bootstrap: list[str] = (), sync_target: int = 0) -> "Proc":
        if self.runner:
            args = [sys.executable, str(Path(__file__).resolve()), "run", "--home", str(self.home.root),
                    "--events", str(self.events_path), "--sync-target", str(sync_target)]
        else:
            args = [str(BIN / "aemd"), "start", "--home", str(self.home.root)]
        args += ["--listen", f"/ip4/{LOOPBACK}/tcp/{self.port}"]
        for b in bootstrap:
            args += ["--bootstrap", b]
        err = open(self.log_path, "ab")
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL,
                                     cwd=str(ROOT))
        err.close()
        return self

    def wait_ready(self, timeout: float = 120) -> "Proc":
        """Read the start banner up to the ``control`` line (the node is running)."""
        deadline = time.monotonic() + timeout
        while not self._ready and time.monotonic() < deadline:
            line = self.proc.stdout.readline().decode()
            if not line:
                raise RuntimeError(f"node {self.home.root.name} exited early:\n{self.stderr_tail()}")
            if line.startswith("control"):
                self._ready = True
        if not self._ready:
            raise TimeoutError(f"node {self.home.root.name} did not start in {timeout} s")
        return self

    def stderr_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def call(self, cmd: str, args: dict | None = None, **kw) -> Any:
        from aemd import control
        return control.call(self.home.socket, cmd, args or {}, **kw)

    def events(self) -> list[dict]:
        try:
            text = self.events_path.read_text()
        except FileNotFoundError:
            return []
        out = []
        for line in text.splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass  # a line being written right now
        return out

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self.proc.stdout:
            self.proc.stdout.close()
        self.proc = None


def start_line(procs: list[Proc], *, sync_target: int = 0, timeout: float = 180) -> None:
    """Start every process at once, each bootstrapping to the one before it
    (a line); return when every one is running."""
    prev = None
    for p in procs:
        p.spawn([prev.addr] if prev else [], sync_target=sync_target)
        prev = p
    deadline = time.monotonic() + timeout
    for p in procs:
        p.wait_ready(max(1.0, deadline - time.monotonic()))


def stop_all(procs: list[Proc]) -> None:
    """SIGTERM every process first (they stop in parallel), then reap each."""
    for p in procs:
        if p.proc is not None and p.proc.poll() is None:
            try:
                p.proc.send_signal(signal.SIGTERM)
            except OSError:
                pass
    for p in procs:
        try:
            p.stop()
        except Exception as exc:  # noqa: BLE001 - keep stopping the others
            log(f"stopping {p.home.root.name}: {exc}")


class TempRoot:
    """A temporary directory removed on exit, whatever happens."""

    def __init__(self, prefix: str) -> None:
        self.path = Path(tempfile.mkdtemp(prefix=prefix))

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, *exc: object) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def code_capsule(key, net: bytes, name: str):
    """A code-patch capsule (no artefact file needed) with a unique id."""
    from aemd.capsules import LocalCapsule, Serving
    from aemd.cmd_task import CODE_PATCH_ARTEFACT
    from crypto.hashing import H
    from protocol.mesh import ExpertCapsuleManifest
    m = ExpertCapsuleManifest(
        net=net, author=key.public, name=name, kind="code_patch", content_hash=H(CODE_PATCH_ARTEFACT),
        size_bytes=0, architecture="", n_params=0, quantization="", context_length=0, vram_need_mb=0,
        domain="bench", tags=(), eval_claims=(), created_at=int(time.time()), sig=b"").signed(key)
    return LocalCapsule(m, Serving(path="", price=1000, roles=("code_patch",), max_concurrency=1))


def gguf_capsule(key, net: bytes, path: Path, *, price: int, domain: str = "general",
                 max_concurrency: int = 1, n_ctx: int = 512):
    from aemd.capsules import LocalCapsule, Serving
    from aemd.executors import estimate_memory_mb, inspect_gguf
    from protocol.mesh import ExpertCapsuleManifest
    info = inspect_gguf(path)
    m = ExpertCapsuleManifest(
        net=net, author=key.public, name=path.name, kind="gguf", content_hash=info.content_hash,
        size_bytes=info.size_bytes, architecture=info.architecture, n_params=info.n_params,
        quantization=info.quantization, context_length=info.context_length or 0,
        vram_need_mb=estimate_memory_mb(info, n_ctx), domain=domain, tags=(), eval_claims=(),
        created_at=int(time.time()), sig=b"").signed(key)
    return LocalCapsule(m, Serving(path=str(path), price=price, roles=("inference",),
                                   max_concurrency=max_concurrency))


# -- the instrumented node process ---------------------------------------------------

def _run(argv: list[str]) -> int:
    import argparse

    import trio

    from aemd import p2p as p2pmod
    from aemd import services
    from aemd.cmd_node import _serve, setup_logging
    from aemd.home import Home
    from aemd.identity import load_node
    from aemd.meshview import MeshTable
    from aemd.node import Node, NodeOptions
    from aemd.storeaccess import StoreAccess
    from protocol.mesh import HostAdvertisement

    ap = argparse.ArgumentParser(prog="_mesh.py run")
    ap.add_argument("--home", required=True)
    ap.add_argument("--events", required=True)
    ap.add_argument("--listen", action="append")
    ap.add_argument("--bootstrap", action="append")
    ap.add_argument("--sync-target", type=int, default=0)
    args = ap.parse_args(argv)

    out = open(args.events, "a", buffering=1)

    def emit(kind: str, **kw: Any) -> None:
        kw.update(ev=kind, t=time.monotonic_ns())
        out.write(json.dumps(kw) + "\n")

    home = Home(Path(args.home).absolute())
    key, genesis, cfg = load_node(home, None)
    setup_logging(cfg["node"]["log_level"])
    me = key.public

    published: set[bytes] = set()
    real_publish = p2pmod.P2PNode.publish

    async def publish(self, topic: str, data: bytes) -> None:
        if topic.endswith("/ads/1"):
            cid = HostAdvertisement.decode(data).capsule_id
            if cid not in published:
                published.add(cid)
                emit("pub", cap=cid.hex())
        return await real_publish(self, topic, data)

    p2pmod.P2PNode.publish = publish

    real_offer = MeshTable.offer_ad

    def offer_ad(self, ad, now, **kw):
        new = (ad.host, ad.capsule_id) not in self.ads
        t = time.monotonic_ns()
        ok = real_offer(self, ad, now, **kw)
        if ok and new and ad.host != me:
            out.write(json.dumps({"ev": "ad", "cap": ad.capsule_id.hex(), "t": t}) + "\n")
        return ok

    MeshTable.offer_ad = offer_ad

    added = [0, False, False]
    real_sync_with = Node.sync_with

    async def sync_with(self, peer, only=None):
        if not added[1]:
            added[1] = True
            emit("sync_start")
        return await real_sync_with(self, peer, only=only)

    Node.sync_with = sync_with
    real_insert = StoreAccess.insert_batch

    async def insert_batch(self, entries):
        res = await real_insert(self, entries)
        added[0] += res[0]
        if args.sync_target and not added[2] and added[0] >= args.sync_target:
            added[2] = True
            emit("synced", added=added[0])
        return res

    StoreAccess.insert_batch = insert_batch

    node = Node(home, key, genesis, NodeOptions.from_config(cfg, args.listen, args.bootstrap))
    services.install(node, cfg)
    try:
        trio.run(_serve, node)
    finally:
        out.close()
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "run":
        sys.exit(_run(sys.argv[2:]))
    print("usage: python bench/_mesh.py run --home HOME --events FILE [--bootstrap MADDR] [--sync-target N]",
          file=sys.stderr)
    sys.exit(2)
