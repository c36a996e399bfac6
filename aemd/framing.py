"""Length-prefixed frames over a libp2p stream.

A frame is a 4-byte big-endian unsigned length ``n`` followed by exactly ``n``
bytes of payload (the byte format is :mod:`protocol.frame`, shared with the
control socket and log files; this module is the async reading and writing)::

    +----------------+-------------------+
    | n (u32, BE)    | n payload bytes   |
    +----------------+-------------------+

Why not py-libp2p's own helpers: ``read_varint_prefixed_bytes`` (and
``libp2p.request_response`` built on it) fails above ~6.8 MB, and it has no size
limit chosen by the caller. Here:

* The reader checks the announced length against the caller's ``max_len``
  *before* reading a single byte of the body, so a hostile prefix such as
  ``2**31`` is refused without allocating or waiting for anything
  (``AemError(TOO_LARGE)``).
* ``stream.read(n)`` returns *at most* ``n`` bytes (whatever the muxer has
  buffered), so the reader loops until it has exactly ``n`` bytes. The end of
  the stream in the middle of a frame (header or body) is a truncated frame:
  ``AemError(BAD_ENCODING)``. The end of the stream exactly at a frame boundary
  is a clean close: :func:`read_frame` raises ``AemError(UNAVAILABLE)``,
  :func:`read_frame_or_eof` returns ``None``.
* Stream errors from libp2p (reset, closed, muxer failure) become
  ``AemError(UNAVAILABLE)``; callers never see libp2p's exception classes.

Timeouts are the caller's, as trio scopes it can see. Never leave a read on a
peer's stream unbounded: a peer that stops sending would hold the task forever.
The pattern, with :func:`deadline` turning ``trio.TooSlowError`` into
``AemError(TIMEOUT)``::

    with deadline(10.0, "sync response"):
        await write_frame(stream, request)
        reply = await read_frame(stream, max_len=MAX_SYNC_RESPONSE)

or with plain trio, when the caller wants to handle the timeout itself::

    with trio.move_on_after(10.0) as scope:
        reply = await read_frame(stream, max_len)
    if scope.cancelled_caught:
        ...

Streams served through :meth:`aemd.p2p.P2PNode.set_stream_handler` carry a
``frame_policy`` (:class:`FramePolicy`): then a frame's body, once its header
has arrived, must arrive within ``policy.frame_deadline(length)`` (a peer that
trickles a frame byte by byte fails with ``AemError(TIMEOUT)`` and is reported
to ``policy.abuse``), and every chunk is charged to ``policy.take`` as it
arrives and given back when the frame is complete or failed: the bytes of
incomplete frames are bounded per peer and in all, and nothing is reserved
for a frame before its bytes arrive (chunks are kept as they come, never an
allocation of the announced length).

One more stack fact (STACK-NOTES, Streams): a receiver that stops reading for
~5 s makes a writer's stream reset after ~4 MB (Yamux window timeout), so a
reader should keep reading, and big transfers should be split into frames that
the receiver consumes as they arrive.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

import trio

from protocol.frame import HEADER_LEN, MAX_FRAME_LEN, check_limit, decode_header, encode_header
from protocol.errors import (
    BAD_ENCODING,
    BAD_VALUE,
    TIMEOUT,
    TOO_LARGE,
    UNAVAILABLE,
    AemError,
)

__all__ = [
    "HEADER_LEN",
    "MAX_FRAME_LEN",
    "FramePolicy",
    "FrameStream",
    "deadline",
    "read_exact",
    "read_frame",
    "read_frame_or_eof",
    "write_frame",
]

# HEADER_LEN (the 4-byte prefix) and MAX_FRAME_LEN (the u32 ceiling; callers
# pass their own, much smaller, ``max_len``) come from protocol.frame.

#: Writes above this size are split into several ``stream.write`` calls so that
#: one call never holds a huge slice; below it the header and body go together.
_WRITE_CHUNK = 256 * 1024


class FrameStream(Protocol):
    """What framing needs from a stream: libp2p's ``INetStream`` has it."""

    async def read(self, n: int | None = None) -> bytes: ...

    async def write(self, data: bytes) -> None: ...


class FramePolicy(Protocol):
    """Limits a stream's owner puts on inbound frames (see the module docstring)."""

    def frame_deadline(self, length: int) -> float: ...

    def take(self, n: int) -> None:
        """Charge ``n`` arrived bytes; raise AemError to refuse them."""
        ...

    def give(self, n: int) -> None: ...

    def abuse(self, reason: str) -> None: ...


class _EOF(Exception):
    """Internal: the stream ended after ``got`` bytes of a ``want``-byte read."""

    def __init__(self, got: int, want: int) -> None:
        super().__init__(f"end of stream after {got} of {want} bytes")
        self.got = got


_check_limit = check_limit


def _is_eof(exc: BaseException) -> bool:
    # libp2p's StreamEOF subclasses EOFError; imported lazily by name so this
    # module stays importable (and testable) without libp2p.
    return isinstance(exc, EOFError)


