"""The commands a new user runs against real nodes (`aemd start` processes on
127.0.0.1): honest answers, one-line errors, and a mesh that wires itself up.

One mesh for the module: A hosts a model and the code-patch verifier, B
bootstraps to A, C bootstraps to A through a list with a malformed and an
unreachable entry and hosts a verifier of its own; D is initialised and never
started (for `aemd start` failures). The last test stops C."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aemd.capsules import remove_capsule, save_capsule
from aemd.executors import TINY_MODEL, write_tiny_llama_gguf
from aemd.p2p import peer_id_from_public
from crypto.keys import SigningKey
from protocol.errors import AemError
from tests.nodekit import Mesh, wait_for
from tests.test_cli_robust import code_patch_capsule, one_line_error

BIN = Path(sys.executable).parent


def ctl(node, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "aemctl"), *args, "--home", str(node.home.root)],
                          capture_output=True, text=True, timeout=120)


def ctl_json(node, *args: str):
    r = ctl(node, *args, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    root = tmp_path_factory.mktemp("clinode")
    m = Mesh(root, 4)
    a, b, c, _d = m.nodes
    model = write_tiny_llama_gguf(root / "tiny.gguf", **TINY_MODEL, dtype="Q8_0")
    for node, args in ((a, [str(model), "--domain", "general", "--name", "tiny-chat"]),
                       (a, ["--code-patch", "--domain", "python"]),
                       (c, ["--code-patch", "--domain", "python"])):
        r = ctl(node, "expert", "add", *args, "--price", "0.1")
        assert r.returncode == 0, r.stderr
    m.unreachable = f"/ip4/127.0.0.1/tcp/{free_port()}/p2p/{peer_id_from_public(SigningKey.generate().public)}"
    m.other = Mesh(root / "othernet", 1)              # a node of another network
    try:
        a.start()
        b.start([a.addr])
        m.other.nodes[0].start()
        c.start(["garbage", a.addr, m.unreachable, m.other.nodes[0].addr])
        yield m
    finally:
        m.other.close()
        m.close()


def connected(node) -> set[str]:
    return {p["peer_id"] for p in node.call("peers") if p.get("connected")}


def test_learned_peers_are_dialled(mesh):
    a, b, c, _ = mesh.nodes
    # B and C only know A; each learns the other from its NodeCard and dials it
    wait_for("B and C connected directly", lambda: c.peer_id in connected(b) and b.peer_id in connected(c))


def test_bootstrap_keeps_good_entries_and_names_bad_ones(mesh):
    a, _, c, _ = mesh.nodes
    wait_for("C connected to A", lambda: a.peer_id in connected(c))
    log = c.log_path.read_text()
    assert "bootstrap entry 'garbage' skipped" in log
    bad_pid = mesh.unreachable.rsplit("/", 1)[1]
    wait_for("a word about the unreachable bootstrap peer",
             lambda: f"bootstrap peer {bad_pid} unreachable" in c.log_path.read_text())
    foreign = mesh.other.nodes[0].peer_id
    wait_for("a word about the bootstrap peer of another network",
             lambda: f"bootstrap peer {foreign} is connected but not on network" in c.log_path.read_text())


def test_peer_join_is_logged(mesh):
    a, b, _, _ = mesh.nodes
    wait_for("join line", lambda: f"peer joined {b.peer_id}" in a.log_path.read_text())


def test_ads_name_the_model(mesh):
    a, b, _, _ = mesh.nodes
    wait_for("A's ads at B", lambda: len([x for x in b.call("ads") if x["peer_id"] == a.peer_id]) == 2)
    ads = [x for x in ctl_json(b, "ads") if x["peer_id"] == a.peer_id and x["kind"] == "gguf"]
    assert ads and ads[0]["model"] == "tiny-chat" and ads[0]["size_bytes"] > 0 and ads[0]["quantization"] == "Q8_0"
    out = ctl(b, "ads").stdout
    assert "tiny-chat (" in out and "Q8_0" in out


def test_status_and_peers_report_gpu(mesh):
    a, b, _, _ = mesh.nodes
    st = ctl_json(a, "status")
    assert st["gpu"]["offload_supported"] in (True, False) and st["gpu"]["layers_offloaded"] == 0
    assert "gpu          llama.cpp build:" in ctl(a, "status").stdout
    wait_for("A's card at B", lambda: any(p["peer_id"] == a.peer_id and p.get("node") for p in b.call("peers")))
    assert all("gpu_layers" in p for p in ctl_json(b, "peers") if p.get("node"))


def test_status_root_does_not_tick_without_entries(mesh):
    a = mesh.nodes[0]
    first = ctl_json(a, "status")
    time.sleep(2.1)          # the property is about wall time passing (past one status tick), not a wait for the mesh
    second = ctl_json(a, "status")
    assert first["log_entries"] == second["log_entries"]      # nothing appends before the transfer test
    assert second["state_root"] == first["state_root"]
    assert second["state_root_as_of"] == first["state_root_as_of"] <= int(time.time())
    assert f"state root   {first['state_root']}  (replay as of" in ctl(a, "status").stdout


def test_transfer_beyond_the_balance_is_refused_at_the_command(mesh):
    a, b, _, _ = mesh.nodes
    before = b.call("status")["log_entries"]
    r = ctl(b, "transfer", "--to", a.account.hex(), "--amount", "1000.000001")   # the grant is 1000
    one_line_error(r, "REFUSED")
    assert "1000.000000 credits available" in r.stderr
    assert b.call("status")["log_entries"] == before
    one_line_error(ctl(b, "transfer", "--to", a.account.hex(), "--amount", "1e30"), "BAD_VALUE")
    ok = ctl(b, "transfer", "--to", a.account.hex(), "--amount", "1")
    assert ok.returncode == 0 and "appended" in ok.stdout


def test_connect_says_when_it_did_not_dial(mesh):
    a, b, _, _ = mesh.nodes
    dead = f"/ip4/127.0.0.1/tcp/{free_port()}/p2p/{a.peer_id}"
    r = ctl(b, "connect", dead)
    assert r.returncode == 0 and "already connected" in r.stdout and "not dialled" in r.stdout, r
    assert not r.stdout.startswith("connected to")


def test_second_start_on_a_live_home_is_one_line(mesh):
    a = mesh.nodes[0]
    r = subprocess.run([str(BIN / "aemd"), "start", "--home", str(a.home.root)], capture_output=True,
                       text=True, timeout=60)
    one_line_error(r, "REFUSED")
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("listen, code", [("/ip4/1.2.3/tcp/1", "BAD_VALUE"), ("PORT_OF_A", "UNAVAILABLE")])
def test_start_with_a_bad_listen_address_is_one_line(mesh, listen, code):
    a, _, _, d = mesh.nodes
    if listen == "PORT_OF_A":
        listen = a.addr.split("/p2p/")[0]
    r = subprocess.run([str(BIN / "aemd"), "start", "--home", str(d.home.root), "--listen", listen],
                       capture_output=True, text=True, timeout=60)
    one_line_error(r, code)
    assert "Traceback" not in r.stderr and len([ln for ln in r.stderr.splitlines() if "error:" in ln]) == 1


def test_a_bad_capsule_file_does_not_kill_the_node(mesh):
    _, b, _, _ = mesh.nodes
    one_line_error(ctl(b, "expert", "add", "--code-patch", "--domain", "python", "--price", "0.1",
                       "--max-concurrency", "5000"), "BAD_VALUE")
    # a capsule file edited by hand past the ad's limit: skipped, with a warning
    bad = code_patch_capsule(b.home, b.key, mesh.genesis.network_id, 5000)
    save_capsule(b.home, bad)
    try:
        b.call("reload_capsules")
        wait_for("the warning", lambda: "not advertised" in b.log_path.read_text())
        # the next announcement builds the ads again and warns again: the node lived through it
        wait_for("the next announcement", lambda: b.log_path.read_text().count("not advertised") >= 2, timeout=30)
        assert b.running and b.call("status")["peer_id"] == b.peer_id
    finally:
        remove_capsule(b.home, bad.id.hex())
        b.call("reload_capsules")


@pytest.mark.parametrize("args", [{"domain": "general", "kind": "text", "prompt": "hi", "tags": 5, "max_price": 1},
                                  {"domain": "python", "kind": "code_patch", "test_cmd": 5, "patch": "x",
                                   "repo_tar": b"", "max_price": 1},
                                  {"domain": 5}])
def test_malformed_control_requests_get_an_error_not_a_dead_node(mesh, args):
    _, b, _, _ = mesh.nodes
    with pytest.raises(AemError):
        b.call("submit_task", args, timeout=60)
    assert b.running and b.call("status")["peer_id"] == b.peer_id


def test_doctor_against_a_running_node(mesh):
    a, _, _, d = mesh.nodes
    listen = a.addr.split("/p2p/")[0]
    config = a.home.config.read_text()
    # the config names the port A listens on: held, but by this node
    a.home.config.write_text(config.replace('listen = ["/ip4/127.0.0.1/tcp/0"]', f'listen = ["{listen}"]', 1))
    try:
        r = ctl(a, "doctor", "--json")
    finally:
        a.home.config.write_text(config)
    out = json.loads(r.stdout)
    checks = {c["name"]: c for c in out["checks"]}
    assert checks["ports"]["status"] == "ok" and "(this node)" in checks["ports"]["detail"], checks["ports"]
    assert checks["clock"]["status"] == "ok" and "peer cards" in checks["clock"]["detail"], checks["clock"]
    assert r.returncode == (4 if not out["ok"] else 0)
    # the same port in the config of a node that is not running: taken by another program
    config = d.home.config.read_text()
    d.home.config.write_text(config.replace('listen = ["/ip4/127.0.0.1/tcp/0"]', f'listen = ["{listen}"]', 1))
    try:
        r = ctl(d, "doctor", "--json")
    finally:
        d.home.config.write_text(config)
    ports = next(c for c in json.loads(r.stdout)["checks"] if c["name"] == "ports")
    assert ports["status"] == "fail" and r.returncode == 4

def test_a_removed_capsule_is_withdrawn_at_once(mesh):
    a, b, _, _ = mesh.nodes
    added = ctl_json(b, "expert", "add", "--code-patch", "--domain", "rust", "--price", "0.3")
    cid = added["capsule_id"]
    wait_for("B's new ad at A", lambda: any(x["capsule_id"] == cid for x in a.call("ads")))
    r = ctl(b, "expert", "remove", cid[:12])
    assert r.returncode == 0, r.stderr
    # the ad would live 60 s (card_ttl_s); the withdrawal removes it at once
    wait_for("B's ad gone at A", lambda: not any(x["capsule_id"] == cid for x in a.call("ads")), timeout=20)


def test_a_stopped_host_withdraws_its_ads(mesh):
    _, b, c, _ = mesh.nodes
    wait_for("C's ad at B", lambda: any(x["peer_id"] == c.peer_id for x in b.call("ads")))
    c.stop()
    # The ad would live 60 s (card_ttl_s); the withdrawal removes it at once.
    wait_for("C's ad gone at B", lambda: not any(x["peer_id"] == c.peer_id for x in b.call("ads")), timeout=20)
    wait_for("leave line", lambda: f"peer left {c.peer_id}" in b.log_path.read_text())

