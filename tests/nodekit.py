"""Real `aemd start` processes on 127.0.0.1 for multi-node tests.

A Mesh makes a fresh network (genesis with grants for every node), one home
per node, and starts each node as its own OS process. Every wait is bounded
(polling the node's control socket), and `close()` stops every process it
started, so a failing test leaves nothing behind.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from aemd import control
from aemd.home import Home
from aemd.identity import atomic_write, init_home
from crypto.keys import SigningKey
from aemd.keyfile import read_keystore
from protocol.errors import AemError
from protocol.admission import DEFAULT_ADMISSION, AdmissionParams
from protocol.genesis import DEFAULT_LIMITS, Genesis, Grant, MintRate

BIN = Path(sys.executable).parent
FAST_CONFIG = """\
[node]
listen = ["/ip4/127.0.0.1/tcp/0"]
log_level = "info"
[gossip]
card_interval_s = 2
card_ttl_s = 60
[sync]
interval_s = 2
[llama]
n_ctx = 512
n_threads = 1
task_timeout_s = 120
[codepatch]
timeout_s = 20
[api]
listen = "127.0.0.1:0"
"""


def wait_for(what: str, fn: Callable[[], Any], timeout: float = 60.0, every: float = 0.2) -> Any:
    """Poll ``fn`` until it returns a truthy value and return that; fail after
    ``timeout`` s with ``what`` and the last value seen.

    The first polls come quickly (20 ms, doubling up to ``every``): most
    conditions hold within a few hundred milliseconds, and a long fixed
    interval would be the slowest part of a test. ``timeout`` is only a bound
    for a broken run, never a wait."""
    deadline = time.monotonic() + timeout
    last: Any = None
    pause = min(0.02, every)
    while True:
        try:
            last = fn()
            if last:
                return last
        except AemError as exc:
            last = exc
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}; last: {last!r}")
        time.sleep(pause)
        pause = min(pause * 2, every)


async def until(what: str, fn: Callable[[], Any], timeout: float = 60.0, every: float = 0.2) -> Any:
    """:func:`wait_for` inside ``trio.run``: ``fn`` may be sync or async; the
    pauses yield to the other tasks (a libp2p host in the test process keeps
    running)."""
    import inspect

    import trio
    deadline = trio.current_time() + timeout
    last: Any = None
    pause = min(0.02, every)
    while True:
        try:
            last = fn()
            if inspect.isawaitable(last):
                last = await last
            if last:
                return last
        except AemError as exc:
            last = exc
        if trio.current_time() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}; last: {last!r}")
        await trio.sleep(pause)
        pause = min(pause * 2, every)


class NodeProc:
    def __init__(self, home: Home, log_path: Path) -> None:
        self.home = home
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.peer_id = ""
        self.addr = ""
        self.api = ""       # http://127.0.0.1:PORT of its HTTP API, from the start banner
        self.key = read_keystore(home.keystore)

    @property
    def account(self) -> bytes:
        return self.key.public

    def start(self, bootstrap: list[str] = (), extra: list[str] = ()) -> "NodeProc":
        args = [str(BIN / "aemd"), "start", "--home", str(self.home.root)]
        for b in bootstrap:
            args += ["--bootstrap", b]
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(args + list(extra), stdout=subprocess.PIPE, stderr=log,
                                     stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline().decode()
            if not line:
                raise AssertionError(f"aemd exited early: {self.log_path.read_text()[-3000:]}")
            if line.startswith("peer id"):
                self.peer_id = line.split()[-1]
            if line.startswith("listen"):
                self.addr = line.split()[-1]
            if line.startswith("api "):
                self.api = line.split()[1].removesuffix("/v1")
            if line.startswith("control"):
                return self
        raise AssertionError("aemd did not start in 60 s")

    def call(self, cmd: str, args: dict | None = None, **kw) -> Any:
        return control.call(self.home.socket, cmd, args or {}, **kw)

    def kill(self, sig: int = signal.SIGKILL) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.reap()

    def reap(self) -> int:
        """Wait for the process (signalled already) to end; SIGKILL after 30 s."""
        try:
            rc = self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait(timeout=10)
        self.proc.stdout.close()
        self.proc = None
        return rc

    def stop(self) -> int:
        return self.kill(signal.SIGTERM)

    def log_has(self, text: str) -> bool:
        return self.log_path.exists() and text in self.log_path.read_text(errors="replace")

    def wait_log(self, text: str, timeout: float = 60.0) -> None:
        """Wait until the node's log holds ``text`` (what the daemon says it did)."""
        wait_for(f"{self.log_path.name} to log {text!r}", lambda: self.log_has(text), timeout=timeout)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class Mesh:
    def __init__(self, root: Path, n: int, *, grant: int = 1_000_000_000, challenge_window: int = 3600,
                 config: str = FAST_CONFIG, extra_grants: dict[bytes, int] | None = None,
                 unfunded: tuple[int, ...] = (), verifier_nodes: tuple[int, ...] = (), quorum: int = 1,
                 admission: AdmissionParams = DEFAULT_ADMISSION,
                 node_configs: dict[int, str] | None = None,
                 mint_rates: tuple[MintRate, ...] = (MintRate(basis="accepted_delta", micro_per_unit=10_000),)) -> None:
        """``verifier_nodes``: nodes whose accounts are the genesis verifiers
        (default: one outside key, ``self.verifier``); ``node_configs``:
        config text appended for single nodes (e.g. a [verifier] section)."""
        self.root = root
        self.verifier = SigningKey.generate()
        homes = [Home(root / f"n{i}") for i in range(n)]
        keys = [init_home(h, None, None) for h in homes]
        founder = SigningKey.generate()
        grants = {k.public: 0 if i in unfunded else grant for i, k in enumerate(keys)}
        grants.update(extra_grants or {})
        verifiers = sorted(keys[i].public for i in verifier_nodes) or [self.verifier.public]
        self.genesis = Genesis(
            network_name="testnet", created_at=int(time.time()) - 10, founder=founder.public,
            verifiers=tuple(verifiers), quorum=quorum,
            grants=tuple(Grant(account=a, amount=grants[a]) for a in sorted(grants)),
            challenge_window=challenge_window,
            mint_rates=tuple(sorted(mint_rates, key=lambda r: r.basis)),
            max_mint_per_receipt=10**12, limits=DEFAULT_LIMITS, sig=b"", admission=admission).signed(founder)
        gfile = root / "genesis.aem"
        atomic_write(gfile, self.genesis.encode())
        for i, h in enumerate(homes):
            init_home(h, gfile, None)
            atomic_write(h.config, (config + (node_configs or {}).get(i, "")).encode())
        self.nodes = [NodeProc(h, root / f"n{i}.log") for i, h in enumerate(homes)]

    def start_line(self, count: int | None = None) -> None:
        """Start nodes one after another, each bootstrapping to the one before."""
        prev = None
        for node in self.nodes[:count]:
            node.start([prev.addr] if prev else [])
            prev = node

    def sync_now(self, nodes: list[NodeProc] | None = None) -> None:
        """Ask each running node to pull from all its peers now, rather than
        wait for its next sync round."""
        for n in nodes or self.nodes:
            if n.running:
                try:
                    n.call("sync_now", timeout=60)
                except AemError:
                    pass          # a peer that went away mid-round: the caller's wait judges the result

    def close(self) -> None:
        # Signal every node first, then wait: each takes a moment to stop
        # cleanly, and one after another that adds up.
        running = [n for n in self.nodes if n.running]
        for n in running:
            n.proc.send_signal(signal.SIGTERM)
        for n in running:
            n.reap()

    def logs(self) -> str:
        return "\n".join(f"--- {n.log_path.name}\n{n.log_path.read_text()[-4000:]}"
                         for n in self.nodes if n.log_path.exists())
