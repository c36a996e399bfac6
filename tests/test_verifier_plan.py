"""What a verifier owes (aemd/verifier.plan, pure): admissions it has not
voted in, re-evaluation rounds others opened, and the rounds its triggers
open (a better expert admitted, the schedule, challenges, an operator)."""

from __future__ import annotations

from aemd.verifier import Job, challenge_round, gate_rows, manual_round, plan, schedule_round
from crypto.hashing import H
from tests.test_admission_replay import PARAMS, Log

NO_SCHEDULE = PARAMS.replace(reeval_interval_s=0)


def jobs(lg: Log, me, now: int = 0, params=NO_SCHEDULE, manual=None, challenges=None) -> list[Job]:
    return plan(lg.state(), me.public, now, params, manual or {}, challenges)


def test_a_submitted_capsule_is_owed_by_every_verifier_until_it_votes_or_a_quorum_decides():
    lg = Log()
    c = lg.capsule()
    assert all(jobs(lg, v) == [Job(c, "admission", b"")] for v in lg.v)
    lg.report(lg.v[0], c, lg.m(c))
    assert jobs(lg, lg.v[0]) == []                          # it voted
    assert jobs(lg, lg.v[2]) == [Job(c, "admission", b"")]
    lg.report(lg.v[1], c, lg.m(c))                          # quorum: decided
    assert lg.state().status(c) == "admitted"
    assert jobs(lg, lg.v[2]) == []                          # nothing left to vote in


def test_a_better_expert_of_the_domain_opens_a_round_for_the_others():
    lg = Log()
    old = lg.capsule()
    lg.vote(old, lg.m(old, 5000))
    new = lg.capsule()
    lg.vote(new, lg.m(new, 9000))
    assert Job(old, "reeval", new) in jobs(lg, lg.v[2])
    assert all(j.capsule_id != new for j in jobs(lg, lg.v[2]))   # nothing newer than it
    # A verifier that opened the round: the others join it even without the trigger.
    lg.report(lg.v[0], old, lg.m(old, 5000), purpose="reeval", round=new, failed=("target",))
    assert Job(old, "reeval", new) not in jobs(lg, lg.v[0])
    assert Job(old, "reeval", new) in jobs(lg, lg.v[1])


def test_rounds_others_opened_are_joined():
    lg = Log()
    c = lg.capsule()
    lg.vote(c, lg.m(c))
    r = H(b"someone's round")
    lg.report(lg.v[0], c, lg.m(c), purpose="reeval", round=r)
    assert jobs(lg, lg.v[1]) == [Job(c, "reeval", r)]
    # A non-verifier's report opens nothing.
    lg2 = Log(seed="adm2")
    c2 = lg2.capsule()
    lg2.vote(c2, lg2.m(c2))
    outsider = lg2.net.outsider
    lg2.add(outsider, lg2.net.admission(outsider, capsule_id=c2, m=lg2.m(c2), purpose="reeval", round=r))
    assert jobs(lg2, lg2.v[1]) == []


def test_the_schedule_challenges_and_an_operator_open_rounds():
    lg = Log()
    c = lg.capsule()
    lg.vote(c, lg.m(c))
    decided = lg.state().get(c).decided_at
    day = 86400
    params = PARAMS.replace(reeval_interval_s=day, challenge_limit=3)
    assert jobs(lg, lg.v[2], now=decided + 1, params=params) == []       # admitted in this slot
    slot = (decided + day) // day
    assert jobs(lg, lg.v[2], now=decided + day, params=params) == [Job(c, "reeval", schedule_round(slot))]
    assert jobs(lg, lg.v[2], params=params, challenges={c: 2}) == []
    assert jobs(lg, lg.v[2], params=params, challenges={c: 3}) == [Job(c, "reeval", challenge_round(c, 1))]
    assert jobs(lg, lg.v[2], params=params, challenges={c: 7}) == [Job(c, "reeval", challenge_round(c, 2))]
    r = manual_round(lg.v[2].public, b"n" * 16)
    assert jobs(lg, lg.v[2], manual={c: r}) == [Job(c, "reeval", r)]
    # Verifiers agree on the rounds their triggers open.
    assert challenge_round(c, 1) == challenge_round(c, 1) != challenge_round(c, 2)


