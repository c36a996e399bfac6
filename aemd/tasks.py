"""Tasks over the mesh: serving them (host side) and submitting them (payer
side), on the task stream protocol of specs/task-protocol.md.

Host: check the request (signatures, network, the authorisation made out to
this host, price, expiry, the payer's replayed balance less what its tasks in
progress here hold, the spend key unused, no dispute of this host by the
payer) and reserve the price, in one step, before any work; run the capsule's
executor off the event loop; stream output chunks; append the signed
InferenceWorkReceipt to its own log; answer with the output and the receipt.

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
from typing import TYPE_CHECKING, Any

import trio

from aemd import p2p, router
from aemd.capsules import LocalCapsule
from aemd.cliutil import fmt_credits
from aemd.control import Emit
from aemd.framing import deadline, read_frame, write_frame
from crypto.hashing import H
from protocol import errors
from protocol.errors import AemError
from protocol.entry import Entry
from protocol.receipts import Dispute
from protocol.taskwire import (MAX_CHUNK, MAX_OUTPUT, MAX_REPLY, TaskAccepted, TaskChunk, TaskFailed, TaskRefused,
                               TaskRequest, TaskResult, decode_reply, task_protocol_id)
from protocol.task import (MAX_MESSAGES, MAX_PROMPT, MAX_TOKENS, Attempt, ChatMessage, InferenceWorkReceipt, ReceiptAck,
                           RouteTrace, SpendAuthorization, TaskPacket, UTF8_TAIL_TOKENS)

if TYPE_CHECKING:
    from aemd.node import Node

log = logging.getLogger("aemd.tasks")

SPEND_AUTH_TTL_S = 600          # a task must start within this; settlement waits for it too
REQUEST_READ_TIMEOUT_S = 30
ACCEPT_BASE_S = 10              # write the request, admission checks, the answer
ACCEPT_MIN_BYTES_PER_S = 128 * 1024   # a request's transfer at no less than ~1 Mbit/s
PROBE_TIMEOUT_S = 5             # dialling a host nobody has reached yet
MAX_PROBES = 16              # dials per task to hosts not yet reached (parallel)
MAX_ATTEMPTS = 8
CHUNK_GATHER_S = 0.03
# Payer-side bounds on what a host may stream for one task (specs/task-protocol.md §3).
MAX_TOKEN_BYTES = 256           # bytes of chunk data per token the task allows
CHUNK_SLACK = 16                # chunks beyond one per token (a host may flush a partial frame)
CODE_PATCH_CHUNKS = 64          # a code-patch report is 1 MiB at most, 16 KiB a chunk
MAX_FORWARDED_CHUNKS = 4096     # chunk events passed to the control client per task
# Payer-side disputes (specs/task-protocol.md §3 step 7).
MAX_DISPUTE_QUEUE = 1024        # receipts waiting to be judged; more are dropped (and logged)
MAX_REMEMBERED_TASKS = 10_000   # finished tasks whose accepted receipt the node keeps in memory


class TaskService:
    """Everything task-related a node holds: executors, limits, traces."""

    def __init__(self, node: "Node", cfg: dict) -> None:
        self.node = node
        self.cfg = cfg
        self.proto = task_protocol_id(node.net)
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
        from aemd.traces import TraceStore
        self.traces = TraceStore(node.home.root / "traces.sqlite")

    # -- wiring ---------------------------------------------------------------

    def start(self, node: "Node", nursery: trio.Nursery) -> None:
        node.p2p.set_stream_handler(self.proto, self.serve, max_concurrent=64)
        node.store.on_insert = self.note_entries
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
        with deadline(REQUEST_READ_TIMEOUT_S, "task request"):
            req = TaskRequest.decode(await read_frame(stream, TaskRequest.MAX_SIZE))
        try:
            cap, price = await self._admit(req)
        except AemError as exc:
            await write_frame(stream, TaskRefused(code=exc.code, detail=exc.detail[:200]).encode())
            self.node.metrics.tasks_refused.inc()
            return
        key, payer = req.spend_auth.spend_key, req.task.payer
        reserved = True        # _admit reserved the price and the spend key
        self.running += 1
        self.node.load = min(100, 100 * self.running // max(1, cap.serving.max_concurrency))
        try:
            await write_frame(stream, TaskAccepted(price=price).encode())
            started = self.node.now()
            try:
                if req.task.kind == "text":
                    await self._executor(cap)      # a first task's model load is not its tokens/s
                t0 = time.monotonic()
                output, tokens = await self._execute(cap, req.task, stream)
                if req.task.kind == "text" and not output:
                    # Nothing to deliver, so nothing to charge (specs/task-protocol.md §6).
                    raise AemError(errors.UNAVAILABLE, "the model produced no output (0 tokens); "
                                                       "nothing is charged")
            except Exception as exc:          # a failed capsule must not look like a dead host
                await self._fail(stream, req.task, exc)
                return
            receipt = InferenceWorkReceipt(
                net=self.node.net, host=self.node.key.public, payer=req.task.payer,
                task_hash=req.task.id, capsule_id=cap.id, spend_auth=req.spend_auth, charge=price,
                output_hash=H(output), tokens_out=tokens, started_at=started,
                finished_at=max(started, self.node.now()), sig=b"").signed(self.node.key)
            # Log first: once the payer holds the receipt, the charge is on record.
            await self.node.append(receipt)
            await self._release(payer, key, price)   # the replay holds the charge from now on
            reserved = False
            await write_frame(stream, TaskResult(output=output, tokens_out=tokens, receipt=receipt).encode())
            self.node.metrics.task_served(tokens, price)
            secs = max(1e-6, time.monotonic() - t0)
            log.info("served task %s  domain %s  %d tokens in %.2f s (%.1f tokens/s)  price %s",
                     req.task.id.hex()[:16], req.task.domain, tokens, secs, tokens / secs, fmt_credits(price))
        finally:
            if reserved:
                await self._release(payer, key, price)
            self.running -= 1
            self.node.load = min(100, 100 * self.running // max(1, cap.serving.max_concurrency))

    async def _fail(self, stream, task: TaskPacket, exc: Exception) -> None:
        """Tell the payer why accepted work failed (task_failed: no receipt, no
        charge), so it reads the host's reason rather than a closed stream."""
        transport = (trio.BrokenResourceError, trio.ClosedResourceError, AemError)
        if isinstance(exc, AemError):
            code, detail = exc.code, exc.detail
        elif isinstance(exc, BaseExceptionGroup) and all(isinstance(e, transport) for e in _leaves(exc)):
            # Only the stream failed (the executor's own errors are raised outside
            # the output nursery): the payer went away, there is no one to tell.
            log.info("task %s  domain %s: the payer went away", task.id.hex()[:16], task.domain)
            return
        else:
            log.error("task %s: the executor failed", task.id.hex()[:16], exc_info=exc)
            code, detail = errors.UNAVAILABLE, f"the host's executor failed ({type(exc).__name__})"
        log.warning("task %s  domain %s  failed: %s: %s", task.id.hex()[:16], task.domain, code, detail)
        self.node.metrics.tasks_failed.inc()
        try:
            await write_frame(stream, TaskFailed(code=code[:32], detail=detail[:200]).encode())
        except (AemError, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass                              # the payer is gone; there is no one to tell

    async def _admit(self, req: TaskRequest) -> tuple[LocalCapsule, int]:
        """Every check that can refuse a task, before any work is done; on
        success the task's price is reserved against the payer's balance and
        its spend key marked in progress, until :meth:`_release`."""
        node, task, auth = self.node, req.task, req.spend_auth
        now = node.now()
        task.verify(node.net)
        auth.verify(node.net, now=now)
        if auth.host != node.key.public:
            raise AemError(errors.REFUSED, "the spend authorisation is made out to another host")
        cap = next((c for c in node.capsules if c.id == req.capsule_id), None)
        if cap is None:
            raise AemError(errors.NOT_FOUND, "this node does not host that capsule")
        if cap.manifest.domain != task.domain or router.KIND_FOR_TASK[task.kind] != cap.manifest.kind:
            raise AemError(errors.REFUSED, "the capsule does not serve this kind of task")
        price = cap.serving.price
        if price > auth.max_charge or price > task.max_price:
            raise AemError(errors.REFUSED, f"price {fmt_credits(price)} exceeds what the payer authorised")
        # One admission at a time, from the replay to the reservation: two
        # requests arriving together can never both pass on the same funds or
        # the same spend key (specs/task-protocol.md §2).
        async with self._admission:
            if auth.spend_key in self._in_flight:
                raise AemError(errors.REFUSED, "this spend key is already being worked on here")
            ledger = await node.store.ledger(now)
            if ledger.spend_key_blocks(task.payer, auth.spend_key, node.key.public):
                raise AemError(errors.REFUSED, "this spend key has already been charged")
            disputed = ledger.disputes(task.payer, node.key.public)
            if disputed:
                raise AemError(errors.REFUSED, f"this payer disputed {disputed} of this host's receipts")
            reserved = self._reserved.get(task.payer, 0)
            funds = ledger.available(task.payer) - reserved
            if funds < price:
                held = f" ({fmt_credits(reserved)} held by its tasks in progress here)" if reserved else ""
                raise AemError(errors.REFUSED, f"the payer has {fmt_credits(max(0, funds))} credits available"
                                               f"{held}, the task costs {fmt_credits(price)}")
            self._in_flight.add(auth.spend_key)
            self._reserved[task.payer] = reserved + price
        return cap, price

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
                    n_gpu_layers=self.node.gpu_layers_for(cap)))   # "auto" resolved, what runs recorded
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
            capacity = self.node.opts.capacity
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
            report = await arun_code_patch(task.repo_tar, task.patch, task.test_cmd, limits=limits,
                                           limiter=self._limiter(cap))
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
        node = self.node
        task = build_task(node, args)
        now = node.now()
        # One spend key for the task; each host tried gets its own authorisation
        # for it (made out to that host, at its price), so only the host that
        # did the work can charge, and the ledger charges the key once.
        spend_key = os.urandom(32)
        ledger = await node.store.ledger(now)
        reputation = {h: router.Reputation(settled=s, challenged=v)
                      for h, (s, v) in ledger.receipt_record().items()}
        ranked = router.rank(list(node.mesh.ads.values()), task, cards=node.mesh.cards,
                             reputation=reputation, self_key=node.key.public, now=now,
                             locality=str(node.opts.capacity.get("locality", "")), limit=None)
        node.hostbook.note_receipts({h: s for h, (s, _v) in ledger.receipt_record().items()})
        ranked = await routable(node, ranked, now)   # reachable and not backing off (hostbook)
        if not ranked:
            raise AemError(errors.NOT_FOUND, no_host_detail(node, task, now))
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
        await trio.to_thread.run_sync(self.traces.put, trace)
        self.node.metrics.tasks_routed.labels(outcome).inc()
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
            "output": result.output, "attempts": len(attempts),
        }

    def _budget(self, task: TaskPacket) -> float:
        return task.latency_budget_ms / 1000 if task.latency_budget_ms else \
            float(self.cfg["llama"]["task_timeout_s"]) + 60

    def authorise(self, task: TaskPacket, spend_key: bytes, host: bytes, price: int) -> SpendAuthorization:
        """The authorisation for one host: only it may charge, at most its price."""
        return SpendAuthorization(net=self.node.net, payer=self.node.key.public, host=host,
                                  spend_key=spend_key, task_hash=task.id, max_charge=price,
                                  expires_at=self.node.now() + SPEND_AUTH_TTL_S, sig=b"").signed(self.node.key)

    async def _attempt(self, ad, cand, task: TaskPacket, spend_key: bytes, emit: Emit) -> TaskResult:
        node = self.node
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
        max_bytes, max_chunks = output_bound(task)
        with deadline(budget, "task"):
            async with self._host_slot(peer), node.p2p.stream(peer, self.proto) as stream:
                request = TaskRequest(capsule_id=ad.capsule_id, task=task, spend_auth=auth).encode()
                # Admission is quick checks; only the request's transfer grows with the task.
                # A host that takes the stream and never answers fails in seconds, not minutes.
                with deadline(accept_deadline(len(request)), "task acceptance"):
                    await write_frame(stream, request)
                    first = decode_reply(await read_frame(stream, MAX_REPLY))
                if isinstance(first, TaskRefused):
                    raise AemError(first.code if first.code else errors.REFUSED, first.detail)
                if not isinstance(first, TaskAccepted):
                    raise AemError(errors.WRONG_OBJECT, "host did not accept or refuse")
                if first.price > auth.max_charge:
                    raise AemError(errors.REFUSED, f"host accepted at {fmt_credits(first.price)}, more than "
                                                   f"its authorised {fmt_credits(auth.max_charge)}")
                chunks = nbytes = 0
                while True:
                    msg = decode_reply(await read_frame(stream, MAX_REPLY))
                    if isinstance(msg, TaskChunk):
                        chunks += 1
                        nbytes += len(msg.data)
                        if chunks > max_chunks or nbytes > max_bytes:
                            # A host streaming without end gets cut off, not read for minutes.
                            raise AemError(errors.TOO_LARGE, f"host streamed more than the task allows "
                                                             f"({max_chunks} chunks, {max_bytes} bytes)")
                        if chunks <= MAX_FORWARDED_CHUNKS:
                            await emit({"event": "chunk", "data": msg.data})
                        continue
                    if isinstance(msg, TaskFailed):       # the host's own reason; nothing charged
                        raise AemError(msg.code or errors.UNAVAILABLE, msg.detail)
                    if isinstance(msg, TaskResult):
                        check_result(msg, node.net, ad.host, task, auth, accepted_price=first.price)
                        return msg
                    raise AemError(errors.WRONG_OBJECT, f"unexpected {msg.TYPE} from the host")


    @asynccontextmanager
    async def _host_slot(self, peer: str):
        slot = self._host_slots.get(peer)
        if slot is None:
            slot = self._host_slots[peer] = [trio.Semaphore(self.node.p2p.config.max_streams_per_peer), 0]
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
        me = self.node.key.public
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
        for r in (waiting[1] if waiting else ()):
            if r.id != accepted:
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
        node = self.node
        me, now = node.key.public, node.now()
        if r.payer != me or self._done.get(r.spend_auth.spend_key) == r.id:
            return False
        r.verify(node.net)
        if now >= max(r.finished_at, r.spend_auth.expires_at) + node.genesis.challenge_window:
            return False                          # the window is over: the ledger would refuse it
        ledger = await node.store.ledger(now)
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


