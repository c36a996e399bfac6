"""Bad local input never crashes the daemon nor prints a traceback: every CLI
failure is one line `error: CODE: detail` with the README's exit code, every
control request is checked like a peer's message, and the code-patch
workspace is private to its owner. In-process or the installed scripts, no
running node (the node-backed cases are in test_cli_node.py)."""

from __future__ import annotations

import glob
import logging
import os
import secrets
import stat
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from pathlib import Path

import pytest
import trio

from aemd import control, ctl, gpu
from aemd.capsules import LocalCapsule, Serving, list_capsules, save_capsule
from aemd.cmd_genesis import parse_credits
from aemd.config import load_config
from aemd.home import Home
from aemd.node import Node, NodeOptions
from crypto.hashing import H
from crypto.keys import SigningKey
from protocol import errors
from protocol.errors import AemError
from protocol.frame import encode_header
from protocol.mesh import ExpertCapsuleManifest, HostAdvertisement
from tests.nodekit import Mesh

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parent.parent


def run(tool: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / tool), *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "AEM_DEBUG": ""})


def one_line_error(r: subprocess.CompletedProcess, code: str, rc: int = 1) -> None:
    assert r.returncode == rc, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert lines and lines[-1].startswith(f"error: {code}: "), r.stderr
    assert "Traceback" not in r.stderr, r.stderr


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    """One initialised home on a fresh network, never started."""
    m = Mesh(tmp_path_factory.mktemp("robust"), 1)
    yield m
    m.close()


@pytest.fixture
def home(mesh):
    h = mesh.nodes[0].home
    for p in h.capsules.glob("*") if h.capsules.is_dir() else []:
        p.unlink()
    return h


def code_patch_capsule(home: Home, key: SigningKey, net: bytes, max_concurrency: int) -> LocalCapsule:
    m = ExpertCapsuleManifest(
        net=net, author=key.public, name="cp", kind="code_patch", content_hash=H(b"x"), size_bytes=0,
        architecture="", n_params=0, quantization="", context_length=0, vram_need_mb=0, domain="python",
        tags=(), eval_claims=(), created_at=1, sig=b"").signed(key)
    return LocalCapsule(m, Serving(path="", price=1, roles=("code_patch",), max_concurrency=max_concurrency))


# -- amounts -------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["1e30", "4611686018427.387905", "nan", "inf", "1e999999999", "-1", "0.0000001"])
def test_amounts_out_of_range_are_bad_value(text):
    with pytest.raises(AemError) as e:
        parse_credits(text)
    assert e.value.code == errors.BAD_VALUE


def test_largest_amount_is_the_wire_bound():
    assert parse_credits("4611686018427.387904") == 2**62


def test_transfer_1e30_is_one_line(home):
    # checked before the node is asked: BAD_VALUE (exit 1), not NO_NODE (exit 3)
    r = run("aemctl", "transfer", "--to", SigningKey.generate().public.hex(), "--amount", "1e30",
            "--home", str(home.root))
    one_line_error(r, "BAD_VALUE")


# -- files and directories ------------------------------------------------------------

