"""Benchmark: how fast a new HostAdvertisement reaches every node of a sparse
mesh, against the floor of diameter x one hop; and how fast a new node
catches up on a large receipt log, against its own local verify-and-store rate.

    python bench/gossip.py            # 5, 10 and 20 nodes; a 100,000-entry log
    python bench/gossip.py --quick    # 5 and 10 nodes, 4 trials each; a 2,000-entry log

Arrangement: every node is its own OS process on 127.0.0.1 (``bench/_mesh.py
run``: exactly what ``aemd start`` runs, plus hooks that write event times to a
file). Not several ``Node`` objects in one process: on this 2-core machine one
process serialises every node's validation, forwarding and heartbeats through
one event loop and one GIL, so a 20-node line would measure the sum of all
nodes' CPU work rather than a relay through independent peers. Separate
processes are what a real mesh is (one daemon per machine); on 2 cores the
relay along a line is sequential anyway (one hop at a time), so the processes
do not compete much for the cores while an advertisement travels. Times are
CLOCK_MONOTONIC (``time.monotonic_ns``), one clock for every process here.

Topology: a line, n0 - n1 - ... - n(k-1), each node bootstrapping to the one
before (checked: every node has exactly its one or two neighbours connected).
Its diameter (longest shortest path) is k - 1 hops; advertisements are
published from an end (n0 and n(k-1) alternately), so each must travel the
whole diameter to the far end.

Advertisement trials: the source gets a new capsule at runtime as ``aemctl
expert add`` does it (the previous trial's capsule removed, the new one saved
with ``save_capsule``, then the control command ``reload_capsules``, which
reloads ``node.capsules`` and calls ``node.reannounce_soon()``). Measured:

- spread: from the moment the source starts publishing the new advertisement
  (hook on ``P2PNode.publish``) to the moment the last node has it in its mesh
  table (hook on ``MeshTable.offer_ad``); p50 and p95 over the trials;
- floor: diameter x the median one-hop time, one hop measured the same way in
  a separate 2-node mesh (two directly connected nodes, same topic, same
  trigger) in the same run; figure ``gossip_<k>_p95_over_floor`` (target <= 3);
- delivered: trials in which every node got the advertisement (target: all);
- trigger: from the control command to the last node (what a user sees; it
  includes the node's deliberate 1 s coalescing delay before announcing).

Catch-up: a log of N valid entries built by ``tests/ledgerkit.bulk`` (2,000
accounts, 200 hosts, 7 verifiers; receipts, transfers, acks, contributions,
challenges, ...; ~2% refused by a ledger rule but all validly signed and
linked; with --quick, a smaller log of the same shape: one account per ~50
entries, a tenth of them hosts) is inserted into a seed node's store before
it starts; then a fresh node bootstrapping to it is started and timed from
its first sync session to the moment sync has added all N entries (hooks on
``Node.sync_with`` and ``StoreAccess.insert_batch``). Baseline chosen: the rate
of inserting the same entries into a fresh local ``LogStore`` (``insert_many``,
batches of 512, one core), measured while no node runs (that store then
becomes the seed's). That is exactly the local work a syncing node cannot
avoid (every signature checked, chain linked, the entry and its fact
written), so the ratio isolates what sync adds (the network, framing,
per-author requests, the seed's reads). ``LogStore.replay``
of a store is not a fair baseline for catching up: it replays facts whose
signatures were checked at insert (~20-40x faster than verifying). The replay
of the same entries from their bytes (``ledger.replay``, signatures checked,
the issue's "local replay rate") is measured too and its ratio printed. Both
baselines run in a clean process of their own (the entries handed over in an
exported log file), as the fresh node is one, not in this process, which
holds the whole generated ledger in memory.
Target: catch-up rate / local rate >= 0.5.

Figures are printed last, one ``name: value`` per line; ratios are
dimensionless, times in milliseconds, rates in entries per second.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _mesh import (Proc, TempRoot, code_capsule, config_text, log, make_homes, now_ns,  # noqa: E402
                   pct, start_line, stop_all, wait_for)

TRIAL_TIMEOUT_S = 30.0
AS_OF = 1_900_000_000


# -- advertisement spread -------------------------------------------------------------

def line_diameter(k: int) -> int:
    """Longest shortest path of a k-node line, computed by BFS from every node."""
    adj = {i: [j for j in (i - 1, i + 1) if 0 <= j < k] for i in range(k)}
    best = 0
    for s in range(k):
        dist, todo = {s: 0}, [s]
        while todo:
            u = todo.pop(0)
            for v in adj[u]:
                if v not in dist:
                    dist[v] = dist[u] + 1
                    todo.append(v)
        best = max(best, max(dist.values()))
    return best


def wait_steady(procs: list[Proc], timeout: float) -> None:
    k = len(procs)

    def steady() -> bool:
        for i, p in enumerate(procs):
            st = p.call("status", timeout=10)
            degree = (i > 0) + (i < k - 1)
            if st["cards_known"] < k or st["peers_connected"] != degree:
                return False
        return True

    wait_for("every node connected to its neighbours and knowing every card", steady, timeout, every=0.5)
    time.sleep(1.5)  # let the cards' own gossip (IHAVE/IWANT) die down


def run_trials(procs: list[Proc], net: bytes, trials: int, tag: str) -> list[dict]:
    """Advertisement trials from the two ends; per trial the publish time and
    every other node's arrival time (ns), or None where it never came."""
    from aemd.capsules import remove_capsule, save_capsule
    ends = [procs[0], procs[-1]] if len(procs) > 1 else [procs[0]]
    current: dict[int, str] = {}
    out = []
    for t in range(trials):
        src_i = t % len(ends)
        src = ends[src_i]
        others = [p for p in procs if p is not src]
        if src_i in current:
            remove_capsule(src.home, current[src_i])
        cap = code_capsule(src.key, net, f"bench {tag} trial {t}")
        cid = cap.id.hex()
        current[src_i] = cid
        save_capsule(src.home, cap)
        t_trigger = now_ns()
        src.call("reload_capsules", timeout=10)
        deadline = time.monotonic() + TRIAL_TIMEOUT_S
        arrivals: dict[int, int] = {}
        while time.monotonic() < deadline and len(arrivals) < len(others):
            time.sleep(0.05)
            for i, p in enumerate(others):
                if i not in arrivals:
                    hit = next((e["t"] for e in p.events() if e["ev"] == "ad" and e["cap"] == cid), None)
                    if hit is not None:
                        arrivals[i] = hit
        pub = next((e["t"] for e in src.events() if e["ev"] == "pub" and e["cap"] == cid), None)
        nb = 0 if src is procs[0] else len(others) - 1      # the source's one neighbour
        out.append({"trigger": t_trigger, "pub": pub, "arrivals": [arrivals.get(i) for i in range(len(others))],
                    "first_hop": arrivals.get(nb)})
        time.sleep(0.3)  # quiet gap between trials
    return out


