"""The verifier role: measure submitted capsules against the admission gates
and append signed AdmissionReports (specs/admission.md).

Only a node whose account is a genesis verifier runs it (``[verifier]
enabled = true``). It watches the admission replay (``ledger/admission.py``)
for work (:func:`plan`, pure): capsules submitted and not yet measured by
it, re-evaluation rounds other verifiers opened, and rounds it opens itself
(a better expert of the same domain admitted, the schedule, an operator's
``aemctl expert reeval``). Each job fetches the artefact from the capsule's
author (``aemd/artefacts.py``: chunked, hash-checked, resumable), measures it
(``aemd/evaluate.py`` for GGUF, ``aemd/codepatch_capsule.py`` for code-patch
capsules), writes the run's RouteTrace as evidence and appends the report.
One job at a time: evals are CPU-bound and a verifier's figures must not
depend on what else it was doing.
"""

from __future__ import annotations

import logging
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from aemd import p2p
from crypto.hashing import H
from protocol import errors
from protocol.admission import (AdmissionReport, Measurements, Peer, Subject, judge,
                                manifest_problem, not_measured)
from protocol.errors import AemError
from protocol.task import Attempt, Candidate, RouteTrace

if TYPE_CHECKING:
    from aemd.node import Node

log = logging.getLogger("aemd.verifier")

FETCH_RETRY_S = (10, 30, 120, 600)   # backoff between failed fetches of one job
REEVAL_UNAVAILABLE_AFTER = 3         # failed fetches after which a re-evaluation reports the artefact gone
UNAVAILABLE = "artefact unavailable from its host"
MISMATCH = "artefact does not match the manifest"
TOO_BIG = "artefact larger than the budget of its node class"
BAD_GGUF = "the artefact is not a readable GGUF model"


@dataclass(frozen=True)
class Job:
    capsule_id: bytes
    purpose: str            # "admission" | "reeval"
    round: bytes            # b"" for admission

    def describe(self) -> str:
        r = f" round {self.round.hex()[:8]}" if self.round else ""
        return f"{self.purpose} of {self.capsule_id.hex()[:16]}{r}"


def schedule_round(slot: int) -> bytes:
    return H(b"aem-reeval-slot" + struct.pack(">Q", slot))


def manual_round(verifier: bytes, nonce: bytes) -> bytes:
    return H(b"aem-reeval-manual" + verifier + nonce)


def challenge_round(capsule_id: bytes, step: int) -> bytes:
    """The round opened when the challenges against a capsule's receipts
    reach ``step`` times the genesis's limit (every verifier counts the same
    log, so they open the same round)."""
    return H(b"aem-reeval-challenges" + capsule_id + struct.pack(">Q", step))


def challenged_receipts(store: Any, challenged: set[bytes]) -> dict[bytes, int]:
    """Capsule id -> how many of its receipts a verifier's challenge voided
    (runs in the store's thread; reads the receipt entries)."""
    from protocol.entry import Entry
    from protocol.task import InferenceWorkReceipt
    out: dict[bytes, int] = {}
    if not challenged:
        return out
    with store._lock:
        rows = store._db.execute("SELECT data FROM entries WHERE kind = 'inference_receipt' AND state = 0").fetchall()
    for (data,) in rows:
        try:
            r = InferenceWorkReceipt.decode(Entry.decode(bytes(data)).body)
        except AemError:
            continue
        if r.id in challenged:
            out[r.capsule_id] = out.get(r.capsule_id, 0) + 1
    return out


