"""Tasks over the mesh: serving them (host side) and submitting them (payer
side), on the task stream protocol of specs/task-protocol.md.

Host: check the request (signatures, network, price, expiry, the payer's
replayed balance, the spend key unused) before any work; run the capsule's
executor off the event loop; stream output chunks; append the signed
InferenceWorkReceipt to its own log; answer with the output and the receipt.

Payer: build and sign the TaskPacket and one SpendAuthorization (one spend
key per task, reused on every retry, so the ledger charges at most once);
rank hosts; try them in order until one delivers a valid receipt; append a
ReceiptAck; record the RouteTrace.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import trio

from aemd import p2p, router
from aemd.capsules import LocalCapsule
from aemd.control import Emit
from aemd.framing import deadline, read_frame, write_frame
from crypto.hashing import H
from protocol import errors
from protocol.errors import AemError
from protocol.taskwire import (MAX_CHUNK, MAX_REPLY, TaskAccepted, TaskChunk, TaskRefused,
                               TaskRequest, TaskResult, decode_reply, task_protocol_id)
from protocol.task import (MAX_PROMPT, Attempt, InferenceWorkReceipt, ReceiptAck, RouteTrace,
                           SpendAuthorization, TaskPacket)

if TYPE_CHECKING:
    from aemd.node import Node

log = logging.getLogger("aemd.tasks")

SPEND_AUTH_TTL_S = 600          # a task must start within this; settlement waits for it too
REQUEST_READ_TIMEOUT_S = 30
ACCEPT_TIMEOUT_S = 60
MAX_ATTEMPTS = 8
CHUNK_GATHER_S = 0.03


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
        self.running = 0
        from aemd.traces import TraceStore
        self.traces = TraceStore(node.home.root / "traces.sqlite")

    # -- wiring ---------------------------------------------------------------

    def start(self, node: "Node", nursery: trio.Nursery) -> None:
        node.p2p.set_stream_handler(self.proto, self.serve, max_concurrent=64)

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
            return
        key = req.spend_auth.spend_key
        self._in_flight.add(key)
        self.running += 1
        self.node.load = min(100, 100 * self.running // max(1, cap.serving.max_concurrency))
        try:
            await write_frame(stream, TaskAccepted(price=price).encode())
            started = self.node.now()
            output, tokens = await self._execute(cap, req.task, stream)
            receipt = InferenceWorkReceipt(
                net=self.node.net, host=self.node.key.public, payer=req.task.payer,
                task_hash=req.task.id, capsule_id=cap.id, spend_auth=req.spend_auth, charge=price,
                output_hash=H(output), tokens_out=tokens, started_at=started,
                finished_at=max(started, self.node.now()), sig=b"").signed(self.node.key)
            # Log first: once the payer holds the receipt, the charge is on record.
            await self.node.append(receipt)
            await write_frame(stream, TaskResult(output=output, tokens_out=tokens, receipt=receipt).encode())
        finally:
            self._in_flight.discard(key)
            self.running -= 1
            self.node.load = min(100, 100 * self.running // max(1, cap.serving.max_concurrency))

    async def _admit(self, req: TaskRequest) -> tuple[LocalCapsule, int]:
        """Every check that can refuse a task, before any work is done."""
        node, task, auth = self.node, req.task, req.spend_auth
        now = node.now()
        task.verify(node.net)
        auth.verify(node.net, now=now)
        cap = next((c for c in node.capsules if c.id == req.capsule_id), None)
        if cap is None:
            raise AemError(errors.NOT_FOUND, "this node does not host that capsule")
        if cap.manifest.domain != task.domain or router.KIND_FOR_TASK[task.kind] != cap.manifest.kind:
            raise AemError(errors.REFUSED, "the capsule does not serve this kind of task")
        price = cap.serving.price
        if price > auth.max_charge or price > task.max_price:
            raise AemError(errors.REFUSED, f"price {price} exceeds what the payer authorised")
        if auth.spend_key in self._in_flight:
            raise AemError(errors.REFUSED, "this spend key is already being worked on here")
        ledger = await node.store.ledger(now)
        if ledger.spend_key_used(task.payer, auth.spend_key):
            raise AemError(errors.REFUSED, "this spend key has already been charged")
        funds = ledger.available(task.payer)
        if funds < price:
            raise AemError(errors.REFUSED, f"the payer has {funds} micro-credits available, the task costs {price}")
        return cap, price

    async def _executor(self, cap: LocalCapsule):
        async with self._load_lock:
            ex = self._executors.get(cap.id)
            if ex is None:
                from aemd.executors.llama import LlamaExecutor
                lc = self.cfg["llama"]
                ex = await trio.to_thread.run_sync(lambda: LlamaExecutor(
                    cap.serving.path, n_ctx=lc["n_ctx"], n_threads=lc["n_threads"] or None,
                    n_gpu_layers=lc["n_gpu_layers"]))
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
            async for piece in recv:
                buf = bytearray(piece.encode("utf-8", "replace"))
                with trio.move_on_after(CHUNK_GATHER_S):
                    while len(buf) < MAX_CHUNK // 2:
                        try:
                            buf += (await recv.receive()).encode("utf-8", "replace")
                        except trio.EndOfChannel:
                            break
                for i in range(0, len(buf), MAX_CHUNK):
                    await write_frame(stream, TaskChunk(data=bytes(buf[i:i + MAX_CHUNK])).encode())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(forward)
            try:
                result = await ex.agenerate(task.prompt, max_tokens, task.seed, task.temperature_milli,
                                            on_token, limiter=self._limiter(cap),
                                            timeout_s=float(lc["task_timeout_s"]))
            finally:
                send.close()
        return result.output_bytes, result.tokens_out

    # -- payer side ---------------------------------------------------------------

    async def submit(self, args: dict, emit: Emit) -> dict:
        node = self.node
        task = build_task(node, args)
        now = node.now()
        auth = SpendAuthorization(net=node.net, payer=node.key.public, spend_key=os.urandom(32),
                                  task_hash=task.id, max_charge=task.max_price,
                                  expires_at=now + SPEND_AUTH_TTL_S, sig=b"").signed(node.key)
        ledger = await node.store.ledger(now)
        reputation = {h: router.Reputation(settled=s, challenged=v)
                      for h, (s, v) in ledger.receipt_record().items()}
        ranked = router.rank(list(node.mesh.ads.values()), task, cards=node.mesh.cards,
                             reputation=reputation, self_key=node.key.public, now=now,
                             locality=str(node.opts.capacity.get("locality", "")))
        if not ranked:
            raise AemError(errors.NOT_FOUND,
                           f"no host in the mesh serves {task.kind} tasks in domain {task.domain!r}"
                           f" at a price up to {task.max_price}")
        funds = ledger.available(node.key.public)
        cheapest = min(c.price for _, c in ranked)
        if funds < cheapest:
            raise AemError(errors.REFUSED, f"not enough credits: {funds} micro-credits available, "
                                           f"the cheapest host asks {cheapest}")
        candidates = tuple(c for _, c in ranked)
        attempts: list[Attempt] = []
        outcome, chosen, receipt, result = "all_failed", b"", None, None
        await emit({"event": "task", "task_id": task.id.hex(), "candidates": len(candidates)})
        for ad, cand in ranked[:MAX_ATTEMPTS]:
            t0 = time.monotonic()
            try:
                result = await self._attempt(ad, task, auth, emit)
            except AemError as exc:
                ms = int((time.monotonic() - t0) * 1000)
                attempts.append(Attempt(host=ad.host, outcome=exc.code.lower()[:32], detail=exc.detail[:200],
                                        elapsed_ms=ms))
                await emit({"event": "attempt", "host": ad.host.hex(), "outcome": exc.code, "detail": exc.detail})
                continue
            attempts.append(Attempt(host=ad.host, outcome="ok", detail="",
                                    elapsed_ms=int((time.monotonic() - t0) * 1000)))
            outcome, chosen, receipt = "ok", ad.host, result.receipt
            break
        else:
            outcome = "all_failed"
        trace = RouteTrace(net=node.net, router=node.key.public, task_id=task.id, candidates=candidates,
                           attempts=tuple(attempts), chosen=chosen, outcome=outcome,
                           receipt_id=receipt.id if receipt else b"", created_at=node.now(),
                           sig=b"").signed(node.key)
        await trio.to_thread.run_sync(self.traces.put, trace)
        if receipt is None:
            raise AemError(errors.UNAVAILABLE,
                           f"all {len(attempts)} hosts failed; see `aemctl trace {task.id.hex()}`")
        ack = ReceiptAck(net=node.net, payer=node.key.public, receipt_id=receipt.id, accepted=True,
                         created_at=node.now(), sig=b"").signed(node.key)
        await node.append(ack)
        return {
            "task_id": task.id.hex(), "host": receipt.host.hex(), "peer_id": p2p.peer_id_from_public(receipt.host),
            "price": receipt.charge, "receipt_id": receipt.id.hex(), "tokens_out": result.tokens_out,
            "output": result.output, "attempts": len(attempts),
        }

    async def _attempt(self, ad, task: TaskPacket, auth: SpendAuthorization, emit: Emit) -> TaskResult:
        node = self.node
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
        budget = task.latency_budget_ms / 1000 if task.latency_budget_ms else \
            float(self.cfg["llama"]["task_timeout_s"]) + 60
        with deadline(budget, "task"):
            async with node.p2p.stream(peer, self.proto) as stream:
                await write_frame(stream, TaskRequest(capsule_id=ad.capsule_id, task=task,
                                                      spend_auth=auth).encode())
                with deadline(ACCEPT_TIMEOUT_S, "task acceptance"):
                    first = decode_reply(await read_frame(stream, MAX_REPLY))
                if isinstance(first, TaskRefused):
                    raise AemError(first.code if first.code else errors.REFUSED, first.detail)
                if not isinstance(first, TaskAccepted):
                    raise AemError(errors.WRONG_OBJECT, "host did not accept or refuse")
                chunks = 0
                while True:
                    msg = decode_reply(await read_frame(stream, MAX_REPLY))
                    if isinstance(msg, TaskChunk):
                        chunks += 1
                        if chunks <= 100_000:
                            await emit({"event": "chunk", "data": msg.data})
                        continue
                    if isinstance(msg, TaskResult):
                        check_result(msg, node.net, ad.host, task, auth)
                        return msg
                    raise AemError(errors.WRONG_OBJECT, f"unexpected {msg.TYPE} from the host")


def _ram_mb() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1 << 20)


def check_result(res: TaskResult, net: bytes, host: bytes, task: TaskPacket, auth: SpendAuthorization) -> None:
    """A result is only accepted with a receipt that proves what it claims."""
    r = res.receipt
    r.verify(net)
    if r.host != host or r.task_hash != task.id or r.spend_auth != auth:
        raise AemError(errors.BAD_VALUE, "receipt is for another host, task or authorisation")
    if r.output_hash != H(res.output):
        raise AemError(errors.BAD_VALUE, "receipt does not match the output")
    if r.charge > auth.max_charge:
        raise AemError(errors.BAD_VALUE, "receipt charges more than authorised")


def report_bytes(report) -> bytes:
    """The code-patch verifier report as the task's output: sorted JSON."""
    d = asdict(report)
    d = {k: (v.hex() if isinstance(v, bytes) else list(v) if isinstance(v, tuple) else v) for k, v in d.items()}
    return json.dumps(d, sort_keys=True, indent=1).encode()


