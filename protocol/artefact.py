"""Fetching a capsule's artefact (a GGUF file, up to many GB) from its host:
the messages of the artefact stream and its two ends as sans-I/O sessions
(protocol/session.py), specs/artefact-protocol.md.

The client (a verifier) asks for a byte range of the file named by its
content hash (or by its capsule id); the host answers with an
:class:`ArtefactRange` header saying exactly which range follows, then the
range's bytes *raw*, not framed; the client may ask again on the same stream
(the host may serve less than asked) and closes it when it has the whole file.

Why raw bytes behind a header instead of one frame or message per chunk: the
range's length is fixed by the header, so the reader needs no framing to find
its end, and a multi-GB transfer is moved by the shell with the fewest copies
(the session never sees the bytes). So the byte-moving is a ``Call`` whose
bound (offset, length) the session has already checked:

* client ``Call("receive", (offset, length))``: read exactly ``length`` bytes
  from the stream into the partial file at ``offset`` (which is where it ends),
  hashing them on the way; returns None. A stall, an end of stream or a reset
  is the shell's ``AemError`` (TIMEOUT / UNAVAILABLE) and ends the session;
  the bytes received so far stay in the partial file for a resumed fetch.
* client ``Call("receive_direct", (port, token, offset, length))``: the same
  over a plain TCP connection to the host's address at ``port``, opened by
  writing ``token``; returns False when no connection could be made (nothing
  received), True when the range is in.
* client ``Call("digest")``: SHA-256 of the whole file received.
* server ``Call("lookup", (capsule_id, content_hash))``: ``(content_hash,
  size)`` of a file this node serves, or None.
* server ``Call("send", (content_hash, offset, length))``: write that range of
  the file to the stream.
* server ``Call("grant_direct", (content_hash, offset, length))``: ``(port,
  token)`` of a one-time direct connection for that range, or None (no
  direct listener: the range goes over the stream).
* server ``Call("await_direct", (token,))``: wait until that connection has
  served the range, failed, or was never made; returns the bytes it sent.

Why a direct connection at all (opt-in on both ends): py-libp2p moves a
stream's bytes through Yamux and Noise in Python, 64 KiB at a time, about
100-160 MB/s on this project's machines against ~1 GB/s for a plain loopback
socket (bench/artefact_fetch.py). The stream still carries everything that
needs the peer's authentication: the request, the header checks, the token
(secret: it travels inside Noise, so only that peer can claim the
connection, once). The bytes themselves need no channel security: the
whole-file hash checks them, and a network attacker that alters them can
only cause a BAD_PROOF, which the shell answers by fetching again over the
stream alone. They are not confidential on that connection.

The client's decisions, all before a byte lands in the file: the manifest's
size within the caller's ``max_bytes`` (else TOO_LARGE, nothing fetched), and
for every header: the right network and content hash, the manifest's size,
the offset asked for, a length from 1 to what was asked (a host that claims
another size or would send more is TOO_LARGE / BAD_VALUE). At the end the
whole file's hash against the manifest's ``content_hash`` (BAD_PROOF: the
shell then deletes the partial file, which is bad as a whole).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from protocol import errors
from protocol.errors import AemError
from protocol.schema import HASH, HASH_OR_EMPTY, TEXT, U63, Bool, Bytes, Str, UInt, WireObject, decode_one_of, f
from protocol.session import Call, Recv, Send, Session

PROTOCOL_VERSION = 1
READ_TIMEOUT_S = 30.0          # a header or request frame; the raw bytes have the shell's idle bound
MAX_REQUESTS_PER_STREAM = 64   # ranges one stream may ask for (a host serving 1 byte each would loop)
# What an error reply may say: a host cannot make the verifier raise any code it likes.
REPLY_CODES = (errors.NOT_FOUND, errors.REFUSED, errors.BAD_VALUE, errors.UNAVAILABLE)


def artefact_protocol_id(network_id: bytes) -> str:
    return f"/aem/{network_id.hex()}/artefact/{PROTOCOL_VERSION}"


@dataclass(frozen=True)
class ArtefactRequest(WireObject):
    """Client -> host: ``length`` bytes from ``offset`` of the file with
    ``content_hash``, or of the capsule ``capsule_id`` (one of the two, the
    other empty)."""
    TYPE = "artefact_req"
    MAX_SIZE = 256
    net: bytes = f(HASH)
    capsule_id: bytes = f(HASH_OR_EMPTY)
    content_hash: bytes = f(HASH_OR_EMPTY)
    offset: int = f(UInt(0, U63))
    length: int = f(UInt(1, U63))
    # The client would take the bytes over a direct TCP connection. Required on
    # the wire like every field; a default only so that code need not name it.
    direct: bool = dataclasses.field(default=False, metadata={"kind": Bool()})

    def _validate(self) -> None:
        if bool(self.capsule_id) == bool(self.content_hash):
            raise AemError(errors.BAD_VALUE, "artefact_req: name exactly one of capsule_id and content_hash")


@dataclass(frozen=True)
class ArtefactRange(WireObject):
    """Host -> client: the file is ``size`` bytes with ``content_hash``; the
    ``length`` raw bytes from ``offset`` follow this frame at once."""
    TYPE = "artefact_range"
    MAX_SIZE = 256
    net: bytes = f(HASH)
    content_hash: bytes = f(HASH)
    size: int = f(UInt(0, U63))
    offset: int = f(UInt(0, U63))
    length: int = f(UInt(0, U63))

    def _validate(self) -> None:
        if self.offset + self.length > self.size:
            raise AemError(errors.BAD_VALUE, "artefact_range: range past the end of the file")


@dataclass(frozen=True)
class ArtefactDirect(WireObject):
    """Host -> client, to a ``direct`` request: the range's raw bytes come
    over a plain TCP connection to ``port`` at the host's address, once the
    client has written ``token`` on it; then the stream goes on as after a
    range."""
    TYPE = "artefact_direct"
    MAX_SIZE = 256
    net: bytes = f(HASH)
    content_hash: bytes = f(HASH)
    size: int = f(UInt(0, U63))
    offset: int = f(UInt(0, U63))
    length: int = f(UInt(0, U63))
    port: int = f(UInt(1, 65535))
    token: bytes = f(Bytes(32))

    def _validate(self) -> None:
        if self.offset + self.length > self.size:
            raise AemError(errors.BAD_VALUE, "artefact_direct: range past the end of the file")


@dataclass(frozen=True)
class ArtefactError(WireObject):
    """Host -> client: the request is not served; the stream ends."""
    TYPE = "artefact_err"
    MAX_SIZE = 512
    net: bytes = f(HASH)
    code: str = f(Str(16, choices=REPLY_CODES))
    detail: str = f(TEXT)


REPLIES = {c.TYPE: c for c in (ArtefactRange, ArtefactDirect, ArtefactError)}
REQUEST_LIMIT = ArtefactRequest.MAX_SIZE
REPLY_LIMIT = max(c.MAX_SIZE for c in REPLIES.values())


def decode_request(data: bytes) -> ArtefactRequest:
    return ArtefactRequest.decode(data)


def decode_reply(data: bytes) -> ArtefactRange | ArtefactDirect | ArtefactError:
    return decode_one_of(data, REPLIES, REPLY_LIMIT)


@dataclass
class FetchStats:
    requests: int = 0
    received: int = 0        # bytes moved by this session (a resumed fetch: the remainder only)


def check_size(size: int, max_bytes: int) -> None:
    """Refuse, before a byte is fetched, an artefact larger than the node
    class it claims allows."""
    if size > max_bytes:
        raise AemError(errors.TOO_LARGE, f"artefact of {size} bytes exceeds the limit of {max_bytes}")


def check_range(hdr: ArtefactRange | ArtefactDirect, net: bytes, content_hash: bytes, size: int, offset: int,
                asked: int) -> None:
    """Whether a host's header may be followed: it must describe the file the
    manifest names and the range asked for, or a prefix of it."""
    if hdr.net != net:
        raise AemError(errors.WRONG_NETWORK, "artefact range of another network")
    if hdr.content_hash != content_hash:
        raise AemError(errors.BAD_VALUE, "host serves another file than the one asked for")
    if hdr.size != size:
        code = errors.TOO_LARGE if hdr.size > size else errors.BAD_VALUE
        raise AemError(code, f"host says the file is {hdr.size} bytes, the manifest {size}")
    if hdr.offset != offset:
        raise AemError(errors.BAD_VALUE, f"host serves from offset {hdr.offset}, asked for {offset}")
    if hdr.length > asked:
        raise AemError(errors.TOO_LARGE, f"host would send {hdr.length} bytes, asked for {asked}")
    if hdr.length == 0:
        raise AemError(errors.BAD_VALUE, "host serves an empty range")


def _frame(data: bytes | None, what: str) -> bytes:
    if data is None:
        raise AemError(errors.UNAVAILABLE, f"stream closed before the {what}")
    return data


def fetch_client(net: bytes, content_hash: bytes, size: int, have: int, max_bytes: int, *,
                 capsule_id: bytes = b"", end: int | None = None, direct: bool = False) -> Session:
    """Fetch bytes ``have`` .. ``end`` (default: the whole ``size``) of the
    file with ``content_hash``; ``have`` bytes are already in the partial file
    (resume). With ``end`` None the session checks the whole file's digest
    at the end; a fetch of one part of a file in parallel with others leaves
    that to its caller. Returns :class:`FetchStats`.

    ``capsule_id`` non-empty: the request names the capsule instead of the
    content hash (the host looks it up; the header must still name
    ``content_hash``). ``direct``: ask for the bytes over a direct TCP
    connection (``Call("receive_direct", (port, token, offset, length))`` ->
    whether the connection could be made; when it could not, the rest comes
    over the stream)."""
    check_size(size, max_bytes)
    stop = size if end is None else end
    if not 0 <= have <= stop <= size:
        raise AemError(errors.BAD_VALUE, f"cannot fetch [{have}, {stop}) of a {size}-byte file")
    stats = FetchStats()
    while have < stop:
        if stats.requests >= MAX_REQUESTS_PER_STREAM:
            raise AemError(errors.REFUSED, "host serves the file in too many small ranges")
        asked = stop - have
        req = ArtefactRequest(net=net, capsule_id=capsule_id, content_hash=b"" if capsule_id else content_hash,
                              offset=have, length=asked, direct=direct)
        stats.requests += 1
        yield Send(req.encode(), READ_TIMEOUT_S, "artefact request")
        reply = decode_reply(_frame((yield Recv(REPLY_LIMIT, READ_TIMEOUT_S, "artefact header")),
                                    "artefact header"))
        if isinstance(reply, ArtefactError):
            if reply.net != net:
                raise AemError(errors.WRONG_NETWORK, "artefact error of another network")
            raise AemError(reply.code, f"host: {reply.detail}")
        check_range(reply, net, content_hash, size, have, asked)
        if isinstance(reply, ArtefactDirect):
            if not direct:
                raise AemError(errors.BAD_VALUE, "host answered with a direct range, asked for none")
            if not (yield Call("receive_direct", (reply.port, reply.token, have, reply.length))):
                direct = False     # the host's port cannot be reached: the stream carries the rest
                continue
        else:
            yield Call("receive", (have, reply.length))
        have += reply.length
        stats.received += reply.length
    if end is None:
        digest = yield Call("digest")
        if digest != content_hash:
            raise AemError(errors.BAD_PROOF, "artefact does not match the manifest's content hash")
    return stats


def fetch_server(net: bytes) -> Session:
    """Answer one client's requests until it closes the stream; returns the
    bytes served. An unknown file or a bad range gets an :class:`ArtefactError`
    and ends the session."""
    served = 0
    for _ in range(MAX_REQUESTS_PER_STREAM):
        frame = yield Recv(REQUEST_LIMIT, READ_TIMEOUT_S, "artefact request")
        if frame is None:
            return served
        req = decode_request(frame)
        if req.net != net:
            raise AemError(errors.WRONG_NETWORK, "artefact request for another network")
        found = yield Call("lookup", (req.capsule_id, req.content_hash))
        if found is None:
            yield Send(ArtefactError(net=net, code=errors.NOT_FOUND, detail="no such artefact here").encode(),
                       READ_TIMEOUT_S, "artefact error", best_effort=True)
            return served
        content_hash, size = found
        if req.offset >= size:
            yield Send(ArtefactError(net=net, code=errors.BAD_VALUE,
                                     detail=f"offset {req.offset} not below the size {size}").encode(),
                       READ_TIMEOUT_S, "artefact error", best_effort=True)
            return served
        length = min(req.length, size - req.offset)
        grant = (yield Call("grant_direct", (content_hash, req.offset, length))) if req.direct else None
        if grant is not None:
            port, token = grant
            yield Send(ArtefactDirect(net=net, content_hash=content_hash, size=size, offset=req.offset,
                                      length=length, port=port, token=token).encode(),
                       READ_TIMEOUT_S, "artefact header")
            served += (yield Call("await_direct", (token,)))
            continue
        yield Send(ArtefactRange(net=net, content_hash=content_hash, size=size, offset=req.offset,
                                 length=length).encode(), READ_TIMEOUT_S, "artefact header")
        yield Call("send", (content_hash, req.offset, length))
        served += length
    return served
