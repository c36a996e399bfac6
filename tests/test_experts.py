"""`aemctl expert add|list|remove` on a node's home (no daemon needed)."""

from __future__ import annotations

import json

from aemd.executors import TINY_MODEL, write_tiny_llama_gguf
from tests.nodekit import Mesh
from tests.test_tasks import aemctl


def test_add_list_remove_and_memory_envelope(tmp_path):
    mesh = Mesh(tmp_path, 1)
    node = mesh.nodes[0]
    model = write_tiny_llama_gguf(tmp_path / "m.gguf", **TINY_MODEL, dtype="Q8_0")
    out = aemctl(node.home, "expert", "add", str(model), "--domain", "general", "--tags", "chat",
                 "--price", "0.25", "--json")
    assert out.returncode == 0, out.stderr
    added = json.loads(out.stdout)
    m = added["manifest"]
    assert m["architecture"] == "llama" and m["quantization"] == "Q8_0" and m["n_params"] > 0
    assert m["vram_need_mb"] > 0 and m["kind"] == "gguf" and m["tags"] == ["chat"]
    assert added["advertised"] is False                       # no daemon running: on next start

    code = json.loads(aemctl(node.home, "expert", "add", "--code-patch", "--domain", "python",
                             "--price", "0.1", "--json").stdout)
    listed = json.loads(aemctl(node.home, "expert", "list", "--json").stdout)
    assert {c["capsule_id"] for c in listed} == {added["capsule_id"], code["capsule_id"]}
    assert {c["price"] for c in listed} == {250_000, 100_000}

    out = aemctl(node.home, "expert", "remove", added["capsule_id"][:10])
    assert out.returncode == 0
    listed = json.loads(aemctl(node.home, "expert", "list", "--json").stdout)
    assert [c["capsule_id"] for c in listed] == [code["capsule_id"]]
    assert aemctl(node.home, "expert", "remove", "ffff").returncode == 1

    # A node whose envelope is smaller than the model's need refuses it.
    cfg = node.home.config.read_text() + "\n[capacity]\nram_mb = 10\n"
    node.home.config.write_text(cfg)
    out = aemctl(node.home, "expert", "add", str(model), "--domain", "general", "--price", "1")
    assert out.returncode == 1 and "REFUSED" in out.stderr and "MB" in out.stderr

    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + b"\xff" * 64)
    out = aemctl(node.home, "expert", "add", str(junk), "--domain", "general", "--price", "1")
    assert out.returncode == 1 and "BAD_VALUE" in out.stderr and "Traceback" not in out.stderr
