"""Benchmark: what the mesh's numbers say about many nodes (specs/scale.md).

    python bench/sim_scale.py            # meshes of 10, 100 and 1,000 nodes (about 5 minutes)
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
3. ``mesh``: meshes on the simulator of tests/sim/ (tests/sim/scale.py:
   the daemon's node logic, real sync sessions and signed gossip, hosts
   publishing ads, the payers authoring a burst): simulated time and
   messages per node until an ad reaches every node and until a burst is
   on every node, bytes per node per entry, growth exponents
   (least-squares log-log slope over the sizes). Two announcement
   policies: ``today`` (the daemon's: origin gossip ids, every synced
   author's head re-announced; O(N^2 x authors) gossip, so 10 and 30 nodes
   only) and ``content`` (content-addressed gossip ids: identical
   HeadAnnouncement bytes forwarded once) at 10, 100 and 1,000 nodes (10
   and 100 with --quick). The burst size of each run is printed.

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


# The mesh part runs on the deterministic simulator of tests/sim/ (its
# scale API, tests/sim/scale.py): the daemon's node logic (aemd/node.py,
# mirrored in tests/sim/node.py) with the real sync sessions, signed ads and
# head announcements, GossipSub-like pubsub at degree 6 (4..12), seeded link
# latency of 2 to 40 ms plus jitter, the in-memory log with signature checks
# memoised across nodes. Two announcement policies:
#
# * ``today``: the daemon as it is: gossip ids (origin, seqno) and a head
#   announcement for every author a sync session stored. Each node that
#   fetches an author's entries re-announces that author's head, and each
#   announcement floods the mesh, so gossip grows with N^2 x authors: run
#   at the small sizes only (TODAY_SIZES; a 10,000-entry burst at 100 nodes
#   takes several minutes).
# * ``content``: the proposed content-addressed gossip id (H(bytes)):
#   identical HeadAnnouncement bytes, re-announced by many nodes, are
#   forwarded once. Run at every size.

TODAY_SIZES = (10, 30)
POLICIES = {"today": {"msg_id": "origin", "announce_synced": True},
            "content": {"msg_id": "content", "announce_synced": True}}
MESH_KEYS = ("ad_time_s", "ad_msgs_per_node", "burst_time_s", "burst_msgs_per_node",
             "burst_gossip_msgs_per_node", "burst_stream_msgs_per_node", "bytes_per_node_per_entry")


def burst_size(n: int, quick: bool) -> int:
    """Entries in the burst at ``n`` nodes, printed as ``*_burst_entries``.
    Above 100 nodes it is BIG_MESH_BURST: 10,000 as at the smaller sizes
    (the 1,000-node mesh then takes about 4 min of the full run); lower it
    to shorten the run."""
    if quick:
        return 1_000
    return 10_000 if n <= 100 else BIG_MESH_BURST


BIG_MESH_BURST = 10_000
# The accounts of a busy spell: the burst is authored round-robin by the
# first 20 payers (6 in a mesh of 10), each announcing its head once per 100
# of its entries, so the number of feeds every node must fetch stays fixed
# while the mesh grows.
BURST_AUTHORS = 20


def sim_trial(n: int, policy: str, n_burst: int) -> dict:
    from tests.sim import scale as sim
    from tests.sim.node import NodeConfig
    cfg = NodeConfig(sync_interval_s=30.0, announce_interval_s=600.0, ad_ttl_s=3600, **POLICIES[policy])
    mesh = sim.build(n, seed=n, cfg=cfg)
    sim.settle(mesh)
    ad = sim.measure_ad(mesh, host=sim.mesh_hosts(mesh)[0])
    authors = [x.id for x in mesh.nodes if x.role == "payer"][:BURST_AUTHORS]
    burst = sim.measure_burst(mesh, n_burst, authors=authors)
    bm = burst["by_kind_messages"]
    return {"complete": ad["complete"] and burst["complete"], "burst_entries": n_burst,
            "burst_authors": len(authors),
            "ad_time_s": ad["time_s"], "ad_msgs_per_node": ad["messages_per_node"],
            "burst_time_s": burst["time_s"], "burst_msgs_per_node": burst["messages_per_node"],
            "burst_gossip_msgs_per_node": bm.get("gossip", 0) / n,
            "burst_gossip_dups_per_node": bm.get("gossip_dup", 0) / n,
            "burst_stream_msgs_per_node": bm.get("stream", 0) / n,
            "burst_sessions_per_node": bm.get("stream_open", 0) / n,
            "bytes_per_node_per_entry": burst["bytes_per_entry_per_node"],
            "burst_gossip_bytes_per_node": burst["by_kind_bytes"].get("gossip", 0) / n,
            "burst_stream_bytes_per_node": burst["by_kind_bytes"].get("stream", 0) / n}


def part_mesh(quick: bool) -> None:
    runs = {"today": TODAY_SIZES, "content": (10, 100) if quick else (10, 100, 1_000)}
    for policy, sizes in runs.items():
        log(f"mesh ({policy}: {POLICIES[policy]}): {sizes} nodes ...")
        note = " (O(N^2 x authors) head gossip: larger meshes take minutes)" if policy == "today" else ""
        fig(f"mesh_{policy}_policy", ", ".join(f"{k}={v}" for k, v in POLICIES[policy].items()))
        fig(f"mesh_{policy}_sizes", ",".join(map(str, sizes)) + note)
        rows = {}
        for n in sizes:
            t = time.monotonic()
            rows[n] = sim_trial(n, policy, burst_size(n, quick))
            log(f"  {policy} {n} nodes: {time.monotonic() - t:.1f} s of bench time")
            for k, v in rows[n].items():
                fig(f"mesh_{policy}_n{n}_{k}", v)
        xs = [n for n in sizes if rows[n]["complete"]]
        if len(xs) >= 2:
            for k in MESH_KEYS:
                ys = [rows[n][k] for n in xs]
                if all(y > 0 for y in ys):
                    fig(f"mesh_{policy}_exponent_{k}", slope(xs, ys))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="10 and 100 nodes, smaller logs")
    ap.add_argument("--part", choices=("cost", "batch", "mesh"), action="append",
                    help="run only these parts (default: all)")
    args = ap.parse_args()
    parts = args.part or ["cost", "batch", "mesh"]
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as d:
        cost = part_cost(args.quick, Path(d)) if ("cost" in parts or "batch" in parts) else {}
    if "batch" in parts:
        part_batch(args.quick, cost)
    if "mesh" in parts:
        part_mesh(args.quick)
    log(f"done in {time.monotonic() - t0:.0f} s (load {os.getloadavg()[0]:.1f})")
    for name, v in FIGURES:
        print(f"{name}: {_fmt(v)}")


if __name__ == "__main__":
    main()
