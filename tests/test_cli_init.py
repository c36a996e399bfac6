"""`aemd init` and `aemctl genesis`, run as a user would (the installed scripts)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from aemd import cli, ctl
from aemd.config import DEFAULTS, Config, load_config
from aemd.home import Home
from crypto.keys import SigningKey
from protocol.errors import AemError

BIN = Path(sys.executable).parent


def run(tool: str, *args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([str(BIN / tool), *args], capture_output=True, text=True, env=env, timeout=120)


def test_help_lists_every_command():
    out = run("aemd", "--help")
    assert out.returncode == 0 and "init" in out.stdout
    out = run("aemctl", "--help")
    assert out.returncode == 0 and "genesis" in out.stdout
    for cmd in cli.build_parser()._subparsers._group_actions[0].choices:
        assert run("aemd", cmd, "--help").returncode == 0
    for cmd in ctl.build_parser()._subparsers._group_actions[0].choices:
        assert run("aemctl", cmd, "--help").returncode == 0


def test_genesis_new_init_and_join(tmp_path):
    verifier = SigningKey.generate()
    home = tmp_path / "node"
    out = run("aemd", "init", "--home", str(home), "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["network_id"] is None
    assert stat.S_IMODE(os.stat(home / "identity.key").st_mode) == 0o600
    cfg = load_config(home / "config.toml")
    assert cfg == Config() and cfg.as_dict() == DEFAULTS      # the template is the defaults
    assert cfg.llama.n_ctx == cfg["llama"]["n_ctx"] == 2048   # typed, and readable as before

    gfile = tmp_path / "net.genesis"
    out = run("aemctl", "genesis", "new", "--name", "testnet", "--out", str(gfile),
              "--verifier", verifier.public.hex(), "--grant", f"{info['account']}=100.5",
              "--home", str(home), "--json")
    assert out.returncode == 0, out.stderr
    g = json.loads(out.stdout)
    assert g["genesis"]["grants"] == [{"account": info["account"], "amount": 100_500_000}]
    assert g["genesis"]["founder"] == info["account"]

    again = run("aemd", "init", "--home", str(home), "--genesis", str(gfile), "--json")
    assert again.returncode == 0, again.stderr
    joined = json.loads(again.stdout)
    assert joined["account"] == info["account"]          # identity kept
    assert joined["network_id"] == g["network_id"]

    shown = run("aemctl", "genesis", "show", str(gfile), "--json")
    assert json.loads(shown.stdout)["network_id"] == g["network_id"]


def test_errors_are_one_line_with_exit_codes(tmp_path):
    bad = tmp_path / "bad.genesis"
    bad.write_bytes(b"\x81\xa1a\x01")
    out = run("aemctl", "genesis", "show", str(bad))
    assert out.returncode == 1
    assert out.stderr.startswith("error: WRONG_OBJECT") and "Traceback" not in out.stderr
    out = run("aemctl", "genesis", "new", "--name", "x", "--out", str(tmp_path / "g"),
              "--verifier", "zz", "--home", str(tmp_path / "h"))
    assert out.returncode == 1 and "BAD_KEY" in out.stderr
    assert run("aemctl", "genesis", "new").returncode == 2


def test_encrypted_identity(tmp_path):
    home = tmp_path / "node"
    pw = tmp_path / "pw"
    pw.write_text("correct horse\n")
    assert run("aemd", "init", "--home", str(home), "--passphrase-file", str(pw)).returncode == 0
    out = run("aemd", "init", "--home", str(home), env_extra={"AEM_PASSPHRASE": "wrong"})
    assert out.returncode == 1 and "BAD_PASSPHRASE" in out.stderr
    out = run("aemd", "init", "--home", str(home), env_extra={"AEM_PASSPHRASE": "correct horse"})
    assert out.returncode == 0


def test_config_rejects_typos(tmp_path):
    p = tmp_path / "config.toml"
    p.write_text("[node]\nlisten_addrs = []\n")
    with pytest.raises(AemError) as exc:
        load_config(p)
    assert exc.value.code == "CONFIG" and "node.listen_addrs" in str(exc.value)
    p.write_text("[sync]\ninterval_s = \"often\"\n")
    with pytest.raises(AemError):
        load_config(p)
    p.write_text("[sync\n")
    with pytest.raises(AemError):
        load_config(p)


def test_home_resolution(tmp_path, monkeypatch):
    from aemd.home import resolve_home
    monkeypatch.setenv("AEM_HOME", str(tmp_path / "env"))
    assert resolve_home(None) == tmp_path / "env"
    assert resolve_home(str(tmp_path / "arg")) == tmp_path / "arg"
    monkeypatch.delenv("AEM_HOME")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert resolve_home(None) == tmp_path / "xdg" / "aem"
    assert Home(tmp_path).store.name == "store.sqlite"


def test_no_node_running_is_a_clear_message(tmp_path):
    home = tmp_path / "node"
    assert run("aemd", "init", "--home", str(home)).returncode == 0
    for cmd in (["status"], ["peers"], ["ads", "--json"], ["transfer", "--to", "00" * 32, "--amount", "1"],
                ["submit-task", "--domain", "general", "--prompt", "hi"], ["trace", "abcd"]):
        out = run("aemctl", *cmd, "--home", str(home))
        assert out.returncode in (1, 3), (cmd, out.stderr)
        assert "Traceback" not in out.stderr
        if cmd[0] in ("status", "peers", "ads", "submit-task", "trace"):
            assert out.returncode == 3 and "no node is running" in out.stderr


def test_start_without_network_says_how_to_join(tmp_path):
    home = tmp_path / "node"
    assert run("aemd", "init", "--home", str(home)).returncode == 0
    out = run("aemd", "start", "--home", str(home))
    assert out.returncode == 1 and "--genesis" in out.stderr


def test_config_is_a_frozen_typed_tree(tmp_path):
    import dataclasses

    p = tmp_path / "config.toml"
    p.write_text('[node]\nlisten = ["/ip4/127.0.0.1/tcp/0"]\n[llama]\nn_gpu_layers = "auto"\n')
    cfg = load_config(p)
    assert cfg.node.listen == ("/ip4/127.0.0.1/tcp/0",) and cfg.llama.n_gpu_layers == "auto"
    assert cfg.sync.batch == DEFAULTS["sync"]["batch"]                 # the rest: defaults
    assert dict(cfg.capacity) == DEFAULTS["capacity"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.llama.n_ctx = 1                                            # type: ignore[misc]
    with pytest.raises(KeyError):
        cfg["llama"]["no_such_key"]