def test_init_onto_a_file(tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    one_line_error(run("aemd", "init", "--home", str(f)), "CONFIG")
    one_line_error(run("aemd", "init", "--home", str(f / "below")), "CONFIG")
    assert f.read_text() == "x"


def test_demo_dir_is_a_file(tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    one_line_error(run("aemd", "demo", "--dir", str(f)), "BAD_VALUE")


def test_start_home_is_a_file(tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    one_line_error(run("aemd", "start", "--home", str(f)), "CONFIG")


def _with_store(home: Home) -> None:
    from ledger.store import LogStore
    from aemd.identity import read_genesis_file
    LogStore.open(home.store, read_genesis_file(home.genesis)).close()


def test_ledger_export_into_a_missing_directory(home, tmp_path):
    _with_store(home)
    one_line_error(run("aemctl", "ledger-export", str(tmp_path / "nodir" / "x.aem"), "--home", str(home.root)),
                   "NOT_FOUND")


def test_ledger_export_onto_a_directory_leaves_nothing(home, tmp_path):
    _with_store(home)
    target = tmp_path / "out"
    target.mkdir()
    one_line_error(run("aemctl", "ledger-export", str(target), "--home", str(home.root)), "BAD_VALUE")
    assert sorted(os.listdir(tmp_path)) == ["out"] and os.listdir(target) == []
    ok = run("aemctl", "ledger-export", str(tmp_path / "log.aem"), "--home", str(home.root))
    assert ok.returncode == 0, ok.stderr
    assert sorted(os.listdir(tmp_path)) == ["log.aem", "out"]      # no .part beside it


def test_unexpected_errors_are_one_line(monkeypatch, capsys, home):
    """The last line of defence: a bug in a command is INTERNAL, one line."""
    from aemd import cmd_task

    def boom(args):
        raise TypeError("unexpected")
    monkeypatch.setattr(cmd_task, "_expert_list", boom)
    assert ctl.main(["expert", "list", "--home", str(home.root)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: INTERNAL: TypeError: unexpected")


# -- expert add / remove --------------------------------------------------------------

def test_max_concurrency_out_of_range_is_refused_and_saves_nothing(home):
    r = run("aemctl", "expert", "add", "--code-patch", "--domain", "python", "--price", "0.1",
            "--max-concurrency", "5000", "--home", str(home.root))
    one_line_error(r, "BAD_VALUE")
    assert list_capsules(home) == []


def test_expert_add_without_node_says_it_is_saved_and_is_idempotent(home):
    args = ["expert", "add", "--code-patch", "--domain", "python", "--price", "0.1", "--home", str(home.root)]
    r1 = run("aemctl", *args)
    assert r1.returncode == 0 and "will be advertised when the node starts" in r1.stdout, r1
    r2 = run("aemctl", *args)
    assert r2.returncode == 0 and "already hosted" in r2.stdout, r2
    caps = list_capsules(home)
    assert len(caps) == 1
    r3 = run("aemctl", *args[:-4], "--price", "0.2", "--home", str(home.root))
    assert r3.returncode == 0 and "updated" in r3.stdout
    caps2 = list_capsules(home)
    assert [c.id for c in caps2] == [caps[0].id] and caps2[0].serving.price == 200_000


@pytest.mark.parametrize("prefix", ["", " ", "ab", "zzzz"])
def test_expert_remove_needs_a_real_prefix(home, prefix):
    assert run("aemctl", "expert", "add", "--code-patch", "--domain", "python", "--price", "0.1",
               "--home", str(home.root)).returncode == 0
    one_line_error(run("aemctl", "expert", "remove", prefix, "--home", str(home.root)), "BAD_VALUE")
    assert len(list_capsules(home)) == 1


# -- global options ------------------------------------------------------------------

def test_global_options_before_the_command(home, capsys):
    assert ctl.main(["--home", str(home.root), "--json", "expert", "list"]) == 0
    assert capsys.readouterr().out.strip() == "[]"
    assert ctl.main(["expert", "list", "--home", str(home.root), "--json"]) == 0
    assert capsys.readouterr().out.strip() == "[]"
    # a home given after the command wins over one given before it
    assert ctl.main(["--home", "/nonexistent-aem", "expert", "list", "--home", str(home.root)]) == 0


def test_global_home_before_status_reaches_that_home(home, capsys):
    assert ctl.main(["--home", str(home.root), "status"]) == 3       # NO_NODE for that home, not usage
    assert str(home.root) in capsys.readouterr().err


# -- the control server --------------------------------------------------------------

def test_control_server_survives_hostile_requests(tmp_path):
    sock = tmp_path / "c.sock"
    calls = []

    async def ok(args, emit):
        calls.append(args)
        return {"n": len(calls)}

    async def buggy(args, emit):
        return len(args["tags"])          # TypeError on tags: 5

    results = {}

    def client():
        def raw(payload: bytes):
            import socket as s
            c = s.socket(s.AF_UNIX, s.SOCK_STREAM)
            c.settimeout(10)
            c.connect(str(sock))
            c.sendall(encode_header(len(payload)) + payload)
            try:
                return control._recv_msg(c)
            finally:
                c.close()
        import msgpack
        out = results
        for name, cmd, args in (("bug", "buggy", {"tags": 5}), ("unknown", "nope", {}),
                                ("args_list", "ok", [1]), ("int_key", "ok", {1: 2})):
            try:
                control.call(sock, cmd, args, timeout=10)
            except AemError as e:
                out[name] = e.code
        out["cmd_int"] = raw(msgpack.packb({"cmd": 5, "args": {}}))["code"]
        out["extra"] = raw(msgpack.packb({"cmd": "ok", "args": {}, "x": 1}))["code"]
        deep = [[[[[[[[[[[1]]]]]]]]]]]
        out["deep"] = raw(msgpack.packb({"cmd": "ok", "args": {"a": deep}}))["code"]
        out["garbage"] = raw(b"\xc1\xc1")["code"]
        out["after"] = control.call(sock, "ok", {"a": 1}, timeout=10)

    async def main():
        async with trio.open_nursery() as n:
            await n.start(control.serve_control, sock, {"ok": ok, "buggy": buggy})
            await trio.to_thread.run_sync(client)
            n.cancel_scope.cancel()

    trio.run(main)
    assert results == {"bug": "INTERNAL", "unknown": "NOT_FOUND", "args_list": "BAD_TYPE",
                       "int_key": "BAD_TYPE", "cmd_int": "BAD_TYPE", "extra": "UNKNOWN_FIELD",
                       "deep": "TOO_DEEP", "garbage": "BAD_ENCODING", "after": {"n": 1}}


# -- the node's own pure parts ----------------------------------------------------------

def _node(mesh, **opts) -> Node:
    from aemd.identity import load_node
    h = mesh.nodes[0].home
    key, genesis, cfg = load_node(h, None)
    return Node(h, key, genesis, NodeOptions(listen=[], bootstrap=opts.pop("bootstrap", []), **opts))


def test_a_bad_capsule_is_skipped_not_fatal(mesh, caplog):
    node = _node(mesh)
    good = code_patch_capsule(node.home, node.key, node.net, 4)
    bad = code_patch_capsule(node.home, node.key, node.net, 5000)   # an ad allows 1..1024
    node.capsules = [bad, good]
    with caplog.at_level(logging.WARNING, "aemd.node"):
        ads = node.my_ads()
    assert [a.max_concurrency for a in ads] == [4]
    assert "not advertised" in caplog.text


def test_malformed_bootstrap_entries_are_skipped_one_by_one(mesh, caplog):
    pid = "12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"
    good = f"/ip4/127.0.0.1/tcp/4001/p2p/{pid}"
    node = _node(mesh, bootstrap=["garbage", "/ip4/127.0.0.1/tcp/1", good, "/ip4/1.2.3.4/tcp/1/p2p/notapeer", good])
    with caplog.at_level(logging.WARNING, "aemd.node"):
        assert node._usable_bootstrap() == [good]
    assert caplog.text.count("skipped") == 3


def _ad(key, net, issued, availability=100, capsule=b"c" * 32) -> HostAdvertisement:
    return HostAdvertisement(net=net, host=key.public, capsule_id=capsule, kind="gguf", domain="general",
                             tags=(), price=1, roles=("inference",), availability=availability,
                             max_concurrency=1, required_receipts=(), issued_at=issued,
                             expires_at=issued + 100, sig=b"").signed(key)


def test_a_withdrawal_drops_the_ad_and_blocks_older_copies(mesh):
    node = _node(mesh)
    host = SigningKey.generate()
    now = int(time.time())
    ad = _ad(host, node.net, now - 10)
    assert node.mesh.offer_ad(ad, now)
    assert node._ad_withdrawn(_ad(host, node.net, now, availability=0))
    assert (host.public, b"c" * 32) not in node.mesh.ads
    assert node._ad_withdrawn(ad)                          # an old copy re-sent by a gossip cache
    assert not node._ad_withdrawn(_ad(host, node.net, now + 1))   # the host came back
    # once the withdrawal itself has expired it blocks nothing
    other = b"d" * 32
    node._ad_withdrawn(_ad(host, node.net, now - 200, availability=0, capsule=other))   # expired at now - 100
    assert not node._ad_withdrawn(_ad(host, node.net, now - 250, capsule=other))


# -- config, GPU, packaging --------------------------------------------------------------

def test_n_gpu_layers_accepts_auto_and_ints(tmp_path):
    p = tmp_path / "config.toml"
    for v, ok in (('"auto"', True), ("-1", True), ("12", True), ('"all"', False), ("-2", False), ("1.5", False)):
        p.write_text(f"[llama]\nn_gpu_layers = {v}\n")
        if ok:
            assert load_config(p)["llama"]["n_gpu_layers"] == tomllib.loads(p.read_text())["llama"]["n_gpu_layers"]
        else:
            with pytest.raises(AemError):
                load_config(p)


def test_gpu_layers_honest():
    # a CPU-only build offloads nothing, whatever the setting
    assert gpu.resolve_layers("auto", 30, 4 << 30, supported=False, free_mb=24000) == 0
    assert gpu.resolve_layers(20, 30, 4 << 30, supported=False, free_mb=24000) == 0
    # unknown GPU memory: auto offloads nothing rather than guess
    assert gpu.resolve_layers("auto", 30, 4 << 30, supported=True, free_mb=None) == 0
    # everything fits: all 30 layers and the output layer
    assert gpu.resolve_layers("auto", 30, 1 << 30, supported=True, free_mb=24000) == 31
    # 31 slices of 100 MiB, 1000 MiB free less the 512 MiB reserve: 4 layers
    assert gpu.resolve_layers("auto", 30, 3100 << 20, supported=True, free_mb=1000) == 4
    assert gpu.offloaded(-1, 30) == 30 and gpu.offloaded(99, 30) == 30 and gpu.offloaded(0, 30) == 0


def test_nvidia_smi_parsing():
    out = gpu.parse_nvidia_smi("NVIDIA H200, 143771, 140000\nbad line\nRTX, x, 1\n")
    assert out == [gpu.GpuInfo("NVIDIA H200", 143771, 140000)]


def test_offload_support_is_detected():
    assert gpu.offload_supported() in (True, False)      # llama-cpp-python is installed


def test_license_is_an_spdx_string():
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert meta["project"]["license"] == "Apache-2.0"
    req = [r for r in meta["build-system"]["requires"] if r.startswith("setuptools")]
    assert req and int(req[0].split(">=")[1].split(".")[0]) >= 77   # PEP 639 strings need 77


# -- the code-patch workspace ------------------------------------------------------------

def test_code_patch_workspace_is_private_during_a_run():
    from aemd.executors import codepatch
    from aemd.executors.fixtures import fixture_patch, fixture_repo_tar
    if codepatch.available_isolation() == "none":
        pytest.skip("no sandbox on this machine")
    marker = f"running-{secrets.token_hex(4)}"
    cmd = ["python3", "-c", f"import pathlib, time; pathlib.Path('{marker}').write_text('1'); time.sleep(4)"]
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("r", codepatch.run_code_patch(
        fixture_repo_tar(), fixture_patch("good"), cmd, limits=codepatch.Limits(wall_s=30.0))))
    t.start()
    try:
        deadline = time.monotonic() + 30
        found = []
        while time.monotonic() < deadline and not found and t.is_alive():
            found = glob.glob(os.path.join(tempfile.gettempdir(), "aem-codepatch-*", "task", "repo", marker))
            time.sleep(0.05)
        assert found, f"the test command never ran: {result}"
        repo = Path(found[0]).parent
        ws = repo.parent.parent
        modes = {p.name: stat.S_IMODE(os.stat(p).st_mode) for p in (ws, ws / "task", ws / "out")}
    finally:
        t.join(60)
    assert modes == {ws.name: 0o700, "task": 0o700, "out": 0o700}
    assert result["r"].outcome == "passed", result["r"]      # the sandbox could still write its tree


@pytest.mark.parametrize("unit", ["aemd.service", "aemd-user.service"])
def test_systemd_units_run_the_daemon_and_stop_it_cleanly(unit):
    import configparser
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str
    cp.read_string((REPO / "packaging" / "systemd" / unit).read_text())
    assert set(cp.sections()) == {"Unit", "Service", "Install"}
    svc = cp["Service"]
    assert " start" in svc["ExecStart"] and svc["ExecStart"].split()[0].endswith("/aemd")
    assert svc["ExecStartPre"].startswith("-") and "aemctl doctor" in svc["ExecStartPre"]   # never blocks
    assert svc["KillSignal"] == "SIGTERM" and int(svc["TimeoutStopSec"]) >= 10
    assert svc["Restart"] == "on-failure"
    assert "RestrictNamespaces" not in svc                 # the code-patch sandbox needs namespaces
    if unit == "aemd.service":
        assert svc["User"] == "aem" and "--home /var/lib/aem" in svc["ExecStart"]


def test_a_damaged_capsule_file_is_skipped_by_the_daemon(home, caplog):
    from aemd.capsules import load_capsules
    key = SigningKey.generate()
    from aemd.identity import read_genesis_file
    net = read_genesis_file(home.genesis).network_id
    good = code_patch_capsule(home, key, net, 1)
    save_capsule(home, good)
    import dataclasses
    bad = LocalCapsule(dataclasses.replace(good.manifest, name="other", sig=b"").signed(key), good.serving)
    save_capsule(home, bad)
    (home.capsules / f"{bad.id.hex()}.json").write_text("{not json")
    with pytest.raises(AemError):
        list_capsules(home)                      # the CLI still names the damage
    with caplog.at_level(logging.WARNING, "aemd.capsules"):
        assert [c.id for c in load_capsules(home)] == [good.id]
    assert f"capsule {bad.id.hex()}.manifest is damaged" in caplog.text


def test_gpu_layers_for_a_model_are_what_runs(mesh, monkeypatch, caplog, tmp_path):
    from aemd.executors import TINY_MODEL, write_tiny_llama_gguf
    path = write_tiny_llama_gguf(tmp_path / "m.gguf", **TINY_MODEL)
    node = _node(mesh, n_gpu_layers="auto")
    cap = code_patch_capsule(node.home, node.key, node.net, 1)
    cap = LocalCapsule(cap.manifest, Serving(path=str(path), price=1, roles=("inference",), max_concurrency=1))
    monkeypatch.setattr(gpu, "offload_supported", lambda: False)
    with caplog.at_level(logging.WARNING, "aemd.node"):
        assert node.gpu_layers_for(cap) == 0
    assert "no GPU offload" in caplog.text and node.gpu_layers[cap.id] == 0
    monkeypatch.setattr(gpu, "offload_supported", lambda: True)
    monkeypatch.setattr(gpu, "detect_gpus", lambda: [gpu.GpuInfo("GPU", 24000, 20000)])
    n = node.gpu_layers_for(cap)
    layers = gpu.model_layers(str(path))
    assert layers == TINY_MODEL.get("n_layers", 2) and n == layers + 1      # all fit, output layer too
    assert node.gpu_layers[cap.id] == layers


def test_expert_add_refused_by_the_node_leaves_no_capsule(home, monkeypatch, capsys):
    from aemd import cmd_task

    def refuse(h):
        raise AemError(errors.REFUSED, "the node refused the reload")
    monkeypatch.setattr(cmd_task, "_notify", refuse)
    rc = ctl.main(["expert", "add", "--code-patch", "--domain", "python", "--price", "0.1", "--home", str(home.root)])
    assert rc == 1 and "error: REFUSED" in capsys.readouterr().err
    assert list_capsules(home) == []
