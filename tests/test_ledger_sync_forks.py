"""Fork detection by the sync protocol, in process: real log stores, the real
sync client and server, over trio's in-memory stream pair (no network).

An author that signs two different entries at one seq and lets one branch
grow longer (``[e0, e1]`` on some nodes, ``[e0']`` on others) must be found
out by every honest node it reaches, whatever the branch lengths: both
conflicting entries stored everywhere, the author frozen from the fork, one
state root (specs/sync-protocol.md section 3, specs/ledger.md section 2).
"""

from __future__ import annotations

import random

import pytest
import trio
import trio.testing

from aemd.storeaccess import StoreAccess
from aemd.sync import sync_client, sync_server
from ledger.store import LogStore
from protocol.entry import make_entry
from protocol.sync import FORK_HEAD
from tests.ledgerkit import T0, TestNet, key


class _Stream:
    """trio's in-memory stream with the read/write interface of a libp2p stream."""

    def __init__(self, s) -> None:
        self.s = s

    async def read(self, n: int | None = None) -> bytes:
        return await self.s.receive_some(n or 65536)

    async def write(self, data: bytes) -> None:
        await self.s.send_all(data)


async def pull(client: StoreAccess, server: StoreAccess, net: bytes):
    """One sync session: ``client`` pulls from ``server``."""
    a, b = trio.testing.memory_stream_pair()
    stats = None
    with trio.fail_after(30):
        async with trio.open_nursery() as n:
            async def serve():
                await sync_server(_Stream(b), server, net)
                await b.aclose()
            n.start_soon(serve)
            stats = await sync_client(_Stream(a), client, net, 64)
            await a.aclose()
    return stats


def branches(net: TestNet, evil, fork_at: int, len_a: int, len_b: int):
    """Two chains of ``evil`` sharing seqs < fork_at, then differing: branch
    a has len_a entries in all, branch b len_b."""
    other = net.users[1]
    common, prev = [], b""
    for s in range(fork_at):
        e = make_entry(evil, net.net, s, prev, s + 1, T0 + s, net.transfer(evil, other, 1 + s))
        common.append(e)
        prev = e.id
    out = []
    for length, tag in ((len_a, 10_000), (len_b, 20_000)):
        chain, p = list(common), prev
        for s in range(fork_at, length):
            e = make_entry(evil, net.net, s, p, s + 1, T0 + s, net.transfer(evil, other, tag + s))
            chain.append(e)
            p = e.id
        out.append(chain)
    return out


def _open(tmp_path, name, net):
    return StoreAccess(LogStore.open(tmp_path / f"{name}.sqlite", net.genesis))


async def _converge(stores, net, rounds):
    """Every ordered pair pulls, ``rounds`` times; returns the stats."""
    out = []
    for _ in range(rounds):
        for c in stores:
            for s in stores:
                if c is not s:
                    out.append(await pull(c, s, net.net))
    return out


@pytest.mark.parametrize("fork_at,len_a,len_b", [
    (0, 2, 1),          # the issue's case: [e0, e1] against [e0']
    (0, 1, 2),
    (3, 9, 4),          # a common prefix, then branches of different lengths
    (5, 6, 40),
    (7, 200, 8),        # a long branch: the least differing seq is searched for
])
def test_split_branches_are_detected_by_both(tmp_path, fork_at, len_a, len_b):
    net = TestNet(n_users=3)
    evil = key("equivocator")
    a_chain, b_chain = branches(net, evil, fork_at, len_a, len_b)
    A, B = _open(tmp_path, "a", net), _open(tmp_path, "b", net)
    A.store.insert_many(a_chain)
    B.store.insert_many(b_chain)
    assert A.store.forks() == {} and B.store.forks() == {}

    async def main():
        # One round each way suffices; a second changes nothing more.
        await _converge([A, B], net, 1)
        roots1 = {s.store.state_root(T0 + 10**6) for s in (A, B)}
        stats2 = await _converge([A, B], net, 1)
        return roots1, stats2
    roots, stats2 = trio.run(main)
    for s in (A, B):
        assert s.store.forks() == {evil.public: fork_at}
        assert s.store.frontiers()[evil.public] == (fork_at, FORK_HEAD)
        # Both conflicting entries are stored as evidence on both nodes.
        ids = s.store.linked_ids([(evil.public, fork_at)])[(evil.public, fork_at)]
        assert {a_chain[fork_at].id, b_chain[fork_at].id} <= ids
        r = s.store.replay(T0 + 10**6)
        assert r.frozen == {evil.public: fork_at}
    assert len(roots) == 1
    assert all(st.forks_sent == 0 and st.checks == 0 for st in stats2)   # quiet once converged
    for s in (A, B):
        s.store.close()


def test_evidence_spreads_to_a_third_node(tmp_path):
    """C holds only branch a; it never talks to B. A, which learned the fork
    from B, passes both entries on: C is frozen too, on the same root."""
    net = TestNet(n_users=3)
    evil = key("equivocator")
    a_chain, b_chain = branches(net, evil, 2, 6, 3)
    A, B, C = (_open(tmp_path, n, net) for n in "abc")
    A.store.insert_many(a_chain)
    C.store.insert_many(a_chain)
    B.store.insert_many(b_chain)

    async def main():
        await pull(A, B, net.net)          # A learns the fork from B
        assert A.store.forks() == {evil.public: 2}
        await pull(C, A, net.net)          # C, ahead of A's fork seq, still fetches it
        await pull(A, C, net.net)
    trio.run(main)
    assert C.store.forks() == {evil.public: 2}
    roots = {s.store.state_root(T0 + 10**6) for s in (A, C)}
    assert len(roots) == 1
    for s in (A, B, C):
        s.store.close()