async def _read_some(stream: FrameStream, n: int) -> bytes:
    """One ``stream.read(n)``; end of stream -> ``b""``; other errors -> UNAVAILABLE."""
    try:
        return await stream.read(n)
    except AemError:
        raise
    except Exception as exc:  # libp2p raises StreamEOF / StreamReset / StreamError
        if _is_eof(exc):
            return b""
        raise AemError(UNAVAILABLE, f"stream read failed: {type(exc).__name__}: {exc}") from exc


async def _read_exact(stream: FrameStream, n: int, policy: FramePolicy | None = None) -> bytes:
    """Exactly ``n`` bytes, or :class:`_EOF` carrying how many arrived.

    With ``policy``, each chunk is charged as it arrives and the total given
    back on the way out (the frame is then the caller's, bounded by how many
    handlers run)."""
    if n == 0:
        return b""
    chunks: list[bytes] = []
    got = 0
    try:
        while got < n:
            chunk = await _read_some(stream, n - got)
            if not chunk:
                raise _EOF(got, n)
            if len(chunk) > n - got:  # a stream must never over-deliver; refuse if it does
                raise AemError(UNAVAILABLE, f"stream returned {len(chunk)} bytes for a {n - got}-byte read")
            if policy is not None:
                policy.take(len(chunk))
            chunks.append(chunk)
            got += len(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)
    finally:
        if policy is not None and got:
            policy.give(got)


async def read_exact(stream: FrameStream, n: int) -> bytes:
    """Read exactly ``n`` bytes. The end of the stream first: ``AemError(BAD_ENCODING)``."""
    if n < 0:
        raise AemError(BAD_VALUE, f"negative read length {n}")
    try:
        return await _read_exact(stream, n)
    except _EOF as eof:
        raise AemError(BAD_ENCODING, f"truncated: {eof}") from None


async def read_frame_or_eof(stream: FrameStream, max_len: int) -> bytes | None:
    """Read one frame; ``None`` if the stream ended cleanly before its first byte.

    Raises ``AemError``: TOO_LARGE (announced length above ``max_len``, checked
    before the body is read), BAD_ENCODING (stream ended mid-frame), UNAVAILABLE
    (stream reset or failed).
    """
    _check_limit(max_len)
    try:
        header = await _read_exact(stream, HEADER_LEN)
    except _EOF as eof:
        if eof.got == 0:
            return None
        raise AemError(BAD_ENCODING, f"truncated frame header: {eof}") from None
    length = decode_header(header, max_len)
    policy: FramePolicy | None = getattr(stream, "frame_policy", None)
    try:
        if policy is None:
            return await _read_exact(stream, length)
        limit = policy.frame_deadline(length)
        with trio.move_on_after(limit):
            return await _read_exact(stream, length, policy)
        policy.abuse(f"frame of {length} bytes not delivered within {limit:.1f} s")
        raise AemError(TIMEOUT, f"frame of {length} bytes not delivered within {limit:.1f} s")
    except _EOF as eof:
        raise AemError(BAD_ENCODING, f"truncated frame body: {eof}") from None


async def read_frame(stream: FrameStream, max_len: int) -> bytes:
    """Read one frame of at most ``max_len`` bytes.

    As :func:`read_frame_or_eof`, but a clean end of stream before the frame is
    ``AemError(UNAVAILABLE)`` too: the caller expected a frame and got none.
    """
    frame = await read_frame_or_eof(stream, max_len)
    if frame is None:
        raise AemError(UNAVAILABLE, "stream closed before a frame arrived")
    return frame


async def write_frame(stream: FrameStream, data: bytes, max_len: int = MAX_FRAME_LEN) -> None:
    """Write ``data`` as one frame. Longer than ``max_len``: ``AemError(TOO_LARGE)``.

    Stream errors become ``AemError(UNAVAILABLE)``. Nothing is written when the
    size check fails.
    """
    _check_limit(max_len)
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise AemError(BAD_VALUE, f"frame payload must be bytes, not {type(data).__name__}")
    length = len(data)
    if length > max_len:
        raise AemError(TOO_LARGE, f"frame of {length} bytes, limit is {max_len}")
    header = encode_header(length)
    try:
        if length <= _WRITE_CHUNK:
            await stream.write(header + bytes(data))
        else:
            await stream.write(header)
            view = memoryview(data)
            for start in range(0, length, _WRITE_CHUNK):
                await stream.write(bytes(view[start : start + _WRITE_CHUNK]))
    except AemError:
        raise
    except Exception as exc:  # StreamClosed / StreamReset / StreamError
        raise AemError(UNAVAILABLE, f"stream write failed: {type(exc).__name__}: {exc}") from exc


@contextmanager
def deadline(seconds: float, what: str = "operation") -> Iterator[trio.CancelScope]:
    """``trio.fail_after(seconds)`` that raises ``AemError(TIMEOUT)`` instead of TooSlowError.

    Only the expiry of *this* scope becomes TIMEOUT; a cancellation from an
    outer scope passes through untouched.
    """
    try:
        with trio.fail_after(seconds) as scope:
            yield scope
    except trio.TooSlowError:
        raise AemError(TIMEOUT, f"{what} took longer than {seconds:g} s") from None
