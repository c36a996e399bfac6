"""The log store: what each insert does, local authoring, sync queries,
limits, checkpoints across reopening, and crash safety under SIGKILL."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from ledger import store as store_mod
from ledger.logfile import write_log
from ledger.replay import replay
from ledger.store import LogStore, Status
from protocol.sync import FORK_HEAD
from protocol import errors
from protocol.entry import make_entry
from protocol.errors import AemError
from tests.ledgerkit import T0, TestNet

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def net() -> TestNet:
    return TestNet(n_users=4)


@pytest.fixture
def store(tmp_path, net):
    s = LogStore.open(tmp_path / "store.sqlite", net.genesis)
    yield s
    s.close()


def test_insert_results(store, net):
    a, b = net.users[:2]
    e0 = net.append(a, net.transfer(a, b, 1))
    e1 = net.append(a, net.transfer(a, b, 2))
    e2 = net.append(a, net.transfer(a, b, 3))
    r = store.insert(e2)
    assert r.status is Status.HELD and r.stored
    assert store.insert(e1).status is Status.HELD
    r = store.insert(e0)
    assert r.status is Status.ADDED and r.promoted == 2 and r.id == e0.id
    assert store.insert(e0).status is Status.DUPLICATE
    assert store.count_held() == 0 and store.count() == 3
    f1 = net.fork(a, 1, net.transfer(a, b, 9))
    assert store.insert(f1).status is Status.EQUIVOCATION
    assert store.forks() == {a.public: 1}
    # Rejections, each with its code.
    other = TestNet(seed="elsewhere")
    foreign = other.append(other.users[0], other.transfer(other.users[0], other.users[1], 1))
    assert store.insert(foreign).code == errors.WRONG_NETWORK
    assert store.insert(net.forge(net.append(b, net.transfer(b, a, 1)))).code == errors.BAD_SIGNATURE
    assert store.insert(b"\x00" * 70_000).code == errors.TOO_LARGE
    bad = make_entry(a, net.net, 3, e1.id, 50, T0, net.transfer(a, b, 4))  # prev is seq 1, not 2
    r = store.insert(bad)
    assert r.status is Status.REJECTED and r.code == errors.BAD_CHAIN
    assert store.count() == 4


def test_broken_held_entries_are_kept_out_of_sync(store, net):
    a, b = net.users[:2]
    e0 = net.append(a, net.transfer(a, b, 1), lamport=5)
    e1 = make_entry(a, net.net, 1, e0.id, 5, T0, net.transfer(a, b, 2))   # Lamport does not grow
    assert store.insert(e1).status is Status.HELD
    assert store.insert(e0).status is Status.ADDED
    assert store.range(a.public, 0, 10) == [e0.encode()]
    assert store.verify().broken == 1


def test_frontiers_and_ranges(store, net):
    a, b = net.users[:2]
    es = [net.append(a, net.transfer(a, b, i + 1)) for i in range(5)]
    eb = net.append(b, net.transfer(b, a, 1))
    store.insert_many(es + [eb])
    fr = store.frontiers()
    assert fr == {a.public: (4, es[4].id), b.public: (0, eb.id)}
    assert store.range(a.public, 2, 2) == [es[2].encode(), es[3].encode()]
    f = net.fork(a, 4, net.transfer(a, b, 77))
    store.insert(f)
    assert store.frontiers()[a.public] == (4, FORK_HEAD)
    assert set(store.range(a.public, 4, 2)) == {f.encode(), es[4].encode()}
    assert store.get(eb.id) == eb.encode() and store.get(b"\0" * 32) is None


def test_append_local(store, net):
    a, b = net.users[:2]
    store.insert(net.append(b, net.transfer(b, a, 1), lamport=41))
    e0 = store.append_local(a, net.transfer(a, b, 5), T0)
    e1 = store.append_local(a, net.transfer(a, b, 6), T0 + 1)
    assert (e0.seq, e0.prev, e0.lamport) == (0, b"", 42)
    assert (e1.seq, e1.prev, e1.lamport) == (1, e0.id, 43)
    assert store.max_lamport() == 43
    # A held entry of our own (say, from a peer after a restore) blocks authoring.
    c = net.users[2]
    net.append(c, net.transfer(c, a, 1))
    store.insert(net.append(c, net.transfer(c, a, 2)))
    with pytest.raises(AemError) as exc:
        store.append_local(c, net.transfer(c, a, 3), T0)
    assert exc.value.code == errors.REFUSED


def test_held_limits(store, net, monkeypatch):
    monkeypatch.setattr(store_mod, "MAX_HELD_PER_AUTHOR", 2)
    a, b = net.users[:2]
    net.append(a, net.transfer(a, b, 1))             # never inserted
    held = [net.append(a, net.transfer(a, b, i + 2)) for i in range(3)]
    rs = store.insert_many(held)
    assert [r.status for r in rs[:2]] == [Status.HELD, Status.HELD]
    assert rs[2].status is Status.REJECTED and rs[2].code == errors.REFUSED


def test_other_network_refused(tmp_path, net):
    LogStore.open(tmp_path / "s.sqlite", net.genesis).close()
    with pytest.raises(AemError) as exc:
        LogStore.open(tmp_path / "s.sqlite", TestNet(seed="other").genesis)
    assert exc.value.code == errors.WRONG_NETWORK


def test_replay_from_the_store_uses_and_saves_checkpoints(tmp_path, net):
    rnd = random.Random(7)
    from tests.ledgerkit import scenario
    net, entries = scenario(rnd, 60, net)
    path = tmp_path / "s.sqlite"
    t1, t2 = T0 + 3600 * 5, T0 + 3600 * 40
    with LogStore.open(path, net.genesis) as s:
        s.insert_many(entries[:40])
        r1 = s.replay(t1)
        assert r1.mode == "full"
        s.insert_many(entries[40:])
        r2 = s.replay(t2)
        assert r2.mode in ("incremental", "rewound")
        assert r2.state_root == replay(net.genesis, entries, t2).state_root
    with LogStore.open(path, net.genesis) as s:   # the checkpoint was saved on close
        r3 = s.replay(t2 + 10)
        assert r3.mode == "incremental"
        assert r3.state_root == replay(net.genesis, entries, t2 + 10).state_root
        r4 = s.replay(t1)                          # earlier as-of: replays everything
        assert r4.mode == "rewound" and r4.state_root == replay(net.genesis, entries, t1).state_root


def test_threads_share_one_store(store, net):
    feeds = [[net.append(u, net.transfer(u, net.users[0], i + 1)) for i in range(20)]
             for u in net.users[1:]]
    errs: list = []

    def work(es):
        try:
            for e in es:
                assert store.insert(e).status is Status.ADDED
                store.frontiers()
        except BaseException as exc:  # pragma: no cover - reported below
            errs.append(exc)

    ts = [threading.Thread(target=work, args=(es,)) for es in feeds]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errs and store.count() == 60


def test_verify_finds_tampering(tmp_path, net):
    a, b = net.users[:2]
    path = tmp_path / "s.sqlite"
    with LogStore.open(path, net.genesis) as s:
        s.insert_many([net.append(a, net.transfer(a, b, i + 1)) for i in range(3)])
        assert not s.verify().problems
    import sqlite3
    db = sqlite3.connect(path)
    data = db.execute("SELECT data FROM entries WHERE seq = 1").fetchone()[0]
    db.execute("UPDATE entries SET data = ? WHERE seq = 1", (data[:-1] + bytes([data[-1] ^ 1]),))
    db.commit()
    db.close()
    with LogStore.open(path, net.genesis) as s:
        rep = s.verify()
        assert rep.problems and len(rep.bad) == 1


_CHILD = """
import sys
from ledger.logfile import read_log_all
from ledger.store import LogStore
from protocol.genesis import Genesis
g = Genesis.decode(open(sys.argv[1], 'rb').read())
store = LogStore.open(sys.argv[2], g)
for i, e in enumerate(read_log_all(sys.argv[3], g.network_id)):
    store.insert(e)
    print(i + 1, flush=True)
