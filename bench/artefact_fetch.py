"""Benchmark: how fast a verifier fetches a capsule's artefact from its host
(``aemd.artefacts.fetch_artefact`` between two real libp2p hosts on
127.0.0.1), against a plain TCP copy of the same file on 127.0.0.1 measured
in the same run.

    python bench/artefact_fetch.py            # a 2 GiB file, two trials
    python bench/artefact_fetch.py --quick    # a 128 MiB file, three trials (seconds)
    python bench/artefact_fetch.py --size-mb 512 --trials 3

Arrangement: the host is its own OS process (this file's ``_serve`` command:
one libp2p host serving the file through ``ArtefactServer`` with a
``DirectServer`` on 127.0.0.1, as a node would), the verifier is this
process; the TCP copy is the same: a child process sends the file with
``os.sendfile``, this process ``recv_into``-s a buffer and writes it to a
file. So each side of either transfer has its own process, as it would on two
machines. Each trial runs the three transfers one after the other (the
machine is shared: a change of load then falls on all three) and writes each
fetched file to a fresh name in one temporary directory, after an
``os.sync()`` (untimed), so that no transfer pays for the writeback of the
one before.

What each figure includes: ``artefact_fetch`` (``direct=True``: request,
token and header checks on the libp2p stream, the bytes on a direct TCP
connection, see specs/artefact-protocol.md section 4) and
``artefact_fetch_stream_only`` (``direct=False``: every byte through Noise
and Yamux) run from the call to its return: stream open, request, every byte
into the partial file, the SHA-256 of the whole file, the rename.
``tcp_copy`` runs from connect to the last byte written: no hash, no
encryption, no framing: the loopback's ceiling for a Python reader. The
figures are the medians of the trials of each (MB = 10^6 bytes); each
trial's three figures are logged as it ends.

Printed last, one ``name: value`` a line: ``size_mb``,
``artefact_fetch_mb_s``, ``artefact_fetch_stream_only_mb_s``,
``tcp_copy_mb_s``, ``ratio`` (direct fetch / tcp), ``ratio_stream_only``,
``sha256_mb_s`` (this machine's hash rate, a bound on any checked fetch).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MiB = 1 << 20
NET = hashlib.sha256(b"aem bench artefact_fetch").digest()
HOST_SEED = bytes([41]) * 32
VERIFIER_SEED = bytes([42]) * 32


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def write_file(path: Path, size: int) -> bytes:
    """Random bytes (so nothing on the way can compress them); returns the SHA-256."""
    h = hashlib.sha256()
    block = os.urandom(8 * MiB)
    with open(path, "wb") as fh:
        left = size
        i = 0
        while left:
            # Each block differs, so a repeated block cannot pass for the file.
            b = (i.to_bytes(8, "big") + block[8:])[: min(len(block), left)]
            fh.write(b)
            h.update(b)
            left -= len(b)
            i += 1
    return h.digest()


def sha256_rate(path: Path, limit: int = 256 * MiB) -> float:
    h = hashlib.sha256()
    buf = bytearray(8 * MiB)
    view = memoryview(buf)
    t = time.perf_counter()
    done = 0
    with open(path, "rb", buffering=0) as fh:
        while done < limit:
            n = fh.readinto(view)
            if not n:
                break
            h.update(view[:n])
            done += n
    return done / 1e6 / (time.perf_counter() - t)


# -- TCP copy -----------------------------------------------------------------

def tcp_serve(path: str, port_file: str) -> None:
    """Child: accept connections, sendfile the whole file to each."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    Path(port_file).write_text(str(srv.getsockname()[1]))
    size = os.path.getsize(path)
    while True:
        conn, _ = srv.accept()
        with conn, open(path, "rb") as fh:
            sent = 0
            while sent < size:
                sent += os.sendfile(conn.fileno(), fh.fileno(), sent, size - sent)


def tcp_copy(port: int, size: int, dest: Path) -> float:
    buf = bytearray(4 * MiB)
    view = memoryview(buf)
    t = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as s, open(dest, "wb", buffering=0) as out:
        got = 0
        while got < size:
            n = s.recv_into(view)
            if not n:
                raise RuntimeError(f"tcp copy ended at {got}")
            out.write(view[:n])
            got += n
    return size / 1e6 / (time.perf_counter() - t)


# -- libp2p -------------------------------------------------------------------

def p2p_serve(path: str, content_hash: str, addr_file: str) -> None:
    """Child: one libp2p host serving the file until stdin closes."""
    import trio

    from aemd.artefacts import ArtefactServer, DirectServer, Served
    from aemd.p2p import open_p2p

    size = os.path.getsize(path)
    h = bytes.fromhex(content_hash)
    served = Served(path, size, h)

    async def main() -> None:
        async with open_p2p(HOST_SEED, ["/ip4/127.0.0.1/tcp/0"]) as node, trio.open_nursery() as nursery:
            direct = DirectServer()
            await nursery.start(direct.run, "127.0.0.1")
            server = ArtefactServer(NET, lambda cid, ch: served if ch == h else None, max_per_peer=64,
                                    max_total=64, direct=direct)
            node.set_stream_handler(server.protocol_id, server.handler, max_per_peer=64, session_timeout=None)
            Path(addr_file).write_text(node.listen_multiaddrs()[0])
            await trio.to_thread.run_sync(sys.stdin.read)
            nursery.cancel_scope.cancel()

    trio.run(main)