def test_a_lower_fork_replaces_a_higher_one(tmp_path):
    """A knows a fork at seq 4, B one at seq 1 of the same author: both end
    frozen at 1."""
    net = TestNet(n_users=3)
    evil = key("equivocator")
    a_chain, b_chain = branches(net, evil, 1, 6, 6)
    A, B = _open(tmp_path, "a", net), _open(tmp_path, "b", net)
    A.store.insert_many(a_chain)
    # A second entry at seq 4 on a's chain.
    other = net.users[1]
    x4 = make_entry(evil, net.net, 4, a_chain[3].id, 5, T0 + 4, net.transfer(evil, other, 999))
    A.store.insert(x4)
    assert A.store.forks() == {evil.public: 4}
    B.store.insert_many(b_chain)
    B.store.insert(make_entry(evil, net.net, 1, b_chain[0].id, 2, T0 + 1, net.transfer(evil, other, 998)))
    assert B.store.forks() == {evil.public: 1}

    async def main():
        await _converge([A, B], net, 2)
    trio.run(main)
    assert A.store.forks() == B.store.forks() == {evil.public: 1}
    assert A.store.state_root(T0 + 10**6) == B.store.state_root(T0 + 10**6)
    for s in (A, B):
        s.store.close()


def test_random_splits_converge(tmp_path):
    """Seeded random branch shapes over three nodes in a line (a - b - c):
    every node ends frozen at the true least fork seq, on one root."""
    rnd = random.Random(1234)
    for trial in range(6):
        net = TestNet(n_users=3, seed=f"split{trial}")
        evil = key(f"equivocator{trial}")
        fork_at = rnd.randint(0, 20)
        la, lb = fork_at + rnd.randint(1, 30), fork_at + rnd.randint(1, 30)
        a_chain, b_chain = branches(net, evil, fork_at, la, lb)
        nodes = [_open(tmp_path, f"{trial}{n}", net) for n in "abc"]
        nodes[0].store.insert_many(a_chain)
        nodes[2].store.insert_many(b_chain)
        # b holds a prefix of one of them (or nothing).
        nodes[1].store.insert_many(rnd.choice([a_chain, b_chain])[: rnd.randint(0, fork_at + 1)])

        async def main():
            for _ in range(2):
                for c, s in ((0, 1), (1, 0), (1, 2), (2, 1)):
                    await pull(nodes[c], nodes[s], net.net)
        trio.run(main)
        for s in nodes:
            assert s.store.forks() == {evil.public: fork_at}, (trial, fork_at, la, lb)
        assert len({s.store.state_root(T0 + 10**6) for s in nodes}) == 1
        for s in nodes:
            s.store.close()


def test_peer_behind_with_another_head_is_looked_into(tmp_path):
    """The peer's frontier is behind ours with a head that is not our entry
    there: a plain "who is further" comparison fetches nothing, the check
    fetches the peer's entry and finds the fork."""
    net = TestNet(n_users=3)
    evil = key("equivocator")
    a_chain, b_chain = branches(net, evil, 0, 5, 2)
    A, B = _open(tmp_path, "a", net), _open(tmp_path, "b", net)
    A.store.insert_many(a_chain)
    B.store.insert_many(b_chain)

    async def main():
        return await pull(A, B, net.net)    # A (seq 4) pulls from B (seq 1)
    st = trio.run(main)
    assert st.checks == 1 and st.forks_sent >= 1
    assert A.store.forks() == {evil.public: 0}
    for s in (A, B):
        s.store.close()


def test_a_fork_head_announcement_alone_brings_the_evidence(tmp_path):
    """The session a head announcement starts (one author, no frontier
    exchange) resolves a fork head just like a full session."""
    from aemd.sync import sync_client as client
    from protocol.sync import Frontier
    net = TestNet(n_users=3)
    evil = key("equivocator")
    a_chain, b_chain = branches(net, evil, 1, 5, 2)
    A, B, C = (_open(tmp_path, n, net) for n in "abc")
    A.store.insert_many(a_chain)
    B.store.insert_many(b_chain)
    C.store.insert_many(a_chain)

    async def main():
        await pull(A, B, net.net)
        ann = Frontier(author=evil.public, seq=1, head=FORK_HEAD)
        x, y = trio.testing.memory_stream_pair()
        with trio.fail_after(30):
            async with trio.open_nursery() as n:
                async def serve():
                    await sync_server(_Stream(y), A, net.net)
                    await y.aclose()
                n.start_soon(serve)
                await client(_Stream(x), C, net.net, 64, only=ann)
                await x.aclose()
    trio.run(main)
    assert C.store.forks() == {evil.public: 1}
    for s in (A, B, C):
        s.store.close()


class _LyingFrontiers:
    """A peer holding our own chain that claims another head at a lower seq."""

    def __init__(self, inner: StoreAccess, author: bytes) -> None:
        self.inner, self.author = inner, author

    async def frontiers(self):
        return {self.author: (1, b"\x42" * 32)}

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_a_false_head_costs_one_request_and_records_nothing(tmp_path):
    net = TestNet(n_users=3)
    evil = key("equivocator")
    a_chain, _ = branches(net, evil, 0, 6, 1)
    A, B = _open(tmp_path, "a", net), _open(tmp_path, "b", net)
    A.store.insert_many(a_chain)
    B.store.insert_many(a_chain[:3])

    async def main():
        return await pull(A, _LyingFrontiers(B, evil.public), net.net)
    st = trio.run(main)
    assert st.checks == 1 and st.requests == 1 and st.forks_sent == 0 and st.rejected == 0
    assert A.store.forks() == {}
    for s in (A, B):
        s.store.close()
