"""The sync sessions of protocol/syncsession.py: they yield exactly the
actions of specs/sync-protocol.md's session vectors (the spec is the check),
the vectors are what tests/sync_vectors.py generates, and a client and a
server driven against each other in memory, on two real log stores holding
random chains (forks included), end with equal frontiers."""

from __future__ import annotations

import tempfile
from collections import deque
from pathlib import Path

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aemd.sync import drive, sync_client
from ledger.store import LogStore, Status
from protocol import errors, syncsession
from protocol.entry import MAX_ENTRY, make_entry
from protocol.errors import AemError
from protocol.session import Call, Recv, Send
from protocol.sync import MAX_BATCH_BYTES, RangeRequest, RangeResponse, SyncDone, decode_sync_message
from tests import sync_vectors
from tests.ledgerkit import T0, TestNet
from tests.test_ledger_sync_forks import _Stream

SPEC = (Path(__file__).resolve().parent.parent / "specs" / "sync-protocol.md").read_text()
VECTORS = sync_vectors.parse(SPEC)


def test_spec_block_is_what_the_generator_prints():
    assert sync_vectors.block() in SPEC


def test_spec_has_the_vectors_the_protocol_needs():
    names = {v[0]["vector"] for v in VECTORS}
    assert {"frontiers_then_range", "pipelined_two_authors", "peer_serves_a_non_entry", "fork_by_binary_search",
            "server_frontiers_range_done", "server_wrong_network"} <= names
    assert {v[0]["session"] for v in VECTORS} == {"client", "server"}


@pytest.mark.parametrize("vec", VECTORS, ids=[v[0]["vector"] for v in VECTORS])
def test_session_yields_the_spec_vector(vec):
    head, *steps, end = vec
    gen = sync_vectors.start(head)
    result = None
    for i, step in enumerate(steps):
        action = gen.send(result)
        want = {k: v for k, v in step.items() if k not in ("result", "note")}
        assert sync_vectors.action_json(action) == want, f"step {i} ({step['note']})"
        if "recv" in step:
            result = None if step["result"] is None else bytes.fromhex(step["result"])
        elif "call" in step:
            result = sync_vectors.result_from_json(step["call"], step["result"])
        else:
            result = None
    if end["end"] == "raise":
        with pytest.raises(AemError) as exc:
            gen.send(result)
        assert exc.value.code == end["code"]
    else:
        with pytest.raises(StopIteration) as stop:
            gen.send(result)
        v = stop.value.value
        assert (sync_vectors.stats_json(v) if head["session"] == "client" else v) == end["value"]


# -- a client and a server against each other, in memory ----------------------

class StoreLog:
    """The sync ops over a real log store, synchronously (as aemd/storeaccess.py)."""

    def __init__(self, store: LogStore) -> None:
        self.store = store

    def frontiers(self):
        return self.store.frontiers()

    def range(self, author, from_seq, limit):
        return self.store.range(author, from_seq, limit)

    def linked_ids(self, pairs):
        return self.store.linked_ids(pairs)

    def insert_batch(self, entries):
        results = self.store.insert_many(entries)
        bad = sum(1 for r in results if r.status is Status.REJECTED and r.code != errors.REFUSED)
        return sum(1 for r in results if r.stored), bad


class _End:
    def __init__(self, gen, log) -> None:
        self.gen, self.log = gen, log
        self.inbox: deque[bytes] = deque()
        self.result = None
        self.waiting: Recv | None = None
        self.done, self.value = False, None


