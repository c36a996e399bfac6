"""Contributions that mint on a measured delta: the shell (``specs/growth.md``).

Files: a contribution's file and its document live in ``<home>/contributions/``
(``<file hash hex>`` and ``<commitment hex>.json``), written whole and
atomically; :func:`contribution_lookup` serves the files to verifiers over the
artefact stream (``aemd/artefacts.py``), never by gossip.

The attest stream ``/aem/<net>/attest/1``: one request frame, one response
frame. ``measure`` (a document): the verifier fetches the file from the asking
peer by its hash, measures the ``eval_improvement`` figure and answers it.
``attest`` (a document and a receipt core): the verifier measures it itself
(or reuses its own earlier figure of the same commitment) and signs the core
only when its figure is the receipt's; otherwise it refuses with its figure.

An eval contribution (a qa eval set) is measured on basis ``accepted_delta``:
every admitted GGUF expert of its domain answers the set as admission runs a
target set (``aemd.evaluate.evaluate_gguf``), and the figure is the highest
score minus the lowest; a copy of a genesis set or of an eval contribution
this verifier attested measures 0 (``protocol.growth.copy_of``).

A skill or operator is counted, not measured: a request for one carries
``as_of`` (the period's end), and the verifier counts the receipts of its own
log that name the commitment (:func:`count_in_log`, specs/growth.md §7).

The contributor's node (control command ``contribute``) asks one verifier to
measure, builds the core with that figure, asks every verifier to attest it,
and appends the signed ContributionReceipt once a quorum has.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import trio

from aemd import p2p
from aemd.framing import read_frame, write_frame
from crypto import domains
from crypto.hashing import H
from ledger.atomicfile import atomic_write
from protocol import canonical, errors
from protocol.errors import AemError
from protocol.growth import (CONTEXT_TYPES, MAX_CONTRIBUTION_BYTES, MAX_REQUEST_BYTES, MAX_RESPONSE_BYTES,
                             ContributionDocument, Figure, attest_problem, best_expert, build_core,
                             check_eval_file, contaminated_items, context_text, copy_of, decode_msg,
                             encode_msg, eval_improvement, near_duplicate_of, parse_request, separation_bp)
from protocol.growth import (USE_MARGIN_S, USE_TYPES, UseRecord, basis_of, check_as_of, count_uses, previous_period,
                             uses_eval_id)
from protocol.receipts import Attestation

if TYPE_CHECKING:
    from aemd.node import Node

log = logging.getLogger("aemd.growth")

N_CTX = 1024                # every verifier measures with this context (the knowledge needs room)
SEED = 0
MAX_PER_PEER = 2            # attest streams served to one peer at once
MAX_TOTAL = 8
IDLE_S = 30.0               # a request frame that does not arrive by then
SESSION_S = 900.0           # one measurement of a small model on a busy machine, with room
FETCH_TIMEOUT_S = 120.0
EXPERT_FETCH_TIMEOUT_S = 1800.0
TABLE_FILE = "growth-attested.json"
EVALS_FILE = "growth-evals.json"     # eval set hash -> the eval contribution this verifier attested it under
PERIODS_FILE = "growth-periods.json"  # skill/operator commitment -> [start, end] of the latest period attested here
MAX_FIGURES = 4096          # figures kept in memory (oldest dropped: measured again if asked)


def attest_proto(net: bytes) -> str:
    return f"/aem/{net.hex()}/attest/1"


# --- the contributor's files ------------------------------------------------------------

def contributions_dir(home: Any) -> Path:
    return Path(home.root) / "contributions"


def save_contribution(home: Any, doc: ContributionDocument, data: bytes) -> Path:
    """Keep the file and its document (atomic writes); returns the document's path."""
    d = contributions_dir(home)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    if H(data) != doc.file_hash:
        raise AemError(errors.BAD_VALUE, "the file is not the document's")
    f = d / doc.file_hash.hex()
    if not (f.exists() and f.stat().st_size == len(data)):
        atomic_write(f, data, 0o600)
    p = d / f"{doc.commitment.hex()}.json"
    atomic_write(p, canonical.encode(doc.to_map()), 0o600)
    return p


