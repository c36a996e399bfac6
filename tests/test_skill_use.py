"""Skill and operator contributions: counted from the log (``specs/growth.md`` §7).

Pure tests of the counting rule (hypothesis over random receipt sets), the
``uses`` wire fields (task, receipt, the payer's check), the command's
arguments, and one run on real nodes: three verifier nodes (quorum 2), a
contributor, a payer, a tiny GGUF host. A real paid task with ``--use``
shows the receipt repeating the list; it cannot settle within a test (the
spend authorisation's 600 s expiry comes first), so the receipts that are
counted are authored by their real host and payer keys into those nodes' own
SQLite logs before start, with times in the past so they have settled, and
reach the verifiers by sync.
"""

from __future__ import annotations

import json
import subprocess
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crypto.hashing import H
from protocol import errors
from protocol.errors import AemError
from protocol.growth import (USE_MARGIN_S, ContributionDocument, UseRecord, build_core, check_as_of, count_uses,
                             encode_msg, parse_request, period_end, previous_period, qualifying_uses, uses_eval_id)
from protocol.task import InferenceWorkReceipt, ReceiptAck, SpendAuthorization, TaskPacket
from tests import task_vectors as tv

C = H(b"the skill")
OTHER = H(b"another skill")
CONTRIB = b"\x01" * 32
ACCOUNTS = [CONTRIB, b"\x02" * 32, b"\x03" * 32, b"\x04" * 32]

record = st.builds(
    UseRecord, receipt_id=st.binary(min_size=32, max_size=32), host=st.sampled_from(ACCOUNTS),
    payer=st.sampled_from(ACCOUNTS), task_hash=st.sampled_from([H(b"t1"), H(b"t2"), H(b"t3")]),
    uses=st.lists(st.sampled_from([C, OTHER]), max_size=2, unique=True).map(tuple),
    settle_at=st.integers(0, 100), acked=st.booleans(), voided=st.booleans())


def _qualifies(r: UseRecord, a: int, b: int) -> bool:
    return (C in r.uses and a < r.settle_at <= b and r.acked and not r.voided
            and CONTRIB not in (r.payer, r.host))


@settings(max_examples=300, deadline=None)
@given(rs=st.lists(record, max_size=30), cuts=st.lists(st.integers(0, 100), min_size=1, max_size=5))
def test_periods_count_each_qualifying_task_once_and_never_overlap(rs, cuts):
    # Counted period after period, the figures add up to the distinct
    # qualifying (payer, task) pairs up to the last cut: none twice, none lost.
    minted: list[tuple] = []
    total = 0
    for t in sorted(set(cuts)):
        after = previous_period(minted, C, "verified_skill_use")
        n = count_uses(rs, C, CONTRIB, after, t)
        if n:
            minted.append((C, uses_eval_id(t), "verified_skill_use"))
        total += n
    last = max(cuts)
    pairs = {(r.payer, r.task_hash) for r in rs if _qualifies(r, 0, last)}
    assert total == len(pairs)
    # A period asked again, or one ending before the last counted, counts nothing.
    after = previous_period(minted, C, "verified_skill_use")
    for t in set(cuts):
        if t <= after:
            assert count_uses(rs, C, CONTRIB, after, t) == 0


@settings(max_examples=200, deadline=None)
@given(rs=st.lists(record, max_size=30), a=st.integers(0, 100), b=st.integers(0, 100))
def test_only_acknowledged_unvoided_uses_by_others_qualify(rs, a, b):
    got = qualifying_uses(rs, C, CONTRIB, a, b)
    assert all(_qualifies(r, a, b) for r in got)
    assert len({(r.payer, r.task_hash) for r in got}) == len(got)
    # A task counts in the period its first qualifying receipt settles in.
    first = {}
    for r in sorted((r for r in rs if _qualifies(r, -1, 10**9)), key=lambda r: (r.settle_at, r.receipt_id)):
        first.setdefault((r.payer, r.task_hash), r)
    assert sorted(got, key=lambda r: r.receipt_id) == sorted(
        (r for r in first.values() if a < r.settle_at <= b), key=lambda r: r.receipt_id)
    # The order of the receipts in the log changes nothing.
    assert qualifying_uses(list(reversed(rs)), C, CONTRIB, a, b) == got


