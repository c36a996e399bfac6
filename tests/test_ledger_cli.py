"""`aemctl ledger-replay | ledger-export | ledger-import | ledger-verify`."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from aemd.ctl import main
from ledger.replay import replay
from ledger.store import LogStore
from tests.ledgerkit import T0, TestNet, scenario

ROOT = Path(__file__).resolve().parent.parent


def _home(tmp_path: Path, name: str, net: TestNet) -> Path:
    h = tmp_path / name
    h.mkdir()
    (h / "genesis.aem").write_bytes(net.genesis.encode())
    return h


@pytest.fixture
def ledger(tmp_path):
    net, entries = scenario(random.Random(11), 50)
    home = _home(tmp_path, "a", net)
    with LogStore.open(home / "store.sqlite", net.genesis) as s:
        s.insert_many(entries)
    return net, entries, home


def _json(capsys, argv) -> tuple[int, dict]:
    capsys.readouterr()
    rc = main(argv)
    return rc, json.loads(capsys.readouterr().out)


def test_replay_json_matches_the_pure_replay(ledger, capsys):
    net, entries, home = ledger
    t = T0 + 50 * 1800
    rc, out = _json(capsys, ["ledger-replay", "--home", str(home), "--as-of", str(t), "--json"])
    assert rc == 0
    want = replay(net.genesis, entries, t)
    assert out["state_root"] == want.state_root.hex()
    assert out["balances"] == {a.hex(): {"available": av, "pending": pe}
                               for a, (av, pe) in want.balances.items()}
    # The store never took the entries whose envelope is bad (forged signatures).
    from ledger.facts import Context, examine
    ctx = Context.of(net.genesis)
    bad = {f.id for f in (examine(e, ctx) for e in entries) if f.author is None}
    assert {(r["entry"], r["code"]) for r in out["rejected"]} == {
        (e.hex(), c) for e, c in want.rejected.items() if e not in bad}
    assert out["entries"] == want.entries - len(bad) and "events" not in out


def test_replay_table(ledger, capsys):
    net, _, home = ledger
    assert main(["ledger-replay", "--home", str(home), "--as-of", str(T0), "--events"]) == 0
    text = capsys.readouterr().out
    assert "state root" in text and net.users[0].public.hex() in text


def test_export_import_replay_round_trip(ledger, tmp_path, capsys):
    net, entries, home = ledger
    log = tmp_path / "ledger.log"
    t = T0 + 50 * 3600
    assert main(["ledger-export", str(log), "--home", str(home)]) == 0
    other = _home(tmp_path, "b", net)
    rc, out = _json(capsys, ["ledger-import", str(log), "--home", str(other), "--json"])
    assert rc == 0 and out["rejected"] == 0
    roots = []
    for h in (home, other):
        roots.append(_json(capsys, ["ledger-replay", "--home", str(h), "--as-of", str(t), "--json"])[1]["state_root"])
    roots.append(_json(capsys, ["ledger-replay", "--home", str(other), "--as-of", str(t), "--json",
                                "--log", str(log), "--workers", "2"])[1]["state_root"])
    assert len(set(roots)) == 1


def test_verify_reports_forks_and_corruption(tmp_path, capsys):
    net = TestNet(n_users=2)
    a, b = net.users
    home = _home(tmp_path, "v", net)
    e0 = net.append(a, net.transfer(a, b, 1))
    with LogStore.open(home / "store.sqlite", net.genesis) as s:
        s.insert(e0)
    rc, out = _json(capsys, ["ledger-verify", "--home", str(home), "--json"])
    assert rc == 0 and out["ok"] and out["entries"] == 1
    with LogStore.open(home / "store.sqlite", net.genesis) as s:
        s.insert(net.fork(a, 0, net.transfer(a, b, 2)))
    rc, out = _json(capsys, ["ledger-verify", "--home", str(home), "--json"])
    assert rc == 4 and out["forks"] == {a.public.hex(): 0}
    log = tmp_path / "x.log"
    assert main(["ledger-export", str(log), "--home", str(home)]) == 0
    rc, out = _json(capsys, ["ledger-verify", "--home", str(home), "--log", str(log), "--json"])
    assert rc == 4 and out["forks"] == {a.public.hex(): 0}
    data = bytearray(log.read_bytes())
    data[-1] ^= 1                                   # the digest no longer matches
    log.write_bytes(bytes(data))
    assert main(["ledger-import", str(log), "--home", str(home)]) == 1
    assert "BAD_ENCODING" in capsys.readouterr().err


def test_missing_store_and_genesis(tmp_path, capsys):
    net = TestNet(n_users=2)
    home = _home(tmp_path, "empty", net)
    assert main(["ledger-replay", "--home", str(home)]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err
    assert main(["ledger-verify", "--home", str(tmp_path / "nowhere")]) == 1


def test_aemctl_entry_point(ledger):
    _, _, home = ledger
    exe = Path(sys.executable).parent / "aemctl"       # the installed console script
    p = subprocess.run([str(exe), "ledger-replay", "--home", str(home), "--as-of", str(T0), "--json"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert len(json.loads(p.stdout)["state_root"]) == 64
