"""Tasks over the mesh: serving them (host side) and submitting them (payer
side), on the task stream protocol of specs/task-protocol.md.

The protocol's decisions live in the pure sessions of
``protocol/tasksession.py`` (``host_session``, ``payer_session``); this
module is their shell: it pumps their frames over a stream (:func:`drive`),
answers their ``Call``\\s from the log, the clock and the executors, and keeps
the metrics. The service sees the node only through :class:`TaskEnv`.

Host: the session checks the request (signatures, network, the authorisation
made out to this host, price, expiry, the payer's replayed balance less what
its tasks in progress here hold, the spend key unused, no dispute of this
host by the payer) and reserves the price, in one step, before any work; the
shell runs the capsule's executor off the event loop and streams output
chunks; the session signs the InferenceWorkReceipt, has it appended to the
log, and answers with the output and the receipt.

Payer: build and sign the TaskPacket and draw one spend key; rank hosts; try
them in order, each with its own SpendAuthorization for that key (made out
to that host, at its price, so only the host that does the work can charge
and the ledger charges the key once), until one delivers a valid receipt at
no more than the price it accepted, reading at most what the task allows;
append a ReceiptAck; record the RouteTrace; dispute every other receipt that
charges the key.
"""

from __future__ import annotations

import json
import logging
import os
import time
from contextlib import asynccontextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Protocol

import trio

from aemd import p2p, router
from aemd.capsules import LocalCapsule
from aemd.cliutil import fmt_credits
from aemd.control import Emit
from aemd.framing import deadline, write_frame
from aemd.sessions import drive
from aemd.traces import memory_of
from crypto.hashing import H
from protocol import errors
from protocol.errors import AemError
from protocol.entry import Entry
from protocol.receipts import Dispute
from protocol.taskwire import MAX_CHUNK, TaskChunk, TaskRequest, TaskResult, task_protocol_id
from protocol.task import (MAX_MESSAGES, MAX_USES, MAX_PROMPT, TRAINING_DEFAULT, TRAINING_USES, Attempt, ChatMessage,
                           InferenceWorkReceipt, ReceiptAck, RouteTrace, SpendAuthorization, TaskPacket)
from protocol.tasksession import (AdmissionFacts, HostOutcome, Offer, PayerGone, Ran, RunFailed, accept_deadline,
                                  admit, host_session, payer_session, to_dispute)

log = logging.getLogger("aemd.tasks")

SPEND_AUTH_TTL_S = 600          # a task must start within this; settlement waits for it too
PROBE_TIMEOUT_S = 5             # dialling a host nobody has reached yet
MAX_PROBES = 16              # dials per task to hosts not yet reached (parallel)
MAX_ATTEMPTS = 8
CHUNK_GATHER_S = 0.03
# Payer-side disputes (specs/task-protocol.md §3 step 7).
MAX_DISPUTE_QUEUE = 1024        # receipts waiting to be judged; more are dropped (and logged)
MAX_REMEMBERED_TASKS = 10_000   # finished tasks whose accepted receipt the node keeps in memory


class TaskNet(Protocol):
    """The part of the node's libp2p host the task service uses."""
    config: Any                                   # .max_streams_per_peer

    def set_stream_handler(self, proto: str, handler: Callable, max_concurrent: int = ...) -> None: ...
    def stream(self, peer: str, proto: str) -> Any: ...   # async context manager -> a frame stream
    async def connect(self, addr: str) -> Any: ...
    def is_connected(self, peer: str) -> bool: ...
    def is_banned(self, peer: str) -> bool: ...
    def seen_ago(self, peer: str) -> float | None: ...


class TaskEnv(Protocol):
    """Exactly what the task service needs of its node (built from the node by
    ``aemd.services.node_env``): its key and network, the clock, the log
    (replay to read, append to write, an insert hook to watch), its capsules,
    the mesh's tables and the hostbook (routing), its host, load reporting and
    metrics. Anything with these members can run the service."""
    key: Any
    net: bytes
    challenge_window: int
    capsules: list
    capacity: dict                                # the operator's capacity settings
    metrics: Any
    mesh: Any                                     # .ads, .cards
    hostbook: Any
    p2p: TaskNet
    traces_path: Path
    admission_params: Any                         # the genesis's AdmissionParams

    def now(self) -> int: ...
    async def admission(self) -> Any: ...         # the admission replay (ledger/admission.py)
    async def ledger(self, now: int) -> Any: ...  # the replay at ``now``
    async def append(self, obj: Any) -> Any: ...
    def set_load(self, percent: int) -> None: ...
    def set_insert_hook(self, hook: Callable[[list[bytes]], None]) -> None: ...
    def gpu_layers_for(self, cap: LocalCapsule) -> int: ...