def manifest_for(content_hash: bytes, size: int):
    from crypto.keys import SigningKey
    from protocol.mesh import ExpertCapsuleManifest

    key = SigningKey.from_seed(bytes([43]) * 32)
    return ExpertCapsuleManifest(
        net=NET, author=key.public, name="bench artefact", kind="gguf", content_hash=content_hash,
        size_bytes=size, architecture="llama", n_params=0, quantization="", context_length=0, vram_need_mb=0,
        domain="bench", tags=(), eval_claims=(), created_at=1, sig=b"").signed(key)


def run_trials(addr: str, tcp_port: int, manifest, dest_dir: Path, trials: int) -> dict[str, list[float]]:
    """Each trial runs the three transfers one after the other (TCP copy,
    direct fetch, stream-only fetch), so a change in the machine's load
    (it is shared) falls on all three alike."""
    import trio

    from aemd.artefacts import fetch_artefact, final_path
    from aemd.p2p import open_p2p

    rates: dict[str, list[float]] = {"tcp": [], "direct": [], "stream": []}
    size = manifest.size_bytes

    async def fetch(node, peer: str, d: Path, direct: bool) -> float:
        t = time.perf_counter()
        path = await fetch_artefact(node, peer, manifest, d, max_bytes=1 << 40, timeout_s=3600, direct=direct)
        rate = size / 1e6 / (time.perf_counter() - t)
        if path != final_path(d, manifest.content_hash):
            raise RuntimeError(f"fetched to {path}")
        path.unlink()
        return rate

    async def main() -> None:
        async with open_p2p(VERIFIER_SEED, ["/ip4/127.0.0.1/tcp/0"]) as node:
            peer = await node.connect(addr)
            for i in range(trials):
                # Each transfer starts with no dirty pages of the one before: the
                # writeback of GBs just written would otherwise slow the next.
                dest = dest_dir / f"tcp{i}"
                await trio.to_thread.run_sync(os.sync)
                rates["tcp"].append(await trio.to_thread.run_sync(tcp_copy, tcp_port, size, dest))
                dest.unlink()
                await trio.to_thread.run_sync(os.sync)
                rates["direct"].append(await fetch(node, peer, dest_dir / f"direct{i}", True))
                await trio.to_thread.run_sync(os.sync)
                rates["stream"].append(await fetch(node, peer, dest_dir / f"stream{i}", False))
                log(f"trial {i + 1}/{trials}: tcp copy {rates['tcp'][-1]:.1f} MB/s, direct fetch "
                    f"{rates['direct'][-1]:.1f} MB/s, stream-only fetch {rates['stream'][-1]:.1f} MB/s")

    trio.run(main)
    return rates


def _wait_file(path: Path, proc: subprocess.Popen, what: str, limit: float = 60.0) -> str:
    end = time.monotonic() + limit
    while time.monotonic() < end:
        if path.exists() and path.read_text():
            return path.read_text()
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not start within {limit:g} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="128 MiB, three trials")
    ap.add_argument("--size-mb", type=int, help="file size in MiB (default 2048, quick 128)")
    ap.add_argument("--trials", type=int, help="trials of each transfer (default 2, quick 3)")
    ap.add_argument("cmd", nargs="?", help=argparse.SUPPRESS)
    ap.add_argument("args", nargs="*", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.cmd == "_tcp":
        return tcp_serve(*a.args)
    if a.cmd == "_serve":
        return p2p_serve(*a.args)
    size = (a.size_mb or (128 if a.quick else 2048)) * MiB
    trials = a.trials or (3 if a.quick else 2)
    with tempfile.TemporaryDirectory(prefix="aem-bench-artefact-") as tmp:
        root = Path(tmp)
        src = root / "model.gguf"
        log(f"writing a {size // MiB} MiB file")
        content_hash = write_file(src, size)
        me = [sys.executable, str(Path(__file__).resolve())]
        procs: list[subprocess.Popen] = []
        try:
            tcp = subprocess.Popen(me + ["_tcp", str(src), str(root / "tcp.port")])
            procs.append(tcp)
            port = int(_wait_file(root / "tcp.port", tcp, "tcp server"))
            host = subprocess.Popen(me + ["_serve", str(src), content_hash.hex(), str(root / "p2p.addr")],
                                    stdin=subprocess.PIPE)
            procs.append(host)
            addr = _wait_file(root / "p2p.addr", host, "libp2p host")
            rates = run_trials(addr, port, manifest_for(content_hash, size), root, trials)
        finally:
            for p in procs:
                if p.stdin is not None:
                    p.stdin.close()
                else:
                    p.terminate()
            for p in procs:
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        sha = sha256_rate(src)
    # Medians: one transfer slowed (or sped) by the shared machine's other
    # jobs moves a best-of figure, much less a median.
    best = {k: statistics.median(v) for k, v in rates.items()}
    print(f"size_mb: {size / 1e6:.1f}")
    print(f"artefact_fetch_mb_s: {best['direct']:.1f}")
    print(f"artefact_fetch_stream_only_mb_s: {best['stream']:.1f}")
    print(f"tcp_copy_mb_s: {best['tcp']:.1f}")
    print(f"ratio: {best['direct'] / best['tcp']:.3f}")
    print(f"ratio_stream_only: {best['stream'] / best['tcp']:.3f}")
    print(f"sha256_mb_s: {sha:.1f}")


if __name__ == "__main__":
    main()
