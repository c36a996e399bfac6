"""The artefact stream's shell (specs/artefact-protocol.md): a host serves the
files of the capsules it hosts, a verifier fetches one into a directory.

The decisions (what to ask, whether a host's header may be followed, whether
the file is the manifest's) are the sessions of protocol/artefact.py, driven
by aemd/sessions.py; this module moves the bytes, which the sessions never
see: a range's raw bytes go from the file to the stream in large writes on
the host, and from the stream to the partial file, through the hash, on the
verifier.

On the verifier the file is ``DEST/<content hash hex>.part`` until the whole
of it has the manifest's hash, then ``DEST/<content hash hex>``: a file under
its final name has been checked, so a caller that gets a path may run evals
on it. A dropped connection, a stall or a host's refusal keeps the partial
file; the next fetch re-hashes the kept prefix and asks only for the rest. A
file whose hash is wrong is deleted (no prefix of it can be told good).

Direct connections (opt-in on both ends, protocol/artefact.py says why): the
host runs a :class:`DirectServer` (a plain TCP listener) beside its libp2p
host; a verifier that asks for it gets a one-time token over the stream and
the range's bytes over TCP, sent with ``os.sendfile`` and, on the verifier,
written and hashed by a worker thread while the next buffer arrives.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import queue
import socket
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import trio

from aemd.framing import deadline, write_frame
from aemd.sessions import drive
from protocol import errors
from protocol.artefact import (ArtefactError, FetchStats, artefact_protocol_id, check_size, fetch_client,
                               fetch_server)
from protocol.errors import AemError
from protocol.mesh import ExpertCapsuleManifest

log = logging.getLogger("aemd.artefacts")

READ_CHUNK = 1 << 20          # at most this much per stream.read (yamux hands over what it has)
WRITE_CHUNK = 1 << 20         # file bytes per stream.write on the host
HASH_CHUNK = 8 << 20          # re-hashing a kept prefix, in a worker thread
CONNECT_S = 10.0              # a direct connection not made (or its token not written) by then: dropped
SENDFILE_CHUNK = 8 << 20      # bytes per os.sendfile on a direct connection
DIRECT_CHUNK = 4 << 20        # bytes per buffer handed to the writer thread on the verifier
DIRECT_BUFFERS = 4            # buffers in flight between the receiving and the writing thread
IDLE_S = 30.0                 # a read or write that moves no byte for this long: the peer stalls
MAX_PER_PEER = 2              # artefact streams served to one peer at once
MAX_TOTAL = 8                 # artefact streams served at once
PROGRESS_STEP = 10            # percent between progress log lines

Progress = Callable[[int, int], None]     # (bytes held, file size)


def artefact_proto(network_id: bytes) -> str:
    """The artefact stream protocol of a network: ``/aem/NET/artefact/1``."""
    return artefact_protocol_id(network_id)


class Served(NamedTuple):
    """A file this node serves: where it is, how big, and its SHA-256."""
    path: str | Path
    size: int
    content_hash: bytes


Lookup = Callable[[bytes, bytes], "Served | None"]     # (capsule_id, content_hash), one of them empty


def lookup_capsules(capsules: Callable[[], Any]) -> Lookup:
    """A lookup over the node's hosted capsules (``capsules()`` -> iterable of
    ``aemd.capsules.LocalCapsule``): a gguf capsule with a file, by capsule id
    or content hash."""

    def lookup(capsule_id: bytes, content_hash: bytes) -> Served | None:
        for cap in capsules():
            m = cap.manifest
            if m.kind != "gguf" or not cap.serving.path:
                continue
            if (capsule_id and cap.id == capsule_id) or (content_hash and m.content_hash == content_hash):
                return Served(cap.serving.path, m.size_bytes, m.content_hash)
        return None

    return lookup


class _ProgressLog:
    """Log lines at most every PROGRESS_STEP percent, the callback at most every percent."""

    def __init__(self, what: str, total: int, start: int, on_progress: Progress | None) -> None:
        self.what, self.total, self.on_progress = what, total, on_progress
        self._logged = self._pct(start)
        self._called = -1
        self.update(start)

    def _pct(self, done: int) -> int:
        return 100 if self.total <= 0 else done * 100 // self.total

    def update(self, done: int) -> None:
        pct = self._pct(done)
        if pct >= self._logged + PROGRESS_STEP or (pct == 100 and self._logged < 100):
            self._logged = pct - pct % PROGRESS_STEP if pct < 100 else 100
            log.info("%s: %d%% (%d of %d bytes)", self.what, pct, done, self.total)
        if self.on_progress is not None and pct != self._called:
            self._called = pct
            self.on_progress(done, self.total)


async def _write(stream: Any, data: bytes | memoryview, idle_s: float) -> None:
    with deadline(idle_s, "artefact write"):
        try:
            await stream.write(data)
        except AemError:
            raise
        except Exception as exc:     # libp2p's StreamClosed / StreamReset / MuxedStreamError
            raise AemError(errors.UNAVAILABLE, f"artefact write failed: {type(exc).__name__}: {exc}") from exc


# -- the host -------------------------------------------------------------------


class _Sender:
    """The host's Call target: ``lookup`` and ``send`` of protocol.artefact.fetch_server."""

    def __init__(self, stream: Any, peer: str, lookup: Lookup, idle_s: float,
                 server: ArtefactServer | None) -> None:
        self.stream, self.peer, self._lookup, self.idle_s, self.server = stream, peer, lookup, idle_s, server
        self._files: dict[bytes, Served] = {}

    async def lookup(self, capsule_id: bytes, content_hash: bytes) -> tuple[bytes, int] | None:
        found = self._lookup(capsule_id, content_hash)
        if found is None:
            return None
        found = Served(*found)
        try:
            if os.stat(found.path).st_size != found.size:
                log.warning("artefact %s: the file is not its manifest's size; not served", found.path)
                return None
        except OSError:
            return None
        self._files[found.content_hash] = found
        return found.content_hash, found.size

    async def grant_direct(self, content_hash: bytes, offset: int, length: int) -> tuple[int, bytes] | None:
        direct = self.server.direct if self.server is not None else None
        if direct is None:
            return None
        return direct.grant(self._files[content_hash].path, offset, length, self.peer)

    async def await_direct(self, token: bytes) -> int:
        if self.server is None or self.server.direct is None:
            raise AemError(errors.INVARIANT, "a direct range awaited without a direct listener")
        sent = await self.server.direct.wait(token)
        self.server.served_bytes += sent
        return sent

    async def send(self, content_hash: bytes, offset: int, length: int) -> None:
        served = self._files[content_hash]
        progress = _ProgressLog(f"serving {content_hash.hex()[:16]} to {self.peer[:16]}", served.size, offset, None)
        end = offset + length
        with open(served.path, "rb", buffering=0) as fh:
            fh.seek(offset)
            buf = bytearray(WRITE_CHUNK)
            view = memoryview(buf)
            pos = offset
            while pos < end:
                n = fh.readinto(view[: min(WRITE_CHUNK, end - pos)])
                if not n:
                    # The file shrank under us: the client sees a short range and resumes elsewhere.
                    raise AemError(errors.UNAVAILABLE, f"artefact {served.path} ended at {pos}")
                await _write(self.stream, bytes(view[:n]), self.idle_s)
                pos += n
                if self.server is not None:
                    self.server.served_bytes += n
                progress.update(pos)


