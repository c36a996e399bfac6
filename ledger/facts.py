"""What replay needs to know about one entry, computed from its bytes alone.

Replay has two halves. This module is the first: for each entry, on its own,
decode the envelope and the body, check every signature (the entry's, the
object's, the embedded spend authorisation's, each verifier attestation's)
and keep only the few fields the ledger rules read, as a :class:`Fact`. It is
a pure function of (entry bytes, network context), so it can run in any
order, in parallel across processes, or once at insert time with the result
stored next to the entry (``ledger/store.py``), after which replay never
checks a signature again. The second half (``ledger/feeds.py``,
``ledger/rules.py``) works on facts only and holds no crypto.

A fact records why an entry cannot apply (``code``) when its envelope or its
body is bad. An envelope failure (size, decoding, network, entry signature)
means the entry is not part of any feed (``author`` is None); a body failure
keeps the entry in its author's feed, where replay rejects it with the code.
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import msgpack

from crypto.hashing import H
from ledger.reasons import LAMPORT_AHEAD
from protocol import errors
from protocol.entry import MAX_ENTRY, Entry
from protocol.errors import AemError
from protocol.genesis import Genesis

# Bump when the meaning or layout of a Fact changes: stores recompute theirs.
FACTS_VERSION = 3

# Lamport clocks are bounded by the author's timestamp (specs/ledger.md
# section 1): an entry's clock, shifted right by LAMPORT_SHIFT bits, is at
# most its ts. So 2^16 clock ticks per second of author time: far more than
# honest clocks ever advance, and no entry can push the clocks of others to
# 2^62. A node's own clock follows only entries at most LOCAL_CLOCK_MARGIN
# into the current second (ledger/store.py), so it always has room left.
LAMPORT_SHIFT = 16
LOCAL_CLOCK_MARGIN = 1 << 15


class Context(NamedTuple):
    """The parts of a genesis that checking one entry depends on."""
    net: bytes                  # network id
    verifiers: frozenset        # genesis verifier keys
    max_entry: int              # entry size limit in bytes

    @classmethod
    def of(cls, genesis: Genesis) -> Context:
        return cls(genesis.network_id, frozenset(genesis.verifiers),
                   min(genesis.limits.max_entry_bytes, MAX_ENTRY))


class Fact(NamedTuple):
    """One entry as replay sees it. ``args`` by kind:

    - ``transfer``: (recipient, amount)
    - ``inference_receipt``: (payer, spend_key, charge, started_at, expires_at, finished_at)
    - ``contribution``: (credit_basis, measured_delta, content_commitment, eval_id,
      number of distinct genesis verifiers whose attestation verifies)
    - ``challenge``: (receipt_id, created_at)
    - ``dispute``: (receipt_id, created_at)
    - ``receipt_ack``: (receipt_id, accepted)
    - other kinds: ()
    """
    id: bytes                   # entry id: H(entry bytes)
    author: bytes | None        # None: the envelope is invalid (code says why)
    seq: int
    prev: bytes
    lamport: int
    ts: int
    kind: str
    code: str | None            # why it cannot apply; None when envelope and body are valid
    obj: bytes                  # id of the body object (H(body)); b"" when the body is invalid
    signer: bytes               # the body object's signer; b"" when the body is invalid
    args: tuple

    @property
    def key(self) -> tuple:
        """Position in the replay order (:func:`order_key`)."""
        return order_key(self)


def order_key(f: Any) -> tuple:
    """The replay order of ``specs/ledger.md`` section 4: (lamport, author,
    seq). The one place that spells it; everything that sorts or compares
    entries in replay order (feeds, rules, checkpoints) calls this."""
    return (f.lamport, f.author, f.seq)


def _transfer(o: Any, ctx: Context) -> tuple:
    return (o.recipient, o.amount)


def _receipt(o: Any, ctx: Context) -> tuple:
    a = o.spend_auth
    return (o.payer, a.spend_key, o.charge, o.started_at, a.expires_at, o.finished_at)


def _contribution(o: Any, ctx: Context) -> tuple:
    return (o.credit_basis, o.measured_delta, o.content_commitment, o.eval_id,
            len(o.valid_attesters(ctx.verifiers)))


def _challenge(o: Any, ctx: Context) -> tuple:
    return (o.receipt_id, o.created_at)


def _ack(o: Any, ctx: Context) -> tuple:
    return (o.receipt_id, o.accepted)


def _none(o: Any, ctx: Context) -> tuple:
    return ()


_ARGS: dict[str, Callable[[Any, Context], tuple]] = {
    "transfer": _transfer,
    "inference_receipt": _receipt,
    "contribution": _contribution,
    "challenge": _challenge,
    "dispute": _challenge,
    "receipt_ack": _ack,
    "admission": _none,
    "capsule_manifest": _none,
}


def as_bytes(item: bytes | Entry) -> bytes:
    if isinstance(item, Entry):
        return item.encode()
    if isinstance(item, (bytearray, memoryview)):
        return bytes(item)
    return item


def check_envelope(data: bytes, ctx: Context) -> Entry:
    """Size, strict decoding, network, the entry signature and the Lamport
    bound, in that order; the checks the store makes before it keeps an
    entry (and replay before an entry joins a feed)."""
    if type(data) is not bytes:
        raise AemError(errors.BAD_TYPE, "an entry is bytes")
    if len(data) > ctx.max_entry:
        raise AemError(errors.TOO_LARGE, f"entry: {len(data)} bytes > {ctx.max_entry}")
    e = Entry.decode(data)
    e.verify(ctx.net)
    if not lamport_fits(e.lamport, e.ts):
        raise AemError(LAMPORT_AHEAD, f"entry: lamport {e.lamport} is ahead of its ts {e.ts}")
    return e


def lamport_fits(lamport: int, ts: int) -> bool:
    """The Lamport bound every node checks alike, at insert and in replay."""
    return lamport >> LAMPORT_SHIFT <= ts


def local_clock_cap(ts: int) -> int:
    """The largest clock a node's own next entry at ``ts`` may follow."""
    return (ts << LAMPORT_SHIFT) + LOCAL_CLOCK_MARGIN