def test_period_ids_and_the_pinned_time():
    assert uses_eval_id(1_800_000_000) == "uses-1800000000" and period_end("uses-1800000000") == 1_800_000_000
    for bad in ("ab" * 32, "uses-", "uses-01", "uses-x", "uses--1"):
        assert period_end(bad) is None
    # The ledger's own keys: other commitments, bases and eval ids are not periods of this one.
    minted = [(C, "uses-50", "verified_skill_use"), (C, "uses-90", "operator_adoption"),
              (OTHER, "uses-99", "verified_skill_use"), (C, "ab" * 32, "verified_skill_use")]
    assert previous_period(minted, C, "verified_skill_use") == 50
    assert check_as_of(1000, 1000 + USE_MARGIN_S) == 1000
    for bad, code in ((1001, errors.REFUSED), (0, errors.BAD_VALUE), ("1", errors.BAD_VALUE)):
        with pytest.raises(AemError) as e:
            check_as_of(bad, 1000 + USE_MARGIN_S)
        assert e.value.code == code


def _doc(type: str = "skill") -> ContributionDocument:
    return ContributionDocument.make(type=type, domain="general", licence="MIT", source_policy="mine",
                                     training_use="any", teacher_policy=None, distilled_from=None,
                                     data=b"Answer in one sentence, then give the source.")


def test_skill_and_operator_documents_and_requests():
    for t, basis in (("skill", "verified_skill_use"), ("operator", "operator_adoption")):
        d = _doc(t)
        core = build_core(net=b"\x07" * 32, contributor=CONTRIB, doc=d, eval_id=uses_eval_id(99), delta=2,
                          created_at=100)
        assert core.credit_basis == basis and core.contribution_type == t
        for op in ("measure", "attest"):
            m = {"op": op, "doc": d.to_map(), "as_of": 99, **({"core": core.to_map()} if op == "attest" else {})}
            assert parse_request(encode_msg(m, 1 << 16)) == (op, d, core if op == "attest" else None, 99)
    with pytest.raises(AemError, match="UTF-8"):
        ContributionDocument.make(type="skill", domain="general", licence="MIT", source_policy="mine",
                                  training_use="any", teacher_policy=None, distilled_from=None, data=b"\xff")
    # as_of belongs to counted types only.
    k = ContributionDocument.make(type="knowledge", domain="general", licence="MIT", source_policy="mine",
                                  training_use="any", teacher_policy=None, distilled_from=None, data=b"facts")
    with pytest.raises(AemError):
        parse_request(encode_msg({"op": "measure", "doc": k.to_map(), "as_of": 5}, 1 << 16))


# --- the wire -------------------------------------------------------------------------------

def test_uses_round_trip_and_are_signed():
    t = tv.task().replace(uses=(C, OTHER)).signed(tv.ALICE)
    back = TaskPacket.decode(t.encode())
    assert back == t and back.uses == (C, OTHER)
    with pytest.raises(AemError):
        t.replace(uses=(C,)).verify(tv.NET)                       # the payer signed the list
    with pytest.raises(AemError):
        tv.task().replace(uses=(C, C)).signed(tv.ALICE)          # distinct
    with pytest.raises(AemError):
        tv.task().replace(uses=tuple(H(bytes([i])) for i in range(5))).signed(tv.ALICE)   # at most 4


def test_the_host_copies_the_tasks_uses_and_the_payer_checks_them():
    from protocol.taskwire import TaskRequest
    from tests.test_task_session import World, run_pair
    t = tv.task().replace(uses=(C,)).signed(tv.ALICE)
    auth = SpendAuthorization(net=tv.NET, payer=tv.ALICE.public, host=tv.BOB.public, spend_key=b"\x07" * 32,
                              task_hash=t.id, max_charge=tv.PRICE, expires_at=tv.T0 + 600, sig=b"").signed(tv.ALICE)
    world = World(available=10 * tv.PRICE, reserved=0, price=tv.PRICE, output=b"ok")
    host_out, res = run_pair(TaskRequest(capsule_id=tv.CAPSULE, task=t, spend_auth=auth), world)
    assert host_out.status == "served", host_out
    assert world.appended[0].uses == (C,) and res.receipt.uses == (C,)
    # A receipt naming other uses than the task is refused (never acknowledged).
    from protocol.tasksession import check_result
    forged = res.receipt.replace(uses=()).signed(tv.BOB)
    with pytest.raises(AemError, match="other contributions"):
        check_result(res.replace(receipt=forged), tv.NET, tv.BOB.public, t, auth, tv.PRICE)
    check_result(res, tv.NET, tv.BOB.public, t, auth, tv.PRICE)


def test_build_task_takes_uses():
    from aemd.tasks import build_task
    from tests.test_traces_export import NODE
    t = build_task(NODE, {"domain": "general", "prompt": "x", "uses": [C.hex()]})
    assert t.uses == (C,)
    assert build_task(NODE, {"domain": "general", "prompt": "x"}).uses == ()
    for bad in (["zz"], [C.hex(), C.hex()], [C.hex()[:-2]], "abc", [1]):
        with pytest.raises(AemError):
            build_task(NODE, {"domain": "general", "prompt": "x", "uses": bad})


