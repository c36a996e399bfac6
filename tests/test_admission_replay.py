"""The admission replay (ledger/admission.py, specs/admission.md §3): its
vector, order independence, the store's shortcut, and what Byzantine
verifiers and authors cannot do."""

from __future__ import annotations

import dataclasses
import re
import sqlite3
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aemd.storeaccess import StoreAccess
from crypto.hashing import H
from ledger.admission import admission_of_applied, replay_admission
from ledger.store import LogStore
from protocol.admission import DEFAULT_ADMISSION, DomainEvals, NodeClass
from tests import admission_vectors as av
from tests.ledgerkit import T0, TestNet

SPEC = (Path(__file__).resolve().parent.parent / "specs" / "admission.md").read_text()
PARAMS = DEFAULT_ADMISSION.replace(
    classes=DEFAULT_ADMISSION.classes + (NodeClass(name="tiny", memory_mb=256),),
    domains=(DomainEvals(domain="code", target_eval=H(b"target"), general_eval=H(b"general"),
                         baseline_bp=4000, general_baseline_bp=5000),))
PROPS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class Log:
    """A test network (3 verifiers, quorum 2, domain `code`) and its log."""

    def __init__(self, quorum: int = 2, seed: str = "adm") -> None:
        self.net = TestNet(seed=seed, quorum=quorum, admission_params=PARAMS)
        self.v = self.net.verifiers
        self.entries: list = []
        self.t = T0

    def add(self, author, obj):
        self.t += 10
        e = self.net.append(author, obj, ts=self.t)
        self.entries.append(e)
        return e

    def capsule(self, author=None, **kw) -> bytes:
        author = author or self.net.users[0]
        m = self.net.manifest(author, **kw)
        self.add(author, m)
        return m.id

    def m(self, cid: bytes, target_bp: int = 6000, **changes):
        content = next(e.payload().content_hash for e in self.entries
                       if e.kind == "capsule_manifest" and e.payload().id == cid)
        return self.net.measurements(content, target_bp, **changes)

    def report(self, verifier, cid: bytes, m, **kw):
        return self.add(verifier, self.net.admission(verifier, capsule_id=cid, m=m, **kw))

    def vote(self, cid: bytes, m, verifiers=None, **kw) -> None:
        for v in verifiers or self.v[:2]:
            self.report(v, cid, m, **kw)

    def state(self):
        return replay_admission(self.net.genesis, self.entries)


# -- the vector ---------------------------------------------------------------

def test_spec_block_is_what_the_generator_prints():
    block = re.search(r"```admission-vectors\n(.*?)```", SPEC, re.S).group(1).strip()
    assert block == av.block()
    assert av.block() == av.block()


def test_vector_outcomes():
    st_ = av.result()
    names = av.capsule_names()
    by_name = {names[c]: x for c, x in st_.capsules.items()}
    assert {n: x.status for n, x in by_name.items()} == {
        "c1": "demoted", "c2": "admitted", "c3": "refused", "c4": "probation"}
    assert by_name["c3"].failed == ("duplicate",) and by_name["c1"].failed == ("target",)
    assert by_name["c2"].measurements.target_bp == 8500      # E9 and E12's, not E10/E11's 8400
    assert by_name["c2"].votes == 3                          # E9, E10, E12 (E11 is v1's second)
    assert st_.admitted() == {c: av.BOB.public for c, n in names.items() if n == "c2"}
    assert [(names[c], d) for c, d, _ in st_.admitted_events] == [("c1", "code"), ("c2", "code")]


# -- order independence -------------------------------------------------------

@PROPS
@given(order=st.permutations(range(len(av.entries()))), dups=st.lists(st.integers(0, 16), max_size=4))
def test_any_arrival_order_gives_the_same_state(order, dups):
    es = [e for _, e in av.entries()]
    want = av.result()
    got = replay_admission(av.genesis(), [es[i].encode() for i in order] + [es[i] for i in dups])
    assert got.root == want.root and got.capsules == want.capsules and got.events == want.events