def pair(client_gen, client_log, server_gen, server_log, max_steps: int = 100_000):
    """Run both sessions to their ends, each frame sent landing in the other's
    inbox; a Recv with an empty inbox waits for the other side, and gets the
    end of stream once the other side has finished. Returns (client outcome,
    server outcome)."""
    c, s = _End(client_gen, client_log), _End(server_gen, server_log)
    other = {id(c): s, id(s): c}
    for _ in range(max_steps):
        if c.done and s.done:
            return c.value, s.value
        progressed = False
        for end in (c, s):
            peer = other[id(end)]
            while not end.done:
                if end.waiting is not None:
                    if end.inbox:
                        frame = end.inbox.popleft()
                        assert len(frame) <= end.waiting.limit
                        end.result, end.waiting = frame, None
                    elif peer.done:
                        end.result, end.waiting = None, None
                    else:
                        break
                try:
                    action = end.gen.send(end.result)
                except StopIteration as stop:
                    end.done, end.value = True, stop.value
                    break
                progressed = True
                end.result = None
                if isinstance(action, Send):
                    peer.inbox.append(action.data)
                elif isinstance(action, Recv):
                    end.waiting = action
                elif isinstance(action, Call):
                    end.result = getattr(end.log, action.op)(*action.args)
        if not progressed and not (c.done and s.done):
            raise AssertionError("both sessions wait for each other")
    raise AssertionError("sessions did not end")


NET = TestNet(n_users=3)
AUTHORS = NET.users


def _chains():
    """Per author: the chain 'p' of 8 entries, and for each fork seq f a
    chain of 8 that shares p's first f entries and differs from there."""
    out = {}
    for ai, k in enumerate(AUTHORS):
        def build(base, tag):
            c = list(base)
            for s in range(len(c), 8):
                tr = NET.transfer(k, AUTHORS[(ai + 1) % 3], 1 + s + tag)
                c.append(make_entry(k, NET.net, s, c[-1].id if c else b"", s + 1, T0 + s, tr))
            return c
        p = build([], 0)
        out[k.public] = (p, {f: build(p[:f], 1000 * (f + 1)) for f in range(8)})
    return out


CHAINS = _chains()
# One side's holding of one author: (length of the chain, fork seq of the
# branch it holds or None for the main chain).
holding = st.tuples(st.integers(0, 8), st.one_of(st.none(), st.integers(0, 7)))


def _fill(store: LogStore, spec) -> None:
    for (n, fork), (author, (p, forks)) in zip(spec, CHAINS.items()):
        chain = p if fork is None else forks[fork]
        if n:
            store.insert_many([e.encode() for e in chain[:n]])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(a=st.lists(holding, min_size=3, max_size=3), b=st.lists(holding, min_size=3, max_size=3),
       batch=st.integers(1, 4))
def test_client_and_server_converge_on_random_logs(a, b, batch):
    with tempfile.TemporaryDirectory() as tmp:
        A = LogStore.open(Path(tmp) / "a.sqlite", NET.genesis)
        B = LogStore.open(Path(tmp) / "b.sqlite", NET.genesis)
        try:
            _fill(A, a)
            _fill(B, b)
            la, lb = StoreLog(A), StoreLog(B)
            # One session each way is enough, forks included (specs/sync-protocol.md
            # section 3, step 4).
            for x, y in ((la, lb), (lb, la)):
                stats, served = pair(syncsession.sync_client(NET.net, batch=batch), x,
                                     syncsession.sync_server(NET.net), y)
                assert stats.rejected == 0
                assert served == stats.requests + 2        # frontiers, ranges, done
            assert A.frontiers() == B.frontiers()
            assert A.forks() == B.forks()
            assert A.state_root(T0 + 10**6) == B.state_root(T0 + 10**6)
        finally:
            A.close()
            B.close()


# -- limits the vectors are too small to show -----------------------------------

