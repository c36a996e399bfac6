"""Five real `aemd start` processes on 127.0.0.1: discovery by gossip, log
replication, crash and restart, partitions. No mocks: each node is its own OS
process with its own home, store and libp2p host."""

from __future__ import annotations

import signal

import pytest

from aemd.capsules import LocalCapsule, Serving, save_capsule
from crypto.hashing import H
from protocol.mesh import ExpertCapsuleManifest
from tests.nodekit import Mesh, wait_for


def add_code_capsule(node, domain: str) -> bytes:
    m = ExpertCapsuleManifest(
        net=node_net(node), author=node.account, name=f"{domain} patcher", kind="code_patch",
        content_hash=H(b"aem code-patch expert v1"), size_bytes=0, architecture="", n_params=0,
        quantization="", context_length=0, vram_need_mb=0, domain=domain, tags=(), eval_claims=(),
        created_at=1, sig=b"").signed(node.key)
    save_capsule(node.home, LocalCapsule(m, Serving(path="", price=1000, roles=("code_patch",), max_concurrency=1)))
    return m.id


def node_net(node) -> bytes:
    from aemd.identity import read_genesis_file
    return read_genesis_file(node.home.genesis).network_id


@pytest.fixture
def mesh5(tmp_path):
    mesh = Mesh(tmp_path, 5)
    yield mesh
    mesh.close()


def _roots(nodes) -> set[str]:
    return {n.call("ledger_replay", {"as_of": 2_000_000_000})["state_root"] for n in nodes}


def _converged(nodes, expect_entries: int):
    def check():
        counts = [n.call("status")["log_entries"] for n in nodes]
        return all(c == expect_entries for c in counts) and len(_roots(nodes)) == 1
    return check


def test_five_nodes_discover_and_replicate(mesh5):
    mesh = mesh5
    capsules = {add_code_capsule(n, f"domain{i}") for i, n in enumerate(mesh.nodes)}
    mesh.start_line()            # n0 - n1 - n2 - n3 - n4, each knowing only its neighbour
    nodes = mesh.nodes
    try:
        everyone = {n.account.hex() for n in nodes}

        def all_cards():
            return all({p["node"] for p in n.call("peers") if p.get("node")} == everyone - {n.account.hex()}
                       for n in nodes)
        wait_for("every node to hold every other node's card", all_cards, timeout=90)

        def all_ads():
            return all({a["capsule_id"] for a in n.call("ads")} == {c.hex() for c in capsules} for n in nodes)
        wait_for("every node to hold every advertisement", all_ads, timeout=90)

        # Entries written on different nodes reach all, and all agree.
        for i, n in enumerate(nodes):
            n.call("transfer", {"to": nodes[(i + 1) % 5].account.hex(), "amount": 1000 + i})
        wait_for("5 entries on every node with one state root", _converged(nodes, 5), timeout=90)
        root = _roots(nodes).pop()

        # SIGKILL a middle node; it keeps its peer id and store, and catches up.
        victim = nodes[2]
        pid_before = victim.peer_id
        victim.kill(signal.SIGKILL)
        for k in range(3):
            nodes[0].call("transfer", {"to": nodes[4].account.hex(), "amount": 7 + k})
        victim.start([nodes[1].addr, nodes[3].addr])
        assert victim.peer_id == pid_before
        wait_for("the restarted node to catch up", _converged(nodes, 8), timeout=90)
        assert _roots(nodes) != {root}
    except BaseException:
        print(mesh.logs())
        raise


def test_stopped_node_catches_up_500_entries(tmp_path):
    mesh = Mesh(tmp_path, 3)
    try:
        mesh.start_line()
        a, b, c = mesh.nodes
        wait_for("c to learn its peers' cards", lambda: len([p for p in c.call("peers") if p.get("node")]) == 2)
        assert c.stop() == 0                  # clean stop on SIGTERM
        for k in range(500):
            (a if k % 2 else b).call("transfer", {"to": c.account.hex(), "amount": 1 + k})
        c.start([])                           # no bootstrap: it redials the peers it learned (peers.json)
        wait_for("the stopped node to fetch 500 entries", _converged(mesh.nodes, 500), timeout=120)
        bal = c.call("ledger_replay")["balances"][c.account.hex()]
        assert bal["available"] == 1_000_000_000 + sum(1 + k for k in range(500))
    except BaseException:
        print(mesh.logs())
        raise
    finally:
        mesh.close()


def test_partitioned_groups_converge_when_linked(tmp_path):
    mesh = Mesh(tmp_path, 4)
    try:
        a, b, c, d = mesh.nodes
        a.start()
        b.start([a.addr])
        c.start()
        d.start([c.addr])
        for k in range(5):
            a.call("transfer", {"to": b.account.hex(), "amount": 10 + k})
            c.call("transfer", {"to": d.account.hex(), "amount": 20 + k})
        wait_for("group 1 converged", _converged([a, b], 5), timeout=60)
        wait_for("group 2 converged", _converged([c, d], 5), timeout=60)
        assert _roots([a, b]) != _roots([c, d])
        # Link the groups through one connection: b dials c.
        b.call("connect", {"addr": c.addr})
        wait_for("all four converged", _converged(mesh.nodes, 10), timeout=90)
    except BaseException:
        print(mesh.logs())
        raise
    finally:
        mesh.close()
