"""Measurements on large simulated meshes, for ``bench/sim_scale.py``.

    mesh = build(1000, seed=1, mix={"host": 0.1, "payer": 0.6, "verifier": 0.05, "relay": 0.25})
    settle(mesh)                             # connections up, first ads and syncs done
    ad = measure_ad(mesh, host=mesh_hosts(mesh)[0])
    burst = measure_burst(mesh, 10_000)

Each measure returns a dict of ``name: value`` figures: simulated seconds
until every live node has the thing, and the messages and bytes the network
carried meanwhile (totals, per node and by kind). A mesh that does not get
there within ``limit_s`` simulated seconds reports ``complete: False`` with
how many nodes did.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from tests.sim.mesh import Mesh
from tests.sim.node import NodeConfig

DEFAULT_MIX = {"host": 0.1, "payer": 0.6, "verifier": 0.05, "relay": 0.25}


def roles_for(n: int, mix: dict[str, float]) -> list[str]:
    """``n`` roles in the proportions of ``mix`` (deterministic, interleaved)."""
    total = sum(mix.values())
    out: list[str] = []
    acc = {r: 0.0 for r in mix}
    for _ in range(n):
        for r, w in mix.items():
            acc[r] += w / total
        r = max(acc, key=lambda k: acc[k])
        acc[r] -= 1.0
        out.append(r)
    return out


def build(n: int, seed: int = 1, *, mix: dict[str, float] | None = None, log: str = "mem", degree: int = 8,
          cfg: NodeConfig | None = None, **kw: Any) -> Mesh:
    """A mesh of ``n`` nodes, each knowing ``degree`` others (a ring plus
    random links), with the in-memory log and tracing off unless asked.
    ``kw`` goes to :class:`Mesh` (latency_ms, loss, msg_id via cfg, ...)."""
    kw.setdefault("tracing", False)
    kw.setdefault("max_events", 500_000_000)
    cfg = cfg or NodeConfig(sync_interval_s=30.0, announce_interval_s=600.0, ad_ttl_s=3600)
    topology: str | int = "full" if n <= degree + 1 else degree
    mesh = Mesh(n, seed, log=log, roles=roles_for(n, mix or DEFAULT_MIX), cfg=cfg, topology=topology, **kw)
    mesh.start()
    return mesh


def settle(mesh: Mesh, seconds: float = 60.0) -> None:
    mesh.sim.run_until(mesh.sim.now + seconds)


def mesh_hosts(mesh: Mesh) -> list[int]:
    return [n.id for n in mesh.nodes if n.role == "host" and n.hostile is None]


def _snapshot(mesh: Mesh) -> tuple[Counter, Counter]:
    return Counter(mesh.net.messages), Counter(mesh.net.bytes)


def _figures(mesh: Mesh, t0: float, before: tuple[Counter, Counter], reached: int, want: int) -> dict[str, Any]:
    msgs = Counter(mesh.net.messages)
    msgs.subtract(before[0])
    byts = Counter(mesh.net.bytes)
    byts.subtract(before[1])
    n = len(mesh.nodes)
    total_m = sum(v for k, v in msgs.items() if k in ("gossip", "stream", "control"))
    total_b = sum(byts.values())
    return {"complete": reached >= want, "reached": reached, "nodes": n, "time_s": mesh.sim.now - t0,
            "messages": total_m, "messages_per_node": total_m / n, "bytes": total_b, "bytes_per_node": total_b / n,
            "by_kind_messages": dict(msgs), "by_kind_bytes": dict(byts)}


def measure_ad(mesh: Mesh, host: int, limit_s: float = 600.0) -> dict[str, Any]:
    """A fresh ad from ``host``: until every other live node holds it."""
    h = mesh.nodes[host]
    live = {n.id for n in mesh.nodes if n.alive and n.id != host}
    got: set[int] = set()
    issued = h.wall + 1                       # strictly newer than any ad it signed before
    mesh.sim.run_until(mesh.sim.now + 1.0)

    def hook(node, ad) -> None:
        if ad.host == h.public and ad.issued_at >= issued:
            got.add(node.id)

    mesh.ad_hook = hook
    before, t0 = _snapshot(mesh), mesh.sim.now
    h._publish_ads(True)
    mesh.sim.run_while(lambda: not live <= got, limit_s)
    mesh.ad_hook = None
    return _figures(mesh, t0, before, len(got & live), len(live))


def measure_burst(mesh: Mesh, n_entries: int, *, authors: list[int] | None = None, per_announce: int = 100,
                  limit_s: float = 3600.0) -> dict[str, Any]:
    """``n_entries`` transfers, authored round-robin by ``authors`` (default:
    the payers), each author announcing its head once per ``per_announce``
    of its entries (a node that appends a batch announces its new head, not
    every entry): until every live node holds all of them."""
    authors = authors or [n.id for n in mesh.nodes if n.role == "payer"] or [0]
    live = [n for n in mesh.nodes if n.alive and n.hostile is None]
    base = {n.id: n.log.count() for n in live}
    target = n_entries
    done: set[int] = set()

    def hook(node) -> None:
        if node.id in base and node.log.count() - base[node.id] >= target:
            done.add(node.id)

    mesh.stored_hook = hook
    before, t0 = _snapshot(mesh), mesh.sim.now
    since: dict[int, int] = {}
    tn = mesh.tn
    for i in range(n_entries):
        a = authors[i % len(authors)]
        node = mesh.nodes[a]
        to = mesh.nodes[(a + 1 + i) % len(mesh.nodes)].public
        e = node.log.append_local(node.key, tn.transfer(node.key, to, 1 + i % 7, at=node.wall), node.wall)
        since[a] = since.get(a, 0) + 1
        if since[a] >= per_announce or i >= n_entries - len(authors):
            node.announce_heads([node.public])
            since[a] = 0
        del e
    for node in live:
        hook(node)
    mesh.sim.run_while(lambda: len(done) < len(live), limit_s)
    mesh.stored_hook = None
    out = _figures(mesh, t0, before, len(done), len(live))
    stream_bytes = out["by_kind_bytes"].get("stream", 0)
    out["entries"] = n_entries
    out["stream_bytes_per_entry_per_node"] = stream_bytes / max(1, n_entries * len(live))
    out["bytes_per_entry_per_node"] = out["bytes"] / max(1, n_entries * len(live))
    out["signature_checks"] = mesh.memo.verified if mesh.memo is not None else None
    return out


def churn(mesh: Mesh, fraction: float, *, over_s: float = 600.0, down_s: tuple[float, float] = (5.0, 60.0)) -> int:
    """Crash ``fraction`` of the nodes at random times within the next
    ``over_s`` simulated seconds, each back after ``down_s`` (a range);
    returns how many were scheduled. Run it before a measure so the measure
    happens under churn (a crashed node counts as not live while down)."""
    rng = mesh.sim.rng
    k = int(round(fraction * len(mesh.nodes)))
    for i in sorted(rng.sample(range(len(mesh.nodes)), k)):
        t = rng.uniform(0, over_s)
        mesh.sim.at(int(t * 1e6), mesh.net.crash, i)
        mesh.sim.at(int((t + rng.uniform(*down_s)) * 1e6), mesh.net.restart, i)
    return k


def per_node(mesh: Mesh) -> dict[str, list[int]]:
    """Messages and bytes each node sent and received so far, gossip and
    stream (sync) apart: lists indexed by node id. Subtract two readings to
    attribute them to one phase."""
    n = range(len(mesh.nodes))
    net = mesh.net
    return {f"{d}_{what}_{kind}": [c[i, kind] for i in n]
            for d, (m, b) in (("sent", (net.sent, net.sent_bytes)), ("received", (net.received, net.received_bytes)))
            for what, c in (("messages", m), ("bytes", b)) for kind in ("gossip", "stream")}


def author(mesh: Mesh, node: int, data: bytes, announce: bool = True) -> str:
    """Store an arbitrary entry's bytes at ``node`` (say, a batch entry
    signed elsewhere) as if authored there, and announce its head; returns
    the insert status."""
    nd = mesh.nodes[node]
    st = nd.log.insert_one(data)
    if announce:
        from protocol.entry import Entry
        nd.announce_heads([Entry.decode(data).author])
    return st.value