def accept_deadline(request_bytes: int) -> float:
    """Seconds a host has to accept or refuse a task request of this size."""
    return ACCEPT_BASE_S + request_bytes / ACCEPT_MIN_BYTES_PER_S


async def routable(node: "Node", ranked: list, now: int) -> list:
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


def no_host_detail(node: "Node", task: TaskPacket, now: int) -> str:
    """Why no host qualifies, in credits: when hosts serve the task but all ask
    more than the task's max price, name the cheapest ask."""
    what = f"no host in the mesh serves {task.kind} tasks in domain {task.domain!r}"
    asks = [ad.price for ad in node.mesh.ads.values()
            if ad.expires_at > now and ad.domain == task.domain and ad.kind == router.KIND_FOR_TASK[task.kind]
            and ad.host != node.key.public and set(task.tags) <= set(ad.tags)]
    if asks:
        return (f"{what} at a price up to {fmt_credits(task.max_price)} credits; "
                f"the cheapest asks {fmt_credits(min(asks))} (raise --max-price)")
    return f"{what}{' with tags ' + ', '.join(task.tags) if task.tags else ''}"


def _ram_mb() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1 << 20)


def check_result(res: TaskResult, net: bytes, host: bytes, task: TaskPacket, auth: SpendAuthorization,
                 accepted_price: int) -> None:
    """A result is only accepted with a receipt that proves what it claims,
    charging no more than the price the host accepted the task at. A result
    refused here is never acknowledged (specs/task-protocol.md §3)."""
    r = res.receipt
    r.verify(net)
    if r.host != host or r.task_hash != task.id or r.spend_auth != auth:
        raise AemError(errors.BAD_VALUE, "receipt is for another host, task or authorisation")
    if r.output_hash != H(res.output):
        raise AemError(errors.BAD_VALUE, "receipt does not match the output")
    if r.charge > auth.max_charge or r.charge > accepted_price:
        raise AemError(errors.BAD_VALUE, f"receipt charges {fmt_credits(r.charge)}, the host accepted the task "
                                         f"at {fmt_credits(accepted_price)}")
    if task.kind == "text" and max(res.tokens_out, r.tokens_out) > (task.max_tokens or MAX_TOKENS) + UTF8_TAIL_TOKENS:
        raise AemError(errors.BAD_VALUE, "the host reports more tokens than the task allows")


