"""The session vectors of specs/sync-protocol.md ("Session vectors"): the
exact actions the sync sessions of protocol/syncsession.py yield for fixed
inputs, built from fixed keys, entries and answers.

Each vector is recorded by running the session against a scripted world: a
small in-memory log answering its ``Call``\\s and a scripted peer answering
its ``Recv``\\s. `python -m tests.sync_vectors` prints the spec's block;
tests/test_sync_session.py replays the block from the spec against the
session, and checks that regenerating it gives the same text.

The JSON forms (one object a line) are defined here, by :func:`to_json` and
:func:`result_from_json`, and described in the spec.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from crypto.hashing import H
from crypto.keys import SigningKey
from protocol.entry import Entry, make_entry
from protocol.errors import AemError
from protocol.receipts import Transfer
from protocol.session import Call, Recv, Send
from protocol.sync import (FORK_HEAD, Frontier, Frontiers, RangeRequest, RangeResponse, SyncDone,
                           decode_sync_message)
from protocol.syncsession import SyncStats, frontier_list, sync_client, sync_server
from tests.vectors import T0, genesis

ALICE = SigningKey.from_seed(bytes([3]) * 32)
BOB = SigningKey.from_seed(bytes([4]) * 32)
EVIL = SigningKey.from_seed(bytes([5]) * 32)      # signs two chains
KEYS = {"alice": ALICE, "bob": BOB, "evil": EVIL}
NET = genesis().network_id
OTHER_NET = H(b"another network")


# -- JSON forms ---------------------------------------------------------------

def to_json(v: Any) -> Any:
    """bytes -> lower-case hex; tuples and lists -> arrays; sets -> sorted
    arrays; a dict with bytes keys -> an object keyed by hex."""
    if isinstance(v, (bytes, bytearray)):
        return bytes(v).hex()
    if isinstance(v, (list, tuple)):
        return [to_json(x) for x in v]
    if isinstance(v, (set, frozenset)):
        return sorted(to_json(x) for x in v)
    if isinstance(v, dict):
        return {k.hex(): to_json(x) for k, x in sorted(v.items())}
    return v


def result_json(op: str, v: Any) -> Any:
    """The JSON form of what a ``Call`` of ``op`` returned: ``linked_ids``'
    dict keyed by (author, seq) becomes an array of [author, seq, ids]."""
    if op == "linked_ids":
        return [[a.hex(), s, to_json(ids)] for (a, s), ids in sorted(v.items())]
    return to_json(v)


def result_from_json(op: str, v: Any) -> Any:
    """The Python value a ``Call`` of ``op`` returns, from its JSON form."""
    if op == "frontiers":
        return {bytes.fromhex(a): (s, bytes.fromhex(h)) for a, (s, h) in v.items()}
    if op == "range":
        return [bytes.fromhex(x) for x in v]
    if op == "linked_ids":
        return {(bytes.fromhex(a), s): {bytes.fromhex(i) for i in ids} for a, s, ids in v}
    if op == "insert_batch":
        return tuple(v)
    raise ValueError(f"no op {op!r}")


def action_json(a: Any) -> dict:
    """An action as its JSON object (without the result fed back)."""
    if isinstance(a, Send):
        return {"send": a.data.hex(), "timeout_s": a.timeout_s, "what": a.what, "best_effort": a.best_effort}
    if isinstance(a, Recv):
        return {"recv": a.limit, "timeout_s": a.timeout_s, "what": a.what}
    if isinstance(a, Call):
        return {"call": a.op, "args": to_json(a.args)}
    raise TypeError(f"not an action: {a!r}")


def stats_json(st: SyncStats) -> dict:
    return {"requests": st.requests, "received": st.received, "added": st.added, "rejected": st.rejected,
            "authors": to_json(st.authors), "checks": st.checks, "forks_sent": st.forks_sent}


def start(params: dict):
    """The session a vector's header line names, ready to run."""
    net = bytes.fromhex(params["net"])
    if params["session"] == "server":
        return sync_server(net)
    only = params.get("only")
    local = params.get("local")
    return sync_client(net, None if local is None else result_from_json("frontiers", local),
                       batch=params["batch"],
                       only=None if only is None else Frontier(author=bytes.fromhex(only["author"]), seq=only["seq"],
                                                               head=bytes.fromhex(only["head"])))


