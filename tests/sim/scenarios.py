"""Seeded scenarios. Each builds a mesh from its seed, runs a workload of
real ledger entries under its faults, then :meth:`Mesh.finish` (faults off,
heal, restart, quiet, drain) and the invariants. Everything is drawn from
the one seeded RNG, so a seed replays bit for bit:

    .venv/bin/python -m tests.sim replay --scenario partition --seed 123
"""

from __future__ import annotations

from typing import Callable

from crypto.hashing import H
from protocol.admission import DEFAULT_ADMISSION, DomainEvals
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


ADMISSION = DEFAULT_ADMISSION.replace(
    admitted_only=True, domains=(DomainEvals(domain="code", target_eval=H(b"sim-target"), general_eval=H(b"sim-general"),
                                             baseline_bp=1000, general_baseline_bp=0),))


def _submit_and_measure(mesh: Mesh, host: int, copy_of: bytes | None) -> None:
    """A host submits a capsule (its manifest); each verifier measures it a
    few seconds later, as it sees fit: the honest figures, now and then a
    dissent or no report at all; a non-verifier signs a report too."""
    node = mesh.nodes[host]
    if not node.alive:
        return
    rng = mesh.sim.rng
    tn = mesh.tn
    content = H(b"artefact" + rng.randbytes(8))
    m = tn.manifest(node.key, at=node.wall, content_hash=content)
    if node.append(m) is None:
        return
    honest = tn.measurements(content, target_bp=rng.choice([500, 1500, 4000, 7000, 9000]))
    if copy_of is not None:          # the same tensors as an earlier capsule: a duplicate
        honest = honest.replace(tensor_hash=copy_of)
    mesh.capsule_tensors.append(honest.tensor_hash)
    for v in range(mesh.n_verifiers):
        r = rng.random()
        if r < 0.1:
            continue
        mine = honest if r > 0.25 else honest.replace(target_bp=rng.randint(0, 10_000))
        t = mesh.sim.now + int(rng.uniform(0.5, 12) * SECOND)
        mesh.sim.at(t, _report, mesh, v, m.id, mine, "admission", b"")
    if rng.random() < 0.3:           # a non-verifier's report: counts for nothing
        rogue = rng.randrange(mesh.n_verifiers, len(mesh.nodes))
        mesh.sim.at(mesh.sim.now + int(rng.uniform(1, 5) * SECOND), _report, mesh, rogue, m.id,
                    honest.replace(target_bp=10_000), "admission", b"")
    # Later, a re-evaluation round: sometimes the artefact is gone.
    if rng.random() < 0.4:
        later = honest if rng.random() < 0.5 else honest.replace(artefact_ok=False)
        rnd = H(b"round" + m.id)
        for v in range(mesh.n_verifiers):
            t = mesh.sim.now + int(rng.uniform(15, 30) * SECOND)
            mesh.sim.at(t, _report, mesh, v, m.id, later, "reeval", rnd)


def _report(mesh: Mesh, i: int, capsule_id: bytes, m, purpose: str, rnd: bytes) -> None:
    node = mesh.nodes[i]
    if not node.alive:
        return
    from protocol.admission import AdmissionReport
    rep = AdmissionReport(net=mesh.tn.net, verifier=node.key.public, capsule_id=capsule_id, purpose=purpose,
                          round=rnd, measurements=m, route_trace_hash=H(b"trace" + capsule_id + node.key.public),
                          verdict="admit", failed=(), created_at=node.wall, sig=b"").signed(node.key)
    node.append(rep)


def admission(seed: int, **kw) -> Mesh:
    """Capsules submitted and measured by three verifiers (quorum 2) under
    partitions and loss: dissenting and missing reports, duplicates, a
    non-verifier's reports, re-evaluations. Every group ends with one
    admission root, the store's equal to the pure replay's."""
    import random as _r
    n = _r.Random(seed * 7919 + 3).randint(4, 7)
    mesh = Mesh(n, seed, admission=ADMISSION, verifier_nodes=3, **kw)
    mesh.n_verifiers = 3
    mesh.capsule_tensors = []
    mesh.start()
    rng = mesh.sim.rng
    mesh.net.loss = rng.uniform(0.0, 0.2)
    _workload(mesh, CHAOS_S, rate=0.1)
    t = 1.0
    while t < CHAOS_S - 15:
        t += rng.expovariate(0.3)
        host = rng.randrange(3, n)
        copy = rng.random() < 0.2
        mesh.sim.at(int(t * SECOND), lambda h=host, c=copy: _submit_and_measure(
            mesh, h, rng.choice(mesh.capsule_tensors) if c and mesh.capsule_tensors else None))
    if rng.random() < 0.6:
        groups = _halves(mesh)
        t = rng.uniform(3, 20)
        mesh.sim.at(int(t * SECOND), mesh.net.partition, groups)
        mesh.sim.at(int((t + rng.uniform(5, 20)) * SECOND), mesh.net.heal)
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
    "hostile": hostile, "churn": churn, "tasks": tasks, "admission": admission,
}

# Seeds per scenario in `pytest -m sim` (at least 200 in all).
SEEDS = {"partition": 35, "loss": 30, "crash": 35, "equivocate": 30, "hostile": 35, "churn": 30, "tasks": 20,
         "admission": 25}


def run(name: str, seed: int, *, keep_trace: bool = False) -> tuple[Mesh, Outcome]:
    mesh = SCENARIOS[name](seed, keep_trace=keep_trace)
    mesh.sim.run_until(CHAOS_S + 5)
    return mesh, mesh.finish()