def test_server_caps_a_response_by_bytes():
    gen = syncsession.sync_server(sync_vectors.NET)
    assert isinstance(next(gen), Recv)
    big = [bytes([i]) * MAX_ENTRY for i in range(MAX_BATCH_BYTES // MAX_ENTRY + 4)]
    call = gen.send(RangeRequest(net=sync_vectors.NET, author=sync_vectors.ALICE.public, from_seq=0,
                                 limit=len(big)).encode())
    assert call == Call("range", (sync_vectors.ALICE.public, 0, len(big)))
    reply = decode_sync_message(gen.send(big).data)
    assert isinstance(reply, RangeResponse)
    assert len(reply.entries) == MAX_BATCH_BYTES // MAX_ENTRY
    assert sum(map(len, reply.entries)) <= MAX_BATCH_BYTES


def test_client_stops_at_the_request_limit(monkeypatch):
    """With the budget spent, no more requests go out, what arrived is still
    inserted, and the session ends with done."""
    monkeypatch.setattr(syncsession, "MAX_REQUESTS_PER_SESSION", 3)
    log = sync_vectors.MemLog()
    chain = sync_vectors.chain(sync_vectors.ALICE, 8, "a", 100)
    peer = sync_vectors.Peer({sync_vectors.ALICE.public: chain})
    lines = sync_vectors.record("limit", sync_vectors.client(batch=1), log, peer)
    sent = [decode_sync_message(bytes.fromhex(x["send"])) for x in lines if "send" in x]
    assert sum(isinstance(m, RangeRequest) for m in sent) == 3
    assert isinstance(sent[-1], SyncDone)
    assert lines[-1]["value"]["added"] == 3 and len(log.chains[sync_vectors.ALICE.public]) == 3


# -- the shell's driver ---------------------------------------------------------------

class _AsyncLog:
    def __init__(self, log) -> None:
        self.log = log

    def __getattr__(self, op):
        async def call(*args):
            return getattr(self.log, op)(*args)
        return call


def test_driver_passes_over_a_failed_best_effort_done():
    """A server that closes once it has answered: the client's final done
    cannot be written, and the session's outcome stands."""
    from aemd.framing import read_frame, write_frame
    chain = sync_vectors.chain(sync_vectors.ALICE, 2, "a", 100)
    server_log = sync_vectors.MemLog({sync_vectors.ALICE.public: chain})

    async def main():
        a, b = trio.testing.memory_stream_pair()
        async with trio.open_nursery() as n:
            async def serve():
                gen = syncsession.sync_server(sync_vectors.NET)
                result = None
                while True:          # answer two requests, then go away
                    action = gen.send(result)
                    if isinstance(action, Recv):
                        result = await read_frame(_Stream(b), action.limit)
                    elif isinstance(action, Call):
                        result = getattr(server_log, action.op)(*action.args)
                    else:
                        await write_frame(_Stream(b), action.data)
                        result = None
                        if isinstance(decode_sync_message(action.data), RangeResponse):
                            await b.aclose()
                            return
            n.start_soon(serve)
            with trio.fail_after(10):
                return await sync_client(_Stream(a), _AsyncLog(sync_vectors.MemLog()), sync_vectors.NET)
    stats = trio.run(main)
    assert stats.added == 2 and stats.rejected == 0


def test_driver_turns_an_early_end_of_stream_into_unavailable():
    """The peer reads the frontiers and closes its side: where a reply is
    due, the end of stream is UNAVAILABLE, as framing's read_frame says."""
    from aemd.framing import read_frame

    async def main():
        a, b = trio.testing.memory_stream_pair()
        async with trio.open_nursery() as n:
            async def peer():
                await read_frame(_Stream(b), 1 << 20)
                await b.send_stream.aclose()
            n.start_soon(peer)
            with trio.fail_after(10), pytest.raises(AemError) as exc:
                await drive(syncsession.sync_client(sync_vectors.NET, {}), _Stream(a),
                            _AsyncLog(sync_vectors.MemLog()))
        return exc.value
    err = trio.run(main)
    assert err.code == errors.UNAVAILABLE and "closed before a frame" in err.detail


def test_client_looks_into_at_most_max_fork_checks_authors(monkeypatch):
    sv = sync_vectors
    ours = {k.public: sv.chain(k, 4, f"{n}x", 300 + 1000 * i) for i, (n, k) in enumerate(sv.KEYS.items())}
    theirs = {a: sv.chain(next(k for k in sv.KEYS.values() if k.public == a), 3, "y", 700 + i * 1000, c[:1])
              for i, (a, c) in enumerate(ours.items())}
    full = sv.record("all", sv.client(), sv.MemLog({a: list(c) for a, c in ours.items()}), sv.Peer(theirs))[-1]["value"]
    assert full["checks"] == 3 and full["forks_sent"] == 3
    monkeypatch.setattr(syncsession, "MAX_FORK_CHECKS", 2)
    capped = sv.record("capped", sv.client(), sv.MemLog({a: list(c) for a, c in ours.items()}), sv.Peer(theirs))[-1]["value"]
    assert capped["checks"] == 2 and capped["forks_sent"] == 2