class _Grant:
    __slots__ = ("path", "offset", "length", "peer", "claimed", "done", "sent")

    def __init__(self, path: str | Path, offset: int, length: int, peer: str) -> None:
        self.path, self.offset, self.length, self.peer = path, offset, length, peer
        self.claimed, self.done = trio.Event(), trio.Event()
        self.sent = 0


class DirectServer:
    """The host's listener for direct connections (protocol/artefact.py: why).

    A served stream grants a one-time ``token`` for one range; a TCP client
    that writes that token within ``connect_s`` gets the range's bytes by
    ``os.sendfile`` (no copy through Python) and the connection is closed.
    Run :meth:`run` in the node's nursery; :attr:`port` is then the port."""

    def __init__(self, *, connect_s: float = CONNECT_S, idle_s: float = IDLE_S, max_grants: int = 64) -> None:
        self.connect_s, self.idle_s, self.max_grants = connect_s, idle_s, max_grants
        self.port: int | None = None
        self.sent_bytes = 0          # range bytes sent on direct connections
        self._grants: dict[bytes, _Grant] = {}

    async def run(self, host: str = "0.0.0.0", port: int = 0, *,
                  task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(port, host=host)
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        try:
            await trio.serve_listeners(self._handle, listeners)
        finally:
            self.port = None

    def grant(self, path: str | Path, offset: int, length: int, peer: str) -> tuple[int, bytes] | None:
        if self.port is None or len(self._grants) >= self.max_grants:
            return None
        token = os.urandom(32)
        self._grants[token] = _Grant(path, offset, length, peer)
        return self.port, token

    async def wait(self, token: bytes) -> int:
        """The bytes the range's connection sent, once it is over (0 when the
        client never came: it then asks for the range on the stream)."""
        g = self._grants.get(token)
        if g is None:
            return 0
        try:
            with trio.move_on_after(self.connect_s):
                await g.claimed.wait()
            if g.claimed.is_set():
                await g.done.wait()        # the connection bounds itself: idle_s per write
            return g.sent
        finally:
            self._grants.pop(token, None)

    async def _handle(self, conn: trio.SocketStream) -> None:
        g: _Grant | None = None
        try:
            token = b""
            with trio.move_on_after(self.connect_s):
                while len(token) < 32:
                    chunk = await conn.receive_some(32 - len(token))
                    if not chunk:
                        break
                    token += chunk
            g = self._grants.get(token)
            if g is None or g.claimed.is_set():
                g = None
                return
            g.claimed.set()
            await self._send(conn.socket, g)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, AemError) as exc:
            log.info("direct artefact connection ended: %s", exc)
        finally:
            if g is not None:
                g.done.set()
            with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                await conn.aclose()

    async def _send(self, sock: Any, g: _Grant) -> None:
        """``os.sendfile`` in a worker thread on a blocking duplicate of the
        socket: the kernel copies file to socket with no wake-up of the event
        loop per socket buffer. A client that stops reading fails the send
        after ``idle_s`` (SO_SNDTIMEO); a cancellation shuts the socket down,
        which ends the thread's send at once."""
        progress = _ProgressLog(f"serving {Path(g.path).name[:16]} directly to {g.peer[:16]}",
                                os.stat(g.path).st_size, g.offset, None)
        sec = int(self.idle_s)
        timeout = struct.pack("ll", sec, int((self.idle_s - sec) * 1e6))

        def send() -> None:
            with socket.socket(fileno=os.dup(sock.fileno())) as out, open(g.path, "rb", buffering=0) as fh:
                out.setblocking(True)
                out.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeout)
                pos, end = g.offset, g.offset + g.length
                while pos < end:
                    try:
                        n = os.sendfile(out.fileno(), fh.fileno(), pos, min(end - pos, SENDFILE_CHUNK))
                    except BlockingIOError:
                        raise AemError(errors.TIMEOUT, f"client read nothing for {self.idle_s:g} s") from None
                    if n == 0:
                        raise AemError(errors.UNAVAILABLE, f"artefact {g.path} ended at {pos}")
                    pos += n
                    g.sent += n
                    self.sent_bytes += n
                    progress.update(pos)

        try:
            await trio.to_thread.run_sync(send, abandon_on_cancel=True)
        except trio.Cancelled:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            raise