def output_bound(task: TaskPacket) -> tuple[int, int]:
    """(bytes, chunks) of streamed output a host may send for ``task``: the
    task's own max_tokens for a text task, the protocol's output limit for
    either kind (specs/task-protocol.md §3)."""
    if task.kind == "text":
        tokens = task.max_tokens or MAX_TOKENS
        return min(MAX_TOKEN_BYTES * tokens, MAX_OUTPUT), tokens + CHUNK_SLACK
    return MAX_OUTPUT, CODE_PATCH_CHUNKS


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


def build_task(node: "Node", args: dict) -> TaskPacket:
    """A signed TaskPacket from control-socket arguments. Every argument is
    checked for type here (AemError, never a TypeError), values by the schema.

    Text tasks take ``prompt`` (a raw completion) or ``messages`` (a chat: a list
    of ``{"role": "system"|"user"|"assistant", "content": str}``), exactly one;
    ``kind`` may be left out for them."""
    has_text = args.get("prompt") is not None or args.get("messages") is not None
    kind = args.get("kind", "text" if has_text else None)
    common = dict(net=node.net, payer=node.key.public, nonce=os.urandom(16),
                  domain=_arg(args, "domain", str, ""), tags=_str_list(args, "tags", 32),
                  max_price=_arg(args, "max_price", int, 0),
                  latency_budget_ms=_arg(args, "latency_budget_ms", int, 0), created_at=node.now(), sig=b"")
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