class _HostCalls:
    """The host session's ``Call`` ops for one task stream (protocol/tasksession.py)."""

    def __init__(self, svc: "TaskService", stream) -> None:
        self.svc, self.stream = svc, stream
        self.cap: LocalCapsule | None = None
        self.locked = False                        # the admission lock is held (admission .. reserve)
        self.reservation: tuple[bytes, bytes, int] | None = None
        self.admitted = self.running = False
        self.t0 = time.monotonic()

    async def now(self) -> int:
        return self.svc.env.now()

    async def capsule(self, capsule_id: bytes) -> Offer | None:
        self.cap = next((c for c in self.svc.env.capsules if c.id == capsule_id), None)
        if self.cap is None:
            return None
        return Offer(domain=self.cap.manifest.domain, kind=self.cap.manifest.kind, price=self.cap.serving.price)

    async def admission(self, payer: bytes, spend_key: bytes) -> AdmissionFacts:
        # One admission at a time, from the replay to the reservation: two
        # requests arriving together can never both pass on the same funds or
        # the same spend key (specs/task-protocol.md §2). Held until reserve/refused.
        svc = self.svc
        await svc._admission.acquire()
        self.locked = True
        ledger = await svc.env.ledger(svc.env.now())
        me = svc.env.key.public
        return AdmissionFacts(in_flight=spend_key in svc._in_flight,
                              charged=ledger.spend_key_blocks(payer, spend_key, me),
                              disputed=ledger.disputes(payer, me), available=ledger.available(payer),
                              reserved=svc._reserved.get(payer, 0))

    def unlock(self) -> None:
        if self.locked:
            self.locked = False
            self.svc._admission.release()

    async def reserve(self, payer: bytes, spend_key: bytes, price: int) -> None:
        svc = self.svc
        svc._in_flight.add(spend_key)
        svc._reserved[payer] = svc._reserved.get(payer, 0) + price
        self.reservation = (payer, spend_key, price)
        self.admitted = True
        self.unlock()

    async def refused(self, code: str, detail: str) -> None:
        self.unlock()
        if self.stream is not None:
            self.svc.env.metrics.tasks_refused.inc()

    async def execute(self, capsule_id: bytes, task: TaskPacket) -> Ran | RunFailed | PayerGone:
        svc, cap = self.svc, self.cap
        self.task = task
        svc.running += 1
        self.running = True
        svc._report_load(cap)
        try:
            if task.kind == "text":
                await svc._executor(cap)      # a first task's model load is not its tokens/s
            self.t0 = time.monotonic()
            output, tokens = await svc._execute(cap, task, self.stream)
            return Ran(output=output, tokens=tokens)
        except Exception as exc:          # a failed capsule must not look like a dead host
            return _failure(task, exc)

    async def failed(self, code: str, detail: str) -> None:
        log.warning("task %s  domain %s  failed: %s: %s", self.task.id.hex()[:16], self.task.domain, code, detail)
        self.svc.env.metrics.tasks_failed.inc()

    async def append_receipt(self, receipt: InferenceWorkReceipt) -> None:
        await self.svc.env.append(receipt)
        await self.release()           # the replay holds the charge from now on

    async def release(self) -> None:
        if self.reservation is not None:
            payer, key, price = self.reservation
            self.reservation = None
            await self.svc._release(payer, key, price)


def _failure(task: TaskPacket, exc: Exception) -> RunFailed | PayerGone:
    """Why accepted work failed, for task_failed (no receipt, no charge), so
    the payer reads the host's reason rather than a closed stream."""
    transport = (trio.BrokenResourceError, trio.ClosedResourceError, AemError)
    if isinstance(exc, AemError):
        return RunFailed(exc.code, exc.detail)
    if isinstance(exc, BaseExceptionGroup) and all(isinstance(e, transport) for e in _leaves(exc)):
        # Only the stream failed (the executor's own errors are raised outside
        # the output nursery): the payer went away, there is no one to tell.
        log.info("task %s  domain %s: the payer went away", task.id.hex()[:16], task.domain)
        return PayerGone()
    log.error("task %s: the executor failed", task.id.hex()[:16], exc_info=exc)
    return RunFailed(errors.UNAVAILABLE, f"the host's executor failed ({type(exc).__name__})")


class _PayerCalls:
    """The payer session's ``Call`` ops: streamed output goes to the control client."""

    def __init__(self, emit: Emit) -> None:
        self.emit = emit

    async def chunk(self, data: bytes) -> None:
        await self.emit({"event": "chunk", "data": data})