def load_document(home: Any, commitment: bytes) -> ContributionDocument:
    p = contributions_dir(home) / f"{commitment.hex()}.json"
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise AemError(errors.NOT_FOUND, f"no contribution {commitment.hex()[:16]} in {p.parent}") from None
    doc = ContributionDocument.from_map(canonical.decode(data, MAX_REQUEST_BYTES))
    if doc.commitment != commitment:
        raise AemError(errors.BAD_VALUE, f"{p} is not the document of its name")
    return doc


def contribution_lookup(home: Any) -> Callable[[bytes], tuple[Path, int] | None]:
    """``lookup(file hash) -> (path, size) | None`` for the artefact server:
    only files kept under ``<home>/contributions/``, by their hash."""
    d = contributions_dir(home)

    def lookup(content_hash: bytes):
        if len(content_hash) != 32:
            return None
        p = d / content_hash.hex()
        try:
            size = p.stat().st_size
        except OSError:
            return None
        return (p, size) if 0 < size <= MAX_CONTRIBUTION_BYTES else None
    return lookup


@dataclass(frozen=True)
class _Wanted:
    """What fetch_artefact needs of a manifest: a file known by its hash."""
    net: bytes
    content_hash: bytes
    size_bytes: int
    id: bytes = b""


# --- the measurement (blocking) ---------------------------------------------------------

def measure_knowledge(model_path: Path, evalset: Any, data: bytes, n_threads: int | None = None
                      ) -> tuple[int, int, int]:
    """(delta, with_bp, without_bp): the domain's target set answered by the
    model without and then with the contribution as a system message; greedy,
    seed 0, CPU, one context size, the KV cache reset per item (as admission
    measures). An item that does not fit counts as wrong in that run."""
    from aemd.executors.llama import LlamaExecutor
    from protocol.evalset import score, score_bp
    ctx = context_text(data)
    runs: dict[bool, list[bool]] = {False: [], True: []}
    with LlamaExecutor(model_path, n_ctx=N_CTX, n_threads=n_threads, n_gpu_layers=0, seed=SEED) as ex:
        if ex.chat_template is None:
            raise AemError(errors.UNAVAILABLE, "the expert has no chat template: no system message to give")
        for with_ctx in (False, True):
            for item in evalset.items:
                msgs = ([{"role": "system", "content": ctx}] if with_ctx else []) + \
                       [{"role": "user", "content": item.prompt}]
                try:
                    r = ex.chat(msgs, evalset.max_tokens, SEED, 0)
                    ok = score(evalset.scorer, r.text, item.answer)
                except AemError as e:
                    if e.code not in (errors.TOO_LARGE, errors.BAD_VALUE):
                        raise
                    ok = False
                runs[with_ctx].append(ok)
    return (eval_improvement(runs[True], runs[False]), score_bp(runs[True]), score_bp(runs[False]))


def measure_eval(models: list[tuple[bytes, Path]], evalset: Any, n_threads: int | None = None
                 ) -> list[tuple[bytes, int]]:
    """(capsule id, score in bp) of each expert on a contributed qa set, run
    exactly as admission runs a domain's target set (context, greedy, seed,
    CPU, chat template or raw prompt as the file decides)."""
    from aemd.evaluate import evaluate_gguf
    return [(cid, evaluate_gguf(path, target=evalset, general=None, probes=None, n_threads=n_threads).target_bp)
            for cid, path in models]


# --- the verifier side ------------------------------------------------------------------