# -- the scripted world ---------------------------------------------------------

_labels: dict[bytes, str] = {}   # entry id / key -> a short name, for the notes only


def entry(author: SigningKey, seq: int, prev: bytes, amount: int, label: str) -> Entry:
    body = Transfer(net=NET, sender=author.public, recipient=BOB.public if author is not BOB else ALICE.public,
                    amount=amount, nonce=amount.to_bytes(16, "big"), created_at=T0 + seq, sig=b"").signed(author)
    e = make_entry(author, NET, seq, prev, seq + 1, T0 + seq, body)
    _labels[e.id] = label
    return e


def chain(author: SigningKey, n: int, tag: str, amount: int, base: list[Entry] = ()) -> list[Entry]:
    out = list(base)
    for s in range(len(out), n):
        out.append(entry(author, s, out[-1].id if out else b"", amount + s, f"{tag}{s}"))
    return out


@dataclass
class MemLog:
    """The local log of a vector: linked chains per author, and the inserts'
    answers (every valid entry is stored unless ``reject`` says otherwise)."""
    chains: dict[bytes, list[Entry]] = field(default_factory=dict)
    forked: dict[bytes, int] = field(default_factory=dict)
    extra: dict[tuple[bytes, int], set[bytes]] = field(default_factory=dict)   # fork evidence
    reject: bool = False

    def frontiers(self):
        out = {a: (c[-1].seq, c[-1].id) for a, c in self.chains.items() if c}
        out.update({a: (s, FORK_HEAD) for a, s in self.forked.items()})
        return out

    def range(self, author, from_seq, limit):
        return [e.encode() for e in self.chains.get(author, []) if e.seq >= from_seq][:limit]

    def linked_ids(self, pairs):
        out = {}
        for a, s in pairs:
            ids = {e.id for e in self.chains.get(a, []) if e.seq == s} | self.extra.get((a, s), set())
            if ids:
                out[(a, s)] = ids
        return out

    def insert_batch(self, entries):
        if self.reject:
            return 0, len(entries)
        added = 0
        for data in entries:
            e = Entry.decode(data)
            c = self.chains.setdefault(e.author, [])
            if any(x.id == e.id for x in c):
                continue
            added += 1
            if e.seq == len(c) and (e.prev == (c[-1].id if c else b"")):
                c.append(e)
            else:
                self.forked[e.author] = min(e.seq, self.forked.get(e.author, e.seq))
                self.extra.setdefault((e.author, e.seq), set()).add(e.id)
        return added, 0


@dataclass
class Peer:
    """The other end, answering each request in order from its chains;
    ``reply`` may replace an answer (a hostile or confused peer)."""
    chains: dict[bytes, list[Entry]] = field(default_factory=dict)
    net: bytes = NET
    reply: Callable[[Any, bytes], bytes | None] | None = None
    asked: deque = field(default_factory=deque)

    def hear(self, data: bytes) -> None:
        msg = decode_sync_message(data)
        if not isinstance(msg, SyncDone):
            self.asked.append(msg)

    def answer(self) -> bytes | None:
        if not self.asked:
            return None        # the peer closed its side
        msg = self.asked.popleft()
        if isinstance(msg, Frontiers):
            fr = {a: (c[-1].seq, c[-1].id) for a, c in self.chains.items() if c}
            out = Frontiers(net=self.net, frontiers=frontier_list(fr)).encode()
        else:
            es = [e.encode() for e in self.chains.get(msg.author, []) if e.seq >= msg.from_seq][: msg.limit]
            out = RangeResponse(net=self.net, author=msg.author, entries=tuple(es)).encode()
        return self.reply(msg, out) if self.reply else out