class TaskService:
    """Everything task-related a node holds: executors, limits, traces."""

    def __init__(self, env: TaskEnv, cfg: dict) -> None:
        self.env = env
        self.cfg = cfg
        self.proto = task_protocol_id(env.net)
        self._executors: dict[bytes, Any] = {}
        self._load_lock = trio.Lock()
        self._limiters: dict[bytes, trio.CapacityLimiter] = {}
        self._in_flight: set[bytes] = set()      # spend keys being worked on here
        # Host: admissions one at a time (replay, checks, reservation as one
        # step), and the price of every accepted task not yet logged, by payer.
        self._admission = trio.Lock()
        # Task streams this node has open to each host, at most the per-peer
        # limit a host serves (specs/sync-protocol.md §2): more would be reset
        # and count as the host's failure, so they wait their turn here.
        self._host_slots: dict[str, list] = {}    # peer id -> [semaphore, users]
        self._reserved: dict[bytes, int] = {}
        # Payer: spend keys of tasks in progress -> receipts for them seen meanwhile;
        # spend keys of finished tasks -> the receipt accepted (b"" for none).
        self._open: dict[bytes, list[InferenceWorkReceipt]] = {}
        self._done: dict[bytes, bytes] = {}
        self._disputes_in, self._disputes_out = trio.open_memory_channel[InferenceWorkReceipt](MAX_DISPUTE_QUEUE)
        self.running = 0
        # This node's training-use policy ([training] use): stamped into the
        # receipts it signs as a host and the tasks it signs as a payer.
        self.training_use = str(cfg.get("training", {}).get("use", TRAINING_DEFAULT))
        from aemd.traces import TraceStore
        self.traces = TraceStore(env.traces_path)

    # -- wiring ---------------------------------------------------------------

    def start(self, _node: Any, nursery: trio.Nursery) -> None:
        """The node's extension hook (its host and store exist from here on)."""
        self.env.p2p.set_stream_handler(self.proto, self.serve, max_concurrent=64)
        self.env.set_insert_hook(self.note_entries)
        nursery.start_soon(self._dispute_loop)

    def close(self) -> None:
        for ex in self._executors.values():
            close = getattr(ex, "close", None)
            if close:
                close()
        self._executors.clear()
        self.traces.close()

    # -- host side --------------------------------------------------------------

    async def serve(self, stream, peer: str) -> None:
        """One task stream: the host session (protocol/tasksession.py) driven on it."""
        calls = _HostCalls(self, stream)
        try:
            out: HostOutcome = await drive(host_session(self.env.net, self.env.key, self.training_use), stream,
                                           calls)
        except AemError as exc:
            if not calls.admitted:
                raise                  # before any work: the stream's own error (size, time, reset)
            log.info("task stream from %s ended: %s: %s", peer, exc.code, exc.detail)
            return
        finally:
            calls.unlock()
            await calls.release()
            if calls.running:
                self.running -= 1
                self._report_load(calls.cap)
        if out.status == "served":
            self.env.metrics.task_served(out.tokens, out.price)
            secs = max(1e-6, time.monotonic() - calls.t0)
            task = calls.task
            log.info("served task %s  domain %s  %d tokens in %.2f s (%.1f tokens/s)  price %s",
                     task.id.hex()[:16], task.domain, out.tokens, secs, out.tokens / secs, fmt_credits(out.price))

    def _report_load(self, cap: LocalCapsule | None) -> None:
        if cap is not None:
            self.env.set_load(min(100, 100 * self.running // max(1, cap.serving.max_concurrency)))

    async def _admit(self, req: TaskRequest) -> tuple[LocalCapsule, int]:
        """The host session's admission step (``protocol.tasksession.admit``)
        alone, with this service's answers: on success the task's price is
        reserved against the payer's balance and its spend key marked in
        progress, until :meth:`_release`."""
        calls = _HostCalls(self, None)
        session = admit(self.env.net, self.env.key.public, req, self.env.now())
        try:
            price = await drive(session, None, calls)
        finally:
            calls.unlock()
        return calls.cap, price

    async def _release(self, payer: bytes, spend_key: bytes, price: int) -> None:
        """End a reservation: the receipt is logged (the replay now holds the
        charge) or the task ended without one. Under the admission lock, so an
        admission never sees the charge in neither place; shielded, so a
        cancelled task still releases."""
        with trio.CancelScope(shield=True):
            async with self._admission:
                self._in_flight.discard(spend_key)
                left = self._reserved.get(payer, 0) - price
                if left > 0:
                    self._reserved[payer] = left
                else:
                    self._reserved.pop(payer, None)

    async def _executor(self, cap: LocalCapsule):
        async with self._load_lock:
            ex = self._executors.get(cap.id)
            if ex is None:
                from aemd.executors.llama import LlamaExecutor
                lc = self.cfg["llama"]
                m = cap.manifest
                log.info("loading model %s (%s, %d MB) for capsule %s", m.name, m.quantization or "?",
                         m.size_bytes >> 20, cap.id.hex()[:16])
                t0 = time.monotonic()
                ex = await trio.to_thread.run_sync(lambda: LlamaExecutor(
                    cap.serving.path, n_ctx=lc["n_ctx"], n_threads=lc["n_threads"] or None,
                    n_gpu_layers=self.env.gpu_layers_for(cap)))   # "auto" resolved, what runs recorded
                log.info("model %s loaded in %.1f s%s", m.name, time.monotonic() - t0,
                         "" if ex.chat_template else " (no chat template: raw prompts only)")
                self._executors[cap.id] = ex
            return ex

    def _limiter(self, cap: LocalCapsule) -> trio.CapacityLimiter:
        lim = self._limiters.get(cap.id)
        if lim is None:
            lim = self._limiters[cap.id] = trio.CapacityLimiter(self.concurrency(cap))
        return lim

    def concurrency(self, cap: LocalCapsule) -> int:
        """Tasks run at once on a capsule: its configured maximum, and for a
        model no more than fit in the node's memory envelope (VRAM when
        layers are offloaded, else RAM) at the manifest's estimate each."""
        n = cap.serving.max_concurrency
        need = cap.manifest.vram_need_mb
        if cap.manifest.kind == "gguf" and need > 0:
            from aemd.executors import concurrency_from_memory
            capacity = self.env.capacity
            on_gpu = self.cfg["llama"]["n_gpu_layers"] != 0 and capacity.get("vram_mb", 0) > 0
            envelope = capacity.get("vram_mb", 0) if on_gpu else (capacity.get("ram_mb") or _ram_mb())
            n = min(n, concurrency_from_memory(int(envelope), int(need)))
        return max(1, n)

    async def _execute(self, cap: LocalCapsule, task: TaskPacket, stream) -> tuple[bytes, int]:
        if task.kind == "code_patch":
            from aemd.executors import Limits, arun_code_patch
            cc = self.cfg["codepatch"]
            limits = Limits(wall_s=float(cc["timeout_s"]), memory_mb=cc["memory_mb"], nproc=cc["max_procs"],
                            cpu_s=max(1, int(cc["timeout_s"])))
            judge, policy = await trio.to_thread.run_sync(_code_patch_runner, cap)
            report = await arun_code_patch(task.repo_tar, task.patch, task.test_cmd, limits=limits,
                                           limiter=self._limiter(cap), judge=judge, policy=policy)
            output = report_bytes(report)
            await write_frame(stream, TaskChunk(data=output[:MAX_CHUNK]).encode())
            return output, 0
        ex = await self._executor(cap)
        lc = self.cfg["llama"]
        max_tokens = min(task.max_tokens or lc["max_tokens"], lc["max_tokens"])
        send, recv = trio.open_memory_channel[str](10_000)
        token = trio.lowlevel.current_trio_token()

        def on_token(piece: str) -> None:
            try:
                trio.from_thread.run_sync(send.send_nowait, piece, trio_token=token)
            except (trio.WouldBlock, trio.RunFinishedError, trio.Cancelled):
                pass  # a chunk lost to a slow reader; the full output is in the result

        async def forward() -> None:
            # One frame per token costs more CPU than the token on a small
            # model; gather what arrives within CHUNK_GATHER_S into one frame.
            # The first piece goes out at once: time to first token is what a
            # person waiting on a chat answer notices.
            first = True
            async for piece in recv:
                buf = bytearray(piece.encode("utf-8", "replace"))
                with trio.move_on_after(0 if first else CHUNK_GATHER_S):
                    first = False
                    while len(buf) < MAX_CHUNK // 2:
                        try:
                            buf += (await recv.receive()).encode("utf-8", "replace")
                        except trio.EndOfChannel:
                            break
                for i in range(0, len(buf), MAX_CHUNK):
                    await write_frame(stream, TaskChunk(data=bytes(buf[i:i + MAX_CHUNK])).encode())

        run = dict(limiter=self._limiter(cap), timeout_s=float(lc["task_timeout_s"]))
        failure: AemError | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(forward)
            try:
                if task.messages:          # a chat: the model's own template (specs/task-protocol.md §5)
                    msgs = [{"role": m.role, "content": m.content} for m in task.messages]
                    result = await ex.achat(msgs, max_tokens, task.seed, task.temperature_milli, on_token, **run)
                else:
                    result = await ex.agenerate(task.prompt, max_tokens, task.seed, task.temperature_milli,
                                                on_token, **run)
            except AemError as exc:
                failure = exc              # raised past the nursery, not inside an exception group
            finally:
                send.close()
        if failure is not None:
            raise failure
        return result.output_bytes, result.tokens_out

    # -- payer side ---------------------------------------------------------------

    async def submit(self, args: dict, emit: Emit) -> dict:
        node = self.env
        if args.get("training_use") is None:      # the task names none: this node's [training] use
            args = {**args, "training_use": self.training_use}
        task = build_task(node, args)
        now = node.now()
        # One spend key for the task; each host tried gets its own authorisation
        # for it (made out to that host, at its price), so only the host that
        # did the work can charge, and the ledger charges the key once.
        spend_key = os.urandom(32)
        ledger = await node.ledger(now)
        reputation = {h: router.Reputation(settled=s, challenged=v)
                      for h, (s, v) in ledger.receipt_record().items()}
        admitted = await self._routable_capsules(task)
        ranked = router.rank(list(node.mesh.ads.values()), task, cards=node.mesh.cards,
                             reputation=reputation, self_key=node.key.public, now=now,
                             locality=str(node.capacity.get("locality", "")), admitted=admitted, limit=None)
        node.hostbook.note_receipts({h: s for h, (s, _v) in ledger.receipt_record().items()})
        ranked = await routable(node, ranked, now)   # reachable and not backing off (hostbook)
        if not ranked:
            raise AemError(errors.NOT_FOUND, no_host_detail(node, task, now, admitted))
        funds = ledger.available(node.key.public)
        cheapest = min(c.price for _, c in ranked)
        if funds < cheapest:
            raise AemError(errors.REFUSED, f"not enough credits: {fmt_credits(funds)} available, "
                                           f"the cheapest host asks {fmt_credits(cheapest)}")
        candidates = tuple(c for _, c in ranked)
        attempts: list[Attempt] = []
        outcome, chosen, receipt, result = "all_failed", b"", None, None
        await emit({"event": "task", "task_id": task.id.hex(), "candidates": len(candidates)})
        # Receipts for this key wait until the task ends (or, should it never
        # return, until every attempt it could make has run out of time).
        self._open[spend_key] = (time.monotonic() + MAX_ATTEMPTS * (self._budget(task) + 60), [])
        for ad, cand in ranked[:MAX_ATTEMPTS]:
            t0 = time.monotonic()
            try:
                result = await self._attempt(ad, cand, task, spend_key, emit)
            except AemError as exc:
                node.hostbook.failed(ad.host, node.now(), timeout=exc.code == errors.TIMEOUT)
                ms = int((time.monotonic() - t0) * 1000)
                attempts.append(Attempt(host=ad.host, outcome=exc.code.lower()[:32], detail=exc.detail[:200],
                                        elapsed_ms=ms))
                await emit({"event": "attempt", "host": ad.host.hex(), "outcome": exc.code, "detail": exc.detail})
                continue
            node.hostbook.succeeded(ad.host, node.now())
            attempts.append(Attempt(host=ad.host, outcome="ok", detail="",
                                    elapsed_ms=int((time.monotonic() - t0) * 1000)))
            outcome, chosen, receipt = "ok", ad.host, result.receipt
            break
        else:
            outcome = "all_failed"
        # Every receipt for this key but the accepted one is disputed (§3 step 7).
        self._close_task(spend_key, receipt.id if receipt is not None else b"")
        trace = RouteTrace(net=node.net, router=node.key.public, task_id=task.id, candidates=candidates,
                           attempts=tuple(attempts), chosen=chosen, outcome=outcome,
                           receipt_id=receipt.id if receipt else b"", created_at=node.now(),
                           sig=b"").signed(node.key)
        # The distillation memory of a task that succeeded, with its trace (aemd/traces.py).
        memory = memory_of(task, receipt, result.output) if receipt is not None else None
        await trio.to_thread.run_sync(self.traces.put, trace, memory)
        self.env.metrics.tasks_routed.labels(outcome).inc()
        if receipt is None:
            last = attempts[-1] if attempts else None
            why = f" (last: {last.outcome.upper()}: {last.detail})" if last is not None else ""
            n = len(attempts)
            raise AemError(errors.UNAVAILABLE, f"{'the only host' if n == 1 else f'all {n} hosts'} failed{why}; "
                                               f"see `aemctl trace {task.id.hex()}`")
        ack = ReceiptAck(net=node.net, payer=node.key.public, receipt_id=receipt.id, accepted=True,
                         created_at=node.now(), sig=b"").signed(node.key)
        await node.append(ack)
        log.info("routed task %s  domain %s  host %s  %d tokens  price %s", task.id.hex()[:16], task.domain,
                 p2p.peer_id_from_public(receipt.host), result.tokens_out, fmt_credits(receipt.charge))
        return {
            "task_id": task.id.hex(), "host": receipt.host.hex(), "peer_id": p2p.peer_id_from_public(receipt.host),
            "price": receipt.charge, "receipt_id": receipt.id.hex(), "tokens_out": result.tokens_out,
            "output": result.output, "attempts": len(attempts), "capsule_id": receipt.capsule_id.hex(),
            "training_use": task.training_use, "host_training_use": receipt.training_use,
            "uses": [u.hex() for u in receipt.uses],
        }

    def _budget(self, task: TaskPacket) -> float:
        return task.latency_budget_ms / 1000 if task.latency_budget_ms else \
            float(self.cfg["llama"]["task_timeout_s"]) + 60

    def authorise(self, task: TaskPacket, spend_key: bytes, host: bytes, price: int) -> SpendAuthorization:
        """The authorisation for one host: only it may charge, at most its price."""
        return SpendAuthorization(net=self.env.net, payer=self.env.key.public, host=host,
                                  spend_key=spend_key, task_hash=task.id, max_charge=price,
                                  expires_at=self.env.now() + SPEND_AUTH_TTL_S, sig=b"").signed(self.env.key)

    async def _routable_capsules(self, task: TaskPacket) -> dict[bytes, bytes] | None:
        """Capsule id -> author of the capsules this task may go to, when the
        genesis sends ordinary traffic only to admitted experts (None: any).
        A task drawn into the probation share (by its id, so the draw is the
        same on every retry) may also go to candidates on probation."""
        params = self.env.admission_params
        if not params.admitted_only:
            return None
        state = await self.env.admission()
        allowed = dict(state.admitted())
        if params.probation_share_bp and int.from_bytes(task.id[:4], "big") % 10_000 < params.probation_share_bp:
            for cid, author in state.probation().items():
                allowed.setdefault(cid, author)
        return allowed

    async def _attempt(self, ad, cand, task: TaskPacket, spend_key: bytes, emit: Emit) -> TaskResult:
        node = self.env
        auth = self.authorise(task, spend_key, ad.host, cand.price)
        peer = p2p.peer_id_from_public(ad.host)
        if not node.p2p.is_connected(peer):
            card = node.mesh.cards.get(ad.host)
            for addr in (card.addrs if card else ()):
                with trio.move_on_after(10):
                    try:
                        await node.p2p.connect(addr if "/p2p/" in addr else f"{addr}/p2p/{peer}")
                        break
                    except AemError:
                        continue
        budget = self._budget(task)
        request = TaskRequest(capsule_id=ad.capsule_id, task=task, spend_auth=auth)
        # The payer session bounds each step: acceptance within seconds (a host
        # that takes the stream and never answers fails fast), the stream by
        # what the task allows; the task's budget bounds the whole attempt.
        with deadline(budget, "task"):
            async with self._host_slot(peer), node.p2p.stream(peer, self.proto) as stream:
                # A host that stops reading the request fails within the acceptance deadline too.
                return await drive(payer_session(node.net, request, budget), stream, _PayerCalls(emit),
                                   send_limit=lambda n: (accept_deadline(n), "task acceptance"))

    @asynccontextmanager
    async def _host_slot(self, peer: str):
        slot = self._host_slots.get(peer)
        if slot is None:
            slot = self._host_slots[peer] = [trio.Semaphore(self.env.p2p.config.max_streams_per_peer), 0]
        slot[1] += 1
        try:
            async with slot[0]:
                yield
        finally:
            slot[1] -= 1
            if slot[1] == 0:
                del self._host_slots[peer]      # bounded by the tasks in flight, not by hosts ever used

    # -- payer side: disputes (specs/task-protocol.md §3 step 7) ----------------------

    def note_entries(self, datas: list[bytes]) -> None:
        """The store's insert hook: pick out receipts that charge this node.
        Cheap (a byte search before any decoding); judged in _dispute_loop."""
        me = self.env.key.public
        for data in datas:
            if b"inference_receipt" not in data:
                continue
            try:
                e = Entry.decode(data)
                if e.kind != "inference_receipt":
                    continue
                r = InferenceWorkReceipt.decode(e.body)
            except AemError:
                continue
            if r.payer == me and e.author == r.host:
                self._judge(r)

    def _judge(self, r: InferenceWorkReceipt) -> None:
        key = r.spend_auth.spend_key
        waiting = self._open.get(key)
        if waiting is not None:                  # the task is still running: decide at its end
            if len(waiting[1]) < MAX_ATTEMPTS * 8:
                waiting[1].append(r)
            return
        if self._done.get(key) == r.id:          # the receipt this node accepted
            return
        self._queue_dispute(r)

    def _close_task(self, spend_key: bytes, accepted: bytes) -> None:
        """A task ended, with ``accepted`` the receipt id it accepted (b"" for
        none): every other receipt seen for its key is disputed."""
        waiting = self._open.pop(spend_key, None)
        self._done[spend_key] = accepted
        while len(self._done) > MAX_REMEMBERED_TASKS:
            self._done.pop(next(iter(self._done)))
        for r in to_dispute(list(waiting[1]) if waiting else [], accepted):
            self._queue_dispute(r)

    def _queue_dispute(self, r: InferenceWorkReceipt) -> None:
        try:
            self._disputes_in.send_nowait(r)
        except trio.WouldBlock:
            log.warning("dispute queue full: receipt %s not disputed", r.id.hex()[:16])

    async def _dispute_loop(self) -> None:
        """Dispute the queued receipts one by one; close tasks that never
        returned (their submit was cancelled) once they are out of time."""
        while True:
            r = None
            with trio.move_on_after(30):
                r = await self._disputes_out.receive()
            now = time.monotonic()
            for key, (until, _) in list(self._open.items()):
                if until < now:
                    self._close_task(key, b"")
            if r is not None:
                try:
                    await self.dispute(r)
                except AemError as exc:
                    log.warning("dispute of receipt %s: %s", r.id.hex()[:16], exc)

    async def dispute(self, r: InferenceWorkReceipt) -> bool:
        """Log a dispute of a receipt charging this node for work it never
        accepted, if the ledger will take it: a valid receipt, not
        acknowledged, not yet disputed, inside its challenge window."""
        node = self.env
        me, now = node.key.public, node.now()
        if r.payer != me or self._done.get(r.spend_auth.spend_key) == r.id:
            return False
        r.verify(node.net)
        if now >= max(r.finished_at, r.spend_auth.expires_at) + node.challenge_window:
            return False                          # the window is over: the ledger would refuse it
        ledger = await node.ledger(now)
        if ledger.acknowledged(r.id, me) or ledger.challenged(r.id):
            return False
        try:
            trace = await trio.to_thread.run_sync(self.traces.get, r.task_hash.hex())
        except AemError:
            trace = None
        if trace is not None and trace.receipt_id == r.id:
            # This node accepted that receipt and stopped (or crashed) before
            # logging its ack: the trace, written first, says so. Ack it now.
            await node.append(ReceiptAck(net=node.net, payer=me, receipt_id=r.id, accepted=True,
                                         created_at=now, sig=b"").signed(node.key))
            return False
        d = Dispute(net=node.net, payer=me, receipt_id=r.id, reason="work never received from this host",
                    created_at=now, sig=b"").signed(node.key)
        await node.append(d)
        log.info("disputed receipt %s of host %s (%s): no result accepted from it", r.id.hex()[:16],
                 p2p.peer_id_from_public(r.host), fmt_credits(r.charge))
        return True


async def routable(node: TaskEnv, ranked: list, now: int) -> list:
    """The ranked (ad, candidate) pairs a task may be tried on, in rank order,
    at most ``router.MAX_CANDIDATES``; ``ranked`` is the router's uncut list.

    Per ``specs/task-protocol.md`` §3 (routing): a host backing off after a
    failure or timeout is skipped (unless no other host is left: then only
    the one whose backoff ends first, so a lone host is never locked out by
    its own backoff); a host is ranked only if it is reachable, i.e. its peer
    is connected now or was connected or answered within the hostbook's
    window. The best-ranked hosts not known to be reachable are dialled first
    (at most ``MAX_PROBES``, in parallel, ``PROBE_TIMEOUT_S`` each); a failed
    dial is a failure in the hostbook. A host this node has banned is dropped. A card is only a claim; a connection
    is evidence that the key holder is at that address. Filtering comes
    before the cut, so any number of unreachable ads cannot push a reachable
    host out of the list.
    """
    book = node.hostbook
    # A host this node has banned is no candidate: the dial would fail here anyway.
    ranked = [(ad, c) for ad, c in ranked if not node.p2p.is_banned(p2p.peer_id_from_public(ad.host))]
    for host in {ad.host for ad, _ in ranked}:
        ago = node.p2p.seen_ago(p2p.peer_id_from_public(host))
        if ago is not None:                       # connected now, or until `ago` seconds ago
            book.reached(host, now - int(ago))
    ready, probe, skipped = book.usable([ad.host for ad, _ in ranked], now)

    async def dial(host: bytes) -> None:
        peer = p2p.peer_id_from_public(host)
        card = node.mesh.cards.get(host)
        with trio.move_on_after(PROBE_TIMEOUT_S):
            for addr in (card.addrs if card else ())[:4]:
                try:
                    await node.p2p.connect(addr if "/p2p/" in addr else f"{addr}/p2p/{peer}")
                    book.reached(host, node.now())
                    return
                except AemError:
                    continue
        book.failed(host, node.now())

    if probe:
        async with trio.open_nursery() as nursery:
            for host in probe[:MAX_PROBES]:
                nursery.start_soon(dial, host)
    ok = {h for h in ready} | {h for h in probe[:MAX_PROBES] if book.is_reachable(h, node.now())}
    out = [(ad, c) for ad, c in ranked if ad.host in ok][:router.MAX_CANDIDATES]
    if not out and skipped:
        soonest = min(skipped, key=book.retry_at)
        if book.is_reachable(soonest, now) or node.p2p.is_connected(p2p.peer_id_from_public(soonest)):
            out = [(ad, c) for ad, c in ranked if ad.host == soonest]
    if ranked and not out:
        wait = max(0, int(min((book.retry_at(h) for h in skipped), default=now) - now))
        raise AemError(errors.UNAVAILABLE,
                       f"{len(ranked)} hosts advertise this, none is reachable now "
                       f"({len(skipped)} backing off after failures"
                       f"{f', the first for {wait} s more' if skipped else ''}; "
                       f"{len(probe)} could not be dialled)")
    return out


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for e in exc.exceptions for leaf in _leaves(e)]
    return [exc]


def no_host_detail(node: TaskEnv, task: TaskPacket, now: int,
                   admitted: dict[bytes, bytes] | None = None) -> str:
    """Why no host qualifies, in credits: when hosts serve the task but all ask
    more than the task's max price, name the cheapest ask; when hosts serve
    it but none with an admitted capsule, say so."""
    what = f"no host in the mesh serves {task.kind} tasks in domain {task.domain!r}"
    serving = [ad for ad in node.mesh.ads.values()
               if ad.expires_at > now and ad.domain == task.domain and ad.kind == router.KIND_FOR_TASK[task.kind]
               and ad.host != node.key.public and set(task.tags) <= set(ad.tags)]
    if admitted is not None and serving and not any(admitted.get(ad.capsule_id) == ad.host for ad in serving):
        return (f"{what} with an admitted expert capsule ({len(serving)} host(s) serve capsules not admitted; "
                "`aemctl experts --status` shows why)")
    asks = [ad.price for ad in serving]
    if asks:
        return (f"{what} at a price up to {fmt_credits(task.max_price)} credits; "
                f"the cheapest asks {fmt_credits(min(asks))} (raise --max-price)")
    return f"{what}{' with tags ' + ', '.join(task.tags) if task.tags else ''}"


def _ram_mb() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1 << 20)


