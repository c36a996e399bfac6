"""The layers, enforced: the contracts in
`.importlinter` hold, and the ledger's pure core imports without SQLite."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINT = Path(sys.executable).parent / "lint-imports"


def _lint(config: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT), "--no-cache", str(config)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_import_contracts_hold():
    r = _lint(ROOT / ".importlinter")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 broken" in r.stdout


def test_a_broken_contract_is_reported(tmp_path):
    # protocol does import crypto: a contract forbidding it must fail, so the
    # check above is not passing by accident (an empty graph, a wrong root).
    cfg = tmp_path / "contracts.ini"
    cfg.write_text("[importlinter]\nroot_packages =\n    protocol\n    crypto\n\n"
                   "[importlinter:contract:x]\nname = x\ntype = forbidden\n"
                   "source_modules =\n    protocol\nforbidden_modules =\n    crypto\n")
    r = _lint(cfg)
    assert r.returncode != 0
    assert "BROKEN" in r.stdout.upper()


def test_replay_imports_and_runs_without_sqlite():
    code = ("import sys; sys.modules['sqlite3'] = None\n"
            "import ledger.replay, ledger\n"
            "from tests import ledger_vectors as v\n"
            "res = ledger.replay(v.genesis(), [e for _, e in v.entries()], v.AS_OF[1])\n"
            "print('root', res.state_root.hex())\n"
            "try:\n    ledger.LogStore\nexcept ImportError:\n    print('store-needs-sqlite')\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "store-needs-sqlite" in r.stdout
    assert "root " in r.stdout


def test_contracts_cover_the_shell_layers():
    # The shell's own layers are contracts too, not only conventions.
    text = (ROOT / ".importlinter").read_text()
    for name in ("peerscore-pure", "nodecontrol-below-node", "p2p-below-node"):
        assert f"[importlinter:contract:{name}]" in text


def test_control_commands_load_without_the_node():
    # No circular import: the node builds on nodecontrol, never the reverse.
    code = ("import sys, aemd.nodecontrol, aemd.p2p.peerscore\n"
            "print('node' if 'aemd.node' in sys.modules else 'no-node')\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "no-node" in r.stdout
