"""Distillation memory (specs/task-protocol.md §8): the training-use policies
on the wire, the memory rows the payer keeps, the pure judgement of a row,
and `aemctl traces export` on real nodes."""

from __future__ import annotations

import json
import subprocess
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aemd.config import load_config
from aemd.tasks import build_task
from aemd.traces import (BAD_RECORD, CHALLENGED, FORMAT, HOST_FORBIDS, PAYER_FORBIDS, REASONS, TESTS_FAILED,
                         UNACKNOWLEDGED, LogView, TraceStore, judge, memory_of)
from crypto.hashing import H
from crypto.keys import SigningKey
from protocol import canonical, errors
from protocol.errors import AemError
from protocol.task import (TRAINING_DEFAULT, TRAINING_USES, Attempt, InferenceWorkReceipt, RouteTrace,
                           SpendAuthorization, TaskPacket)
from tests import wirekit
from tests.nodekit import BIN, FAST_CONFIG, Mesh, wait_for

NET = H(b"traces-net")
PAYER = SigningKey.from_seed(bytes([31]) * 32)
HOST = SigningKey.from_seed(bytes([32]) * 32)
T0 = 1_800_000_000
NODE = SimpleNamespace(net=NET, key=PAYER, now=lambda: T0)
OK = LogView(acknowledged=True, challenged=False)

# The fields every exported line carries (specs/task-protocol.md §8).
FIELDS = {"format", "task_id", "domain", "kind", "prompt", "messages", "max_tokens", "temperature_milli", "seed",
          "patch", "test_cmd", "repo_hash", "output", "tokens_out", "payer", "host", "capsule_id", "receipt_id",
          "price", "payer_training_use", "host_training_use", "verifier", "created_at", "finished_at", "receipt",
          "task_packet"}


def done(task: TaskPacket, output: bytes, host_use: str, host: SigningKey = HOST) -> InferenceWorkReceipt:
    auth = SpendAuthorization(net=NET, payer=PAYER.public, host=host.public, spend_key=bytes([1]) * 32,
                              task_hash=task.id, max_charge=500_000, expires_at=T0 + 600, sig=b"").signed(PAYER)
    return InferenceWorkReceipt(net=NET, host=host.public, payer=PAYER.public, task_hash=task.id,
                                capsule_id=bytes([2]) * 32, spend_auth=auth, charge=400_000, output_hash=H(output),
                                tokens_out=5, started_at=T0 + 1, finished_at=T0 + 2, sig=b"",
                                training_use=host_use).signed(host)


def text_task(use: str = "allowed", **kw) -> TaskPacket:
    return build_task(NODE, {"domain": "general", "max_price": 1_000_000, "prompt": "Once upon",
                             "training_use": use, **kw})


# -- the wire fields ----------------------------------------------------------------


def test_policies_default_to_forbidden_but_are_required_on_the_wire():
    t = text_task(TRAINING_DEFAULT)
    assert TRAINING_DEFAULT == "forbidden" and TRAINING_USES == ("allowed", "forbidden")
    assert build_task(NODE, {"domain": "general", "prompt": "x"}).training_use == "forbidden"
    r = done(t, b"x", "allowed")
    for obj in (t, r):
        m = dict(canonical.decode(obj.encode(), 1 << 24))
        m.pop("training_use")
        with pytest.raises(AemError) as e:
            type(obj).decode(canonical.encode(m))
        assert e.value.code == errors.MISSING_FIELD
        m["training_use"] = "maybe"
        with pytest.raises(AemError) as e:
            type(obj).decode(canonical.encode(m))
        assert e.value.code == errors.BAD_VALUE


def test_the_policies_are_signed():
    t = text_task("allowed")
    forged = t.replace(training_use="forbidden")
    with pytest.raises(AemError) as e:
        forged.verify(NET)
    assert e.value.code == errors.BAD_SIGNATURE
    r = done(t, b"x", "forbidden")
    with pytest.raises(AemError) as e:
        r.replace(training_use="allowed").verify(NET)
    assert e.value.code == errors.BAD_SIGNATURE


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_wire_round_trip_keeps_the_policies(data):
    for cls in (TaskPacket, InferenceWorkReceipt):
        obj = data.draw(wirekit.objects(cls))
        back = cls.decode(obj.encode())
        assert back == obj and back.training_use == obj.training_use in TRAINING_USES


def test_build_task_checks_the_policy():
    for bad, code in ((1, errors.BAD_TYPE), ("yes", errors.BAD_VALUE)):
        with pytest.raises(AemError) as e:
            text_task(bad)
        assert e.value.code == code


def test_config_training_section(tmp_path):
    path = tmp_path / "config.toml"
    assert load_config(path).training.use == "forbidden"
    path.write_text('[training]\nuse = "allowed"\n')
    assert load_config(path).training.use == "allowed"
    path.write_text('[training]\nuse = "sometimes"\n')
    with pytest.raises(AemError) as e:
        load_config(path)
    assert e.value.code == errors.CONFIG and "training.use" in e.value.detail


# -- the memory and its judgement -----------------------------------------------------