class GrowthVerifier:
    """Measures and attests contributions for peers (genesis verifiers only)."""

    def __init__(self, node: "Node", cfg: Any) -> None:
        self.node = node
        vcfg = cfg["verifier"]
        self.eval_threads = int(vcfg["eval_threads"]) or None
        self.max_artefact_bytes = int(vcfg["max_artefact_mb"]) << 20
        self.artefacts = node.home.root / "artefacts"
        self.fetched = node.home.root / "contributions-fetched"
        self.table_path = node.home.root / TABLE_FILE
        self.figures: dict[bytes, Figure] = {}      # commitment -> this verifier's figure
        self._lock = trio.Lock()                   # one measurement at a time
        self.table = self._read_table()
        self.evals_path = node.home.root / EVALS_FILE
        self.evals = self._read_evals()            # eval hash -> (commitment, file hash)
        self.periods_path = node.home.root / PERIODS_FILE
        self.periods = self._read_periods()        # commitment -> (T_prev, T) of the latest period attested here
        self.measured = 0
        self.attested = 0
        self.refused = 0

    def _read_table(self) -> dict[bytes, bytes]:
        try:
            raw = json.loads(self.table_path.read_text())
            return {bytes.fromhex(k): bytes.fromhex(v) for k, v in raw.items()}
        except FileNotFoundError:
            return {}
        except (ValueError, AttributeError, TypeError):
            log.warning("%s unreadable: starting an empty table of attested contributions", self.table_path)
            return {}

    def _read_evals(self) -> dict[bytes, tuple[bytes, bytes]]:
        try:
            raw = json.loads(self.evals_path.read_text())
            return {bytes.fromhex(k): (bytes.fromhex(v["commitment"]), bytes.fromhex(v["file"]))
                    for k, v in raw.items()}
        except FileNotFoundError:
            return {}
        except (ValueError, AttributeError, TypeError, KeyError):
            log.warning("%s unreadable: starting an empty table of attested evals", self.evals_path)
            return {}

    def _read_periods(self) -> dict[bytes, tuple[int, int]]:
        try:
            raw = json.loads(self.periods_path.read_text())
            return {bytes.fromhex(k): (int(v[0]), int(v[1])) for k, v in raw.items()}
        except FileNotFoundError:
            return {}
        except (ValueError, AttributeError, TypeError):
            log.warning("%s unreadable: starting an empty table of counted periods", self.periods_path)
            return {}

    def _remember(self, doc: ContributionDocument, fig: Figure, after: int = 0) -> None:
        if doc.type in USE_TYPES:
            # A period this verifier attested bounds the next one even before
            # its receipt reaches the log: no two overlapping periods signed.
            t = int(fig.eval_id.split("-", 1)[1])
            if t > self.periods.get(doc.commitment, (0, 0))[1]:
                self.periods[doc.commitment] = (after, t)
                atomic_write(self.periods_path, json.dumps({k.hex(): list(v) for k, v in self.periods.items()},
                                                           sort_keys=True).encode(), 0o600)
            return
        if doc.type == "eval":
            eh = bytes.fromhex(fig.eval_id)
            if eh not in self.evals:
                self.evals[eh] = (doc.commitment, doc.file_hash)
                atomic_write(self.evals_path, json.dumps(
                    {k.hex(): {"commitment": c.hex(), "file": f.hex()} for k, (c, f) in self.evals.items()},
                    sort_keys=True).encode(), 0o600)
        if doc.file_hash in self.table:
            return
        self.table[doc.file_hash] = doc.commitment
        atomic_write(self.table_path, json.dumps({k.hex(): v.hex() for k, v in self.table.items()},
                                                 sort_keys=True).encode(), 0o600)

    async def handler(self, stream: Any, peer: str) -> None:
        try:
            req = await read_frame(stream, MAX_REQUEST_BYTES)
            op, doc, core, as_of = parse_request(req)
            asker = p2p.public_from_peer_id(peer)
            after = 0
            if doc.type in USE_TYPES:
                fig, after = await self.count_figure(doc, asker, as_of)
            else:
                fig = await self.figure(doc, peer)
            if op == "measure":
                resp = {"ok": True, "figure": fig.to_map()}
            else:
                problem = attest_problem(core, doc, net=self.node.net, contributor=asker, figure=fig)
                if problem:
                    self.refused += 1
                    resp = {"ok": False, "code": errors.REFUSED, "detail": problem, "figure": fig.to_map()}
                else:
                    att = core.attested_by(self.node.key)
                    self._remember(doc, fig, after)
                    self.attested += 1
                    resp = {"ok": True, "figure": fig.to_map(), "attestation": att.to_map()}
        except AemError as exc:
            resp = {"ok": False, "code": exc.code, "detail": exc.detail[:300]}
        await write_frame(stream, encode_msg(resp, MAX_RESPONSE_BYTES))

    async def count_figure(self, doc: ContributionDocument, contributor: bytes, as_of: int | None
                           ) -> tuple[Figure, int]:
        """(figure, T_prev): the counted figure of a skill or operator for the
        period ending at ``as_of`` (specs/growth.md §7), from this verifier's
        own log; never cached. The period it attested last may be attested
        again (a retry: the ledger mints it once); any other must begin after it."""
        if as_of is None:
            raise AemError(errors.BAD_VALUE, f"a {doc.type} is counted for a period: the request names as_of")
        check_as_of(as_of, self.node.now())
        basis = basis_of(doc.type)
        last = self.periods.get(doc.commitment)
        attested = 0 if last is None else (last[0] if as_of == last[1] else last[1])
        after, n = await self.node.store.with_replay(
            self.node.now(), lambda store, res: count_in_log(store, res, doc.commitment, contributor, basis, as_of,
                                                             attested))
        reason = "" if n else f"no qualifying use in ({after}, {as_of}]"
        self.measured += 1
        log.info("%s contribution %s: %d use(s) in (%d, %d]", doc.type, doc.commitment.hex()[:16], n, after, as_of)
        return Figure(doc.commitment, uses_eval_id(as_of), b"", n, 0, 0, reason), after

    async def figure(self, doc: ContributionDocument, peer: str) -> Figure:
        """This verifier's own figure of ``doc`` (measured once per commitment)."""
        async with self._lock:
            fig = self.figures.get(doc.commitment)
            if fig is None:
                fig = await self._measure(doc, peer)
                if len(self.figures) >= MAX_FIGURES:
                    del self.figures[next(iter(self.figures))]
                self.figures[doc.commitment] = fig
                self.measured += 1
            return fig

    async def _measure(self, doc: ContributionDocument, peer: str) -> Figure:
        from aemd.evaluate import load_evalset
        node = self.node
        dom = node.genesis.admission.domain(doc.domain)
        if dom is None:
            raise AemError(errors.REFUSED, f"the genesis judges no domain {doc.domain!r}")
        if doc.type == "eval":
            return await self._measure_eval(doc, peer)
        evalset = load_evalset(dom.target_eval)
        eval_id = evalset.hash.hex()
        state = await node.store.admission()
        rows = [(cid, c.subject.domain, c.manifest.kind, c.measurements.target_bp if c.measurements else 0)
                for cid, c in state.capsules.items() if cid in state.admitted()]
        expert = best_expert(rows, doc.domain)
        if expert is None:
            raise AemError(errors.UNAVAILABLE, f"no expert of {doc.domain!r} is admitted: nothing to measure with")

        def zero(reason: str) -> Figure:
            log.info("contribution %s measures 0: %s", doc.commitment.hex()[:16], reason)
            return Figure(doc.commitment, eval_id, expert, 0, 0, 0, reason)
        dup = near_duplicate_of(self.table, doc)
        if dup is not None:
            return zero(f"the same file as contribution {dup.hex()[:16]}")
        data = await self._fetch(doc, peer)
        if doc.type not in CONTEXT_TYPES:
            return zero(f"a {doc.type} contribution is not measurable yet")
        text = data.decode("utf-8", errors="replace")
        found = contaminated_items(text, evalset.items)
        if found:
            return zero(f"it contains {len(found)} item(s) of the eval {evalset.name}")
        cap = state.capsules[expert]
        model = await self._expert_file(cap.manifest)
        t0 = time.monotonic()
        delta, with_bp, without_bp = await trio.to_thread.run_sync(
            measure_knowledge, model, evalset, data, self.eval_threads)
        log.info("contribution %s: %s with it %d bp, without %d bp: delta %d bp (%.0f s)",
                 doc.commitment.hex()[:16], evalset.name, with_bp, without_bp, delta, time.monotonic() - t0)
        return Figure(doc.commitment, eval_id, expert, delta, with_bp, without_bp, "")

    async def _fetch(self, doc: ContributionDocument, peer: str) -> bytes:
        from aemd.artefacts import fetch_artefact
        node = self.node
        path = await fetch_artefact(node.p2p, peer, _Wanted(node.net, doc.file_hash, doc.file_size),
                                    self.fetched, max_bytes=MAX_CONTRIBUTION_BYTES, timeout_s=FETCH_TIMEOUT_S)
        return await trio.to_thread.run_sync(path.read_bytes)

    def _existing_evals(self, doc: ContributionDocument) -> list[tuple[str, bytes, tuple]]:
        """The evals an eval contribution must not copy, in the order the
        spec reports them: each domain's target and general sets, the probe
        set, then the eval contributions this verifier attested (by hash)."""
        from aemd.artefacts import final_path
        from aemd.evaluate import load_evalset
        from protocol.evalset import parse_evalset
        params = self.node.genesis.admission
        named: list[tuple[str, bytes]] = []
        for d in params.domains:
            named += [(f"{d.domain}'s {role} set", h) for role, h in (("target", d.target_eval),
                                                                         ("general", d.general_eval)) if h]
        if params.probe_set:
            named.append(("the probe set", params.probe_set))
        out: list[tuple[str, bytes, tuple]] = []
        for name, h in named:
            try:
                s = load_evalset(h)
                out.append((f"{name} {s.name}", h, s.items))
            except AemError:
                out.append((name, h, ()))     # not an eval set here (code-patch fixtures): its hash only
        for eh in sorted(self.evals):
            commitment, file_hash = self.evals[eh]
            if commitment == doc.commitment:
                continue
            try:
                items = parse_evalset(final_path(self.fetched, file_hash).read_bytes()).items
            except (OSError, AemError):
                items = ()
            out.append((f"eval contribution {commitment.hex()[:16]}", eh, items))
        return out

    async def _measure_eval(self, doc: ContributionDocument, peer: str) -> Figure:
        """The accepted_delta figure: how far the contributed set separates
        the domain's admitted GGUF experts (0 for a copy of an existing eval)."""
        node = self.node
        data = await self._fetch(doc, peer)
        s = check_eval_file(data)
        eval_id = s.hash.hex()

        def zero(reason: str) -> Figure:
            log.info("eval contribution %s measures 0: %s", doc.commitment.hex()[:16], reason)
            return Figure(doc.commitment, eval_id, b"", 0, 0, 0, reason)
        dup = near_duplicate_of(self.table, doc)
        if dup is not None:
            return zero(f"the same file as contribution {dup.hex()[:16]}")
        reason = await trio.to_thread.run_sync(lambda: copy_of(s, self._existing_evals(doc)))
        if reason:
            return zero(f"a copy of an existing eval: {reason}")
        state = await node.store.admission()
        experts = sorted(cid for cid, c in state.capsules.items()
                         if cid in state.admitted() and c.subject.domain == doc.domain and c.manifest.kind == "gguf")
        if len(experts) < 2:
            return zero(f"{len(experts)} admitted expert(s) of {doc.domain!r}: a separation needs two")
        models = [(cid, await self._expert_file(state.capsules[cid].manifest)) for cid in experts]
        t0 = time.monotonic()
        scores = await trio.to_thread.run_sync(measure_eval, models, s, self.eval_threads)
        delta = separation_bp([bp for _, bp in scores])
        top = min(scores, key=lambda r: (-r[1], r[0]))
        log.info("eval contribution %s: %s on %d experts: %s: separation %d bp (%.0f s)",
                 doc.commitment.hex()[:16], s.name, len(scores),
                 ", ".join(f"{cid.hex()[:12]} {bp}" for cid, bp in scores), delta, time.monotonic() - t0)
        return Figure(doc.commitment, eval_id, top[0], delta, top[1], min(bp for _, bp in scores), "")

    async def _expert_file(self, manifest: Any) -> Path:
        """The expert's checked artefact: the copy admission fetched, or fetched anew."""
        from aemd.artefacts import fetch_artefact, final_path
        p = final_path(self.artefacts, manifest.content_hash)
        if p.exists() and p.stat().st_size == manifest.size_bytes:
            return p
        for local in self.node.capsules:
            if local.manifest.content_hash == manifest.content_hash and local.serving.path:
                return Path(local.serving.path)
        now = self.node.now()
        peer = next((p2p.peer_id_from_public(ad.host) for ad in self.node.mesh.ads.values()
                     if ad.capsule_id == manifest.id and ad.host == manifest.author and ad.expires_at > now), None)
        if peer is None:
            raise AemError(errors.UNAVAILABLE, "no host advertises the domain's expert now")
        return await fetch_artefact(self.node.p2p, peer, manifest, self.artefacts,
                                    max_bytes=self.max_artefact_bytes, timeout_s=EXPERT_FETCH_TIMEOUT_S)

    def status(self) -> dict:
        return {"measured": self.measured, "attested": self.attested, "refused": self.refused,
                "files_seen": len(self.table), "evals_seen": len(self.evals)}