class ArtefactServer:
    """What a hosting node runs for the artefact protocol.

    ``lookup(capsule_id, content_hash)`` -> :class:`Served` or None: only the
    files it returns are served. ``allow(peer_id)`` -> bool: whether a peer may
    fetch at all (e.g. only genesis verifiers). At most ``max_per_peer``
    streams of one peer and ``max_total`` in all are served at once; one
    more gets an ``UNAVAILABLE`` reply. With ``direct`` (a running
    :class:`DirectServer`) a client that asks for it gets its ranges over a
    direct TCP connection."""

    def __init__(self, net: bytes, lookup: Lookup, *, allow: Callable[[str], bool] | None = None,
                 max_per_peer: int = MAX_PER_PEER, max_total: int = MAX_TOTAL, idle_s: float = IDLE_S,
                 direct: DirectServer | None = None) -> None:
        self.net, self.lookup, self.allow, self.direct = net, lookup, allow, direct
        self.max_per_peer, self.max_total, self.idle_s = max_per_peer, max_total, idle_s
        self._active: dict[str, int] = {}
        self.served_bytes = 0       # range bytes written to clients, as they go
        self.refused = 0

    @property
    def protocol_id(self) -> str:
        return artefact_proto(self.net)

    async def handler(self, stream: Any, peer: str) -> None:
        """The stream handler (``P2PNode.set_stream_handler(proto, server.handler, ...)``)."""
        await serve_artefact(stream, peer, net=self.net, lookup=self.lookup, allow=self.allow, server=self)

    def _enter(self, peer: str) -> bool:
        if self._active.get(peer, 0) >= self.max_per_peer or sum(self._active.values()) >= self.max_total:
            return False
        self._active[peer] = self._active.get(peer, 0) + 1
        return True

    def _leave(self, peer: str) -> None:
        left = self._active.get(peer, 0) - 1
        if left > 0:
            self._active[peer] = left
        else:
            self._active.pop(peer, None)


