"""The admission replay: which capsules the log admits, as a pure function
of (genesis, entries) (``specs/admission.md`` section 3).

    state = replay_admission(genesis, entries)
    state.status(capsule_id)        # "candidate", "probation", "admitted", ...
    state.admitted()                # capsule id -> author
    state.root                      # what two peers compare

Admission is a replay, not a rumour: a verifier's report counts only once it
is an applied entry of the log, and the admitted set is decided here, from
the applied manifests and reports in replay order, so every peer holding the
same log computes the same set, whatever order its entries arrived in. The
entries that count are exactly those the credit ledger applies
(``ledger/feeds.py``: linked, below their author's fork, not after as-of;
valid body, signed by the entry's author, first entry of its object), taken
in its replay order (``ledger.facts.order_key``).

The comparison with the rest of the mesh (``protocol.admission.judge``) is
made against the admitted set *as this replay has it* at the report that
completes a quorum, so verifiers that measured at different moments still
agree, and a later newcomer changes an expert's fate only through a
re-evaluation, itself a quorum of reports in the log.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, NamedTuple

from crypto.hashing import H
from ledger.facts import Context, Fact, as_bytes, examine_many, order_key, paused_gc
from ledger.feeds import extend
from protocol import canonical
from protocol.admission import AdmissionReport, Measurements, Peer, Subject, judge
from protocol.entry import Entry
from protocol.genesis import Genesis
from protocol.mesh import ExpertCapsuleManifest

MAX_AS_OF = 2**63 - 1
KINDS = ("capsule_manifest", "admission")

CANDIDATE, PROBATION, ADMITTED, REFUSED, DEMOTED, PRUNED = (
    "candidate", "probation", "admitted", "refused", "demoted", "pruned")
STATUSES = (CANDIDATE, PROBATION, ADMITTED, REFUSED, DEMOTED, PRUNED)
FINAL = frozenset({REFUSED, PRUNED})


@dataclass
class CapsuleAdmission:
    """What the log says of one registered capsule."""
    capsule_id: bytes
    author: bytes
    subject: Subject
    registered_at: int                     # ts of the manifest's entry
    manifest: ExpertCapsuleManifest = field(repr=False)   # the registering one
    status: str = CANDIDATE
    measurements: Measurements | None = None   # of the last decision that applied
    failed: tuple = ()                     # gates that decision failed
    decided_at: int = 0                    # ts of its deciding entry (0: none yet)
    votes: int = 0                         # counted reports, every group of this capsule
    demotions: int = 0

    def root_item(self) -> list:
        key = self.measurements.key() if self.measurements is not None else b""
        return [self.capsule_id, self.status, key, list(self.failed)]


class Event(NamedTuple):
    """A capsule's change of status, in replay order."""
    status: str
    capsule_id: bytes
    domain: str
    ts: int                                # ts of the entry that caused it


@dataclass
class _Group:
    voters: set = field(default_factory=set)
    tally: dict = field(default_factory=dict)     # measurements key -> counted reports
    decided: bool = False
    #: The counted reports, in replay order: (verifier, measurements key, verdict, failed).
    ballots: list = field(default_factory=list)


@dataclass
class AdmissionState:
    """The result of the admission replay."""
    capsules: dict[bytes, CapsuleAdmission]
    events: list[Event]
    entries: int                           # applied manifest and admission entries looked at
    #: (capsule id, purpose, round) -> its votes, in the replay order of each group's first one.
    groups: dict[tuple, _Group] = field(default_factory=dict, repr=False)
    _root: bytes | None = field(default=None, repr=False, compare=False)

    def get(self, capsule_id: bytes) -> CapsuleAdmission | None:
        return self.capsules.get(capsule_id)

    def status(self, capsule_id: bytes) -> str | None:
        c = self.capsules.get(capsule_id)
        return c.status if c is not None else None

    def _with(self, status: str) -> dict[bytes, bytes]:
        return {cid: c.author for cid, c in sorted(self.capsules.items()) if c.status == status}

    def admitted(self) -> dict[bytes, bytes]:
        """Admitted capsule id -> its author."""
        return self._with(ADMITTED)

    def probation(self) -> dict[bytes, bytes]:
        """Capsule id -> author of the candidates on probation."""
        return self._with(PROBATION)

    def voted(self, verifier: bytes, capsule_id: bytes, purpose: str, round: bytes) -> bool:
        """Whether ``verifier`` owes no report in that group: its vote there
        counted, or the group is decided."""
        g = self.groups.get((capsule_id, purpose, round))
        return g is not None and (g.decided or verifier in g.voters)

    def open_rounds(self, capsule_id: bytes) -> list[bytes]:
        """The re-evaluation rounds of a capsule that have counted votes and
        no decision yet, oldest first (a verifier joins rounds others opened)."""
        return [rnd for (cid, purpose, rnd), g in self.groups.items()
                if cid == capsule_id and purpose == "reeval" and not g.decided]

    def reports(self, capsule_id: bytes) -> list[dict]:
        """The counted reports on a capsule, group by group (what `aemctl
        experts --json` shows: two verifiers' figures agree when their
        measurement keys do)."""
        return [{"purpose": purpose, "round": rnd, "verifier": v, "measurements_key": key,
                 "verdict": verdict, "failed": list(failed), "decided": g.decided}
                for (cid, purpose, rnd), g in self.groups.items() if cid == capsule_id
                for v, key, verdict, failed in g.ballots]

    def peers(self) -> list[Peer]:
        """The admitted experts with the measurements that admitted (or kept) them."""
        return _peers(self.capsules)

    @property
    def admitted_events(self) -> list[tuple[bytes, str, int]]:
        """(capsule id, domain, ts) of every admission (re-admissions too), in
        replay order: what triggers a re-evaluation of the domain's others."""
        return [(e.capsule_id, e.domain, e.ts) for e in self.events if e.status == ADMITTED]

    @property
    def root(self) -> bytes:
        """H(canonical([[capsule_id, status, measurements key or b"", failed], ...]
        sorted by capsule id)), specs/admission.md section 3.4."""
        if self._root is None:
            self._root = H(canonical.encode([self.capsules[c].root_item() for c in sorted(self.capsules)]))
        return self._root

    def to_json(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "capsules": [{"capsule_id": c.capsule_id, "author": c.author, "status": c.status,
                          "domain": c.subject.domain, "kind": c.subject.kind,
                          "failed": list(c.failed), "decided_at": c.decided_at, "votes": c.votes,
                          "measurements": c.measurements.key() if c.measurements else b""}
                         for _, c in sorted(self.capsules.items())],
            "events": [{"status": e.status, "capsule_id": e.capsule_id, "domain": e.domain, "ts": e.ts}
                       for e in self.events],
        }