@st.composite
def random_logs(draw):
    """A log of a few capsules and reports from verifiers and an outsider:
    most reports carry what an honest verifier measures in their group, some
    other figures, so quorums, disagreements, duplicates, demotions and
    prunings all happen."""
    lg = Log(seed="h")
    caps = [lg.capsule(lg.net.users[i % 3]) for i in range(draw(st.integers(1, 3)))]
    copy_of_first = lg.m(caps[0]).tensor_hash
    targets = st.sampled_from([3000, 6000, 6050, 8000])
    truth: dict = {}

    def honest(cid, group):
        if (cid, group) not in truth:
            dup = cid != caps[0] and draw(st.integers(0, 3)) == 0
            truth[(cid, group)] = lg.m(cid, draw(targets), **({"tensor_hash": copy_of_first} if dup else {}))
        return truth[(cid, group)]

    voters = lg.v + [lg.net.outsider]
    for _ in range(draw(st.integers(0, 16))):
        cid = draw(st.sampled_from(caps))
        who = draw(st.sampled_from(voters))
        group = draw(st.sampled_from([0, 0, 1, 2]))          # 0: admission, else a re-evaluation round
        m = honest(cid, group) if draw(st.integers(0, 4)) else lg.m(cid, draw(targets))
        lg.report(who, cid, m, purpose="reeval" if group else "admission",
                  round=H(b"round%d" % group) if group else b"",
                  trace=b"" if draw(st.integers(0, 9)) == 0 else None)
    return lg


@PROPS
@given(lg=random_logs(), data=st.data())
def test_random_logs_replay_alike_in_any_order(lg, data):
    want = lg.state()
    order = data.draw(st.permutations(lg.entries))
    got = replay_admission(lg.net.genesis, order)
    assert got.root == want.root and got.capsules == want.capsules and got.events == want.events


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(lg=random_logs(), data=st.data())
def test_the_store_gives_the_replay_state_in_any_insert_order(tmp_path_factory, lg, data):
    order = data.draw(st.permutations(lg.entries))
    path = tmp_path_factory.mktemp("adm") / "log.sqlite"
    with LogStore.open(path, lg.net.genesis) as store:
        store.insert_many(order)
        got = admission_of_applied(lg.net.genesis, store.admission_entries())
    assert got.root == lg.state().root


# -- Byzantine verifiers and authors -----------------------------------------

def test_a_non_verifiers_report_counts_for_nothing():
    lg = Log()
    c = lg.capsule()
    lg.report(lg.net.outsider, c, lg.m(c))
    lg.report(lg.v[0], c, lg.m(c))
    s = lg.state()
    assert s.status(c) == "probation" and s.get(c).votes == 1 and s.admitted() == {}


def test_one_verifier_cannot_admit_alone_nor_vote_twice():
    lg = Log()
    c = lg.capsule()
    for _ in range(3):
        lg.report(lg.v[0], c, lg.m(c))
    s = lg.state()
    assert s.status(c) == "probation" and s.get(c).votes == 1
    lg.report(lg.v[1], c, lg.m(c))
    assert lg.state().status(c) == "admitted"


def test_a_verifier_cannot_change_its_vote():
    lg = Log()
    c = lg.capsule()
    lg.report(lg.v[0], c, lg.m(c, 8000))
    lg.report(lg.v[1], c, lg.m(c, 6000))
    lg.report(lg.v[0], c, lg.m(c, 6000))     # would make quorum on 6000
    assert lg.state().status(c) == "probation"
    lg.report(lg.v[2], c, lg.m(c, 8000))
    s = lg.state()
    assert s.status(c) == "admitted" and s.get(c).measurements.target_bp == 8000