def install_server(p2p: Any, net: bytes, lookup: Callable[[bytes], tuple[str | Path, int] | None],
                   allow: Callable[[str], bool] | None = None, *, direct: DirectServer | None = None,
                   max_per_peer: int = MAX_PER_PEER, max_total: int = MAX_TOTAL) -> ArtefactServer:
    """Serve the artefact protocol on ``p2p`` (a running ``P2PNode``).

    ``lookup(content_hash)`` -> ``(path, size)`` of a hosted capsule's file,
    or None; ``allow(peer_id)`` as for :class:`ArtefactServer`; ``direct`` a
    running :class:`DirectServer`, if the node offers direct connections.
    Returns the server (its ``served_bytes`` and ``refused`` counters)."""

    def by_hash(capsule_id: bytes, content_hash: bytes) -> Served | None:
        found = lookup(content_hash) if content_hash else None
        return None if found is None else Served(found[0], found[1], content_hash)

    server = ArtefactServer(net, by_hash, allow=allow, direct=direct, max_per_peer=max_per_peer,
                            max_total=max_total)
    # One stream more than the server's own limits at the libp2p layer, so a
    # verifier over them gets the typed UNAVAILABLE reply rather than a reset
    # (and a penalty). No session timeout: a multi-GB range is bounded by the
    # idle deadlines of its reads and writes instead.
    p2p.set_stream_handler(server.protocol_id, server.handler, max_concurrent=max_total + 1,
                           max_per_peer=max_per_peer + 1, idle_timeout=IDLE_S, session_timeout=None)
    return server


async def _refuse(stream: Any, net: bytes, code: str, detail: str, idle_s: float) -> None:
    with trio.move_on_after(idle_s):
        try:
            await write_frame(stream, ArtefactError(net=net, code=code, detail=detail).encode())
        except AemError:
            pass


async def serve_artefact(stream: Any, peer: str, *, net: bytes, lookup: Lookup,
                         allow: Callable[[str], bool] | None = None, server: ArtefactServer | None = None,
                         idle_s: float = IDLE_S) -> int:
    """Serve one client's artefact stream; returns the bytes served. Without
    ``server`` no concurrency limit applies (tests, a one-off)."""
    idle_s = server.idle_s if server is not None else idle_s
    if allow is not None and not allow(peer):
        await _refuse(stream, net, errors.REFUSED, "this host serves artefacts to verifiers only", idle_s)
        if server is not None:
            server.refused += 1
        return 0
    if server is not None and not server._enter(peer):
        server.refused += 1
        await _refuse(stream, net, errors.UNAVAILABLE, "too many artefact streams; try again later", idle_s)
        return 0
    try:
        return await drive(fetch_server(net), stream, _Sender(stream, peer, lookup, idle_s, server))
    finally:
        if server is not None:
            server._leave(peer)


# -- the verifier ---------------------------------------------------------------


async def _read(stream: Any, n: int, pos: int) -> bytes:
    try:
        data = await stream.read(n)
    except AemError:
        raise
    except EOFError:                       # libp2p's StreamEOF
        data = b""
    except Exception as exc:               # StreamReset / MuxedStreamError
        raise AemError(errors.UNAVAILABLE,
                       f"artefact stream failed at byte {pos}: {type(exc).__name__}: {exc}") from exc
    if not data:
        raise AemError(errors.UNAVAILABLE, f"host closed the stream at byte {pos}")
    return data