def _note(a: Any, result: Any) -> str:
    """A short reading of one step, for people (the check ignores it)."""
    def name(b: bytes) -> str:
        return _labels.get(b, b.hex()[:8])

    def msg(data: bytes) -> str:
        try:
            m = decode_sync_message(data)
        except AemError:
            return f"{len(data)} bytes that are no sync message"
        net = "" if getattr(m, "net", NET) == NET else " (another network)"
        if isinstance(m, Frontiers):
            return "frontiers [" + ", ".join(f"{name(f.author)} {f.seq} {name(f.head)}" for f in m.frontiers) + "]" + net
        if isinstance(m, RangeRequest):
            return f"range_req {name(m.author)} from {m.from_seq} limit {m.limit}" + net
        if isinstance(m, RangeResponse):
            return f"range {name(m.author)} [" + " ".join(_entry_name(x) for x in m.entries) + "]" + net
        return m.TYPE + net

    if isinstance(a, Send):
        return "send " + msg(a.data)
    if isinstance(a, Recv):
        return "recv " + ("end of stream" if result is None else msg(result))
    if a.op == "insert_batch":
        return f"insert [{' '.join(_entry_name(x) for x in a.args[0])}] -> {result[0]} added, {result[1]} rejected"
    if a.op == "linked_ids":
        return "linked_ids " + ", ".join(f"{name(x)}@{s}" for x, s in a.args[0]) + " -> " + ", ".join(
            f"@{s} {{{' '.join(sorted(name(i) for i in ids))}}}" for (x, s), ids in sorted(result.items()))
    if a.op == "frontiers":
        return "frontiers -> " + ", ".join(f"{name(x)} {s} {name(h)}" for x, (s, h) in sorted(result.items()))
    return f"{a.op} {name(a.args[0])} from {a.args[1]} limit {a.args[2]} -> {len(result)} entries"


def _entry_name(data: bytes) -> str:
    return _labels.get(H(data), "not-an-entry")


def record(name: str, params: dict, log: MemLog, peer: Peer | None = None,
           feed: list[bytes | None] | None = None) -> list[dict]:
    """Run one session in the scripted world and write down every step. A
    client's Recvs are answered by ``peer``; a server's by ``feed``."""
    lines: list[dict] = [{"vector": name, **params}]
    gen = start(params)
    result: Any = None
    feed = deque(feed or ())
    while True:
        try:
            a = gen.send(result)
        except StopIteration as stop:
            v = stop.value
            lines.append({"end": "return", "value": stats_json(v) if isinstance(v, SyncStats) else v})
            return lines
        except AemError as exc:
            lines.append({"end": "raise", "code": exc.code})
            return lines
        if isinstance(a, Send):
            result = None
            if peer is not None:
                peer.hear(a.data)
        elif isinstance(a, Recv):
            result = peer.answer() if peer is not None else (feed.popleft() if feed else None)
        else:
            result = getattr(log, a.op)(*a.args)
        step = action_json(a)
        if isinstance(a, Recv):
            step["result"] = None if result is None else result.hex()
        elif isinstance(a, Call):
            step["result"] = result_json(a.op, result)
        step["note"] = _note(a, result)
        lines.append(step)


def client(batch: int = 64, only: Frontier | None = None) -> dict:
    return {"session": "client", "net": NET.hex(), "batch": batch, "local": None,
            "only": None if only is None else {"author": only.author.hex(), "seq": only.seq,
                                               "head": only.head.hex()}}


def server() -> dict:
    return {"session": "server", "net": NET.hex()}


