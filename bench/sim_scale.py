"""Benchmark: what the mesh's numbers say about many nodes (specs/scale.md).

    python bench/sim_scale.py            # meshes of 10, 100 and 1,000 nodes (a few minutes)
    python bench/sim_scale.py --quick    # 10 and 100 nodes, under a minute

Three parts, in one run:

1. ``cost``: today's per-entry cost on one node, with the real code. A
   tests/ledgerkit.bulk log (every kind of entry) and a log of task pairs
   (an InferenceWorkReceipt entry by the host, a ReceiptAck entry by the
   payer) are inserted into a real SQLite LogStore (``insert_many``: every
   signature and link checked, the entry and its facts stored) and replayed
   from their bytes (``ledger.replay``). Per entry: CPU microseconds, bytes
   on the wire, bytes in the store. From them, what a node would spend per
   day if every node stored and verified every receipt of 100,000 nodes
   doing 1,000 tasks a day each.
2. ``batch``: the same task load as per-receipt entries against the batched
   receipts of protocol/receiptbatch.py (one entry per host per epoch: a
   Merkle-sum root, the total, one debit line per payer). Entries and bytes
   every node replicates, and the CPU every node spends checking them; the
   payer's cost of checking its own line; a dispute's proof. The speed
   figure is a ratio against the per-receipt cost measured in the same run.
3. ``mesh``: meshes of 10, 100 and 1,000 nodes (hosts publishing ads, the
   accounts of a busy spell authoring a burst, verifiers among them, 5% of
   the nodes offline for the first 20 s): simulated time and messages per
   node until an ad reaches every node, until a burst of 10,000 entries is
   on every node, bytes per node per entry replicated, and the growth
   exponents (least-squares log-log slope over the sizes). The model is
   described above class MemLog: the daemon's own sync sessions, the
   daemon's head-sync rules, gossip as a flood; it stands in until the
   simulator of tests/sim/ reports the same figures.

Figures, printed last as ``name: value`` lines.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

from ledger import replay  # noqa: E402
from ledger.store import LogStore  # noqa: E402
from protocol import receiptbatch as rb  # noqa: E402
from protocol.entry import Entry  # noqa: E402
from tests.ledgerkit import MICRO, T0, TestNet, bulk  # noqa: E402

# The load the issue names: 100,000 home nodes, 1,000 tasks a day each.
BIG_NODES = 100_000
TASKS_PER_NODE_DAY = 1_000
DAY = 86_400
ACK_BODY_BYTES = 246        # a ReceiptAck's canonical bytes (checked in part_cost)
# Applying one debit line in replay: one balance update, as replaying a stored
# fact costs (about 10 µs an entry, bench/README.md "from stored facts").
LINE_APPLY_US = 10.0
LINE_BYTES = 48             # payer 32, first 4, count 4, amount 8 (BatchHead.wire_size)
# The 100,000-node case of specs/scale.md: one node in ten hosts, a payer uses
# ten hosts per epoch.
BIG_HOSTS = 10_000
BIG_FAVOURITES = 10

FIGURES: list[tuple[str, object]] = []


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def fig(name: str, value: object) -> None:
    FIGURES.append((name, value))
    log(f"  {name}: {value}")


def _fmt(v: object) -> str:
    if isinstance(v, float):
        if v == 0 or 0.01 <= abs(v) < 1e6:
            return f"{v:.4g}" if abs(v) < 1 else f"{v:.2f}"
        return f"{v:.3e}"
    return str(v)


def cpu_us_per(fn, n: int) -> float:
    """Process CPU microseconds per item of ``fn()`` over ``n`` items (the
    cyclic GC paused, as replay does, so that collections of the caller's
    heap are not charged to the code measured)."""
    gc.collect()
    gc.disable()
    try:
        c = time.process_time()
        fn()
        return (time.process_time() - c) / n * 1e6
    finally:
        gc.enable()


# -- 1. today's per-entry cost ------------------------------------------------------


def task_log(n_tasks: int, hosts: int, payers: int, seed: int) -> tuple[TestNet, list[bytes], list]:
    """``n_tasks`` tasks as today's log holds them: the host's receipt entry
    and the payer's ack entry, hosts and payers drawn at random."""
    rnd = random.Random(seed)
    net = TestNet(n_users=hosts + payers, seed=f"scale{seed}", grant=100_000 * MICRO)
    hs, ps = net.users[:hosts], net.users[hosts:]
    out: list[bytes] = []
    receipts = []
    for i in range(n_tasks):
        t = T0 + 10 * i
        h, p = rnd.choice(hs), rnd.choice(ps)
        charge = rnd.randint(1, 20 * MICRO)
        r = net.receipt(h, p, charge, at=t - 5, auth=net.spend_auth(p, charge, t + 600))
        receipts.append(r)
        out.append(net.append(h, r, ts=t).encode())
        out.append(net.append(p, net.ack(p, r.id, t + 1), ts=t + 1).encode())
    return net, out, receipts


