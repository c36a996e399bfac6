"""`aemctl doctor`: every check reports ok/warn/fail/skip with a fix, and the
exit code says whether problems were found. In-process; the running-node
case (ports held by the node, clock skew against peers) is in test_cli_node.py."""

from __future__ import annotations

import json
import socket
from collections import namedtuple

import pytest

from aemd import ctl, doctor, gpu
from aemd.home import Home
from aemd.identity import atomic_write
from tests.nodekit import Mesh

NAMES = ["home", "sandbox", "gpu", "ports", "clock", "disk"]


@pytest.fixture
def home(tmp_path):
    m = Mesh(tmp_path, 1)
    return m.nodes[0].home


def doctor_json(home: Home, capsys) -> tuple[int, dict]:
    rc = ctl.main(["doctor", "--home", str(home.root), "--json"])
    return rc, json.loads(capsys.readouterr().out)


def test_every_check_is_reported_and_problems_exit_4(home, capsys):
    rc, out = doctor_json(home, capsys)
    assert [c["name"] for c in out["checks"]] == NAMES
    for c in out["checks"]:
        assert c["status"] in ("ok", "warn", "fail", "skip")
        assert c["status"] in ("ok", "skip") or c["fix"], c
    bad = any(c["status"] in ("warn", "fail") for c in out["checks"])
    assert rc == (4 if bad else 0) and out["ok"] is (not bad)
    clock = next(c for c in out["checks"] if c["name"] == "clock")
    assert clock["status"] == "skip"                      # no node running


def test_a_taken_port_fails_with_a_fix(home, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        atomic_write(home.config, f'[node]\nlisten = ["/ip4/127.0.0.1/tcp/{port}"]\n[api]\nenabled = false\n'.encode())
        rc, out = doctor_json(home, capsys)
    ports = next(c for c in out["checks"] if c["name"] == "ports")
    assert ports["status"] == "fail" and str(port) in ports["detail"] and "listen" in ports["fix"]
    assert rc == 4


def test_low_disk_fails(home):
    usage = namedtuple("usage", "total used free")
    assert doctor.check_disk(home, lambda p: usage(10 << 30, 10 << 30, 100 << 20)).status == "fail"
    assert doctor.check_disk(home, lambda p: usage(10 << 30, 9 << 30, 1 << 30)).status == "warn"
    assert doctor.check_disk(home, lambda p: usage(10 << 30, 1 << 30, 9 << 30)).status == "ok"


def test_offload_configured_on_a_cpu_build_fails(monkeypatch):
    monkeypatch.setattr(gpu, "offload_supported", lambda: False)
    monkeypatch.setattr(gpu, "detect_gpus", lambda: [])
    c = doctor.check_gpu({"llama": {"n_gpu_layers": "auto"}})
    assert c.status == "fail" and "DGGML_CUDA=on" in c.fix
    assert doctor.check_gpu({"llama": {"n_gpu_layers": 0}}).status == "ok"
    monkeypatch.setattr(gpu, "detect_gpus", lambda: [gpu.GpuInfo("RTX", 12000, 11000)])
    assert doctor.check_gpu({"llama": {"n_gpu_layers": 0}}).status == "warn"   # a GPU left unused
    monkeypatch.setattr(gpu, "offload_supported", lambda: True)
    assert doctor.check_gpu({"llama": {"n_gpu_layers": "auto"}}).status == "ok"


def test_clock_skew_from_peer_cards():
    now = 1_800_000_000
    card = lambda pid, t: {"peer_id": pid, "node": "ab", "issued_at": t}
    assert doctor.check_clock([card("p", now - 50), card("q", now + 2)], now).status == "ok"
    assert doctor.check_clock([card("p", now + 100)], now).status == "warn"
    c = doctor.check_clock([card("p", now + 1000)], now)
    assert c.status == "fail" and "p" in c.detail and c.fix
    assert doctor.check_clock([{"peer_id": "x", "node": None}], now).status == "skip"


def test_text_output_names_each_check(home, capsys):
    rc = ctl.main(["--home", str(home.root), "doctor"])
    out = capsys.readouterr().out
    for name in NAMES:
        assert f" {name} " in out or f" {name}\t" in out or f"  {name}" in out
    assert rc in (0, 4)