def test_refused_and_pruned_capsules_are_owed_nothing():
    lg = Log()
    c = lg.capsule()
    lg.vote(c, lg.m(c, 100))                                # below the baseline: refused
    assert lg.state().status(c) == "refused"
    assert jobs(lg, lg.v[2], manual={c: H(b"r")}) == []


def test_gate_rows_show_each_figure_and_outcome():
    lg = Log()
    c = lg.capsule()
    lg.vote(c, lg.m(c, 100))
    cap = lg.state().get(c)
    rows = {r["gate"]: r for r in gate_rows(cap, PARAMS, 2)}
    assert list(rows) == ["target", "general", "duplicate", "trigger", "fits", "manifest", "reproducible",
                          "evidence"]
    assert rows["target"]["figure"] == 100 and rows["target"]["passed"] is False
    assert rows["fits"]["passed"] is True and rows["fits"]["figure"] == cap.measurements.memory_mb
    lg2 = Log(seed="adm3")
    c2 = lg2.capsule()
    undecided = {r["gate"]: r for r in gate_rows(lg2.state().get(c2), PARAMS, 2)}
    assert all(r["passed"] is None for r in undecided.values())


def test_routing_reads_the_admitted_set_and_draws_the_probation_share_by_task_id():
    """TaskService._routable_capsules: open network -> no filter; gated ->
    admitted capsules (by author), plus probation ones for the tasks whose id
    falls in the share (the same draw on every retry)."""
    from types import SimpleNamespace

    import trio

    from aemd.tasks import TaskService
    lg = Log()
    admitted = lg.capsule()
    lg.vote(admitted, lg.m(admitted))
    probation = lg.capsule()
    lg.report(lg.v[0], probation, lg.m(probation))
    state = lg.state()
    assert state.status(probation) == "probation"

    async def admission():
        return state

    def routable(params, task_id: bytes):
        svc = SimpleNamespace(env=SimpleNamespace(admission_params=params, admission=admission))
        return trio.run(TaskService._routable_capsules, svc, SimpleNamespace(id=task_id))

    assert routable(PARAMS.replace(admitted_only=False), b"\0" * 32) is None
    gated = PARAMS.replace(admitted_only=True, probation_share_bp=1000)
    author = lg.net.users[0].public
    inside, outside = (5).to_bytes(4, "big") + b"\0" * 28, (5000).to_bytes(4, "big") + b"\0" * 28
    assert routable(gated, outside) == {admitted: author}
    assert routable(gated, inside) == {admitted: author, probation: author}
    assert routable(gated.replace(probation_share_bp=0), inside) == {admitted: author}


def test_a_file_that_is_not_a_gguf_measures_the_same_refusal_everywhere(tmp_path):
    """Every verifier reads the same bytes, so a file no GGUF reader accepts
    gets one fixed reason (not a parser's message) and fails gate 6."""
    from types import SimpleNamespace

    from aemd.verifier import BAD_GGUF, VerifierService
    from protocol.admission import Subject, judge
    lg = Log()
    cid = lg.capsule()
    cap = lg.state().get(cid)
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 60)
    fake = SimpleNamespace(node=SimpleNamespace(genesis=lg.net.genesis), eval_threads=1)
    m = VerifierService._evaluate(fake, cap.manifest, cap.subject, bad)
    assert m.manifest_problem == BAD_GGUF and not m.manifest_ok and m.artefact_ok
    assert VerifierService._evaluate(fake, cap.manifest, cap.subject, bad) == m
    assert "manifest" in judge(m, cap.subject, [], PARAMS)
    assert isinstance(cap.subject, Subject)
