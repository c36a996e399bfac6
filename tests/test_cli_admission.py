"""The admission commands without a running node: `genesis new`'s admission
options, `expert add --class`, and one-line errors with the README's exit
codes for `expert submit`, `expert reeval` and `experts`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from aemd.evaluate import load_evalset
from aemd.executors.tinygguf import TINY_MODEL, write_tiny_llama_gguf
from crypto.keys import SigningKey

BIN = Path(sys.executable).parent


def run(tool: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / tool), *args], capture_output=True, text=True, timeout=120)


def _network(tmp_path: Path, *extra: str) -> tuple[Path, dict]:
    home = tmp_path / "node"
    info = json.loads(run("aemd", "init", "--home", str(home), "--json").stdout)
    gfile = tmp_path / "net.genesis"
    out = run("aemctl", "genesis", "new", "--name", "gated", "--out", str(gfile), "--verifier",
              SigningKey.generate().public.hex(), "--grant", f"{info['account']}=10", "--home", str(home),
              "--json", *extra)
    assert out.returncode == 0, out.stderr
    assert run("aemd", "init", "--home", str(home), "--genesis", str(gfile)).returncode == 0
    return home, json.loads(out.stdout)["genesis"]


def test_genesis_new_writes_the_admission_gates(tmp_path):
    home, g = _network(tmp_path, "--gated", "--admission-domain", "general=general-target,general-facts,500",
                       "--node-class", "laptop=4096", "--node-class", "cpu=8192", "--probation-share-bp", "250")
    a = g["admission"]
    assert a["admitted_only"] is True and a["probation_share_bp"] == 250
    assert [c["name"] for c in a["classes"]] == ["cpu", "laptop"]
    (dom,) = a["domains"]
    assert dom["domain"] == "general" and dom["baseline_bp"] == 500
    assert dom["target_eval"] == load_evalset("general-target").hash.hex()
    assert dom["general_eval"] == load_evalset("general-facts").hash.hex()
    assert a["probe_set"] == load_evalset("probes").hash.hex()
    shown = run("aemctl", "genesis", "show", str(tmp_path / "net.genesis"))
    assert "gated" in shown.stdout and "domain general" in shown.stdout and "laptop 4096 MB" in shown.stdout


def test_genesis_new_refuses_bad_admission_options(tmp_path):
    key = SigningKey.generate().public.hex()
    for args, code in ((["--admission-domain", "general"], "BAD_VALUE"),
                       (["--admission-domain", "general=no-such-set"], "BAD_VALUE"),
                       (["--node-class", "x=many"], "BAD_VALUE"),
                       (["--min-gain-bp", "20000"], "BAD_VALUE")):
        out = run("aemctl", "genesis", "new", "--name", "x", "--out", str(tmp_path / f"g{len(args)}{code}"),
                  "--verifier", key, "--home", str(tmp_path / "h"), *args)
        assert out.returncode == 1, (args, out.stderr)
        assert out.stderr.startswith(f"error: {code}") and len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_expert_add_claims_a_class(tmp_path):
    home, _ = _network(tmp_path, "--node-class", "small=1", "--node-class", "cpu=8192")
    model = write_tiny_llama_gguf(tmp_path / "tiny.gguf", seed=1, **TINY_MODEL)
    out = run("aemctl", "expert", "add", str(model), "--domain", "general", "--price", "0.1", "--home", str(home),
              "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["manifest"]["node_class"] == "cpu"      # the smallest that covers it
    out = run("aemctl", "expert", "add", str(model), "--domain", "general", "--price", "0.1", "--class", "small",
              "--home", str(home), "--json")
    assert out.returncode == 0 and json.loads(out.stdout)["manifest"]["node_class"] == "small"
    out = run("aemctl", "expert", "add", str(model), "--domain", "general", "--price", "0.1", "--class", "huge",
              "--home", str(home))
    assert out.returncode == 1 and "is not a node class of this network" in out.stderr
    out = run("aemctl", "expert", "add", str(model), "--domain", "general", "--price", "0.1", "--submit",
              "--home", str(home))
    assert out.returncode == 3 and "needs a running node" in out.stderr, out.stderr
    out = run("aemctl", "expert", "add", str(model), "--domain", "general", "--price", "0.1", "--judge",
              "applies", "--home", str(home))
    assert out.returncode == 1 and "--judge goes with --code-patch" in out.stderr


def test_admission_commands_without_a_node_say_so(tmp_path):
    home, _ = _network(tmp_path)
    for args in (["experts", "--status"], ["expert", "submit", "ab" * 32], ["expert", "reeval", "ab" * 32]):
        out = run("aemctl", *args, "--home", str(home))
        assert out.returncode == 3, (args, out.stderr)
        assert out.stderr.startswith("error: NO_NODE"), out.stderr
    out = run("aemctl", "expert", "submit", "zz", "--home", str(home))
    assert out.returncode == 1 and "at least 4 hex digits" in out.stderr
    for args in (["experts"], ["expert", "submit"], ["expert", "reeval"]):
        h = run("aemctl", *args, "--help")
        assert h.returncode == 0 and "usage:" in h.stdout