def use_records(store: Any, res: Any) -> list[UseRecord]:
    """The applied inference receipts that name contributions they used, as
    the count reads them (blocking; ``res`` is the store's replay)."""
    from ledger.state import VOIDED
    from protocol.entry import Entry
    st = res.checkpoint.state
    out = []
    for data in store.linked_of_kind("inference_receipt"):
        try:
            r = Entry.decode(data).payload()
        except AemError:
            continue
        if not getattr(r, "uses", ()):
            continue
        rid = r.id
        applied = st.receipts.get(rid)
        if applied is None:
            continue                  # refused by a rule, or not in the applied feeds
        out.append(UseRecord(receipt_id=rid, host=r.host, payer=r.payer, task_hash=r.task_hash, uses=tuple(r.uses),
                             settle_at=applied[3], acked=rid + r.payer in st.acks,
                             voided=applied[4] == VOIDED or rid in st.challenged))
    return out


def count_in_log(store: Any, res: Any, commitment: bytes, contributor: bytes, basis: str, as_of: int,
                 attested: int = 0) -> tuple[int, int]:
    """(T_prev, count) of one commitment's period ending at ``as_of``: T_prev
    the latest period end minted in the replay or ``attested`` here before."""
    st = res.checkpoint.state
    after = max(previous_period(st.contributions, commitment, basis), attested)
    return after, count_uses(use_records(store, res), commitment, contributor, after, as_of)