def _code_patch_runner(cap: LocalCapsule) -> tuple[str, Any]:
    """The judge (from the capsule's runner spec, its artefact) and the patch
    policy (from its manifest) a code-patch capsule runs tasks with. A
    capsule made before runner specs existed runs the tests, with no policy."""
    from aemd.codepatch_capsule import parse_runner_spec
    judge = "tests"
    if cap.serving.path:
        try:
            with open(cap.serving.path, "rb") as fh:
                judge = parse_runner_spec(fh.read(4096)).judge
        except OSError as exc:
            raise AemError(errors.UNAVAILABLE, f"the capsule's runner spec is unreadable: {exc.strerror}") from None
    policy = cap.manifest.patch_policy[0] if cap.manifest.patch_policy else None
    return judge, policy


def report_bytes(report) -> bytes:
    """The code-patch verifier report as the task's output: sorted JSON."""
    d = asdict(report)
    d = {k: (v.hex() if isinstance(v, bytes) else list(v) if isinstance(v, tuple) else v) for k, v in d.items()}
    return json.dumps(d, sort_keys=True, indent=1).encode()


def _arg(args: dict, name: str, want: type | tuple, default: Any) -> Any:
    """One control-socket argument, of the type the task needs (bool is not an int)."""
    v = args.get(name, default)
    if v is None:
        v = default
    if not isinstance(v, want) or (isinstance(v, bool) and bool not in (want if isinstance(want, tuple) else (want,))):
        names = " or ".join(t.__name__ for t in (want if isinstance(want, tuple) else (want,)))
        raise AemError(errors.BAD_TYPE, f"{name} must be {names}, not {type(v).__name__}")
    return v


