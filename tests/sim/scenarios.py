"""Seeded scenarios. Each builds a mesh from its seed, runs a workload of
real ledger entries under its faults, then :meth:`Mesh.finish` (faults off,
heal, restart, quiet, drain) and the invariants. Everything is drawn from
the one seeded RNG, so a seed replays bit for bit:

    .venv/bin/python -m tests.sim replay --scenario partition --seed 123
"""

from __future__ import annotations

from typing import Callable

from tests.ledgerkit import MICRO
from tests.sim.core import SECOND
from tests.sim.hostile import MODES
from tests.sim.mesh import Mesh, Outcome

CHAOS_S = 50.0


def replay_command(name: str, seed: int) -> str:
    return f".venv/bin/python -m tests.sim replay --scenario {name} --seed {seed}"


def _workload(mesh: Mesh, until_s: float, rate: float = 0.35) -> None:
    """Entries at random times until ``until_s``: transfers, paid tasks
    (receipt then ack), double spends, overdrafts."""
    rng = mesh.sim.rng
    n = len(mesh.nodes)
    honest = [x.id for x in mesh.honest()]
    t = 1.0
    while True:
        t += rng.expovariate(rate)
        if t >= until_s:
            return
        op = rng.choices(["transfer", "pay", "double", "overdraft"], [40, 40, 10, 10])[0]
        a, b = rng.sample(honest, 2) if len(honest) > 1 else (honest[0], (honest[0] + 1) % n)
        amount = rng.choice([1, 10, 1_000, 5 * MICRO, 50 * MICRO])
        if op == "transfer":
            mesh.sim.at(int(t * SECOND), mesh.transfer, a, b, amount)
        elif op == "overdraft":
            mesh.sim.at(int(t * SECOND), mesh.transfer, a, b, 5_000 * MICRO)
        elif op == "pay":
            mesh.sim.at(int(t * SECOND), mesh.pay, a, b, amount)
        elif len(honest) >= 3:
            h1, h2, p = rng.sample(honest, 3)
            mesh.sim.at(int(t * SECOND), mesh.double_spend, (h1, h2), p, amount)


def _halves(mesh: Mesh) -> list[list[int]]:
    ids = [x.id for x in mesh.nodes]
    mesh.sim.rng.shuffle(ids)
    k = mesh.sim.rng.randint(1, len(ids) - 1)
    return [sorted(ids[:k]), sorted(ids[k:])]