# --- the contributor side ---------------------------------------------------------------

async def _ask(node: "Node", verifier: bytes, req: dict) -> dict:
    peer = p2p.peer_id_from_public(verifier)
    with trio.fail_after(SESSION_S + 30):
        async with node.p2p.stream(peer, attest_proto(node.net)) as stream:
            await write_frame(stream, encode_msg(req, MAX_REQUEST_BYTES))
            return decode_msg(await read_frame(stream, MAX_RESPONSE_BYTES), MAX_RESPONSE_BYTES)


class Contributor:
    """Jobs of this node's contributions: measure, attest, append."""

    def __init__(self, node: "Node") -> None:
        self.node = node
        self.jobs: dict[bytes, dict] = {}
        self._nursery: trio.Nursery | None = None

    def start(self, node: "Node", nursery: trio.Nursery) -> None:
        self._nursery = nursery

    def submit(self, doc: ContributionDocument, as_of: int | None = None) -> dict:
        """Start a job; a skill or operator is counted for the period ending
        at ``as_of`` (default: now less the margin verifiers require)."""
        job = self.jobs.get(doc.commitment)
        if job is not None and job["state"] in ("measuring", "attesting"):
            return job
        if doc.type in USE_TYPES:
            as_of = check_as_of(self.node.now() - USE_MARGIN_S if as_of is None else as_of, self.node.now())
        elif as_of is not None:
            raise AemError(errors.BAD_VALUE, f"as_of: a {doc.type} contribution is measured, not counted")
        job = {"commitment": doc.commitment.hex(), "state": "measuring", "delta": None, "receipt_id": None,
               "attestations": 0, "quorum": self.node.genesis.quorum, "refusals": [], "detail": "",
               "type": doc.type, "as_of": as_of}
        self.jobs[doc.commitment] = job
        if self._nursery is None:
            raise AemError(errors.UNAVAILABLE, "the node is still starting")
        self._nursery.start_soon(self._run, doc, job)
        return job

    async def _run(self, doc: ContributionDocument, job: dict) -> None:
        try:
            await self._work(doc, job)
        except AemError as exc:
            job["state"], job["detail"] = "failed", f"{exc.code}: {exc.detail}"
        except trio.TooSlowError:
            job["state"], job["detail"] = "failed", "a verifier did not answer in time"
        log.info("contribution %s: %s %s", doc.commitment.hex()[:16], job["state"], job["detail"])

    async def _work(self, doc: ContributionDocument, job: dict) -> None:
        node = self.node
        verifiers = sorted(v for v in node.genesis.verifiers if v != node.key.public)
        pinned = {"as_of": job["as_of"]} if doc.type in USE_TYPES else {}
        figure = None
        for v in verifiers:
            try:
                resp = await _ask(node, v, {"op": "measure", "doc": doc.to_map(), **pinned})
            except (AemError, trio.TooSlowError) as exc:
                job["refusals"].append({"verifier": v.hex(), "detail": str(exc)[:200]})
                continue
            if resp.get("ok"):
                figure = resp["figure"]
                break
            job["refusals"].append({"verifier": v.hex(), "detail": f"{resp.get('code')}: {resp.get('detail')}"})
        if figure is None:
            raise AemError(errors.UNAVAILABLE, "no verifier measured it")
        delta, eval_id = int(figure["delta"]), str(figure["eval_id"])
        job["delta"], job["eval_id"] = delta, eval_id
        if delta == 0:
            # Nothing to mint: no entry in the log for a figure of 0.
            job["state"], job["detail"] = "zero", figure.get("zero_reason") or (
                "no qualifying use" if doc.type in USE_TYPES else "no improvement")
            return
        core = build_core(net=node.net, contributor=node.key.public, doc=doc, eval_id=eval_id, delta=delta,
                          created_at=node.now())
        job["state"] = "attesting"
        msg = core.attest_bytes()
        atts: dict[bytes, Attestation] = {}

        async def one(v: bytes) -> None:
            try:
                resp = await _ask(node, v, {"op": "attest", "doc": doc.to_map(), "core": core.to_map(), **pinned})
            except (AemError, trio.TooSlowError) as exc:
                job["refusals"].append({"verifier": v.hex(), "detail": str(exc)[:200]})
                return
            if not resp.get("ok"):
                job["refusals"].append({"verifier": v.hex(), "detail": f"{resp.get('code')}: {resp.get('detail')}",
                                        "figure": (resp.get("figure") or {}).get("delta")})
                return
            try:
                a = Attestation.from_map(resp["attestation"], "attestation")
                if a.verifier != v:
                    raise AemError(errors.BAD_KEY, "attested by another key")
                domains.verify(a.verifier, msg, a.sig)
            except (AemError, KeyError) as exc:
                job["refusals"].append({"verifier": v.hex(), "detail": f"bad attestation: {exc}"[:200]})
                return
            atts[v] = a
            job["attestations"] = len(atts)
        async with trio.open_nursery() as n:
            for v in verifiers:
                n.start_soon(one, v)
        if len(atts) < node.genesis.quorum:
            raise AemError(errors.REFUSED, f"{len(atts)} attestation(s), the quorum is {node.genesis.quorum}")
        receipt = core.replace(attestations=tuple(atts[v] for v in sorted(atts))).signed(node.key)
        entry = await node.append(receipt)
        job["state"], job["receipt_id"], job["entry_id"] = "appended", receipt.id.hex(), entry.id.hex()