class _Receiver:
    """The verifier's Call target: ``receive`` and ``digest`` of protocol.artefact.fetch_client."""

    def __init__(self, stream: Any, fh: Any, hasher: Any, progress: _ProgressLog, idle_s: float) -> None:
        self.stream, self.fh, self.hasher, self.progress, self.idle_s = stream, fh, hasher, progress, idle_s
        self.received = 0

    async def receive(self, offset: int, length: int) -> None:
        stream, fh, update = self.stream, self.fh, self.hasher.update
        if fh.tell() != offset:
            raise AemError(errors.INVARIANT, f"partial file at {fh.tell()}, range from {offset}")
        left = length
        pos = offset
        while left:
            with trio.move_on_after(self.idle_s) as scope:
                data = await _read(stream, min(left, READ_CHUNK), pos)
            if scope.cancelled_caught:
                raise AemError(errors.TIMEOUT, f"host sent nothing for {self.idle_s:g} s at byte {pos}")
            n = len(data)
            if n > left:          # a stream must never over-deliver
                raise AemError(errors.UNAVAILABLE, "stream returned more than was read")
            try:
                fh.write(data)
            except (OSError, ValueError) as exc:
                raise AemError(errors.STORE, f"cannot write the partial file: {exc}") from exc
            update(data)
            left -= n
            pos += n
            self.received += n
            self.progress.update(pos)

    async def receive_direct(self, port: int, token: bytes, offset: int, length: int) -> bool:
        """The range over a direct TCP connection to the host.

        The bytes are moved by two worker threads, not the event loop: one
        fills a few large buffers (``recv_into``) on a blocking duplicate of the
        socket, the other writes and hashes each filled buffer (all of these
        release the GIL), so receiving, writing and hashing overlap on the
        machine's cores. The file stays a prefix of what arrived, in order,
        whatever fails. A cancellation (the fetch's deadline) shuts the socket
        down, which ends the threads at once."""
        ip = _peer_ip(self.stream)
        if ip is None:
            return False
        try:
            with trio.fail_after(CONNECT_S):
                conn = await trio.open_tcp_stream(ip, port)
        except (OSError, trio.TooSlowError) as exc:
            log.info("direct connection to %s:%d failed (%s); the stream carries the range", ip, port, exc)
            return False
        if self.fh.tell() != offset:
            raise AemError(errors.INVARIANT, f"partial file at {self.fh.tell()}, range from {offset}")
        moved = _DirectReceive(conn.socket.fileno(), token, length, self.fh, self.hasher, self.idle_s)

        async def watch() -> None:
            try:
                while True:
                    await trio.sleep(0.1)
                    self.progress.update(offset + moved.written)
            finally:
                if not moved.finished:
                    with contextlib.suppress(OSError):
                        conn.socket.shutdown(socket.SHUT_RDWR)

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch)
                try:
                    await trio.to_thread.run_sync(moved.run)
                finally:
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            raise _first(group) from None
        finally:
            self.received += moved.written
            self.progress.update(offset + moved.written)
            with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                await conn.aclose()
        if moved.error is not None:
            raise moved.error
        return True

    async def digest(self) -> bytes:
        return self.hasher.digest()