"""


@pytest.mark.parametrize("seed", [1, 2])
def test_sigkill_while_appending_leaves_a_prefix(tmp_path, seed):
    rnd = random.Random(seed)
    net = TestNet(n_users=3, seed=f"kill{seed}")
    written = []
    for i in range(600):
        u = net.users[i % 3]
        written.append(net.append(u, net.transfer(u, net.users[(i + 1) % 3], i + 1)).encode())
    (tmp_path / "g.aem").write_bytes(net.genesis.encode())
    write_log(tmp_path / "in.log", net.net, written)
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(tmp_path / "g.aem"), str(tmp_path / "s.sqlite"),
         str(tmp_path / "in.log")], cwd=ROOT, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    stop_at = rnd.randint(30, 300)
    done = 0
    assert child.stdout is not None
    for line in child.stdout:
        done = int(line)
        if done >= stop_at:
            break
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL
    assert done >= stop_at, "the child stopped early"
    with LogStore.open(tmp_path / "s.sqlite", net.genesis) as s:
        rep = s.verify()
        assert not rep.problems and rep.held == 0 and rep.broken == 0
        ids = {e for e in (f.id for f in s.facts())}
        n = len(ids)
        assert n >= done
        from crypto.hashing import H
        assert ids == {H(w) for w in written[:n]}, "not a prefix of what was written"
        assert s.replay(T0 + 10).state_root == replay(net.genesis, written[:n], T0 + 10).state_root


def test_a_replay_with_nothing_new_copies_nothing(store, net):
    """The per-task ledger check (a replay with no new entries, then one
    balance) shares the checkpoint's state instead of copying it and builds
    no map of all accounts: its cost does not grow with the log."""
    a, b = net.users[:2]
    store.insert_many([net.append(a, net.transfer(a, b, i + 1)) for i in range(50)])
    r1 = store.replay(T0 + 10)
    r2 = store.replay(T0 + 20)
    assert r2.mode == "incremental"
    assert r2.checkpoint.state is r1.checkpoint.state
    assert r2.checkpoint.feeds is r1.checkpoint.feeds and r2.checkpoint.notes is r1.checkpoint.notes
    assert r2.available(a.public) == net.grant - 1275
    assert r2._balances is None
    assert r2.spend_key_used(a.public, b"\x00" * 32) is False
    # A new entry still gives a new state, and leaves earlier results as they were.
    store.insert(net.append(b, net.transfer(b, a, 5)))
    r3 = store.replay(T0 + 30)
    assert r3.checkpoint.state is not r2.checkpoint.state
    assert r3.available(a.public) == net.grant - 1275 + 5
    assert r2.available(a.public) == net.grant - 1275
    assert r3.state_root == replay(net.genesis, list(store.iter_entries()), T0 + 30).state_root