# --- wiring into a node -----------------------------------------------------------------

def install(node: "Node", cfg: Any) -> GrowthVerifier | None:
    """The attest stream (on genesis verifiers with ``[verifier] enabled``)
    and the control commands ``contribute`` and ``contribution_status``."""
    from aemd.nodecontrol import _hex_arg
    svc = None
    if cfg["verifier"]["enabled"] and node.key.public in node.genesis.verifiers:
        svc = GrowthVerifier(node, cfg)

        def serve(node: "Node", nursery: trio.Nursery) -> None:
            node.p2p.set_stream_handler(attest_proto(node.net), svc.handler, max_concurrent=MAX_TOTAL,
                                        max_per_peer=MAX_PER_PEER, idle_timeout=IDLE_S,
                                        session_timeout=SESSION_S)
        node.add_extension(serve)
    # Contribution files travel on the artefact stream the verifier module
    # serves (installed before this one); verifiers fetch them by hash.
    sources = getattr(node, "artefact_sources", None)
    if sources is None:
        raise AemError(errors.INTERNAL, "install aemd.verifier before aemd.growth: it serves the files")
    sources.append(contribution_lookup(node.home))
    contributor = Contributor(node)
    node.add_extension(contributor.start)

    async def contribute(args: dict, emit) -> dict:
        c = _hex_arg(args, "commitment", 32)
        doc = await trio.to_thread.run_sync(load_document, node.home, c)
        as_of = args.get("as_of")
        if as_of is not None and (type(as_of) is not int or as_of < 1):
            raise AemError(errors.BAD_VALUE, "as_of must be a positive integer time")
        if doc.type not in USE_TYPES and node.genesis.admission.domain(doc.domain) is None:
            # A skill or operator is counted from the log, not judged in a domain.
            raise AemError(errors.REFUSED, f"the genesis judges no domain {doc.domain!r} (it judges: "
                           f"{', '.join(d.domain for d in node.genesis.admission.domains) or 'none'})")
        return dict(contributor.submit(doc, as_of))

    async def contribution_status(args: dict, emit) -> dict:
        c = _hex_arg(args, "commitment", 32)
        job = contributor.jobs.get(c)
        if job is None:
            raise AemError(errors.NOT_FOUND, f"no contribution job {c.hex()[:16]} since this node started")
        return dict(job, verifier=svc.status() if svc else None)

    node.control_handlers.update({"contribute": contribute, "contribution_status": contribution_status})
    return svc