def spread_ms(trial: dict) -> float | None:
    if trial["pub"] is None or any(a is None for a in trial["arrivals"]):
        return None
    return (max(trial["arrivals"]) - trial["pub"]) / 1e6


def mesh_run(root: Path, k: int, trials: int, tag: str) -> list[dict]:
    homes, keys, genesis = make_homes(root / tag, k, config=config_text())
    procs = [Proc(h, key) for h, key in zip(homes, keys)]
    try:
        t0 = time.monotonic()
        start_line(procs)
        wait_steady(procs, timeout=60 + 6 * k)
        log(f"  {tag}: {k} nodes up and steady in {time.monotonic() - t0:.1f} s; {trials} trials")
        t0 = time.monotonic()
        return run_trials(procs, genesis.network_id, trials, tag)
    finally:
        log(f"  {tag}: trials took {time.monotonic() - t0:.1f} s")
        t0 = time.monotonic()
        stop_all(procs)
        log(f"  {tag}: stopped in {time.monotonic() - t0:.1f} s")


# -- catch-up ---------------------------------------------------------------------------

def catch_up(root: Path, n: int) -> dict:
    import gc
    import json
    import subprocess

    from ledger.logfile import write_log
    from tests.ledgerkit import bulk

    t = time.perf_counter()
    users = min(2000, max(20, n // 50))          # ~50 entries per account at every size
    net, entries = bulk(n, users=users, hosts=max(2, users // 10),
                        progress=lambda i: i % 20_000 == 0 and log(f"    built {i}"))
    log(f"  catch-up: {n}-entry log built in {time.perf_counter() - t:.1f} s")
    homes, keys, genesis = make_homes(root / "catchup", 2, config=config_text(), genesis=net.genesis)
    seed_home, fresh_home = homes
    logfile = root / "catchup.log"
    write_log(logfile, genesis.network_id, entries)
    del net, entries
    gc.collect()

    # Both baselines run in a clean process of their own, as the fresh node is one:
    # it fills the seed's store (local insert), then replays the entries' bytes.
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--baseline-worker",
                          str(logfile), str(seed_home.genesis), str(seed_home.store)],
                         capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        raise RuntimeError(f"baseline worker failed: {out.stderr[-2000:]}")
    base = json.loads(out.stdout.strip().splitlines()[-1])
    logfile.unlink()
    insert_s, stored, store_replay_s, replay_s = (base["insert_s"], base["stored"], base["store_replay_s"],
                                                 base["replay_s"])
    store_root = bytes.fromhex(base["root"])
    log(f"  catch-up: local insert {insert_s:.1f} s ({stored} stored), store replay {store_replay_s:.2f} s, "
        f"replay from bytes {replay_s:.1f} s")

    seed, fresh = Proc(seed_home, keys[0]), Proc(fresh_home, keys[1])
    try:
        seed.spawn().wait_ready()
        t_spawn = now_ns()
        fresh.spawn([seed.addr], sync_target=stored).wait_ready()
        synced = wait_for("the fresh node to sync the whole log",
                          lambda: next((e for e in fresh.events() if e["ev"] == "synced"), None),
                          timeout=max(120.0, 6 * insert_s), every=0.25)
        start = next(e["t"] for e in fresh.events() if e["ev"] == "sync_start")
        count = fresh.call("status", timeout=60)["log_entries"]
        fresh_root = fresh.call("ledger_replay", {"as_of": AS_OF}, timeout=120)["state_root"]
    finally:
        stop_all([fresh, seed])
    sync_s = (synced["t"] - start) / 1e9
    log(f"  catch-up: synced {count} entries in {sync_s:.1f} s")
    return {"n": n, "stored": stored, "count": count, "insert_s": insert_s, "replay_s": replay_s,
            "store_replay_s": store_replay_s, "sync_s": sync_s, "since_spawn_s": (synced["t"] - t_spawn) / 1e9,
            "same_root": fresh_root == store_root.hex()}


def baseline_worker(logfile: str, genesis_file: str, store_path: str) -> None:
    """Time, in this clean process: inserting the log's entries into a fresh
    store (batches of 512, as a sync batch at most), replaying that store, and
    replaying the entries from their bytes. Prints one JSON line."""
    import json

    from aemd.identity import read_genesis_file
    from ledger import LogStore, replay
    from ledger.logfile import read_log_all

    genesis = read_genesis_file(Path(genesis_file))
    entries = read_log_all(logfile, genesis.network_id)
    store = LogStore.open(store_path, genesis)
    t = time.perf_counter()
    for i in range(0, len(entries), 512):
        store.insert_many(entries[i:i + 512])
    insert_s = time.perf_counter() - t
    stored = store.count()
    t = time.perf_counter()
    root = store.replay(AS_OF).state_root
    store_replay_s = time.perf_counter() - t
    store.close()
    t = time.perf_counter()
    res = replay(genesis, entries, AS_OF)
    replay_s = time.perf_counter() - t
    if res.state_root != root:
        raise SystemExit("replay from bytes and from the store disagree")
    print(json.dumps({"insert_s": insert_s, "stored": stored, "store_replay_s": store_replay_s,
                      "replay_s": replay_s, "root": root.hex()}))


# -- figures -------------------------------------------------------------------------------

def spread_figures(root: Path, sizes: list[int], trials: int, floor_trials: int) -> list[tuple[str, str]]:
    log(f"one-hop floor: 2 nodes, {floor_trials} trials")
    hop = [spread_ms(t) for t in mesh_run(root, 2, floor_trials, "hop")]
    hop_ok = [h for h in hop if h is not None]
    hop_med = pct(hop_ok, 0.5)
    figures = [("one_hop_ms_p50", f"{hop_med:.2f}"), ("one_hop_ms_p95", f"{pct(hop_ok, 0.95):.2f}")]
    for k in sizes:
        res = mesh_run(root, k, trials, f"line{k}")
        d = line_diameter(k)
        spreads = [spread_ms(t) for t in res]
        ok = [s for s in spreads if s is not None]
        floor = d * hop_med
        trig = [(max(t["arrivals"]) - t["trigger"]) / 1e6 for t in res if spread_ms(t) is not None]
        first = [(t["first_hop"] - t["pub"]) / 1e6 for t in res if t["pub"] and t["first_hop"]]
        p50, p95 = pct(ok, 0.5), pct(ok, 0.95)
        per_hop = p50 / d
        figures += [
            (f"gossip_{k}_diameter", str(d)),
            (f"gossip_{k}_delivered", f"{len(ok)}/{len(res)}"),
            (f"gossip_{k}_floor_ms", f"{floor:.1f}"),
            (f"gossip_{k}_spread_ms_p50", f"{p50:.1f}"),
            (f"gossip_{k}_spread_ms_p95", f"{p95:.1f}"),
            (f"gossip_{k}_ms_per_hop_p50", f"{per_hop:.2f}"),
            (f"gossip_{k}_first_hop_in_mesh_ms_p50", f"{pct(first, 0.5):.1f}"),
            (f"gossip_{k}_trigger_to_all_ms_p50", f"{pct(trig, 0.5):.0f}"),
            (f"gossip_{k}_p50_over_floor", f"{p50 / floor:.2f}"),
            (f"gossip_{k}_p95_over_floor", f"{p95 / floor:.2f}"),
        ]
        log(f"  line{k}: spread p50 {p50:.1f} ms p95 {p95:.1f} ms, floor {floor:.1f} ms")
    return figures


def catchup_figures(c: dict) -> list[tuple[str, str]]:
    sync_rate = c["stored"] / c["sync_s"]
    insert_rate = c["stored"] / c["insert_s"]
    replay_rate = c["stored"] / c["replay_s"]
    return [
        ("catchup_entries", str(c["stored"])),
        ("catchup_synced_entries", str(c["count"])),
        ("catchup_same_state_root", "yes" if c["same_root"] else "NO"),
        ("catchup_s", f"{c['sync_s']:.1f}"),
        ("catchup_rate_per_s", f"{sync_rate:.0f}"),
        ("local_insert_rate_per_s", f"{insert_rate:.0f}"),
        ("local_replay_from_bytes_rate_per_s", f"{replay_rate:.0f}"),
        ("local_store_replay_rate_per_s", f"{c['stored'] / c['store_replay_s']:.0f}"),
        ("catchup_over_local_insert", f"{sync_rate / insert_rate:.2f}"),
        ("catchup_over_local_replay", f"{sync_rate / replay_rate:.2f}"),
    ]


# -- main -----------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="5 and 10 nodes, 4 trials each, a 2,000-entry log")
    ap.add_argument("--sizes", type=int, nargs="*", default=None, help="mesh sizes (default 5 10 20)")
    ap.add_argument("--trials", type=int, default=None, help="advertisements per mesh (default 20)")
    ap.add_argument("--entries", type=int, default=None, help="catch-up log size (default 100000)")
    ap.add_argument("--only", choices=["spread", "catchup"], help="run one half only")
    ap.add_argument("--baseline-worker", nargs=3, metavar=("LOG", "GENESIS", "STORE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.baseline_worker:
        baseline_worker(*args.baseline_worker)
        return
    sizes = args.sizes or ([5, 10] if args.quick else [5, 10, 20])
    trials = args.trials or (4 if args.quick else 20)
    floor_trials = 5 if args.quick else 2 * trials
    n_entries = args.entries or (2_000 if args.quick else 100_000)

    figures: list[tuple[str, str]] = []
    with TempRoot("aem-bench-gossip-") as root:
        if args.only != "catchup":
            figures += spread_figures(root, sizes, trials, floor_trials)
        if args.only != "spread":
            figures += catchup_figures(catch_up(root, n_entries))
    for name, value in figures:
        print(f"{name}: {value}")


if __name__ == "__main__":
    main()