def test_disagreeing_measurements_never_make_a_quorum():
    lg = Log()
    c = lg.capsule()
    lg.report(lg.v[0], c, lg.m(c))
    lg.report(lg.v[1], c, lg.m(c, results_hash=H(b"other results")))   # same scores, other items
    lg.report(lg.v[2], c, lg.m(c, 6001))
    s = lg.state()
    assert s.status(c) == "probation" and s.get(c).votes == 3 and s.get(c).measurements is None


def test_a_report_without_evidence_does_not_count():
    lg = Log()
    c = lg.capsule()
    lg.vote(c, lg.m(c), trace=b"")
    assert lg.state().status(c) == "candidate"
    lg.vote(c, lg.m(c))             # the same verifiers, now with evidence: their votes were not used up
    assert lg.state().status(c) == "admitted"


def test_a_report_before_the_manifest_or_from_a_forked_verifier_does_not_count():
    lg = Log()
    m = lg.net.manifest(lg.net.users[0])
    lg.vote(m.id, lg.net.measurements(m.content_hash))     # the capsule is not registered yet
    lg.add(lg.net.users[0], m)
    assert lg.state().status(m.id) == "candidate"
    lg.report(lg.v[0], m.id, lg.m(m.id))
    lg.entries.append(lg.net.fork(lg.v[1], lg.net.head(lg.v[1]).seq + 1, lg.net.transfer(lg.v[1], lg.v[0], 1)))
    lg.report(lg.v[1], m.id, lg.m(m.id))                   # past v1's fork: frozen
    assert lg.state().status(m.id) == "probation"


def test_a_manifest_in_another_authors_entry_registers_nothing():
    lg = Log()
    m = lg.net.manifest(lg.net.users[0])
    lg.add(lg.net.users[1], m)          # WRONG_AUTHOR in the credit ledger too
    lg.vote(m.id, lg.net.measurements(m.content_hash))
    assert lg.state().capsules == {}


def test_a_copy_of_an_admitted_expert_is_refused_as_duplicate():
    lg = Log()
    a = lg.capsule()
    lg.vote(a, lg.m(a))
    copy = lg.capsule(lg.net.users[1])          # other metadata, same tensors
    lg.vote(copy, lg.m(copy, 7000, tensor_hash=lg.m(a).tensor_hash))
    near = lg.capsule(lg.net.users[2])          # other tensors, same behaviour
    lg.vote(near, lg.m(near, 7000, fingerprint=lg.m(a).fingerprint))
    s = lg.state()
    assert s.status(a) == "admitted"
    assert (s.status(copy), s.get(copy).failed) == ("refused", ("duplicate",))
    assert (s.status(near), s.get(near).failed) == ("refused", ("duplicate",))


def test_a_worse_capsule_is_refused_for_target_and_a_regression_for_general():
    lg = Log()
    a = lg.capsule()
    lg.vote(a, lg.m(a, 6000))
    worse = lg.capsule(lg.net.users[1])
    lg.vote(worse, lg.m(worse, 6050))           # < 6000 + min_gain 100
    regress = lg.capsule(lg.net.users[2])
    lg.vote(regress, lg.m(regress, 7000, general_bp=3000))
    s = lg.state()
    assert (s.status(worse), s.get(worse).failed) == ("refused", ("target",))
    assert (s.status(regress), s.get(regress).failed) == ("refused", ("general",))
    assert s.admitted() == {a: lg.net.users[0].public}


def test_a_capsule_claiming_a_too_small_class_is_refused_for_fits():
    lg = Log()
    c = lg.capsule(node_class="tiny")           # 256 MiB; the model needs 512
    lg.vote(c, lg.m(c, node_class="tiny"))
    s = lg.state()
    assert (s.status(c), s.get(c).failed) == ("refused", ("fits",))