@pytest.mark.parametrize("payer_use,host_use,reason", [
    ("allowed", "allowed", ""), ("forbidden", "allowed", PAYER_FORBIDS), ("allowed", "forbidden", HOST_FORBIDS),
    ("forbidden", "forbidden", PAYER_FORBIDS)])
def test_judge_needs_both_policies(payer_use, host_use, reason):
    t = text_task(payer_use)
    m = memory_of(t, done(t, b" there was", host_use), b" there was")
    if reason:
        assert (m.task, m.output) == (b"", b"")          # content nobody may train on is not kept
    got, rec = judge(m, NET, PAYER.public, OK)
    assert got == reason
    if not reason:
        assert set(rec) == FIELDS and rec["format"] == FORMAT
        assert rec["prompt"] == "Once upon" and rec["output"] == " there was" and rec["price"] == 400_000
        assert rec["payer_training_use"] == rec["host_training_use"] == "allowed"
        assert rec["verifier"]["method"] == "receipt_ack" and rec["verifier"]["outcome"] == "acknowledged"
        assert TaskPacket.decode(bytes.fromhex(rec["task_packet"])) == t
        assert InferenceWorkReceipt.decode(bytes.fromhex(rec["receipt"])).id.hex() == rec["receipt_id"]


def test_judge_reads_the_log_and_the_objects():
    t = text_task("allowed")
    m = memory_of(t, done(t, b"out", "allowed"), b"out")
    assert judge(m, NET, PAYER.public, LogView(acknowledged=True, challenged=True))[0] == CHALLENGED
    assert judge(m, NET, PAYER.public, LogView(acknowledged=False, challenged=False))[0] == UNACKNOWLEDGED
    # A row whose bytes do not check out: another output, network, payer, task, or a forged receipt.
    assert judge(m.__class__(**{**_fields(m), "output": b"other"}), NET, PAYER.public, OK)[0] == BAD_RECORD
    assert judge(m, H(b"other-net"), PAYER.public, OK)[0] == BAD_RECORD
    assert judge(m, NET, HOST.public, OK)[0] == BAD_RECORD
    t2 = text_task("allowed", seed=9)
    assert judge(m.__class__(**{**_fields(m), "task": t2.encode()}), NET, PAYER.public, OK)[0] == BAD_RECORD
    forged = bytearray(m.receipt)
    forged[-1] ^= 1
    assert judge(m.__class__(**{**_fields(m), "receipt": bytes(forged)}), NET, PAYER.public, OK)[0] == BAD_RECORD
    # The columns can only be stricter than the signed objects, never looser.
    r_no = done(t, b"out", "forbidden")
    lying = m.__class__(**{**_fields(m), "receipt": r_no.encode()})
    assert judge(lying, NET, PAYER.public, OK)[0] == HOST_FORBIDS


def _fields(m) -> dict:
    return {k: getattr(m, k) for k in m.__slots__}


def test_code_patch_tasks_need_a_passing_report():
    repo = b"\0" * 1024
    t = build_task(NODE, {"kind": "code_patch", "domain": "python", "repo_tar": repo, "patch": "p",
                          "test_cmd": ["true"], "max_price": 1, "training_use": "allowed"})
    for outcome, reason in (("passed", ""), ("failed", TESTS_FAILED)):
        out = json.dumps({"outcome": outcome, "exit_code": 0}, sort_keys=True, indent=1).encode()
        got, rec = judge(memory_of(t, done(t, out, "allowed"), out), NET, PAYER.public, OK)
        assert got == reason
        if rec is not None:
            assert rec["verifier"] == {"method": "code_patch_report", "outcome": "passed", "acknowledged": True,
                                       "challenged": False}
            assert rec["task_packet"] is None and rec["repo_hash"] == H(repo).hex() and rec["test_cmd"] == ["true"]


def test_store_writes_the_memory_with_the_trace_and_pages_through_it(tmp_path):
    store = TraceStore(tmp_path / "traces.sqlite")
    try:
        rows = []
        for i in range(7):
            t = text_task("allowed" if i % 2 else "forbidden", seed=i)
            r = done(t, b"o%d" % i, "allowed")
            trace = RouteTrace(net=NET, router=PAYER.public, task_id=t.id, candidates=(),
                               attempts=(Attempt(host=HOST.public, outcome="ok", detail="", elapsed_ms=1),),
                               chosen=HOST.public, outcome="ok", receipt_id=r.id, created_at=T0 + i,
                               sig=b"").signed(PAYER)
            m = memory_of(t, r, b"o%d" % i)
            store.put(trace, m)
            rows.append(m)
        store.put(RouteTrace(net=NET, router=PAYER.public, task_id=H(b"failed"), candidates=(), attempts=(),
                             chosen=b"", outcome="all_failed", receipt_id=b"", created_at=T0, sig=b"").signed(PAYER))
        assert store.memory_count("general") == 7 and store.memory_count("python") == 0
        got = list(store.memories("general", batch=3))
        assert sorted(got, key=lambda m: m.task_id) == sorted(rows, key=lambda m: m.task_id)
        verdicts = [judge(m, NET, PAYER.public, OK)[0] for m in got]
        assert verdicts.count("") == 3 and verdicts.count(PAYER_FORBIDS) == 4
        assert store.get(rows[0].task_id.hex()[:8]).task_id == rows[0].task_id
    finally:
        store.close()


