"""The deterministic mesh simulator (tests/sim/): seeded scenarios with
every invariant checked, replay determinism, and checks that the invariant
checker itself catches what it claims to."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.ledgerkit import MICRO
from tests.sim.mesh import Mesh
from tests.sim.scenarios import SEEDS, replay_command, run

pytestmark = pytest.mark.sim

CASES = [(name, seed) for name, k in SEEDS.items() for seed in range(k)]
ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name,seed", CASES, ids=[f"{n}-{s}" for n, s in CASES])
def test_scenario(name: str, seed: int) -> None:
    mesh, out = run(name, seed)
    assert not out.failures, (f"{name} seed {seed}: {len(out.failures)} invariant failures:\n  "
                              + "\n  ".join(out.failures[:20]) + f"\nreplay: {replay_command(name, seed)}")
    if name == "equivocate":
        assert mesh.equivocators, f"no fork was made; replay: {replay_command(name, seed)}"
    if name == "hostile":
        # Invalid gossip and invalid entries cost a peer its connections.
        for n in mesh.nodes:
            if n.hostile in ("garbage", "forged"):
                assert any(p == n.id for _, p, _ in mesh.bans), \
                    f"hostile node {n.id} ({n.hostile}) never banned; replay: {replay_command(name, seed)}"
    if name == "tasks":
        assert any(code is None for _, _, code in mesh.tasks_done), \
            f"no task was served; replay: {replay_command(name, seed)}"


def test_at_least_200_seeds() -> None:
    assert len(CASES) >= 200


def test_replay_is_bit_for_bit() -> None:
    _, a = run("churn", 3)
    _, b = run("churn", 3)
    _, c = run("churn", 4)
    assert a.trace_hash == b.trace_hash and a.events == b.events
    assert a.trace_hash != c.trace_hash


def test_replay_does_not_depend_on_hash_seed() -> None:
    """Another process with another PYTHONHASHSEED (set iteration order of
    bytes changes with it) replays the same trace."""
    _, here = run("hostile", 5)
    env = dict(os.environ, PYTHONHASHSEED="12345", PYTHONPATH=str(ROOT))
    got = subprocess.run([sys.executable, "-m", "tests.sim", "replay", "--scenario", "hostile", "--seed", "5",
                          "--quiet"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert f"trace {here.trace_hash}" in got.stdout, got.stdout + got.stderr


# -- the checker catches what it claims to ---------------------------------------------


def _quiet_mesh(seed: int = 11) -> Mesh:
    mesh = Mesh(4, seed)
    mesh.start()
    mesh.sim.run_until(5)
    mesh.pay(0, 1, 3 * MICRO)
    mesh.transfer(2, 3, 2 * MICRO)
    mesh.sim.run_until(20)
    return mesh


def test_checker_sees_a_divergent_node() -> None:
    mesh = _quiet_mesh()
    out = mesh.finish()
    assert not out.failures
    # An entry only node 3 holds: another state root in the group.
    e = mesh.tn.transfer(mesh.key(1), mesh.key(2).public, 7, at=mesh.nodes[1].wall)
    mesh.nodes[1].log.append_local(mesh.key(1), e, mesh.nodes[1].wall)
    out.failures.clear()
    mesh.check(out)
    assert any("state roots" in f for f in out.failures), out.failures
    assert any("frontiers differ" in f for f in out.failures), out.failures


def test_checker_sees_a_missing_ad_and_a_stray_session() -> None:
    mesh = _quiet_mesh()
    out = mesh.finish()
    host = next(n for n in mesh.nodes if n.ads)
    other = next(n for n in mesh.nodes if n is not host)
    other.table.ads.pop((host.public, host.capsule))
    other.syncing.add(host.id)
    out.failures.clear()
    mesh.check(out)
    assert any(f"no ad of host {host.id}" in f for f in out.failures), out.failures
    assert any("still marks syncs" in f for f in out.failures), out.failures


def test_checker_sees_an_equivocator_not_frozen() -> None:
    mesh = _quiet_mesh()
    out = mesh.finish()
    mesh.equivocators[mesh.key(0).public] = 0     # claimed, but no fork exists
    out.failures.clear()
    mesh.check(out)
    assert sum("not frozen" in f for f in out.failures) == 4, out.failures


def test_a_partition_that_never_heals_is_two_groups() -> None:
    """Convergence is per connected group: two sides that never meet keep
    their own roots, and each side agrees within itself."""
    mesh = Mesh(4, 2)
    mesh.start()
    mesh.sim.run_until(3)
    mesh.net.partition([[0, 1], [2, 3]])
    mesh.transfer(0, 1, 5)
    mesh.transfer(2, 3, 6)
    mesh.sim.run_until(60)
    mesh.stopping = True
    while mesh.sim.step():
        pass
    from tests.sim.mesh import Outcome
    out = Outcome()
    mesh.check(out)
    assert out.groups == [[0, 1], [2, 3]]
    assert not out.failures, out.failures
    assert out.roots[0] == out.roots[1] != out.roots[2] == out.roots[3]


@pytest.mark.parametrize("name,seed", [("churn", 0), ("equivocate", 1), ("hostile", 2), ("tasks", 0),
                                       ("admission", 2)])
def test_memlog_runs_like_the_store(name: str, seed: int) -> None:
    """The dict log of large meshes is a faithful stand-in for the real
    store: the same scenario gives the same trace, event for event, and the
    same state roots."""
    from tests.sim.scenarios import CHAOS_S, SCENARIOS
    outs = []
    for log in ("store", "mem"):
        mesh = SCENARIOS[name](seed, log=log)
        mesh.sim.run_until(CHAOS_S + 5)
        outs.append(mesh.finish())
    store, mem = outs
    assert not store.failures and not mem.failures
    assert store.trace_hash == mem.trace_hash
    assert store.roots == mem.roots


def test_checker_sees_an_admission_decision_only_one_node_holds() -> None:
    """The admission invariant can fail: two verifiers' failing re-evaluation
    reports stored on one node and never announced demote an expert there
    alone, and its group has two admission roots."""
    from tests.sim.scenarios import CHAOS_S, SCENARIOS
    mesh = SCENARIOS["admission"](0)
    mesh.sim.run_until(CHAOS_S + 5)
    out = mesh.finish()
    assert not out.failures, out.failures
    decided = {s.status(c) for s in mesh.admission_roots.values() for c in s.capsules}
    assert {"admitted", "refused"} <= decided          # the scenario decides both ways
    state = mesh.admission_roots[0]
    cid = next(c for c, cap in state.capsules.items() if cap.status == "admitted")
    tn, node = mesh.tn, mesh.nodes[0]
    gone = state.capsules[cid].measurements.replace(artefact_ok=False)
    for v in (0, 1):
        key = mesh.nodes[v].key
        node.log.append_local(key, tn.admission(key, at=node.wall, capsule_id=cid, m=gone, purpose="reeval",
                                                round=b"\x07" * 32, failed=("manifest",)), node.wall)
    assert node.log.admission().status(cid) == "demoted"
    out.failures.clear()
    mesh.check(out)
    assert any("admission roots" in f for f in out.failures), out.failures