def build() -> list[list[dict]]:
    _labels.clear()
    _labels.update({k.public: n for n, k in KEYS.items()})
    a = chain(ALICE, 3, "a", 100)
    b = chain(BOB, 1, "b", 200)
    ours = chain(EVIL, 4, "x", 300)            # evil's chain here: x0 x1 x2 x3
    theirs = chain(EVIL, 3, "y", 400, ours[:1])   # the peer's: x0 y1 y2
    out = []

    # 1. Frontiers exchange, then one range after our head; one insert.
    out.append(record("frontiers_then_range", client(),
                      MemLog({ALICE.public: a[:1]}), Peer({ALICE.public: a})))

    # 2. Two authors, small ranges: both requests in flight before the first
    #    answer is read, both answers merged into one insert.
    out.append(record("pipelined_two_authors", client(),
                      MemLog(), Peer({ALICE.public: a[:1], BOB.public: b})))

    # 3. A batch of 1: the next range is asked while the peer had a full one
    #    and its frontier is not reached; each batch is inserted when full.
    out.append(record("batches_of_one", client(batch=1),
                      MemLog(), Peer({ALICE.public: a[:2]})))

    # 4. A head announcement: no frontiers exchange, one author up to one entry.
    out.append(record("only_announced_author", client(only=Frontier(author=ALICE.public, seq=2, head=a[2].id)),
                      MemLog({ALICE.public: a[:1]}), Peer({ALICE.public: a})))

    # 5. The peer serves bytes that are not an entry where the first entries
    #    of a range are looked at: rejected, no more requests, done.
    def junk(msg, data):
        if isinstance(msg, RangeRequest):
            return RangeResponse(net=NET, author=msg.author, entries=(b"\x01\x02\x03",)).encode()
        return data
    out.append(record("peer_serves_a_non_entry", client(),
                      MemLog({ALICE.public: a[:1]}), Peer({ALICE.public: a}, reply=junk)))

    # 6. The log refuses what the peer served: the session stops there.
    out.append(record("insert_rejected", client(),
                      MemLog(reject=True), Peer({ALICE.public: a[:1], BOB.public: b})))

    # 7. A fork found by binary search: the peer is behind us with another
    #    head (y2 at seq 2, we hold x3); its chain leaves ours at seq 1.
    out.append(record("fork_by_binary_search", client(),
                      MemLog({EVIL.public: ours}), Peer({EVIL.public: theirs})))

    # 8. The peer answers the frontiers with a range; and with frontiers of
    #    another network.
    def wrong(msg, data):
        return RangeResponse(net=NET, author=ALICE.public, entries=()).encode()
    out.append(record("frontiers_answered_with_a_range", client(), MemLog(), Peer({}, reply=wrong)))
    out.append(record("frontiers_of_another_network", client(), MemLog(), Peer({ALICE.public: a}, net=OTHER_NET)))

    # 9. The peer closes the stream where an answer is due.
    out.append(record("peer_closes_early", client(), MemLog(), Peer({}, reply=lambda m, d: None)))

    # 10. The server: frontiers, a range, done.
    server_log = MemLog({ALICE.public: a, BOB.public: b})
    out.append(record("server_frontiers_range_done", server(), server_log, feed=[
        Frontiers(net=NET, frontiers=()).encode(),
        RangeRequest(net=NET, author=ALICE.public, from_seq=1, limit=8).encode(),
        SyncDone(net=NET).encode()]))

    # 11. The server: a clean end of stream ends the session too.
    out.append(record("server_end_of_stream", server(), server_log, feed=[
        RangeRequest(net=NET, author=BOB.public, from_seq=0, limit=1).encode()]))

    # 12. The server: a message for another network, and a reply where a request is due.
    out.append(record("server_wrong_network", server(), server_log, feed=[
        RangeRequest(net=OTHER_NET, author=ALICE.public, from_seq=0, limit=1).encode()]))
    out.append(record("server_gets_a_reply", server(), server_log, feed=[
        RangeResponse(net=NET, author=ALICE.public, entries=()).encode()]))
    return out


def block() -> str:
    lines = ["```sync-vectors"]
    for vec in build():
        lines += [json.dumps(x, separators=(",", ":")) for x in vec]
    lines.append("```")
    return "\n".join(lines)


def parse(text: str) -> list[list[dict]]:
    """The vectors of a ```sync-vectors block, as lists of JSON objects."""
    import re
    body = re.search(r"```sync-vectors\n(.*?)```", text, re.S).group(1)
    out: list[list[dict]] = []
    for line in body.splitlines():
        obj = json.loads(line)
        if "vector" in obj:
            out.append([obj])
        else:
            out[-1].append(obj)
    return out


if __name__ == "__main__":
    print(block())