class _DirectReceive:
    """A direct range's bytes: :meth:`run` (a worker thread) receives them
    into DIRECT_BUFFERS large buffers and writes each piece to the file as
    it arrives (as a plain copy would); a second thread hashes each filled
    buffer, so the hash, the costliest step, runs beside the copying."""

    def __init__(self, fd: int, token: bytes, length: int, fh: Any, hasher: Any, idle_s: float) -> None:
        self.fd, self.token, self.length, self.fh, self.hasher, self.idle_s = fd, token, length, fh, hasher, idle_s
        self.written = 0
        self.finished = False
        self.error: AemError | None = None

    def run(self) -> None:
        free: queue.Queue = queue.Queue()
        full: queue.Queue = queue.Queue()
        for _ in range(DIRECT_BUFFERS):
            free.put(bytearray(DIRECT_CHUNK))
        hashing = threading.Thread(target=self._hash, args=(full, free), name="aem-artefact-hash", daemon=True)
        hashing.start()
        write = self.fh.write
        try:
            with socket.socket(fileno=os.dup(self.fd)) as sock:
                sock.settimeout(self.idle_s)
                sock.sendall(self.token)
                left = self.length
                while left:
                    buf = free.get()
                    view = memoryview(buf)[: min(DIRECT_CHUNK, left)]
                    n = 0
                    try:
                        while n < len(view):
                            got = sock.recv_into(view[n:])
                            if not got:
                                raise AemError(errors.UNAVAILABLE, "host closed the direct connection")
                            try:
                                write(view[n: n + got])
                            except (OSError, ValueError) as exc:
                                raise AemError(errors.STORE, f"cannot write the partial file: {exc}") from exc
                            n += got
                            self.written += got
                    finally:
                        full.put((buf, n))      # what was written is hashed, whatever ends the range
                    left -= n
        except TimeoutError:
            self.error = AemError(errors.TIMEOUT, f"host sent nothing for {self.idle_s:g} s")
        except AemError as exc:
            self.error = exc
        except OSError as exc:
            self.error = AemError(errors.UNAVAILABLE, f"direct artefact connection failed: {exc}")
        finally:
            full.put(None)
            hashing.join()
            self.finished = True

    def _hash(self, full: queue.Queue, free: queue.Queue) -> None:
        update = self.hasher.update
        while (item := full.get()) is not None:
            buf, n = item
            if n:
                update(memoryview(buf)[:n])
            free.put(buf)


def _first(group: BaseExceptionGroup) -> BaseException:
    """The one error of a nursery's group that matters: an AemError if any."""
    leaves: list[BaseException] = []

    def walk(e: BaseException) -> None:
        if isinstance(e, BaseExceptionGroup):
            for x in e.exceptions:
                walk(x)
        else:
            leaves.append(e)

    walk(group)
    for e in leaves:
        if isinstance(e, AemError):
            return e
    return leaves[0] if leaves else group


def _peer_ip(stream: Any) -> str | None:
    """The host's IP address, as the libp2p connection of ``stream`` sees it."""
    try:
        addr = stream.muxed_conn.secured_conn.get_remote_address()
        if addr:
            return str(addr[0])
    except Exception:
        pass
    return None


def _hash_prefix(path: Path, length: int) -> Any:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as fh:
        buf = bytearray(HASH_CHUNK)
        view = memoryview(buf)
        left = length
        while left:
            n = fh.readinto(view[: min(HASH_CHUNK, left)])
            if not n:
                break
            h.update(view[:n])
            left -= n
    return h


def final_path(dest_dir: str | Path, content_hash: bytes) -> Path:
    return Path(dest_dir) / content_hash.hex()


def partial_path(dest_dir: str | Path, content_hash: bytes) -> Path:
    return Path(dest_dir) / f"{content_hash.hex()}.part"


async def fetch_artefact(p2p: Any, peer_id: str, manifest: ExpertCapsuleManifest, dest_dir: str | Path, *,
                         max_bytes: int, timeout_s: float, on_progress: Progress | None = None,
                         idle_s: float = IDLE_S, by_capsule_id: bool = False, direct: bool = False,
                         stats: FetchStats | None = None) -> Path:
    """Fetch the artefact of ``manifest`` from ``peer_id`` into ``dest_dir``;
    returns the path of the checked file, ``dest_dir/<content hash hex>``.

    Refused before any byte moves when the manifest's size exceeds
    ``max_bytes`` (TOO_LARGE). The whole fetch is bounded by ``timeout_s``
    and every read by ``idle_s`` (TIMEOUT). ``on_progress(held, size)`` is
    called as bytes arrive (at most once per percent). ``direct``: ask the
    host for the bytes over a direct TCP connection (faster; see
    protocol/artefact.py); a host without one, or one that cannot be
    reached, serves them over the stream, and a direct fetch whose hash fails
    is fetched once more over the stream alone before BAD_PROOF is believed.

    Errors are AemError: TIMEOUT / UNAVAILABLE (the partial file kept: call
    again to resume), BAD_PROOF (the file is not the manifest's: deleted),
    TOO_LARGE / BAD_VALUE / WRONG_NETWORK (the host misbehaved; nothing it
    sent was written), NOT_FOUND / REFUSED (the host's answer). ``stats``, if
    given, gets the requests made and bytes moved by this call."""
    size, content_hash = manifest.size_bytes, manifest.content_hash
    check_size(size, max_bytes)
    dest = Path(dest_dir)
    final, part = final_path(dest, content_hash), partial_path(dest, content_hash)
    try:
        if final.stat().st_size == size:
            return final
    except FileNotFoundError:
        pass
    dest.mkdir(parents=True, exist_ok=True)
    what = f"fetching {content_hash.hex()[:16]} from {peer_id[:16]}"
    with deadline(timeout_s, f"artefact fetch of {size} bytes"):
        async with _part_lock(part):
            if final.exists() and final.stat().st_size == size:
                return final        # another fetch of the same file finished while this one waited
            await _fetch_or_retry(p2p, peer_id, manifest, part, what, max_bytes=max_bytes, on_progress=on_progress,
                                  idle_s=idle_s, by_capsule_id=by_capsule_id, direct=direct, stats=stats)
            os.replace(part, final)
    log.info("%s: done, %d bytes, hash checked", what, size)
    return final