def measure_log(name: str, genesis, entries: list[bytes], tmp: Path) -> dict[str, float]:
    n = len(entries)
    path = tmp / f"{name}.sqlite"
    store = LogStore.open(path, genesis)
    try:
        def insert() -> None:
            for i in range(0, n, 512):
                store.insert_many(entries[i:i + 512])
        ins = cpu_us_per(insert, n)
        if store.count() != n:
            raise SystemExit(f"{name}: stored {store.count()} of {n} entries")
    finally:
        store.close()
    db = sum(p.stat().st_size for p in tmp.glob(f"{name}.sqlite*"))
    end = max(Entry.decode(e).ts for e in entries[-50:]) + 60
    rep = cpu_us_per(lambda: replay(genesis, entries, end), n)
    return {"insert_us": ins, "replay_us": rep, "wire_bytes": sum(map(len, entries)) / n,
            "store_bytes": db / n}


def part_cost(quick: bool, tmp: Path) -> dict[str, float]:
    log("cost: today's per-entry cost ...")
    n_bulk = 2_000 if quick else 6_000
    net, entries = bulk(n_bulk, seed=3)
    b = measure_log("bulk", net.genesis, entries, tmp)
    tnet, tentries, _ = task_log(1_000 if quick else 3_000, hosts=50, payers=200, seed=4)
    t = measure_log("tasks", tnet.genesis, tentries, tmp)
    # Each feed holds one kind (hosts author receipts, payers acks), so each
    # kind's entries link on their own and can be measured apart.
    r = measure_log("receipts", tnet.genesis, tentries[0::2], tmp)
    a = measure_log("acks", tnet.genesis, tentries[1::2], tmp)
    ack = Entry.decode(tentries[1])
    if abs(len(ack.body) - ACK_BODY_BYTES) > 16:
        raise SystemExit(f"a ReceiptAck is {len(ack.body)} bytes now: update ACK_BODY_BYTES")
    k = Ed25519PrivateKey.generate()
    pub, msg = k.public_key(), b"x" * 300
    sig = k.sign(msg)
    ver = cpu_us_per(lambda: [pub.verify(sig, msg) for _ in range(3000)], 3000)
    fig("ed25519_verify_us", ver)
    for key, d in (("bulk", b), ("task", t), ("receipt", r), ("ack", a)):
        fig(f"{key}_entry_insert_cpu_us", d["insert_us"])
        fig(f"{key}_entry_replay_cpu_us", d["replay_us"])
        fig(f"{key}_entry_wire_bytes", d["wire_bytes"])
        fig(f"{key}_entry_store_bytes", d["store_bytes"])
    # Every node stores and verifies every entry: 2 entries a task (receipt, ack).
    per_day = BIG_NODES * TASKS_PER_NODE_DAY * 2
    fig("today_100k_entries_per_node_day", per_day)
    fig("today_100k_insert_cpu_hours_per_node_day", per_day * t["insert_us"] / 3.6e9)
    fig("today_100k_replay_cpu_hours_per_node_day", per_day * t["replay_us"] / 3.6e9)
    fig("today_100k_wire_gb_per_node_day", per_day * t["wire_bytes"] / 1e9)
    fig("today_100k_store_gb_per_node_day", per_day * t["store_bytes"] / 1e9)
    return {"verify_us": ver, "ack_insert_us": a["insert_us"], "ack_wire_bytes": a["wire_bytes"],
            **{f"task_{k}": v for k, v in t.items()},
            **{f"bulk_{k}": v for k, v in b.items()}}


# -- 2. per-receipt entries against batched receipts ---------------------------------