def examine_entry(e: Entry, eid: bytes, ctx: Context) -> Fact:
    """The fact of an entry whose envelope is already known to be valid."""
    try:
        obj = e.payload()
        obj.verify(ctx.net)
        args = _ARGS[e.kind](obj, ctx)
    except AemError as exc:
        return Fact(eid, e.author, e.seq, e.prev, e.lamport, e.ts, e.kind, exc.code, b"", b"", ())
    return Fact(eid, e.author, e.seq, e.prev, e.lamport, e.ts, e.kind, None,
                obj.id, getattr(obj, obj.SIGNER), args)


def examine(item: bytes | Entry, ctx: Context) -> Fact:
    """The fact of one entry (its bytes or an Entry). Never raises for bad input."""
    data = as_bytes(item)
    try:
        eid = H(data)
    except TypeError:
        return Fact(b"\0" * 32, None, 0, b"", 0, 0, "", errors.BAD_TYPE, b"", b"", ())
    try:
        e = check_envelope(data, ctx)
    except AemError as exc:
        return Fact(eid, None, 0, b"", 0, 0, "", exc.code, b"", b"", ())
    return examine_entry(e, eid, ctx)


# -- many at once, optionally on several cores --------------------------------

@contextlib.contextmanager
def paused_gc():
    """Pause the cyclic garbage collector while replay builds many small,
    acyclic objects: otherwise CPython runs collections over the whole
    growing heap again and again, which cost a large part of a full replay.
    Nothing replay builds holds a cycle, so nothing is left for later."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


_CHUNK = 2048
_worker_ctx: Context | None = None
_shared: list[bytes] = []      # the entries, inherited by forked workers (never pickled)


def _init_worker(ctx: Context) -> None:
    global _worker_ctx
    _worker_ctx = ctx


def _examine_range(span: tuple[int, int]) -> list[Fact]:
    if _worker_ctx is None:
        raise AemError(errors.INVARIANT, "worker started without its context")
    ctx, datas = _worker_ctx, _shared
    with paused_gc():
        return [examine(datas[i], ctx) for i in range(*span)]


def examine_many(items: Iterable[bytes | Entry], ctx: Context, *, workers: int = 1,
                 progress: Callable[[int], None] | None = None) -> list[Fact]:
    """Facts of many entries, in input order. ``workers`` > 1 spreads the
    signature checks over that many processes (forked; call it from a
    single-threaded program such as the CLI or a benchmark)."""
    datas = [as_bytes(i) for i in items]
    if workers <= 1 or len(datas) < 2 * _CHUNK:
        out = []
        with paused_gc():
            for n, d in enumerate(datas, 1):
                out.append(examine(d, ctx))
                if progress is not None and n % 1024 == 0:
                    progress(n)
        return out
    global _shared
    spans = [(i, min(i + _CHUNK, len(datas))) for i in range(0, len(datas), _CHUNK)]
    out: list[Fact] = []
    mp = multiprocessing.get_context("fork")
    _shared = datas            # forked workers see it as it is now
    try:
        with ProcessPoolExecutor(max_workers=workers, mp_context=mp, initializer=_init_worker,
                                 initargs=(ctx,)) as pool:
            for part in pool.map(_examine_range, spans):
                out.extend(part)
                if progress is not None:
                    progress(len(out))
    finally:
        _shared = []
    return out


# -- storage form (ledger/store.py keeps one per entry) -----------------------

def pack_fact(f: Fact) -> bytes:
    return msgpack.packb(tuple(f), use_bin_type=True)


def unpack_fact(b: bytes) -> Fact:
    t = msgpack.unpackb(b, raw=False, use_list=False)
    return Fact(*t)


def pack_facts(fs: Sequence[Fact]) -> bytes:
    return msgpack.packb([tuple(f) for f in fs], use_bin_type=True)


def unpack_facts(b: bytes) -> list[Fact]:
    return [Fact(*t) for t in msgpack.unpackb(b, raw=False, use_list=False)]