# One fetch at a time per partial file: two would write the same bytes twice over.
_PART_LOCKS: dict[Path, list] = {}


@contextlib.asynccontextmanager
async def _part_lock(part: Path):
    key = part.resolve()
    entry = _PART_LOCKS.setdefault(key, [trio.Lock(), 0])
    entry[1] += 1
    try:
        async with entry[0]:
            yield
    finally:
        entry[1] -= 1
        if not entry[1]:
            del _PART_LOCKS[key]


async def _fetch_or_retry(p2p: Any, peer_id: str, manifest: ExpertCapsuleManifest, part: Path, what: str, *,
                          max_bytes: int, on_progress: Progress | None, idle_s: float, by_capsule_id: bool,
                          direct: bool, stats: FetchStats | None) -> None:
    try:
        await _fetch_into(p2p, peer_id, manifest, part, what, max_bytes=max_bytes, on_progress=on_progress,
                          idle_s=idle_s, by_capsule_id=by_capsule_id, direct=direct, stats=stats)
    except AemError as exc:
        if not (direct and exc.code == errors.BAD_PROOF):
            raise
        # Bytes on a direct connection have no channel security: the stream decides.
        log.warning("%s: the direct fetch failed its hash; fetching over the stream alone", what)
        await _fetch_into(p2p, peer_id, manifest, part, what, max_bytes=max_bytes, on_progress=on_progress,
                          idle_s=idle_s, by_capsule_id=by_capsule_id, direct=False, stats=stats)


async def _fetch_into(p2p: Any, peer_id: str, manifest: ExpertCapsuleManifest, part: Path, what: str, *,
                      max_bytes: int, on_progress: Progress | None, idle_s: float, by_capsule_id: bool,
                      direct: bool, stats: FetchStats | None) -> None:
    size, content_hash, net = manifest.size_bytes, manifest.content_hash, manifest.net
    have = part.stat().st_size if part.exists() else 0
    if have > size:
        have = 0          # not a prefix of this file
    try:
        try:
            hasher = (await trio.to_thread.run_sync(_hash_prefix, part, have)) if have else hashlib.sha256()
            fh = open(part, "r+b" if part.exists() else "wb")
        except OSError as exc:
            raise AemError(errors.STORE, f"cannot open the partial file {part}: {exc}") from exc
        if have:
            log.info("%s: resuming at %d of %d bytes", what, have, size)
        with fh:
            fh.truncate(have)
            fh.seek(have)
            progress = _ProgressLog(what, size, have, on_progress)
            async with p2p.stream(peer_id, artefact_proto(net)) as stream:
                target = _Receiver(stream, fh, hasher, progress, idle_s)
                try:
                    got = await drive(fetch_client(net, content_hash, size, have, max_bytes, direct=direct,
                                                   capsule_id=manifest.id if by_capsule_id else b""),
                                      stream, target)
                finally:
                    if stats is not None:
                        stats.received += target.received
                if stats is not None:
                    stats.requests += got.requests
    except AemError as exc:
        if exc.code == errors.BAD_PROOF:
            part.unlink(missing_ok=True)
            log.warning("%s: %s; partial file deleted", what, exc.detail)
        else:
            log.info("%s: stopped: %s", what, exc)
        raise