def test_refused_is_final():
    lg = Log()
    c = lg.capsule()
    lg.vote(c, lg.m(c, 3000))
    lg.vote(c, lg.m(c, 9000), verifiers=lg.v[1:])            # the group is decided
    lg.vote(c, lg.m(c, 9000), purpose="reeval", round=H(b"r"))
    s = lg.state()
    assert s.status(c) == "refused" and s.get(c).failed == ("target",)


def test_a_failing_reevaluation_demotes_and_a_second_demotion_prunes():
    lg = Log()
    c = lg.capsule()
    lg.vote(c, lg.m(c, 6000))
    lg.vote(c, lg.m(c, 4050), purpose="reeval", round=H(b"r1"))     # below baseline + min gain
    s = lg.state()
    assert (s.status(c), s.get(c).failed, s.admitted()) == ("demoted", ("target",), {})
    lg.vote(c, lg.m(c, 6000), purpose="reeval", round=H(b"r2"))     # passes: re-admitted
    assert lg.state().status(c) == "admitted"
    lg.vote(c, lg.m(c, 4050), purpose="reeval", round=H(b"r3"))     # demoted before: pruned
    s = lg.state()
    assert s.status(c) == "pruned" and [e.status for e in s.events if e.capsule_id == c] == [
        "probation", "admitted", "demoted", "admitted", "pruned"]


def test_a_failing_reevaluation_of_a_demoted_expert_prunes_it():
    lg = Log()
    c = lg.capsule()
    lg.vote(c, lg.m(c))
    lg.vote(c, lg.m(c, 4050), purpose="reeval", round=H(b"r1"))
    lg.vote(c, lg.m(c, 4050), purpose="reeval", round=H(b"r2"))
    assert lg.state().status(c) == "pruned"


def test_an_artefact_that_no_longer_matches_demotes_and_a_restored_one_readmits():
    lg = Log()
    c = lg.capsule()
    lg.vote(c, lg.m(c))
    lg.vote(c, lg.m(c, artefact_hash=H(b"other bytes"), artefact_ok=False), purpose="reeval", round=H(b"r"))
    s = lg.state()
    assert (s.status(c), s.get(c).failed) == ("demoted", ("manifest",))
    assert c not in s.admitted()
    lg.vote(c, lg.m(c), purpose="reeval", round=H(b"r2"))          # the host restored its file
    assert lg.state().status(c) == "admitted"


def test_a_much_better_newcomer_then_a_reevaluation_demotes_the_old_expert():
    lg = Log()
    old = lg.capsule()
    lg.vote(old, lg.m(old, 6000))
    new = lg.capsule(lg.net.users[1])
    lg.vote(new, lg.m(new, 8500))
    s = lg.state()
    assert s.admitted().keys() == {old, new}
    assert [c for c, _, _ in s.admitted_events] == [old, new]          # what triggers the re-evaluation
    lg.vote(old, lg.m(old, 6000), purpose="reeval", round=H(b"newcomer"))   # same figures as before
    s = lg.state()
    assert (s.status(old), s.get(old).failed) == ("demoted", ("target",))
    assert s.admitted() == {new: lg.net.users[1].public}


def test_a_reevaluation_of_a_candidate_is_ignored_and_closes_its_group():
    lg = Log()
    c = lg.capsule()
    lg.vote(c, lg.m(c), purpose="reeval", round=H(b"r"))
    s = lg.state()
    assert s.status(c) == "candidate" and s.get(c).measurements is None and s.get(c).votes == 2


def test_the_root_covers_status_figures_and_failed_gates():
    a, b = Log(), Log()
    for lg, target in ((a, 6000), (b, 6001)):
        c = lg.capsule()
        lg.vote(c, lg.m(c, target))
    assert a.state().status(a.entries[0].payload().id) == b.state().status(b.entries[0].payload().id)
    assert a.state().root != b.state().root
    assert Log().state().root == H(bytes([0x90]))           # canonical([]) is one byte


# -- the store and the node's access to it ------------------------------------