def plan(state: Any, me: bytes, now: int, params: Any, manual: dict[bytes, bytes],
         challenges: dict[bytes, int] | None = None) -> list[Job]:
    """The jobs this verifier owes, oldest submission first (pure).

    ``state`` is an AdmissionState; ``manual`` maps capsule id -> round an
    operator asked this verifier to open; ``challenges`` capsule id -> its
    receipts voided by verifiers' challenges."""
    jobs: list[Job] = []
    for cid, cap in sorted(state.capsules.items(), key=lambda kv: (kv[1].registered_at, kv[0])):
        if cap.status in ("candidate", "probation"):
            job = Job(cid, "admission", b"")
            if not state.voted(me, job.capsule_id, job.purpose, job.round):
                jobs.append(job)
            continue
        if cap.status not in ("admitted", "demoted"):
            continue
        rounds: list[bytes] = list(state.open_rounds(cid))          # joined: opened by others
        if cap.status == "admitted":
            # A better expert of the same domain admitted after this one.
            for other, domain, ts in state.admitted_events:
                if other != cid and domain == cap.subject.domain and ts > cap.decided_at:
                    rounds.append(other)
            if params.reeval_interval_s:
                slot = now // params.reeval_interval_s
                if cap.decided_at < slot * params.reeval_interval_s:
                    rounds.append(schedule_round(slot))
            n = (challenges or {}).get(cid, 0)
            if params.challenge_limit and n >= params.challenge_limit:
                rounds.append(challenge_round(cid, n // params.challenge_limit))
        if cid in manual:
            rounds.append(manual[cid])
        seen: set[bytes] = set()
        for r in rounds:
            if r not in seen and not state.voted(me, cid, "reeval", r):
                seen.add(r)
                jobs.append(Job(cid, "reeval", r))
    return jobs


class VerifierService:
    def __init__(self, node: "Node", cfg: Any, traces: Any) -> None:
        vcfg = cfg["verifier"]
        if node.key.public not in node.genesis.verifiers:
            raise AemError(errors.CONFIG, "[verifier] enabled = true, but this node's account "
                                          f"{node.key.public.hex()[:16]}... is not one of the genesis "
                                          f"verifiers ({len(node.genesis.verifiers)}): only they may measure "
                                          "capsules; set enabled = false or use a verifier's home")
        self.node = node
        self.traces = traces
        self.poll_s = max(1, int(vcfg["poll_s"]))
        self.fetch_timeout_s = max(10, int(vcfg["fetch_timeout_s"]))
        self.max_artefact_bytes = int(vcfg["max_artefact_mb"]) << 20
        self.eval_threads = int(vcfg["eval_threads"]) or None
        self.direct = bool(cfg["artefacts"]["direct"])     # try hosts' direct ports first
        self.dir = node.home.root / "artefacts"
        self.manual: dict[bytes, bytes] = {}
        self.failures: dict[Job, tuple[int, float]] = {}     # job -> (count, next try, monotonic)
        self.current: Job | None = None
        self.progress = (0, 0)            # the current fetch: bytes done, bytes in all
        self.done = 0
        self._kick = trio.Event()

    # -- life ------------------------------------------------------------------------

    def start(self, node: "Node", nursery: trio.Nursery) -> None:
        nursery.start_soon(self._loop)

    def kick(self) -> None:
        self._kick.set()

    def request_reeval(self, capsule_id: bytes) -> bytes:
        r = manual_round(self.node.key.public, os.urandom(16))
        self.manual[capsule_id] = r
        self.kick()
        return r

    async def _loop(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        log.info("verifier on: measuring submitted capsules (quorum %d of %d verifiers)",
                 self.node.genesis.quorum, len(self.node.genesis.verifiers))
        while True:
            try:
                await self.round()
            except AemError as exc:
                log.warning("verifier round: %s", exc)
            with trio.move_on_after(self.poll_s):
                await self._kick.wait()
            self._kick = trio.Event()

    async def round(self) -> int:
        """Do every job that is due now; the number done."""
        state = await self.node.store.admission()
        params = self.node.genesis.admission
        challenges = None
        if params.challenge_limit and state.admitted():
            res = await self.node.store.ledger(self.node.now())
            st = res.checkpoint.state
            voided = {rid for rid in st.challenged if rid not in st.disputed}   # verifiers' challenges only
            challenges = await self.node.store._run(challenged_receipts, self.node.store.store, voided)
        jobs = plan(state, self.node.key.public, self.node.now(), params, self.manual, challenges)
        n = 0
        for job in jobs:
            count, next_try = self.failures.get(job, (0, 0.0))
            if time.monotonic() < next_try:
                continue
            cap = state.capsules[job.capsule_id]
            self.current = job
            try:
                report = await self._measure(job, cap, state, count)
            finally:
                self.current = None
            if report is None:
                self.failures[job] = (count + 1, time.monotonic() + FETCH_RETRY_S[min(count, len(FETCH_RETRY_S) - 1)])
                continue
            self.failures.pop(job, None)
            if job.purpose == "reeval" and self.manual.get(job.capsule_id) == job.round:
                del self.manual[job.capsule_id]
            await self.node.append(report)
            self.done += 1
            n += 1
            log.info("reported %s: %s%s", job.describe(), report.verdict,
                     f" (failed: {', '.join(report.failed)})" if report.failed else "")
            state = await self.node.store.admission()   # later jobs judge against the newest set
        return n

    # -- one job ---------------------------------------------------------------------

    def _source(self, manifest) -> str | None:
        """The peer to fetch from: the capsule's author, if it advertises it."""
        now = self.node.now()
        for ad in self.node.mesh.ads.values():
            if ad.capsule_id == manifest.id and ad.host == manifest.author and ad.expires_at > now:
                return p2p.peer_id_from_public(ad.host)
        return None

    async def _measure(self, job: Job, cap: Any, state: Any, failures: int) -> AdmissionReport | None:
        node = self.node
        params = node.genesis.admission
        manifest = cap.manifest
        subject: Subject = cap.subject
        t0 = time.monotonic()
        log.info("measuring %s: %s %s, domain %s, class %s", job.describe(), manifest.kind, manifest.name,
                 manifest.domain, manifest.node_class or "(none)")
        problem = manifest_problem(manifest, node.net)
        if problem:
            m = not_measured(subject, problem)
        else:
            path = await self._fetch(job, manifest, params, failures)
            if path is None:
                if job.purpose == "reeval" and failures + 1 >= REEVAL_UNAVAILABLE_AFTER:
                    m = _artefact_bad(subject, UNAVAILABLE)
                else:
                    return None
            elif path == MISMATCH:
                m = _artefact_bad(subject, MISMATCH)
            elif path == TOO_BIG:
                # Not fetched: larger than the class it claims can hold. The
                # file's size bounds its memory need from below.
                m = _artefact_bad(subject, TOO_BIG).replace(
                    memory_mb=min(-(-manifest.size_bytes // (1 << 20)), (1 << 24)))
            else:
                try:
                    m = await trio.to_thread.run_sync(self._evaluate, manifest, subject, Path(path))
                except AemError as exc:
                    # This verifier cannot measure it now (an eval set it lacks,
                    # no sandbox, a model llama.cpp refuses): no figure it did
                    # not measure; retried later.
                    log.warning("%s: cannot measure here: %s: %s", job.describe(), exc.code, exc.detail)
                    return None
        peers = [Peer(cid, state.capsules[cid].subject.domain, state.capsules[cid].measurements)
                 for cid in state.admitted()]
        failed = judge(m, subject, peers, params, job.purpose)
        elapsed = int((time.monotonic() - t0) * 1000)
        trace = RouteTrace(
            net=node.net, router=node.key.public,
            task_id=H(b"aem-admission-eval" + job.capsule_id + job.purpose.encode() + job.round),
            candidates=(Candidate(host=manifest.author, capsule_id=job.capsule_id, price=0, score=m.target_bp),),
            attempts=(Attempt(host=manifest.author, outcome="measured",
                              detail=_summary(m, failed)[:200], elapsed_ms=elapsed),),
            chosen=manifest.author, outcome=f"{job.purpose}_eval", receipt_id=b"",
            created_at=node.now(), sig=b"").signed(node.key)
        await trio.to_thread.run_sync(self.traces.put, trace)
        return AdmissionReport(
            net=node.net, verifier=node.key.public, capsule_id=job.capsule_id, purpose=job.purpose,
            round=job.round, measurements=m, route_trace_hash=trace.id,
            verdict="reject" if failed else "admit", failed=failed, created_at=node.now(),
            sig=b"").signed(node.key)

    async def _fetch(self, job: Job, manifest, params, failures: int):
        """The verified artefact's path; MISMATCH when the host served other
        bytes; None when it could not be fetched now (retried later)."""
        from aemd.artefacts import fetch_artefact
        if manifest.kind == "gguf":
            cls = params.node_class(manifest.node_class)
            budget = (cls.memory_mb << 20) if cls is not None else 0
            limit = min(self.max_artefact_bytes, max(budget, 1 << 20))
        else:
            limit = 1 << 20
        if manifest.size_bytes > limit:
            return TOO_BIG
        self.progress = (0, manifest.size_bytes)
        peer = self._source(manifest)
        if peer is None:
            log.info("%s: no host advertises it now; will retry", job.describe())
            return None
        # A re-evaluation checks what the host serves now, not a copy kept from before.
        if job.purpose == "reeval":
            for p in (self.dir / manifest.content_hash.hex(),):
                p.unlink(missing_ok=True)

        def progress(done: int, total: int) -> None:
            self.progress = (done, total)     # shown by `aemctl experts` on this node
        try:
            return await fetch_artefact(self.node.p2p, peer, manifest, self.dir, max_bytes=limit,
                                        timeout_s=self.fetch_timeout_s, on_progress=progress,
                                        direct=self.direct)
        except AemError as exc:
            if exc.code == errors.BAD_PROOF:
                # Fetched whole (and, over a direct connection, once more over
                # the libp2p stream): the host serves other bytes than the manifest's.
                log.warning("%s: %s", job.describe(), exc.detail)
                return MISMATCH
            log.info("%s: fetch failed (%s: %s); will retry", job.describe(), exc.code, exc.detail)
            return None

    def _evaluate(self, manifest, subject: Subject, path: Path) -> Measurements:
        """Blocking: the figures of a fetched, hash-checked artefact."""
        params = self.node.genesis.admission
        dom = params.domain(manifest.domain)
        if manifest.kind == "code_patch":
            from aemd.codepatch_capsule import evaluate_code_patch, load_fixtures, spec_problem
            spec = path.read_bytes()
            problem = spec_problem(spec)
            if problem:
                return not_measured(subject, f"runner spec: {problem}", manifest.content_hash, artefact_ok=True)
            if dom is None:
                return _fetched(manifest, tensor_hash=H(spec))
            # A fixture set this verifier lacks, or no sandbox here: NOT_FOUND or
            # UNAVAILABLE propagate, and the job is retried rather than reported.
            fig = evaluate_code_patch(spec, manifest.patch_policy[0], load_fixtures(dom.target_eval))
            return _fetched(manifest, tensor_hash=fig.tensor_hash, target_eval=dom.target_eval,
                            target_bp=fig.target_bp, results_hash=fig.results_hash)
        from aemd import evaluate
        try:
            memory_mb, tensor_hash = evaluate.static_figures(path)
        except AemError as exc:
            if exc.code not in (errors.BAD_VALUE, errors.TOO_LARGE, errors.BAD_ENCODING):
                raise
            # A file that is not a GGUF every verifier can read: the same
            # fixed reason from each (details differ by version), so they agree.
            log.info("%s is not a readable GGUF: %s", path.name, exc.detail)
            return not_measured(subject, BAD_GGUF, manifest.content_hash, artefact_ok=True)
        cls = params.node_class(manifest.node_class)
        if dom is None or cls is None or memory_mb > cls.memory_mb:
            # It does not fit the class it claims (or nothing judges its
            # domain): no verifier loads it, so none has figures to give.
            return _fetched(manifest, tensor_hash=tensor_hash, memory_mb=memory_mb)
        fig = evaluate.evaluate_gguf(path, target=evaluate.load_evalset(dom.target_eval),
                                     general=evaluate.load_evalset(dom.general_eval) if dom.general_eval else None,
                                     probes=evaluate.load_evalset(params.probe_set) if params.probe_set else None,
                                     n_threads=self.eval_threads)
        return _fetched(manifest, tensor_hash=fig.tensor_hash, memory_mb=fig.memory_mb, target_eval=dom.target_eval,
                        target_bp=fig.target_bp, general_eval=dom.general_eval, general_bp=fig.general_bp,
                        trigger_divergence_bp=fig.trigger_divergence_bp, fingerprint=fig.fingerprint,
                        results_hash=fig.results_hash)

    def status(self) -> dict:
        done, total = self.progress
        return {"enabled": True, "current": self.current.describe() if self.current else None,
                "fetched_bytes": done, "artefact_bytes": total, "reports": self.done,
                "retrying": len(self.failures)}


def _artefact_bad(subject: Subject, problem: str) -> Measurements:
    """A valid manifest whose artefact could not be had as it says."""
    return not_measured(subject, problem).replace(artefact_ok=False, manifest_ok=True)


def _fetched(manifest, **figures) -> Measurements:
    """The measurements of a fetched, hash-checked artefact: ``figures``
    as measured, every figure not measured 0 or empty."""
    base = dict(artefact_hash=manifest.content_hash, artefact_ok=True, manifest_ok=True, manifest_problem="",
                tensor_hash=b"", memory_mb=0, node_class=manifest.node_class, target_eval=b"", target_bp=0,
                general_eval=b"", general_bp=0, trigger_divergence_bp=0, fingerprint=b"", results_hash=b"")
    return Measurements(**{**base, **figures})


def _summary(m: Measurements, failed: tuple) -> str:
    return (f"target {m.target_bp} bp, general {m.general_bp} bp, trigger {m.trigger_divergence_bp} bp, "
            f"memory {m.memory_mb} MB, failed {','.join(failed) or 'none'}")


# -- status rows and gates, as `aemctl experts --status` shows them --------------------

def gate_rows(cap: Any, params: Any, quorum: int) -> list[dict]:
    """Each gate with its measured figure, its threshold, and whether it held
    (None while no quorum has decided)."""
    m: Measurements | None = cap.measurements
    failed = set(cap.failed or ())
    decided = cap.status not in ("candidate", "probation")
    dom = params.domain(cap.subject.domain)
    cls = params.node_class(cap.subject.node_class)

    def row(gate: str, figure: Any, threshold: str) -> dict:
        return {"gate": gate, "figure": figure, "threshold": threshold,
                "passed": (gate not in failed) if decided and m is not None else None}
    if m is None:
        return [row(g, None, "") for g in ("target", "general", "duplicate", "trigger", "fits", "manifest",
                                            "reproducible", "evidence")] 
    base = dom.baseline_bp if dom else None
    return [
        row("target", m.target_bp, f">= best admitted of {cap.subject.domain!r} (or baseline {base} bp) "
                                   f"+ {params.min_gain_bp} bp"),
        row("general", m.general_bp, f"drop <= {params.max_regression_bp} bp"),
        row("duplicate", m.tensor_hash.hex()[:16] or None,
            f"tensor data unlike any admitted; probe agreement < {params.near_duplicate_bp} bp"),
        row("trigger", m.trigger_divergence_bp, f"<= {params.max_trigger_divergence_bp} bp"),
        row("fits", m.memory_mb, f"<= {cls.memory_mb} MB ({cls.name})" if cls else
            f"class {cap.subject.node_class!r} is not in the genesis"),
        row("manifest", m.manifest_problem or "ok", "signature, policies, artefact hash"),
        row("reproducible", cap.votes, f"{quorum} identical reports"),
        row("evidence", "route trace" if cap.votes else None, "every report references its RouteTrace"),
    ]


def capsule_row(cid: bytes, cap: Any, params: Any, quorum: int) -> dict:
    m = cap.manifest
    return {"capsule_id": cid.hex(), "name": m.name, "kind": m.kind, "domain": m.domain,
            "node_class": m.node_class, "author": cap.author.hex(), "status": cap.status,
            "failed": list(cap.failed or ()), "decided_at": cap.decided_at, "votes": cap.votes,
            "measurements": cap.measurements.to_map() if cap.measurements is not None else None,
            "gates": gate_rows(cap, params, quorum)}


# -- wiring into a node ------------------------------------------------------------------

def direct_host(node: "Node") -> str:
    """Where the direct artefact listener binds: the address of the node's
    first IPv4 libp2p listen address (so a node listening on loopback only
    opens nothing more), else every interface."""
    for addr in node.opts.listen:
        parts = addr.split("/")
        if len(parts) > 2 and parts[1] == "ip4":
            return parts[2]
    return "0.0.0.0"


def install(node: "Node", cfg: Any, traces: Any) -> VerifierService | None:
    """Serve this node's capsule artefacts to verifiers, add the admission
    control commands, and (``[verifier] enabled``) run the verifier role."""
    from aemd import artefacts
    svc = VerifierService(node, cfg, traces) if cfg["verifier"]["enabled"] else None
    verifiers = frozenset(node.genesis.verifiers)

    def capsule_files(content_hash: bytes):
        for cap in node.capsules:
            if cap.manifest.content_hash == content_hash and cap.serving.path:
                return cap.serving.path, cap.manifest.size_bytes
        return None
    # Other services add what verifiers may fetch from this node (e.g. the
    # contributions it offers): callables content hash -> (path, size) | None.
    sources = [capsule_files]
    node.artefact_sources = sources

    def lookup(content_hash: bytes):
        for src in sources:
            found = src(content_hash)
            if found is not None:
                return found
        return None

    def allow(peer: str) -> bool:
        # Artefacts are large: only the genesis verifiers, who measure them, may fetch.
        try:
            return p2p.public_from_peer_id(peer) in verifiers
        except AemError:
            return False

    acfg = cfg["artefacts"]

    def start_server(node: "Node", nursery: trio.Nursery) -> None:
        async def run() -> None:
            direct = None
            if acfg["direct"]:
                d = artefacts.DirectServer()
                try:
                    await nursery.start(d.run, direct_host(node), int(acfg["direct_port"]))
                    direct = d
                except OSError as exc:
                    log.warning("artefact direct port %s: %s; verifiers fetch over libp2p streams only",
                                acfg["direct_port"], exc.strerror)
            artefacts.install_server(node.p2p, node.net, lookup, allow, direct=direct)
        nursery.start_soon(run)
    node.add_extension(start_server)
    if svc is not None:
        node.add_extension(svc.start)

    params, quorum = node.genesis.admission, node.genesis.quorum

    async def submit_capsule(args: dict, emit) -> dict:
        from aemd.nodecontrol import _hex_arg
        cid = _hex_arg(args, "capsule_id", 32)
        cap = next((c for c in node.capsules if c.id == cid), None)
        if cap is None:
            raise AemError(errors.NOT_FOUND, f"this node serves no capsule {cid.hex()[:16]} "
                                             "(`aemctl expert list`; a withdrawn capsule's file changed)")
        m = cap.manifest
        if not m.node_class:
            raise AemError(errors.REFUSED, "the capsule claims no node class; add it again with "
                                           f"`aemctl expert add --class NAME` ({', '.join(c.name for c in params.classes)})")
        if params.node_class(m.node_class) is None:
            raise AemError(errors.REFUSED, f"node class {m.node_class!r} is not one of the genesis's: "
                                           f"{', '.join(c.name for c in params.classes)}")
        if params.domain(m.domain) is None:
            raise AemError(errors.REFUSED, f"the genesis names no eval sets for domain {m.domain!r} "
                                           f"(it judges: {', '.join(d.domain for d in params.domains) or 'none'}); "
                                           "no verifier could measure it")
        state = await node.store.admission()
        if cid in state.capsules:
            return {"capsule_id": cid, "status": state.capsules[cid].status, "submitted": False}
        entry = await node.append(m)
        if svc is not None:
            svc.kick()
        return {"capsule_id": cid, "status": "candidate", "submitted": True, "entry_id": entry.id,
                "verifiers": len(node.genesis.verifiers), "quorum": quorum}

    async def experts(args: dict, emit) -> dict:
        state = await node.store.admission()
        rows = [{**capsule_row(cid, cap, params, quorum), "reports": state.reports(cid)}
                for cid, cap in sorted(state.capsules.items())]
        return {"root": state.root, "admitted_only": params.admitted_only, "quorum": quorum,
                "experts": rows, "verifier": svc.status() if svc is not None else None}

    async def reeval(args: dict, emit) -> dict:
        from aemd.nodecontrol import _hex_arg
        if svc is None:
            raise AemError(errors.REFUSED, "this node is not a verifier ([verifier] enabled = false)")
        cid = _hex_arg(args, "capsule_id", 32)
        state = await node.store.admission()
        cap = state.capsules.get(cid)
        if cap is None or cap.status not in ("admitted", "demoted"):
            raise AemError(errors.REFUSED, f"capsule {cid.hex()[:16]} is not admitted or demoted "
                                           f"({cap.status if cap else 'unknown'}): nothing to re-evaluate")
        return {"capsule_id": cid, "round": svc.request_reeval(cid)}

    async def verifier_status(args: dict, emit) -> dict:
        return svc.status() if svc is not None else {"enabled": False}

    node.control_handlers.update({"submit_capsule": submit_capsule, "experts": experts,
                                  "reeval": reeval, "verifier_status": verifier_status})
    return svc