def part_batch(quick: bool, cost: dict[str, float]) -> dict[str, float]:
    """One epoch of a mesh's task load: ``hosts`` hosts, ``payers`` payers,
    each payer routing to a few favourite hosts (routing ranks by price and
    reputation, so a payer's tasks go to few hosts)."""
    log("batch: per-receipt entries against one batch per host per epoch ...")
    hosts, payers, tasks, fav = (20, 200, 2_000, 3) if quick else (50, 1_000, 10_000, 3)
    rnd = random.Random(5)
    net = TestNet(n_users=hosts + payers, seed="scale-batch", grant=100_000 * MICRO)
    hs, ps = net.users[:hosts], net.users[hosts:]
    favourites = {p.public: rnd.sample(range(hosts), fav) for p in ps}
    by_host: dict[int, list] = {i: [] for i in range(hosts)}
    for i in range(tasks):
        p = rnd.choice(ps)
        h = rnd.choice(favourites[p.public])
        charge = rnd.randint(1, 20 * MICRO)
        by_host[h].append(net.receipt(hs[h], p, charge, at=T0 + i,
                                      auth=net.spend_auth(p, charge, T0 + i + 600)))
    batches = []
    build = cpu_us_per(lambda: batches.extend(rb.batch_of(rs) for rs in by_host.values() if rs), tasks)
    heads = [b.head for b in batches]
    # What every node does per batch entry: what an ack entry costs to insert
    # (an entry envelope, two signatures: the entry's and the ack's) less the
    # ack's own signature, then the head check.
    check = cpu_us_per(lambda: [rb.check_head(h) for h in heads], len(heads))
    envelope_us = cost["ack_insert_us"] - cost["verify_us"]
    entry_overhead = cost["ack_wire_bytes"] - ACK_BODY_BYTES   # the envelope's bytes
    lines = sum(len(h.lines) for h in heads)
    per_receipt_bytes = tasks * 2 * cost["task_wire_bytes"]
    batch_bytes = sum(entry_overhead + h.wire_size() for h in heads)
    per_receipt_cpu = tasks * 2 * cost["task_insert_us"]
    batch_cpu = len(heads) * (envelope_us + check) + lines * LINE_APPLY_US
    # The payer's own check: its line's range proof, for each host it used.
    proofs = [(b.head, ln.payer, b.prove_line(ln.payer)) for b in batches for ln in b.head.lines]
    payer_us = cpu_us_per(lambda: [rb.verify_line(h, p, pr) for h, p, pr in proofs], len(proofs))
    proof_bytes = statistics.mean(pr.wire_size() for _, _, pr in proofs)
    # A dispute: one leaf and its path, checked by every node.
    b0 = max(batches, key=lambda b: b.head.count)
    x = b0.leaves[len(b0.leaves) // 2]
    dp = b0.prove(x.receipt_id)
    dispute_us = cpu_us_per(lambda: [rb.verify_charge(b0.head, x, dp) for _ in range(500)], 500)
    fig("batch_tasks", tasks)
    fig("batch_hosts", hosts)
    fig("batch_payers", payers)
    fig("per_receipt_entries_per_node", tasks * 2)
    fig("batched_entries_per_node", len(heads))
    fig("batched_debit_lines", lines)
    fig("per_receipt_bytes_per_node", int(per_receipt_bytes))
    fig("batched_bytes_per_node", batch_bytes)
    fig("batched_bytes_ratio", batch_bytes / per_receipt_bytes)
    fig("per_receipt_cpu_ms_per_node", per_receipt_cpu / 1e3)
    fig("batched_cpu_ms_per_node", batch_cpu / 1e3)
    fig("batched_cpu_ratio", batch_cpu / per_receipt_cpu)
    fig("batch_build_cpu_us_per_receipt", build)
    fig("batch_check_head_cpu_us", check)
    fig("payer_line_check_cpu_us", payer_us)
    fig("payer_line_proof_bytes", proof_bytes)
    fig("dispute_proof_bytes", dp.wire_size())
    fig("dispute_verify_cpu_us", dispute_us)
    fig("dispute_proof_depth", len(dp.siblings))
    # The same costs at 100,000 nodes (specs/scale.md, section 3.B): H E batch
    # entries and min(P t, P F E) debit lines a day, for hourly and daily epochs.
    for name, epochs in (("hourly", 24), ("daily", 1)):
        ents = BIG_HOSTS * epochs
        lns = min(BIG_NODES * TASKS_PER_NODE_DAY, BIG_NODES * BIG_FAVOURITES * epochs)
        fig(f"batched_100k_{name}_entries_per_node_day", ents)
        fig(f"batched_100k_{name}_lines_per_node_day", lns)
        fig(f"batched_100k_{name}_mb_per_node_day",
            (ents * (entry_overhead + 48) + lns * LINE_BYTES) / 1e6)
        fig(f"batched_100k_{name}_cpu_s_per_node_day",
            (ents * (envelope_us + check) + lns * LINE_APPLY_US) / 1e6)
    return {"lines_per_task": lines / tasks}


# -- 3. the simulated mesh --------------------------------------------------------------


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log(y) on log(x): the growth exponent."""
    lx = [math.log(x) for x in xs]
    ly = [math.log(max(y, 1e-12)) for y in ys]
    mx, my = statistics.mean(lx), statistics.mean(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


# The model of the mesh (used until tests/sim/ offers the same figures; see
# specs/scale.md section 5). What is real: the sync sessions are the
# daemon's own generators (protocol/syncsession.py) driven against in-memory
# logs, so frames, bytes and round trips are the protocol's; the entries and
# the advertisement are real signed objects; who syncs with whom follows
# aemd/node.py (a head announcement from a connected origin starts a session
# with it for that author, a relayed one a full session with a random peer,
# both through RateGate(0.5/s, burst 8) as HEAD_SYNC_RATE/BURST; after a
# session that added entries the node announces those authors' heads; every
# node runs a full anti-entropy session every 30 s x U(0.75, 1.25) with its
# peers in turn, and with every peer on connecting). What is modelled:
# gossip is a flood over the connections with duplicate suppression (each
# node forwards a new message once to every other neighbour: GossipSub's
# mesh at degree D, without IHAVE/IWANT), each link has a seeded one-way
# latency of 10 to 60 ms, a session takes its round trips times the link's
# RTT plus its bytes at 20 Mbit/s, and signature checks are done once for
# the whole mesh (the lightweight log), their cost being part 1's figure.

LINK_MS = (10.0, 60.0)
BANDWIDTH = 20e6 / 8          # bytes/s of a home link
AE_INTERVAL = 30.0
DIAL = 3                      # bootstrap peers a node dials (each node gets ~2 x DIAL connections)
CHURN = 0.05                  # nodes offline during the burst, back after CHURN_BACK_S
CHURN_BACK_S = 20.0
HEAD_SYNC_RATE, HEAD_SYNC_BURST = 0.5, 8


class _Meta:
    """Entry metadata, decoded once for the whole mesh (the lightweight log)."""
    cache: dict[bytes, tuple[bytes, int, bytes, bytes, bytes]] = {}

    @classmethod
    def of(cls, data: bytes) -> tuple[bytes, int, bytes, bytes, bytes]:
        """(author, seq, prev, id, the one copy of these bytes every log keeps:
        each frame decoded makes new bytes objects, and 1,000 logs of 10,000
        entries must share theirs)."""
        m = cls.cache.get(data)
        if m is None:
            e = Entry.decode(data)
            m = cls.cache[data] = (e.author, e.seq, e.prev, e.id, data)
        return m


class MemLog:
    """The LogAccess of aemd/sync.py over dicts: entries stored in order."""

    def __init__(self) -> None:
        self.feeds: dict[bytes, list[bytes]] = {}
        self.ids: dict[bytes, list[bytes]] = {}
        self.count = 0

    def frontiers(self) -> dict[bytes, tuple[int, bytes]]:
        return {a: (len(f) - 1, self.ids[a][-1]) for a, f in self.feeds.items()}

    def range(self, author: bytes, from_seq: int, limit: int) -> list[bytes]:
        return self.feeds.get(author, [])[from_seq:from_seq + limit]

    def linked_ids(self, pairs) -> dict:
        out = {}
        for a, q in pairs:
            ids = self.ids.get(a, [])
            out[(a, q)] = {ids[q]} if 0 <= q < len(ids) else set()
        return out

    def insert_batch(self, entries) -> tuple[int, int]:
        added = 0
        for d in entries:
            a, q, prev, eid, one = _Meta.of(d)
            ids = self.ids.setdefault(a, [])
            if q == len(ids) and (q == 0 or ids[-1] == prev):
                self.feeds.setdefault(a, []).append(one)
                ids.append(eid)
                added += 1
        self.count += added
        return added, 0

    def seq(self, author: bytes) -> int:
        return len(self.ids.get(author, ())) - 1


class _Staged:
    """The client's log during a session: reads see the log, inserts wait
    until the session ends (in simulated time)."""

    def __init__(self, log: MemLog) -> None:
        self.log, self.pending = log, []

    def __getattr__(self, op):
        return getattr(self.log, op)

    def insert_batch(self, entries):
        self.pending.extend(_Meta.of(d)[4] for d in entries)
        return len(entries), 0


def drive(client, server, clog, slog) -> tuple[int, int, int]:
    """Run a sync_client against a sync_server to the end: (frames, bytes,
    round trips the client waited for)."""
    from collections import deque
    from protocol.session import Call, Recv, Send
    to_s, to_c = deque(), deque()
    frames = nbytes = waits = 0
    c_val, s_val, c_done, s_done = None, None, False, False
    c_blocked = s_blocked = False
    while not (c_done and s_done):
        progressed = False
        while not c_done:
            if c_blocked:
                if not to_c:
                    break
                c_val, c_blocked = to_c.popleft(), False
            try:
                act = client.send(c_val)
            except StopIteration:
                c_done = True
                break
            progressed = True
            if isinstance(act, Send):
                to_s.append(act.data)
                frames += 1
                nbytes += len(act.data)
                c_val = None
            elif isinstance(act, Recv):
                c_blocked, c_val = True, None
                if not to_c:
                    waits += 1
            elif isinstance(act, Call):
                c_val = getattr(clog, act.op)(*act.args)
        while not s_done:
            if s_blocked:
                if to_s:
                    s_val, s_blocked = to_s.popleft(), False
                elif c_done:
                    s_val, s_blocked = None, False
                else:
                    break
            try:
                act = server.send(s_val)
            except StopIteration:
                s_done = True
                break
            progressed = True
            if isinstance(act, Send):
                to_c.append(act.data)
                frames += 1
                nbytes += len(act.data)
                s_val = None
            elif isinstance(act, Recv):
                s_blocked, s_val = True, None
            elif isinstance(act, Call):
                s_val = getattr(slog, act.op)(*act.args)
        if not progressed:
            raise SystemExit("sync sessions deadlocked in the bench driver")
    return frames, nbytes, waits


class Mesh:
    def __init__(self, n: int, seed: int, net: bytes) -> None:
        import heapq
        self.heapq = heapq
        from aemd.meshview import RateGate
        self.rnd = random.Random(seed)
        self.n, self.net = n, net
        self.adj: list[dict[int, float]] = [dict() for _ in range(n)]
        for i in range(1, n):
            for j in self.rnd.sample(range(i), min(DIAL, i)):
                ms = self.rnd.uniform(*LINK_MS) / 1e3
                self.adj[i][j] = self.adj[j][i] = ms
        self.logs = [MemLog() for _ in range(n)]
        self.up = [True] * n
        self.gates = [RateGate(HEAD_SYNC_RATE, HEAD_SYNC_BURST) for _ in range(n)]
        self.turn = [0] * n
        self.inflight: set[tuple[int, int, bytes]] = set()
        self.pending: dict[tuple[int, bytes], tuple[int, float]] = {}
        self.events: list = []
        self.k = 0
        self.now = 0.0
        self.msgs = self.gossip_bytes = self.sync_frames = self.sync_bytes = self.sessions = 0
        self._dist: dict[int, list[float]] = {}

    # -- gossip: a flood with duplicate suppression over the live graph -----------

    def dist(self, s: int) -> list[float]:
        d = self._dist.get(s)
        if d is None:
            d = [math.inf] * self.n
            d[s] = 0.0
            h = [(0.0, s)]
            while h:
                t, u = self.heapq.heappop(h)
                if t > d[u]:
                    continue
                for v, w in self.adj[u].items():
                    if self.up[v] and t + w < d[v]:
                        d[v] = t + w
                        self.heapq.heappush(h, (t + w, v))
            self._dist[s] = d
        return d

    def live_links(self) -> int:
        return sum(1 for u in range(self.n) if self.up[u] for v in self.adj[u] if self.up[v]) // 2

    def flood_cost(self, size: int) -> None:
        # Every live node forwards a new message once to each neighbour but the
        # one it came from: 2 E - (N - 1) transmissions, whatever the source.
        live = sum(self.up)
        tx = 2 * self._links - (live - 1)
        self.msgs += tx
        self.gossip_bytes += tx * size

    def at(self, t: float, *ev) -> None:
        self.k += 1
        self.heapq.heappush(self.events, (t, self.k, ev))

    def announce(self, s: int, author: bytes) -> None:
        q = self.logs[s].seq(author)
        self.flood_cost(self.head_size)
        d = self.dist(s)
        pending = self.pending
        for v in range(self.n):
            if v != s and self.up[v] and d[v] < math.inf and self.logs[v].seq(author) < q:
                t = self.now + d[v]
                # A node acts on the first announcement of a head it lacks:
                # an equal or older one arriving later is counted (above) but
                # starts nothing (the daemon might start a second session:
                # the model errs towards fewer sessions).
                p = pending.get((v, author))
                if p is not None and p[0] >= q and p[1] <= t:
                    continue
                pending[(v, author)] = (q, t)
                self.at(t, "head", v, s, author, q)

    # -- sync sessions --------------------------------------------------------------

    def session(self, c: int, s: int, only=None) -> None:
        from protocol.syncsession import sync_client, sync_server
        staged = _Staged(self.logs[c])
        frames, nbytes, waits = drive(sync_client(self.net, only=only), sync_server(self.net),
                                      staged, self.logs[s])
        self.sessions += 1
        self.sync_frames += frames
        self.sync_bytes += nbytes
        rtt = 2 * self.adj[c].get(s, LINK_MS[1] / 1e3)
        self.at(self.now + waits * rtt + nbytes / BANDWIDTH, "apply", c, staged.pending,
                only.author if only is not None else None)

    def on_head(self, v: int, origin: int, author: bytes, q: int) -> None:
        p = self.pending.get((v, author))
        if p is not None and p[0] == q and p[1] == self.now:
            del self.pending[(v, author)]
        if self.logs[v].seq(author) >= q:
            return
        from protocol.sync import Frontier
        peers = [p for p in self.adj[v] if self.up[p]]
        if not peers:
            return
        if origin in self.adj[v]:
            if (v, origin, author) in self.inflight or not self.gates[v].allow(str(origin), self.now):
                return
            self.inflight.add((v, origin, author))
            fr = self.logs[origin].frontiers().get(author)
            self.session(v, origin, Frontier(author=author, seq=fr[0], head=fr[1]))
        elif self.gates[v].allow("", self.now):
            self.session(v, self.rnd.choice(peers))

    def on_apply(self, v: int, entries: list[bytes], only_author) -> None:
        if only_author is not None:
            self.inflight = {x for x in self.inflight if not (x[0] == v and x[2] == only_author)}
        if not self.up[v]:
            return
        before = {a: self.logs[v].seq(a) for a in {_Meta.of(d)[0] for d in entries}}
        self.logs[v].insert_batch(entries)
        for a in sorted(a for a, q in before.items() if self.logs[v].seq(a) > q)[:64]:
            self.announce(v, a)

    def on_ae(self, v: int) -> None:
        if self.up[v]:
            peers = sorted(p for p in self.adj[v] if self.up[p])
            if peers:
                self.session(v, peers[self.turn[v] % len(peers)])
                self.turn[v] += 1
        self.at(self.now + AE_INTERVAL * (0.75 + 0.5 * self.rnd.random()), "ae", v)

    def on_return(self, v: int) -> None:
        self.up[v] = True
        self._dist.clear()
        self._links = self.live_links()
        for p in sorted(self.adj[v]):
            if self.up[p]:
                self.session(v, p)        # a new connection: sync with the peer

    def run_until(self, done, limit: float = 3600.0) -> float | None:
        while self.events:
            t, _, ev = self.heapq.heappop(self.events)
            if t > limit:
                return None
            self.now = t
            getattr(self, "on_" + ev[0])(*ev[1:])
            if done():
                return t
        return None


def mesh_trial(n: int, burst: list[bytes], ad: bytes, head_size: int, net: bytes, seed: int) -> dict:
    m = Mesh(n, seed, net)
    m.head_size = head_size
    m._links = m.live_links()
    rnd = m.rnd
    fig_ = {}
    # An ad from a host: a flood; time until every node holds it.
    src = rnd.randrange(n)
    d = m.dist(src)
    m.flood_cost(len(ad))
    fig_["ad_time_s"] = max(d)
    fig_["ad_msgs_per_node"] = m.msgs / n
    # The burst: authored at the nodes whose accounts wrote it, churned nodes off.
    m.msgs = m.gossip_bytes = 0
    for v in rnd.sample(range(n), int(n * CHURN)):
        m.up[v] = False
        m.at(CHURN_BACK_S, "return", v)
    m._dist.clear()
    m._links = m.live_links()
    authors = sorted({_Meta.of(e)[0] for e in burst})
    home = {a: rnd.choice([v for v in range(n) if m.up[v]]) for a in authors}
    for e in burst:
        m.logs[home[_Meta.of(e)[0]]].insert_batch([e])
    for v in range(n):
        m.at(AE_INTERVAL * rnd.random(), "ae", v)
    for a in authors:
        m.announce(home[a], a)
    total = len(burst)
    stayed = [v for v in range(n) if m.up[v]]
    t_up = m.run_until(lambda: all(m.logs[v].count == total for v in stayed))
    fig_["burst_time_up_s"] = t_up
    t_all = m.run_until(lambda: all(m.logs[v].count == total for v in range(n)))
    fig_["burst_time_all_s"] = t_all if t_all is not None else t_up
    fig_["burst_msgs_per_node"] = (m.msgs + m.sync_frames) / n
    fig_["burst_gossip_msgs_per_node"] = m.msgs / n
    fig_["burst_sync_frames_per_node"] = m.sync_frames / n
    fig_["burst_sessions_per_node"] = m.sessions / n
    entry_bytes = sum(map(len, burst))
    fig_["bytes_per_node_per_entry"] = (m.gossip_bytes + m.sync_bytes) / n / total
    fig_["sync_bytes_per_node"] = m.sync_bytes / n
    fig_["gossip_bytes_per_node"] = m.gossip_bytes / n
    fig_["overhead_per_entry_byte"] = (m.gossip_bytes + m.sync_bytes) / n / entry_bytes
    return fig_


def part_mesh(quick: bool) -> None:
    from protocol.mesh import HostAdvertisement
    from protocol.sync import Frontier, HeadAnnouncement
    sizes = (10, 100) if quick else (10, 100, 1_000)
    n_burst = 2_000 if quick else 10_000
    log(f"mesh: {sizes} nodes, a burst of {n_burst} entries ...")
    # 20 accounts (all of them hosting) and the 7 verifiers: a busy spell of a few
    # hosts, whose feeds every node must fetch. The model's cost grows with
    # authors x nodes^2 (every node re-announces every author it fetched).
    net, entries = bulk(n_burst, users=20, hosts=20, seed=6)
    host = net.users[0]
    ad = HostAdvertisement(net=net.net, host=host.public, capsule_id=bytes(32), kind="gguf",
                           domain="general", tags=("chat",), price=MICRO, roles=("inference",),
                           availability=90, max_concurrency=4, required_receipts=(),
                           issued_at=T0, expires_at=T0 + 300, sig=b"",
                           model="smollm2-135m-instruct", size_bytes=98_000_000,
                           quantization="Q4_1").signed(host).encode()
    head = HeadAnnouncement(net=net.net, frontier=Frontier(author=bytes(32), seq=99_999, head=bytes(32)),
                            lamport=10**9).encode()
    fig("mesh_burst_entries", n_burst)
    fig("mesh_burst_authors", len({_Meta.of(e)[0] for e in entries}))
    rows = {}
    for n in sizes:
        t = time.monotonic()
        rows[n] = mesh_trial(n, entries, ad, len(head), net.net, seed=n)
        log(f"  {n} nodes: {time.monotonic() - t:.1f} s of bench time")
        for k, v in rows[n].items():
            fig(f"n{n}_{k}", v)
    part_mesh_batch(ad, len(head))
    xs = list(sizes)
    for k in ("ad_time_s", "ad_msgs_per_node", "burst_time_up_s", "burst_msgs_per_node",
              "burst_sessions_per_node", "bytes_per_node_per_entry"):
        ys = [rows[n][k] for n in xs]
        if all(y and y > 0 for y in ys):
            fig(f"exponent_{k}", slope(xs, ys))


def part_sim(quick: bool, sizes_arg: str | None) -> None:
    """The same ad and burst figures from the simulator of tests/sim/
    (tests/sim/scale.py: the daemon's node logic on simulated streams and
    gossip, with its own role mix and churn-free settle), where it is fast
    enough: ``--engine sim`` or ``--engine both``."""
    from tests.sim import scale as sim
    sizes = tuple(int(x) for x in sizes_arg.split(",")) if sizes_arg else ((10, 100) if quick else (10, 100, 1_000))
    n_burst = 1_000 if quick else 10_000
    rows = {}
    for n in sizes:
        t = time.monotonic()
        mesh = sim.build(n, seed=n)
        sim.settle(mesh)
        ad = sim.measure_ad(mesh, host=sim.mesh_hosts(mesh)[0])
        burst = sim.measure_burst(mesh, n_burst)
        log(f"  sim {n} nodes: {time.monotonic() - t:.1f} s of bench time")
        rows[n] = {"ad_time_s": ad["time_s"], "ad_msgs_per_node": ad["messages_per_node"],
                   "burst_time_s": burst["time_s"], "burst_msgs_per_node": burst["messages_per_node"],
                   "bytes_per_node_per_entry": burst["bytes_per_entry_per_node"],
                   "complete": ad["complete"] and burst["complete"]}
        fig(f"sim_burst_entries_n{n}", n_burst)
        for k, v in rows[n].items():
            fig(f"sim_n{n}_{k}", v)
    xs = [n for n in sizes if rows[n]["complete"]]
    if len(xs) >= 2:
        for k in ("ad_time_s", "ad_msgs_per_node", "burst_time_s", "burst_msgs_per_node",
                  "bytes_per_node_per_entry"):
            ys = [rows[n][k] for n in xs]
            if all(y > 0 for y in ys):
                fig(f"sim_exponent_{k}", slope(xs, ys))


def part_mesh_batch(ad: bytes, head_size: int, n: int = 100) -> None:
    """The same task load through the same mesh twice: as per-receipt entries
    (a receipt and an ack per task) and as one batch entry per host (the
    host's envelope around BatchHead.encode(): no entry kind exists for it
    yet, and the mesh model never reads a body)."""
    from protocol.entry import Entry as E
    tasks, hosts, payers = 2_000, 20, 200
    log(f"mesh: {tasks} tasks through {n} nodes, per-receipt against batched ...")
    net, entries, receipts = task_log(tasks, hosts=hosts, payers=payers, seed=7)
    by_host: dict[bytes, list] = {}
    for r in receipts:
        by_host.setdefault(r.host, []).append(r)
    keys = {k.public: k for k in net.users[:hosts]}
    batched = []
    for i, (h, rs) in enumerate(sorted(by_host.items())):
        body = rb.batch_of(rs).head.encode()
        batched.append(E(net=net.net, author=h, seq=0, prev=b"", lamport=i + 1, ts=T0, kind="transfer",
                         body=body, sig=b"").signed(keys[h]).encode())
    for name, burst in (("per_receipt", entries), ("batched", batched)):
        r = mesh_trial(n, burst, ad, head_size, net.net, seed=n)
        fig(f"n{n}_{name}_entries_per_node", len(burst))
        fig(f"n{n}_{name}_bytes_per_node", int(r["bytes_per_node_per_entry"] * len(burst)))
        fig(f"n{n}_{name}_sync_bytes_per_node", int(r["sync_bytes_per_node"]))
        fig(f"n{n}_{name}_gossip_bytes_per_node", int(r["gossip_bytes_per_node"]))
        fig(f"n{n}_{name}_msgs_per_node", r["burst_msgs_per_node"])
        fig(f"n{n}_{name}_time_up_s", r["burst_time_up_s"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="10 and 100 nodes, smaller logs")
    ap.add_argument("--part", choices=("cost", "batch", "mesh"), action="append",
                    help="run only these parts (default: all)")
    ap.add_argument("--engine", choices=("model", "sim", "both"), default="model",
                    help="mesh figures from the bench's event model (default) or tests/sim/")
    ap.add_argument("--sim-sizes", help="node counts for --engine sim, e.g. 10,100")
    args = ap.parse_args()
    parts = args.part or ["cost", "batch", "mesh"]
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as d:
        cost = part_cost(args.quick, Path(d)) if ("cost" in parts or "batch" in parts) else {}
    if "batch" in parts:
        part_batch(args.quick, cost)
    if "mesh" in parts and args.engine in ("model", "both"):
        part_mesh(args.quick)
    if "mesh" in parts and args.engine in ("sim", "both"):
        part_sim(args.quick, args.sim_sizes)
    log(f"done in {time.monotonic() - t0:.0f} s (load {os.getloadavg()[0]:.1f})")
    for name, v in FIGURES:
        print(f"{name}: {_fmt(v)}")


if __name__ == "__main__":
    main()