def test_storeaccess_caches_until_the_log_changes(tmp_path):
    lg = Log()
    c = lg.capsule()
    lg.vote(c, lg.m(c))
    calls = []

    async def main():
        sa = StoreAccess.open(tmp_path / "log.sqlite", lg.net.genesis)
        real = sa.store.admission_entries
        sa.store.admission_entries = lambda: calls.append(1) or real()
        await sa.insert_batch([e.encode() for e in lg.entries])
        s1 = await sa.admission()
        assert await sa.admission() is s1 and len(calls) == 1
        await sa.insert_batch([lg.net.append(lg.net.users[0], lg.net.transfer(lg.net.users[0], lg.net.users[1], 1),
                                             ts=T0 + 999).encode()])
        assert await sa.admission() is s1 and len(calls) == 1            # not an admission entry
        lg.vote(c, lg.m(c, 3000), purpose="reeval", round=H(b"r"))
        await sa.insert_batch([e.encode() for e in lg.entries[-2:]])
        s2 = await sa.admission()
        assert len(calls) == 2 and s2.status(c) == "demoted" and s1.status(c) == "admitted"
        await sa.close()

    trio.run(main)


def test_a_store_written_before_the_kind_column_is_migrated(tmp_path):
    lg = Log()
    c = lg.capsule()
    lg.vote(c, lg.m(c))
    path = tmp_path / "old.sqlite"
    with LogStore.open(path, lg.net.genesis) as store:
        store.insert_many(lg.entries)
    db = sqlite3.connect(str(path))
    db.execute("DROP INDEX entries_admission")
    db.execute("ALTER TABLE entries DROP COLUMN kind")
    db.commit()
    db.close()
    with LogStore.open(path, lg.net.genesis) as store:
        assert admission_of_applied(lg.net.genesis, store.admission_entries()).root == lg.state().root
        assert store.admission_marker()[0] == 3


def test_as_of_holds_back_future_reports():
    lg = Log()
    c = lg.capsule()
    lg.vote(c, lg.m(c))
    assert replay_admission(lg.net.genesis, lg.entries, as_of=lg.t - 1).status(c) == "probation"
    assert replay_admission(lg.net.genesis, lg.entries, as_of=lg.t).status(c) == "admitted"


@pytest.mark.parametrize("quorum", [1, 3])
def test_quorum_is_the_genesis_quorum(quorum):
    lg = Log(quorum=quorum)
    c = lg.capsule()
    lg.vote(c, lg.m(c), verifiers=lg.v[:quorum - 1] or lg.v[:1])
    assert lg.state().status(c) == ("admitted" if quorum == 1 else "probation")
    if quorum > 1:
        lg.report(lg.v[quorum - 1], c, lg.m(c))
        assert lg.state().status(c) == "admitted"


def test_json_shape():
    j = av.result().to_json()
    assert j["root"] == av.result().root and len(j["capsules"]) == 4 and j["events"][0]["status"] == "probation"
    assert dataclasses.is_dataclass(av.result())


def test_what_a_verifier_owes():
    lg = Log()
    c = lg.capsule()
    lg.report(lg.v[0], c, lg.m(c))
    s = lg.state()
    assert s.voted(lg.v[0].public, c, "admission", b"") and not s.voted(lg.v[1].public, c, "admission", b"")
    assert s.get(c).manifest.id == c
    lg.report(lg.v[1], c, lg.m(c))
    r1, r2 = H(b"r1"), H(b"r2")
    lg.report(lg.v[1], c, lg.m(c), purpose="reeval", round=r2)
    lg.report(lg.v[0], c, lg.m(c), purpose="reeval", round=r1)
    s = lg.state()
    assert s.voted(lg.v[2].public, c, "admission", b"")           # decided: nothing owed
    assert s.open_rounds(c) == [r2, r1]
    lg.report(lg.v[2], c, lg.m(c), purpose="reeval", round=r2)
    assert lg.state().open_rounds(c) == [r1]