# -- `aemctl traces export` on real nodes ------------------------------------------------


def aemctl(home, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "aemctl"), *args, "--home", str(home.root)], capture_output=True,
                          text=True, timeout=300)


def test_export_honours_payer_and_host_policies(tmp_path):
    """n0 pays, its [training] use = "allowed"; n1 hosts domain general and
    allows; n2 hosts domain notes with the default (forbidden)."""
    from aemd.executors import TINY_MODEL, write_tiny_llama_gguf
    model = write_tiny_llama_gguf(tmp_path / "tiny.gguf", **TINY_MODEL)
    allow = '[training]\nuse = "allowed"\n'
    mesh = Mesh(tmp_path, 3, config=FAST_CONFIG, node_configs={0: allow, 1: allow})
    p, h_yes, h_no = mesh.nodes
    for node, domain in ((h_yes, "general"), (h_no, "notes")):
        out = aemctl(node.home, "expert", "add", str(model), "--domain", domain, "--price", "0.5", "--json")
        assert out.returncode == 0, out.stderr
    mesh.start_line()
    try:
        wait_for("both ads at the payer", lambda: len(p.call("ads")) == 2, timeout=90)

        def cards():      # n2 bootstrapped to n1: the payer dials it from its card
            got = {c["node"]: c.get("addrs") for c in p.call("peers") if c.get("node")}
            return all(got.get(h.account.hex()) for h in (h_yes, h_no))
        wait_for("both hosts' cards at the payer", cards, timeout=90)

        def submit(domain: str, *extra: str) -> dict:
            out = aemctl(p.home, "submit-task", "--domain", domain, "--prompt", "Once upon a time",
                         "--max-tokens", "24", "--seed", "3", "--max-price", "1", *extra, "--json")
            assert out.returncode == 0, out.stderr + mesh.logs()
            return json.loads(out.stdout)
        kept = submit("general")                                      # the payer's config: allowed
        assert kept["training_use"] == "allowed" and kept["host_training_use"] == "allowed"
        no_payer = submit("general", "--training-use", "forbidden")
        assert no_payer["training_use"] == "forbidden"
        no_host = submit("notes", "--training-use", "allowed")
        assert no_host["host"] == h_no.account.hex() and no_host["host_training_use"] == "forbidden"

        # Three receipts (hosts' logs) and three acks (the payer's) at the payer.
        def logged():
            mesh.sync_now([p])
            return p.call("ledger_replay")["entries"] >= 6
        wait_for("the receipts at the payer", logged, timeout=90)

        out_file = tmp_path / "general.jsonl"
        out = aemctl(p.home, "traces", "export", "--domain", "general", "--out", str(out_file), "--json")
        assert out.returncode == 0, out.stderr
        summary = json.loads(out.stdout)
        assert summary["written"] == 1 and summary["left_out_total"] == 1
        assert summary["left_out"] == {r: (1 if r == PAYER_FORBIDS else 0) for r in REASONS}
        lines = [json.loads(x) for x in out_file.read_text().splitlines()]
        assert len(lines) == 1 and set(lines[0]) == FIELDS
        rec = lines[0]
        assert (rec["task_id"], rec["receipt_id"], rec["host"], rec["capsule_id"], rec["price"]) == (
            kept["task_id"], kept["receipt_id"], kept["host"], kept["capsule_id"], kept["price"])
        assert rec["output"] == bytes.fromhex(kept["output_hex"]).decode("utf-8", "replace")
        assert rec["prompt"] == "Once upon a time" and rec["domain"] == "general" and rec["kind"] == "text"
        assert rec["verifier"]["outcome"] == "acknowledged"

        notes = tmp_path / "notes.jsonl"
        out = aemctl(p.home, "traces", "export", "--domain", "notes", "--out", str(notes))
        assert out.returncode == 0, out.stderr
        assert notes.read_text() == "" and "left out 1 (1 host_forbids)" in out.stderr

        # Usage errors are one line and leave no file.
        bad = aemctl(p.home, "traces", "export", "--domain", "General!", "--out", str(tmp_path / "x.jsonl"))
        assert bad.returncode != 0 and len(bad.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "x.jsonl").exists()
    except BaseException:
        print(mesh.logs())
        raise
    finally:
        mesh.close()


def test_http_api_takes_the_payer_policy():
    from aemd.api.openai_routes import common_args
    ctx = SimpleNamespace(settings=SimpleNamespace(max_price=1_000_000))
    assert "training_use" not in common_args(ctx, {"model": "general"})      # the node's [training] use
    assert common_args(ctx, {"model": "general", "aem_training_use": "allowed"})["training_use"] == "allowed"
    with pytest.raises(AemError) as e:
        common_args(ctx, {"model": "general", "aem_training_use": True})
    assert "aem_training_use" in e.value.detail