# --- on real nodes ----------------------------------------------------------------------------

VERIFIER_CONFIG = """
[verifier]
enabled = true
poll_s = 1
eval_threads = 1
"""
RATE = 1_000_000          # micro-credits per counted use
V, CONTRIBUTOR, PAYER = (0, 1, 2), 3, 4


def _aemctl(node, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    from tests.nodekit import BIN
    return subprocess.run([str(BIN / "aemctl"), *args, "--home", str(node.home.root)], capture_output=True,
                          text=True, timeout=timeout)


def _seed(mesh, doc: ContributionDocument, now: int) -> None:
    """Receipts of tasks that name ``doc``, authored by their host (node 0)
    and acknowledged by their payer into each author's own log: two by the
    payer, one by the contributor itself; all settled long before ``now``."""
    from ledger.store import LogStore
    keys = {i: n.key for i, n in enumerate(mesh.nodes)}
    host = keys[0]
    net = mesh.genesis.network_id
    receipts, acks = [], {}
    for payer_i, n in ((PAYER, 1), (PAYER, 2), (CONTRIBUTOR, 3)):
        payer = keys[payer_i]
        task_hash = H(b"task %d" % n)
        auth = SpendAuthorization(net=net, payer=payer.public, host=host.public, spend_key=H(b"key %d" % n),
                                  task_hash=task_hash, max_charge=1000, expires_at=now - 500, sig=b"").signed(payer)
        r = InferenceWorkReceipt(net=net, host=host.public, payer=payer.public, task_hash=task_hash,
                                 capsule_id=H(b"capsule"), spend_auth=auth, charge=1000, output_hash=H(b"out"),
                                 tokens_out=3, started_at=now - 600, finished_at=now - 599, sig=b"",
                                 uses=(doc.commitment,)).signed(host)
        receipts.append(r)
        acks.setdefault(payer_i, []).append(ReceiptAck(net=net, payer=payer.public, receipt_id=r.id, accepted=True,
                                                       created_at=now - 598, sig=b"").signed(payer))
    with LogStore.open(mesh.nodes[0].home.store, mesh.genesis) as s:
        entries = [s.append_local(host, r, now) for r in receipts]
    for i, objs in acks.items():
        # The payer holds the receipts it acknowledges (its acks' clocks follow theirs).
        with LogStore.open(mesh.nodes[i].home.store, mesh.genesis) as s:
            s.insert_many(entries)
            for a in objs:
                s.append_local(keys[i], a, now)


def _replays(mesh) -> list[dict]:
    # One as_of for all: the state root covers it, and a second may pass between two replays.
    t = str(int(time.time()))
    return [json.loads(_aemctl(n, "ledger-replay", "--as-of", t, "--json").stdout) for n in mesh.nodes]


def _agreed(mesh, entries: int) -> list[dict]:
    from tests.nodekit import wait_for

    seen: list = []

    def done():
        mesh.sync_now()
        rs = _replays(mesh)
        seen[:] = [(r["entries"], r["state_root"][:8]) for r in rs]
        return rs if all(r["entries"] >= entries for r in rs) and len({r["state_root"] for r in rs}) == 1 else None
    try:
        return wait_for(f"every node at {entries} entries, one state root", done, timeout=60, every=0.5)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; (entries, root) per node: {seen}") from None


def _contribute(node, *args: str) -> tuple[int, dict, str]:
    out = _aemctl(node, "contribute", *args, "--wait", "60", "--json")
    return out.returncode, (json.loads(out.stdout) if out.stdout.strip() else {}), out.stderr


@pytest.mark.real
def test_uses_of_a_skill_mint_once_per_period_on_every_node(tmp_path):
    from protocol.genesis import MintRate
    from tests import nodekit
    mesh = nodekit.Mesh(tmp_path, 5, verifier_nodes=V, quorum=2, challenge_window=2,
                        node_configs={i: VERIFIER_CONFIG for i in V},
                        mint_rates=(MintRate(basis="verified_skill_use", micro_per_unit=RATE),))
    skill = tmp_path / "skill.txt"
    skill.write_text("Answer in one sentence, then name your source.\n")
    terms = ("--license", "CC0-1.0", "--source-policy", "written for aem's tests", "--training-use", "any use")
    doc = ContributionDocument.make(type="skill", domain="general", licence="CC0-1.0",
                                    source_policy="written for aem's tests", training_use="any use",
                                    teacher_policy=None, distilled_from=None, data=skill.read_bytes())
    from aemd.executors import TINY_MODEL, write_tiny_llama_gguf
    model = write_tiny_llama_gguf(tmp_path / "tiny.gguf", **TINY_MODEL)
    out = _aemctl(mesh.nodes[0], "expert", "add", str(model), "--domain", "general", "--price", "0.5", "--json")
    assert out.returncode == 0, out.stderr
    now = int(time.time())
    _seed(mesh, doc, now)
    try:
        mesh.start_line()
        contributor, payer = mesh.nodes[CONTRIBUTOR], mesh.nodes[PAYER]
        c = doc.commitment.hex()
        # A real task naming the skill: its receipt repeats the list (it settles
        # only after the spend authorisation's expiry: not in this period).
        nodekit.wait_for("the host's ad at the payer", lambda: len(payer.call("ads")) == 1, timeout=60)
        out = _aemctl(payer, "submit-task", "--domain", "general", "--prompt", "Once upon a time", "--max-tokens",
                      "8", "--max-price", "1", "--use", c, "--json")
        assert out.returncode == 0, out.stderr + mesh.logs()
        assert json.loads(out.stdout)["uses"] == [c]
        base = _agreed(mesh, 3 + 3 + 2)    # three receipts, three acks; the task's receipt and ack
        # Registered, counted up to before the receipts settled: nothing to mint.
        rc, job, err = _contribute(contributor, "--type", "skill", "--file", str(skill), "--domain", "general",
                                   *terms, "--as-of", str(now - 700))
        assert rc == 1 and job["state"] == "zero" and job["commitment"] == c, (err, job)
        # The recount: the payer's two tasks, not the contributor's own.
        rc, job, err = _contribute(contributor, "--recount", c)
        assert rc == 0 and job["state"] == "appended" and job["delta"] == 2, (err, job, mesh.logs())
        assert job["attestations"] >= 2 and job["eval_id"] == f"uses-{job['as_of']}"
        rs = _agreed(mesh, base[0]["entries"] + 1)
        acct = contributor.account.hex()
        for r in rs:
            assert r["totals"]["minted"] == base[0]["totals"]["minted"] + 2 * RATE
            assert r["balances"][acct]["available"] == base[0]["balances"][acct]["available"] + 2 * RATE
        # Again: no use since the last period, nothing appended or minted.
        rc, job2, err = _contribute(contributor, "--recount", c)
        assert rc == 1 and job2["state"] == "zero" and job2["delta"] == 0, (err, job2)
        # A period ending inside the counted one is refused by the verifiers too.
        rc, job3, err = _contribute(contributor, "--recount", c, "--as-of", str(now - 100))
        assert rc == 1 and job3["state"] == "zero", (err, job3)
        mesh.sync_now()
        for r in _replays(mesh):
            assert r["totals"]["minted"] == base[0]["totals"]["minted"] + 2 * RATE
    finally:
        mesh.close()


def test_a_verifier_never_attests_overlapping_periods_but_may_repeat_its_last(tmp_path):
    # The verifier's own bound, as count_figure applies it, over a fixed log:
    # uses settling at 10, 20, 30; nothing minted yet (the receipts may be in flight).
    import trio
    from types import SimpleNamespace
    from aemd import growth
    d = _doc()
    rs = [UseRecord(receipt_id=H(b"%d" % t), host=ACCOUNTS[1], payer=ACCOUNTS[2], task_hash=H(b"t%d" % t),
                    uses=(d.commitment,), settle_at=t, acked=True, voided=False) for t in (10, 20, 30)]
    state = SimpleNamespace(contributions=set())

    async def with_replay(as_of, fn):
        return fn(None, SimpleNamespace(checkpoint=SimpleNamespace(state=state)))
    v = growth.GrowthVerifier.__new__(growth.GrowthVerifier)
    v.node = SimpleNamespace(now=lambda: 10_000, store=SimpleNamespace(with_replay=with_replay))
    v.periods, v.periods_path, v.measured = {}, tmp_path / growth.PERIODS_FILE, 0
    orig = growth.use_records
    growth.use_records = lambda store, res: rs
    try:
        def count(t):
            return trio.run(v.count_figure, d, CONTRIB, t)
        fig, after = count(20)
        assert (fig.delta, after, fig.eval_id) == (2, 0, "uses-20")
        v._remember(d, fig, after)
        assert count(20)[0].delta == 2                   # a retry of the same period: the same figure
        assert count(15)[0].delta == 0                   # inside the attested period
        assert count(30)[0].delta == 1                   # the next period starts where it ended
        assert growth.GrowthVerifier._read_periods(v) == {d.commitment: (0, 20)}
    finally:
        growth.use_records = orig