def build_task(node: "Node", args: dict) -> TaskPacket:
    """A signed TaskPacket from control-socket arguments (validated by the schema)."""
    kind = args.get("kind")
    common = dict(net=node.net, payer=node.key.public, nonce=os.urandom(16), domain=args.get("domain", ""),
                  tags=tuple(args.get("tags") or ()), max_price=args.get("max_price", 0),
                  latency_budget_ms=args.get("latency_budget_ms", 0), created_at=node.now(), sig=b"")
    if kind == "text":
        prompt = args.get("prompt", "")
        if not isinstance(prompt, str) or not prompt or len(prompt.encode("utf-8", "replace")) > MAX_PROMPT:
            raise AemError(errors.BAD_VALUE, "a text task needs a prompt of at most 64 KiB")
        t = TaskPacket(kind="text", prompt=prompt, max_tokens=args.get("max_tokens", 128),
                       temperature_milli=args.get("temperature_milli", 0), seed=args.get("seed", 0),
                       repo_tar=b"", repo_hash=b"", patch="", test_cmd=(), **common)
    elif kind == "code_patch":
        repo = args.get("repo_tar", b"")
        if not isinstance(repo, bytes):
            raise AemError(errors.BAD_TYPE, "repo_tar must be bytes")
        t = TaskPacket(kind="code_patch", prompt="", max_tokens=0, temperature_milli=0, seed=0,
                       repo_tar=repo, repo_hash=H(repo), patch=args.get("patch", ""),
                       test_cmd=tuple(args.get("test_cmd") or ()), **common)
    else:
        raise AemError(errors.BAD_VALUE, "kind must be text or code_patch")
    return t.signed(node.key)