def _str_list(args: dict, name: str, max_items: int) -> tuple[str, ...]:
    v = _arg(args, name, (list, tuple), ())
    if len(v) > max_items:
        raise AemError(errors.TOO_LARGE, f"{name}: more than {max_items} items")
    if not all(isinstance(x, str) for x in v):
        raise AemError(errors.BAD_TYPE, f"{name} must be a list of strings")
    return tuple(v)


def _messages(v: Any) -> tuple[ChatMessage, ...]:
    if not isinstance(v, (list, tuple)) or not v:
        raise AemError(errors.BAD_VALUE, "messages must be a non-empty list of {role, content}")
    if len(v) > MAX_MESSAGES:
        raise AemError(errors.TOO_LARGE, f"more than {MAX_MESSAGES} messages")
    out = []
    for i, m in enumerate(v):
        if not isinstance(m, dict):
            raise AemError(errors.BAD_TYPE, f"messages[{i}] must be a map with role and content")
        out.append(ChatMessage.from_map(m, f"messages[{i}]"))
    return tuple(out)


def build_task(node: TaskEnv, args: dict) -> TaskPacket:
    """A signed TaskPacket from control-socket arguments. Every argument is
    checked for type here (AemError, never a TypeError), values by the schema.

    Text tasks take ``prompt`` (a raw completion) or ``messages`` (a chat: a list
    of ``{"role": "system"|"user"|"assistant", "content": str}``), exactly one;
    ``kind`` may be left out for them. ``training_use`` ("allowed" or
    "forbidden", default forbidden) is the payer's policy for training on the
    task's prompt and output (specs/task-protocol.md §8)."""
    training_use = _arg(args, "training_use", str, TRAINING_DEFAULT)
    if training_use not in TRAINING_USES:
        raise AemError(errors.BAD_VALUE, "training_use must be allowed or forbidden")
    uses = _str_list(args, "uses", MAX_USES)
    if len(set(uses)) != len(uses) or not all(len(u) == 64 and all(c in "0123456789abcdef" for c in u)
                                              for u in uses):
        raise AemError(errors.BAD_VALUE, f"uses: at most {MAX_USES} distinct contribution commitments, 64 hex each")
    has_text = args.get("prompt") is not None or args.get("messages") is not None
    kind = args.get("kind", "text" if has_text else None)
    common = dict(net=node.net, payer=node.key.public, nonce=os.urandom(16),
                  domain=_arg(args, "domain", str, ""), tags=_str_list(args, "tags", 32),
                  max_price=_arg(args, "max_price", int, 0),
                  latency_budget_ms=_arg(args, "latency_budget_ms", int, 0), created_at=node.now(), sig=b"",
                  training_use=training_use, uses=tuple(bytes.fromhex(u) for u in uses))
    if kind == "text":
        prompt = _arg(args, "prompt", str, "")
        messages = args.get("messages")
        if bool(prompt) == (messages is not None):
            raise AemError(errors.BAD_VALUE, "a text task needs a prompt or messages (exactly one)")
        if prompt and len(prompt.encode("utf-8", "replace")) > MAX_PROMPT:
            raise AemError(errors.TOO_LARGE, "a text task needs a prompt of at most 64 KiB")
        t = TaskPacket(kind="text", prompt=prompt, messages=_messages(messages) if messages is not None else (),
                       max_tokens=_arg(args, "max_tokens", int, 128),
                       temperature_milli=_arg(args, "temperature_milli", int, 0), seed=_arg(args, "seed", int, 0),
                       repo_tar=b"", repo_hash=b"", patch="", test_cmd=(), **common)
    elif kind == "code_patch":
        for name in ("prompt", "messages"):
            if args.get(name) is not None:
                raise AemError(errors.BAD_VALUE, f"a code_patch task takes no {name}")
        repo = _arg(args, "repo_tar", bytes, b"")
        t = TaskPacket(kind="code_patch", prompt="", max_tokens=0, temperature_milli=0, seed=0,
                       repo_tar=repo, repo_hash=H(repo), patch=_arg(args, "patch", str, ""),
                       test_cmd=_str_list(args, "test_cmd", 64), **common)
    else:
        raise AemError(errors.BAD_VALUE, "kind must be text or code_patch")
    return t.signed(node.key)