def replay_admission(genesis: Genesis, entries: Iterable[bytes | Entry], as_of: int = MAX_AS_OF) -> AdmissionState:
    """The admission state of ``entries`` (their bytes or Entry objects, any
    order, duplicates allowed) as of ``as_of``. Every entry is needed, not
    only the manifests and reports: whether one of those applies depends on
    its author's whole feed (a fork below it, a broken link)."""
    ctx = Context.of(genesis)
    datas: dict[bytes, bytes] = {}
    for item in entries:
        d = as_bytes(item)
        datas.setdefault(H(d), d)
    with paused_gc():
        facts = examine_many(list(datas.values()), ctx)
        feeds: dict = {}
        notes: dict = {}
        joined = extend(feeds, notes, facts, as_of)
    return admission_of_applied(genesis, [(f, datas[f.id]) for f in joined if f.kind in KINDS])


def admission_of_applied(genesis: Genesis, applied: Iterable[tuple[Fact, bytes]]) -> AdmissionState:
    """The admission state from the manifest and admission entries of the
    applied feeds, as (fact, entry bytes) in any order: the rules of
    section 3 without the feed logic. A store that knows which entries are
    linked and below their author's fork (``LogStore.admission_entries``)
    calls this directly."""
    seen_obj: set[bytes] = set()
    items: list[tuple[Fact, Any]] = []
    for f, data in sorted(applied, key=lambda x: order_key(x[0])):
        if f.kind not in KINDS or f.code is not None or f.signer != f.author or f.obj in seen_obj:
            continue      # refused by the credit ledger too (specs/ledger.md section 5.1)
        seen_obj.add(f.obj)
        items.append((f, Entry.decode(data).payload()))
    return _run(genesis, items)


def _peers(capsules: dict[bytes, CapsuleAdmission]) -> list[Peer]:
    return [Peer(c.capsule_id, c.subject.domain, c.measurements) for _, c in sorted(capsules.items())
            if c.status == ADMITTED and c.measurements is not None]


def _run(genesis: Genesis, items: list[tuple[Fact, Any]]) -> AdmissionState:
    params = genesis.admission
    verifiers = frozenset(genesis.verifiers)
    quorum = genesis.quorum
    caps: dict[bytes, CapsuleAdmission] = {}
    groups: dict[tuple, _Group] = {}
    events: list[Event] = []
    for f, obj in items:
        if f.kind == "capsule_manifest":
            m: ExpertCapsuleManifest = obj
            if m.author != f.author or m.id in caps:
                continue
            caps[m.id] = CapsuleAdmission(
                capsule_id=m.id, author=m.author, registered_at=f.ts, manifest=m,
                subject=Subject(m.id, m.kind, m.domain, m.node_class, m.content_hash, m.size_bytes))
            continue
        r: AdmissionReport = obj
        c = caps.get(r.capsule_id)
        if f.author not in verifiers or r.verifier != f.author or c is None or not r.route_trace_hash:
            continue
        g = groups.setdefault(r.group(), _Group())
        if g.decided or r.verifier in g.voters:
            continue
        g.voters.add(r.verifier)
        c.votes += 1
        if r.purpose == "admission" and r.verdict == "admit" and c.status == CANDIDATE:
            c.status = PROBATION
            events.append(Event(PROBATION, c.capsule_id, c.subject.domain, f.ts))
        key = r.measurements.key()
        g.ballots.append((r.verifier, key, r.verdict, r.failed))
        g.tally[key] = n = g.tally.get(key, 0) + 1
        if n == quorum:
            g.decided = True
            _decide(c, r.purpose, r.measurements, f.ts, _peers(caps), params, events)
    return AdmissionState(capsules=caps, events=events, entries=len(items), groups=groups)


def _decide(c: CapsuleAdmission, purpose: str, m: Measurements, ts: int, peers: list[Peer],
            params, events: list[Event]) -> None:
    """A quorum of identical measurements: judge them and move the capsule."""
    st = c.status
    if purpose == "admission":
        if st not in (CANDIDATE, PROBATION):
            return
        failed = judge(m, c.subject, peers, params, purpose)
        new = REFUSED if failed else ADMITTED
    else:
        if st not in (ADMITTED, DEMOTED):
            return
        failed = judge(m, c.subject, peers, params, purpose)
        if not failed:
            new = ADMITTED
        elif st == DEMOTED or c.demotions > 0:
            new = PRUNED
        else:
            new = DEMOTED
    c.measurements, c.failed, c.decided_at = m, failed, ts
    if new == DEMOTED:
        c.demotions += 1
    if new != st:
        c.status = new
        events.append(Event(new, c.capsule_id, c.subject.domain, ts))