def partition(seed: int, **kw) -> Mesh:
    """Partitions (one or two rounds, sometimes three groups), workload on
    every side, then heal."""
    mesh = _mesh(seed, **kw)
    rng = mesh.sim.rng
    _workload(mesh, CHAOS_S)
    t = rng.uniform(3, 15)
    for _ in range(rng.randint(1, 2)):
        groups = _halves(mesh)
        if rng.random() < 0.3 and len(groups[1]) >= 2:
            g = groups.pop()
            groups += [g[: len(g) // 2], g[len(g) // 2:]]
        mesh.sim.at(int(t * SECOND), mesh.net.partition, groups)
        t += rng.uniform(10, 25)
        mesh.sim.at(int(t * SECOND), mesh.net.heal)
        t += rng.uniform(2, 8)
    mesh.faults(True)
    return mesh


def loss(seed: int, **kw) -> Mesh:
    """Gossip loss and stream resets (a lost stream message resets it)."""
    mesh = _mesh(seed, **kw)
    rng = mesh.sim.rng
    mesh.net.loss = rng.uniform(0.05, 0.4)
    mesh.net.reset_p = rng.uniform(0.005, 0.05)
    _workload(mesh, CHAOS_S)
    mesh.faults(True)
    return mesh


def crash(seed: int, **kw) -> Mesh:
    """Nodes crash (some of them mid-sync, with a session open) and restart."""
    mesh = _mesh(seed, **kw)
    rng = mesh.sim.rng
    _workload(mesh, CHAOS_S)
    mesh.crash_in_sync = rng.randint(1, 3)
    for _ in range(rng.randint(1, 4)):
        t = rng.uniform(2, CHAOS_S)
        mesh.sim.at(int(t * SECOND), _crash_some, mesh, rng.uniform(1, 20), rng.random() < 0.6)
    mesh.faults(True)
    return mesh


def _crash_some(mesh: Mesh, down_s: float, mid_sync: bool) -> None:
    rng = mesh.sim.rng
    live = [n.id for n in mesh.nodes if n.alive]
    if len(live) < 2:
        return
    busy = sorted({r.node.id for r in mesh.net.runners.values() if r.node.alive})
    victim = rng.choice(busy) if mid_sync and busy else rng.choice(live)
    mesh.sim.note("crash-mid-sync" if victim in busy else "crash-idle", victim)
    mesh.net.crash(victim)
    mesh.sim.at(int(down_s * SECOND), mesh.net.restart, victim)


def equivocate(seed: int, **kw) -> Mesh:
    """An author signs two entries at one seq, each given to one half of a
    partitioned mesh; after the heal every node holds both and freezes it."""
    mesh = _mesh(seed, **kw)
    rng = mesh.sim.rng
    _workload(mesh, CHAOS_S, rate=0.2)
    groups = _halves(mesh)
    mesh.sim.at(int(5 * SECOND), mesh.net.partition, groups)
    author = rng.choice(groups[0])
    other = rng.choice(groups[1])

    extra = rng.choice([0, 0, 1, 3])           # the second branch grows too: the fork lies below both heads
    more = rng.choice([0, 1, 4])               # and so does the first, on the author's side

    def fork() -> None:
        mesh.transfer(author, other, 1_000)    # a head to equivocate at, even on an empty feed
        mesh.equivocate(author, other, extra)
        for k in range(more):
            mesh.sim.at(int((k + 1) * SECOND), mesh.transfer, author, other, 10 + k)

    mesh.sim.at(int(rng.uniform(8, 30) * SECOND), fork)
    mesh.sim.at(int(rng.uniform(35, 50) * SECOND), mesh.net.heal)
    if rng.random() < 0.4:
        mesh.net.loss = 0.1
        mesh.faults(True)
    return mesh


def hostile(seed: int, **kw) -> Mesh:
    """One or two hostile peers (bad sync servers, bad gossip) among honest nodes."""
    rng0 = __import__("random").Random(seed)
    n = rng0.randint(4, 7)
    bad = {rng0.randrange(n): rng0.choice(MODES)}
    if n >= 6 and rng0.random() < 0.3:
        bad[(min(bad) + 1) % n] = rng0.choice(MODES)
    mesh = _mesh(seed, n=n, hostile=bad, **kw)
    _workload(mesh, CHAOS_S)
    mesh.faults(True)
    return mesh


def churn(seed: int, **kw) -> Mesh:
    """Everything at once: loss, resets, partitions, crashes, double spends."""
    mesh = _mesh(seed, **kw)
    rng = mesh.sim.rng
    mesh.net.loss = rng.uniform(0.0, 0.2)
    mesh.net.reset_p = rng.uniform(0.0, 0.02)
    _workload(mesh, CHAOS_S, rate=0.5)
    mesh.crash_in_sync = rng.randint(0, 2)
    t = 2.0
    while t < CHAOS_S:
        t += rng.expovariate(0.15)
        what = rng.choice(["crash", "partition"])
        if what == "crash":
            mesh.sim.at(int(t * SECOND), _crash_some, mesh, rng.uniform(1, 15), rng.random() < 0.5)
        else:
            mesh.sim.at(int(t * SECOND), mesh.net.partition, _halves(mesh))
            mesh.sim.at(int((t + rng.uniform(3, 12)) * SECOND), mesh.net.heal)
    mesh.faults(True)
    return mesh


def tasks(seed: int, **kw) -> Mesh:
    """Paid tasks over the real task sessions (a fake executor), with loss,
    resets and hosts or payers crashing mid-task; the payer acknowledges
    what it accepted."""
    from tests.sim.tasks import EXECUTE_US, run_task
    mesh = _mesh(seed, **kw)
    rng = mesh.sim.rng
    mesh.net.loss = rng.uniform(0.0, 0.2)
    mesh.net.reset_p = rng.uniform(0.0, 0.03)
    _workload(mesh, CHAOS_S, rate=0.15)
    hosts = [n.id for n in mesh.nodes if n.role == "host"] or [0]
    t = 3.0
    while t < CHAOS_S:
        t += rng.expovariate(0.4)
        h = rng.choice(hosts)
        p = rng.choice([n.id for n in mesh.nodes if n.id != h])
        mesh.sim.at(int(t * SECOND), run_task, mesh, p, h)
        if rng.random() < 0.1:      # a crash while that task runs
            victim = rng.choice([h, p])
            mesh.sim.at(int(t * SECOND) + rng.randint(1, 2 * EXECUTE_US), mesh.net.crash, victim)
            mesh.sim.at(int((t + rng.uniform(2, 10)) * SECOND), mesh.net.restart, victim)
    mesh.faults(True)
    return mesh


def _mesh(seed: int, n: int | None = None, **kw) -> Mesh:
    import random as _r
    n = n or _r.Random(seed * 7919 + 1).randint(3, 7)
    mesh = Mesh(n, seed, **kw)
    mesh.start()
    return mesh


SCENARIOS: dict[str, Callable[..., Mesh]] = {
    "partition": partition, "loss": loss, "crash": crash, "equivocate": equivocate,
    "hostile": hostile, "churn": churn, "tasks": tasks,
}

# Seeds per scenario in `pytest -m sim` (at least 200 in all).
SEEDS = {"partition": 35, "loss": 30, "crash": 35, "equivocate": 30, "hostile": 35, "churn": 30, "tasks": 20}


def run(name: str, seed: int, *, keep_trace: bool = False) -> tuple[Mesh, Outcome]:
    mesh = SCENARIOS[name](seed, keep_trace=keep_trace)
    mesh.sim.run_until(CHAOS_S + 5)
    return mesh, mesh.finish()
