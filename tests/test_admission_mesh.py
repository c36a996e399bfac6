"""Admission end to end on real nodes (issue: the verifier mesh).

Five `aemd start` processes on 127.0.0.1: n0 pays, n1 hosts every capsule,
n2..n4 are the genesis verifiers (quorum 2) running the verifier role. The
genesis is gated: ordinary tasks go only to admitted experts. Real llama.cpp
measures real GGUF files: SmolLM2-135M-Instruct, a copy of it with other
metadata, a random-weight tiny model, and the tiny model claiming a class
smaller than itself; and two code-patch verifier capsules, one that runs the
tests and one that passes every patch that applies.

The tests run in file order on one mesh (module fixture): admission first,
then refusals, then a non-verifier's reports, then demotion.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

import pytest

from aemd.executors.ggufhash import copy_with_metadata
from aemd.executors.models import smollm2_path
from aemd.executors.tinygguf import TINY_MODEL, write_tiny_llama_gguf
from crypto.keys import SigningKey
from ledger.store import LogStore
from protocol.admission import DEFAULT_ADMISSION, AdmissionReport, DomainEvals, NodeClass
from tests.nodekit import BIN, Mesh, wait_for

pytestmark = pytest.mark.real

VERIFIER_CONFIG = """
[verifier]
enabled = true
poll_s = 1
eval_threads = 1
"""
HOST, PAYER, VERIFIERS = 1, 0, (2, 3, 4)
DECIDE_S = 600          # the slowest decision: three verifiers measuring SmolLM2 on two shared cores


def aemctl(home, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "aemctl"), *args, "--home", str(home.root)], capture_output=True,
                          text=True, timeout=timeout)


def add(node, *args: str) -> str:
    out = aemctl(node.home, "expert", "add", *args, "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)["capsule_id"]


def experts(node) -> dict[str, dict]:
    return {r["capsule_id"]: r for r in node.call("experts", timeout=60)["experts"]}


def status_everywhere(mesh: Mesh, cid: str) -> set[str]:
    return {experts(n).get(cid, {}).get("status", "unknown") for n in mesh.nodes if n.running}


def wait_status(mesh: Mesh, cid: str, want: str, timeout: float = DECIDE_S) -> None:
    def done():
        mesh.sync_now()
        return status_everywhere(mesh, cid) == {want}
    try:
        wait_for(f"capsule {cid[:12]} {want} on every node", done, timeout=timeout, every=1.0)
    except AssertionError:
        print(mesh.logs())
        raise


def submit(mesh: Mesh, cid: str) -> None:
    out = aemctl(mesh.nodes[HOST].home, "expert", "submit", cid, "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["submitted"] is True


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from aemd.codepatch_capsule import load_fixtures
    from aemd.evaluate import load_evalset
    root = tmp_path_factory.mktemp("admission")
    admission = DEFAULT_ADMISSION.replace(
        admitted_only=True,
        classes=(NodeClass(name="cpu", memory_mb=8192), NodeClass(name="tiny", memory_mb=1)),
        domains=(DomainEvals(domain="code", target_eval=load_fixtures("code-patch-fixtures").hash,
                             general_eval=b"", baseline_bp=9000, general_baseline_bp=0),
                 DomainEvals(domain="general", target_eval=load_evalset("general-target").hash,
                             general_eval=load_evalset("general-facts").hash, baseline_bp=0,
                             general_baseline_bp=0)),
        probe_set=load_evalset("probes").hash, reeval_interval_s=0)
    mesh = Mesh(root, 5, verifier_nodes=VERIFIERS, quorum=2, admission=admission,
                node_configs={i: VERIFIER_CONFIG for i in VERIFIERS})
    host = mesh.nodes[HOST]
    smol = root / "smol.gguf"
    shutil.copyfile(smollm2_path(), smol)
    copy_with_metadata(smol, root / "smol-relabelled.gguf", {"general.name": "SmolLM2 relabelled"})
    write_tiny_llama_gguf(root / "random.gguf", seed=7, **TINY_MODEL)
    caps = {
        "smol": add(host, str(smol), "--domain", "general", "--price", "0.1", "--class", "cpu"),
        "copy": add(host, str(root / "smol-relabelled.gguf"), "--domain", "general", "--price", "0.05",
                    "--class", "cpu"),
        "random": add(host, str(root / "random.gguf"), "--domain", "general", "--price", "0.01",
                      "--class", "cpu"),
        "small": add(host, str(root / "random.gguf"), "--domain", "general", "--price", "0.01",
                     "--class", "tiny"),
        "tests": add(host, "--code-patch", "--domain", "code", "--price", "0.1"),
    }
    assert len(set(caps.values())) == len(caps)
    mesh.start_line()
    try:
        yield mesh, caps, root
    finally:
        mesh.close()


def test_a_non_verifier_cannot_run_the_verifier_role(world, tmp_path):
    mesh, _, _ = world
    payer = mesh.nodes[PAYER]
    cfg = payer.home.config.read_text()
    try:
        payer.home.config.write_text(cfg + VERIFIER_CONFIG)
        out = subprocess.run([str(BIN / "aemd"), "start", "--home", str(payer.home.root)],
                             capture_output=True, text=True, timeout=60)
    finally:
        payer.home.config.write_text(cfg)
    # The payer is running, so a second start would fail on the home lock
    # first: the config check must come before it, with its own message.
    assert out.returncode != 0
    assert "not one of the genesis verifiers" in out.stderr, out.stderr


def test_the_better_capsule_is_admitted_and_then_receives_tasks(world):
    mesh, caps, _ = world
    payer = mesh.nodes[PAYER]
    # Before admission a gated network sends it nothing.
    out = aemctl(payer.home, "submit-task", "--domain", "general", "--message", "Hi", "--max-tokens", "4")
    assert out.returncode == 1 and "admitted" in out.stderr, out.stderr
    submit(mesh, caps["smol"])
    wait_status(mesh, caps["smol"], "admitted")
    row = experts(payer)[caps["smol"]]
    assert row["votes"] >= 2 and row["failed"] == []
    assert row["measurements"]["target_bp"] > 0
    gates = {g["gate"]: g for g in row["gates"]}
    assert all(g["passed"] is True for g in gates.values()), gates
    # Two verifiers' reports on it carry identical figures.
    reports = [r for r in row["reports"] if r["purpose"] == "admission"]
    assert len(reports) >= 2 and len({r["measurements_key"] for r in reports}) == 1
    # Every node computes the same admission root.
    mesh.sync_now()
    wait_for("one admission root", lambda: len({n.call("experts")["root"] for n in mesh.nodes}) == 1,
             timeout=60)
    out = aemctl(payer.home, "submit-task", "--domain", "general", "--message", "What is the capital of France?",
                 "--max-tokens", "8", "--max-price", "1", "--json")
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert res["capsule_id"] == caps["smol"]


def test_a_copy_a_worse_capsule_and_one_too_large_for_its_class_are_refused(world):
    mesh, caps, _ = world
    for name in ("copy", "random", "small"):
        submit(mesh, caps[name])
    for name in ("copy", "random", "small"):
        wait_status(mesh, caps[name], "refused")
    rows = experts(mesh.nodes[PAYER])
    assert "duplicate" in rows[caps["copy"]]["failed"]
    assert {"target", "general"} <= set(rows[caps["random"]]["failed"])      # worse, and a regression
    assert "fits" in rows[caps["small"]]["failed"]
    # The copy's tensors are SmolLM2's: same tensor hash, another file.
    m_copy, m_smol = rows[caps["copy"]]["measurements"], rows[caps["smol"]]["measurements"]
    assert m_copy["tensor_hash"] == m_smol["tensor_hash"]
    assert m_copy["artefact_hash"] != m_smol["artefact_hash"]
    out = aemctl(mesh.nodes[PAYER].home, "experts", "--status")
    assert out.returncode == 0 and "FAIL  duplicate" in out.stdout, out.stdout


def test_a_code_patch_verifier_that_agrees_with_the_labels_is_admitted_one_that_passes_all_is_not(world):
    mesh, caps, _ = world
    submit(mesh, caps["tests"])
    # `expert add --submit`: added and submitted in one command on the running host.
    out = aemctl(mesh.nodes[HOST].home, "expert", "add", "--code-patch", "--judge", "applies", "--domain", "code",
                 "--price", "0.01", "--submit", "--json")
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert res["submitted"]["submitted"] is True
    caps["applies"] = res["capsule_id"]
    wait_status(mesh, caps["tests"], "admitted")
    wait_status(mesh, caps["applies"], "refused")
    rows = experts(mesh.nodes[PAYER])
    assert rows[caps["tests"]]["measurements"]["target_bp"] == 10_000
    assert rows[caps["applies"]]["measurements"]["target_bp"] < 9_000
    assert "target" in rows[caps["applies"]]["failed"]


def test_reports_signed_by_non_verifiers_count_for_nothing(world):
    mesh, caps, _ = world
    payer = mesh.nodes[PAYER]
    rows = experts(payer)
    m = rows[caps["smol"]]["measurements"]
    bad = AdmissionReport.from_map({
        "type": "admission", "version": 1, "net": mesh.genesis.network_id, "verifier": payer.key.public,
        "capsule_id": bytes.fromhex(caps["smol"]), "purpose": "reeval", "round": b"\x01" * 32,
        "measurements": {**m, "artefact_ok": False}, "route_trace_hash": b"\x02" * 32,
        "verdict": "reject", "failed": ["manifest"], "created_at": int(time.time()), "sig": b""})
    rogue = SigningKey.generate()
    payer.stop()
    store = LogStore.open(payer.home.store, mesh.genesis)
    try:
        store.append_local(payer.key, bad.signed(payer.key), int(time.time()))
        store.append_local(rogue, bad.replace(verifier=rogue.public).signed(rogue), int(time.time()))
    finally:
        store.close()
    payer.start([mesh.nodes[HOST].addr])
    mesh.sync_now()
    n = payer.call("status")["log_entries"]
    wait_for("the rogue reports everywhere",
             lambda: (mesh.sync_now(), all(x.call("status")["log_entries"] >= n for x in mesh.nodes))[1], timeout=60)
    assert status_everywhere(mesh, caps["smol"]) == {"admitted"}


def test_an_admitted_expert_whose_reevaluation_fails_is_demoted_and_gets_no_tasks(world):
    mesh, caps, root = world
    payer = mesh.nodes[PAYER]
    # The host now serves other bytes under the admitted capsule (a new file
    # renamed over the old one: the running model keeps its own mapping).
    smol = root / "smol.gguf"
    data = bytearray(smol.read_bytes())
    data[-1000] ^= 0xFF
    tmp = root / "smol.tmp"
    tmp.write_bytes(data)
    os.replace(tmp, smol)
    out = aemctl(mesh.nodes[VERIFIERS[0]].home, "expert", "reeval", caps["smol"], "--json")
    assert out.returncode == 0, out.stderr
    wait_status(mesh, caps["smol"], "demoted")
    row = experts(payer)[caps["smol"]]
    assert "manifest" in row["failed"]
    out = aemctl(payer.home, "submit-task", "--domain", "general", "--message", "Hi", "--max-tokens", "4")
    assert out.returncode == 1 and "admitted" in out.stderr, out.stderr
