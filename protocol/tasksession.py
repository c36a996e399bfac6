"""The task stream's two ends as sans-I/O sessions (protocol/session.py):
``host_session`` serves one task stream, ``payer_session`` is one attempt of
a payer on one host (specs/task-protocol.md §2, §3, "Session vectors").

Every decision of the protocol is made here: what a request may weigh, the
host's admission checks (signatures, the authorisation naming this host,
capsule, price, spend key, disputes, funds less reservations), when accepted
work counts as failed, the receipt, and on the payer's side the bounds on
what a host may stream and whether its result is accepted. The shell
(``aemd/tasks.py``) answers the ``Call``\\s: it holds the log, the clock, the
executors and the metrics. The host's ``Call`` ops, in the order a served
task uses them:

* ``now()`` -> int: the clock (admission time, then start and end of work).
* ``capsule(capsule_id)`` -> :class:`Offer` | None: what this host serves.
* ``admission(payer, spend_key)`` -> :class:`AdmissionFacts`: the replay's
  facts for the payer. The shell takes its admission lock here and holds it
  until ``reserve`` or ``refused``: the facts and the reservation are one
  atomic step (specs/task-protocol.md §2).
* ``reserve(payer, spend_key, price)`` -> None: hold the price and the key.
* ``refused(code, detail)`` -> None: the request is refused (and the lock,
  if held, released); the session then sends ``task_refused``.
* ``execute(capsule_id, task)`` -> :class:`Ran` | :class:`RunFailed` |
  :class:`PayerGone`: run the work. The shell streams the ``chunk`` frames
  itself while it runs: their gathering is a matter of timing (tokens
  arriving from a thread within a few milliseconds go out as one frame),
  which a pure session cannot see; what the payer accepts of them is decided
  in ``payer_session``.
* ``failed(code, detail)`` -> None: accepted work failed; ``task_failed`` follows.
* ``append_receipt(receipt)`` -> None: log the signed receipt (and end the
  reservation: the replay holds the charge from then on), before the result
  is sent, so a payer never holds a receipt its host has not logged.

The payer's single op is ``chunk(data)`` -> None: forward streamed output to
the control client (at most ``MAX_FORWARDED_CHUNKS`` per attempt).
"""

from __future__ import annotations

from dataclasses import dataclass

from crypto.hashing import H
from protocol import errors
from protocol.errors import AemError
from protocol.session import Call, Recv, Send, Session
from protocol.task import (MAX_TOKENS, TRAINING_DEFAULT, UTF8_TAIL_TOKENS, InferenceWorkReceipt, SpendAuthorization,
                           TaskPacket)
from protocol.taskwire import (MAX_OUTPUT, MAX_REPLY, TaskAccepted, TaskChunk, TaskFailed, TaskRefused, TaskRequest,
                               TaskResult, decode_reply)

KIND_FOR_TASK = {"text": "gguf", "code_patch": "code_patch"}   # the capsule kind a task kind needs
REQUEST_READ_TIMEOUT_S = 30
ACCEPT_BASE_S = 10              # write the request, admission checks, the answer
ACCEPT_MIN_BYTES_PER_S = 128 * 1024   # a request's transfer at no less than ~1 Mbit/s
# Payer-side bounds on what a host may stream for one task (specs/task-protocol.md §3).
MAX_TOKEN_BYTES = 256           # bytes of chunk data per token the task allows
CHUNK_SLACK = 16                # chunks beyond one per token (a host may flush a partial frame)
CODE_PATCH_CHUNKS = 64          # a code-patch report is 1 MiB at most, 16 KiB a chunk
MAX_FORWARDED_CHUNKS = 4096     # chunk events passed to the control client per task
MAX_DETAIL = 200                # characters of a reason sent in task_refused / task_failed


@dataclass(frozen=True, slots=True)
class Offer:
    """What the host serves under a capsule id (the ``capsule`` Call)."""
    domain: str
    kind: str
    price: int


@dataclass(frozen=True, slots=True)
class AdmissionFacts:
    """The host's replay of its log for one payer and spend key, and its own
    bookkeeping of tasks in progress (the ``admission`` Call)."""
    in_flight: bool      # the spend key is being worked on here now
    charged: bool        # the replay blocks the spend key for this host (ledger.spend_key_blocks)
    disputed: int        # receipts of this host the payer disputed
    available: int       # the payer's available balance by the replay
    reserved: int        # prices of the payer's tasks in progress here


@dataclass(frozen=True, slots=True)
class Ran:
    output: bytes
    tokens: int


@dataclass(frozen=True, slots=True)
class RunFailed:
    code: str
    detail: str


@dataclass(frozen=True, slots=True)
class PayerGone:
    """Only the stream failed while the work ran: nobody is left to tell."""


@dataclass(frozen=True, slots=True)
class HostOutcome:
    status: str          # served, refused, failed, gone, closed
    code: str = ""
    detail: str = ""
    price: int = 0
    tokens: int = 0


def fmt_credits(micro: int) -> str:
    """Micro-credits as a decimal number of credits, exact (as aemctl prints them)."""
    sign = "-" if micro < 0 else ""
    whole, frac = divmod(abs(micro), 1_000_000)
    return f"{sign}{whole}.{frac:06d}"


def accept_deadline(request_bytes: int) -> float:
    """Seconds a host has to accept or refuse a task request of this size."""
    return ACCEPT_BASE_S + request_bytes / ACCEPT_MIN_BYTES_PER_S


def output_bound(task: TaskPacket) -> tuple[int, int]:
    """(bytes, chunks) of streamed output a host may send for ``task``: the
    task's own max_tokens for a text task, the protocol's output limit for
    either kind (specs/task-protocol.md §3)."""
    if task.kind == "text":
        tokens = task.max_tokens or MAX_TOKENS
        return min(MAX_TOKEN_BYTES * tokens, MAX_OUTPUT), tokens + CHUNK_SLACK
    return MAX_OUTPUT, CODE_PATCH_CHUNKS


# -- host ---------------------------------------------------------------------


def judge_funds(facts: AdmissionFacts, price: int) -> None:
    """Step 4 of specs/task-protocol.md §2 on the replay's facts: raise the
    refusal, or return when the task may be reserved."""
    if facts.in_flight:
        raise AemError(errors.REFUSED, "this spend key is already being worked on here")
    if facts.charged:
        raise AemError(errors.REFUSED, "this spend key has already been charged")
    if facts.disputed:
        raise AemError(errors.REFUSED, f"this payer disputed {facts.disputed} of this host's receipts")
    funds = facts.available - facts.reserved
    if funds < price:
        held = f" ({fmt_credits(facts.reserved)} held by its tasks in progress here)" if facts.reserved else ""
        raise AemError(errors.REFUSED, f"the payer has {fmt_credits(max(0, funds))} credits available"
                                       f"{held}, the task costs {fmt_credits(price)}")


def admit(net: bytes, host: bytes, req: TaskRequest, now: int) -> Session:
    """Every check that can refuse a task, before any work is done; returns
    the price, reserved (``reserve``) against the payer's balance with its
    spend key marked in progress. Raises the refusal as ``AemError``; the
    caller must then yield ``refused`` (which ends the admission lock)."""
    task, auth = req.task, req.spend_auth
    task.verify(net)
    auth.verify(net, now=now)
    if auth.host != host:
        raise AemError(errors.REFUSED, "the spend authorisation is made out to another host")
    offer = yield Call("capsule", (req.capsule_id,))
    if offer is None:
        raise AemError(errors.NOT_FOUND, "this node does not host that capsule")
    if offer.domain != task.domain or KIND_FOR_TASK[task.kind] != offer.kind:
        raise AemError(errors.REFUSED, "the capsule does not serve this kind of task")
    price = offer.price
    if price > auth.max_charge or price > task.max_price:
        raise AemError(errors.REFUSED, f"price {fmt_credits(price)} exceeds what the payer authorised")
    facts = yield Call("admission", (task.payer, auth.spend_key))
    judge_funds(facts, price)
    yield Call("reserve", (task.payer, auth.spend_key, price))
    return price


def host_session(net: bytes, key, training_use: str = TRAINING_DEFAULT) -> Session:
    """Serve one task stream as the host holding signing key ``key``, whose
    receipts state ``training_use`` (its policy for training on the output);
    returns a :class:`HostOutcome`."""
    data = yield Recv(TaskRequest.MAX_SIZE, REQUEST_READ_TIMEOUT_S, "task request")
    if data is None:
        return HostOutcome("closed")
    try:
        req = TaskRequest.decode(data)
        now = yield Call("now")
        price = yield from admit(net, key.public, req, now)
    except AemError as exc:
        code, detail = exc.code[:32], exc.detail[:MAX_DETAIL]
        yield Call("refused", (code, detail))
        yield Send(TaskRefused(code=code, detail=detail).encode())
        return HostOutcome("refused", code, detail)
    task = req.task
    yield Send(TaskAccepted(price=price).encode())
    started = yield Call("now")
    ran = yield Call("execute", (req.capsule_id, task))
    if isinstance(ran, PayerGone):
        return HostOutcome("gone", price=price)
    if isinstance(ran, RunFailed):
        code, detail = ran.code, ran.detail
    elif task.kind == "text" and not ran.output:
        # Nothing to deliver, so nothing to charge (specs/task-protocol.md §6).
        code, detail = errors.UNAVAILABLE, "the model produced no output (0 tokens); nothing is charged"
    else:
        code = ""
    if code:
        code, detail = code[:32], detail[:MAX_DETAIL]
        yield Call("failed", (code, detail))
        yield Send(TaskFailed(code=code, detail=detail).encode())
        return HostOutcome("failed", code, detail, price=price)
    finished = yield Call("now")
    receipt = InferenceWorkReceipt(
        net=net, host=key.public, payer=task.payer, task_hash=task.id, capsule_id=req.capsule_id,
        spend_auth=req.spend_auth, charge=price, output_hash=H(ran.output), tokens_out=ran.tokens,
        started_at=started, finished_at=max(started, finished), sig=b"", training_use=training_use,
        uses=task.uses).signed(key)
    # Log first: once the payer holds the receipt, the charge is on record.
    yield Call("append_receipt", (receipt,))
    yield Send(TaskResult(output=ran.output, tokens_out=ran.tokens, receipt=receipt).encode())
    return HostOutcome("served", price=price, tokens=ran.tokens)


# -- payer --------------------------------------------------------------------


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
    if tuple(r.uses) != tuple(task.uses):
        # A use is counted from the receipt: it must name what the task named.
        raise AemError(errors.BAD_VALUE, "receipt names other contributions used than the task")
    if r.charge > auth.max_charge or r.charge > accepted_price:
        raise AemError(errors.BAD_VALUE, f"receipt charges {fmt_credits(r.charge)}, the host accepted the task "
                                         f"at {fmt_credits(accepted_price)}")
    if task.kind == "text" and max(res.tokens_out, r.tokens_out) > (task.max_tokens or MAX_TOKENS) + UTF8_TAIL_TOKENS:
        raise AemError(errors.BAD_VALUE, "the host reports more tokens than the task allows")


def payer_session(net: bytes, request: TaskRequest, timeout_s: float) -> Session:
    """One attempt of ``request`` on the host its authorisation names: send it,
    read the answer (within the acceptance deadline for its size), the
    streamed output (within the task's budget ``timeout_s`` per frame) and
    the result. Returns the accepted :class:`TaskResult`; a refusal, a
    failure, an over-long stream or a result that proves less than it must
    raise ``AemError`` (the payer tries its next host, and never
    acknowledges such a result)."""
    task, auth, host = request.task, request.spend_auth, request.spend_auth.host
    data = request.encode()
    yield Send(data)
    first = yield Recv(MAX_REPLY, accept_deadline(len(data)), "task acceptance")
    if first is None:
        raise AemError(errors.UNAVAILABLE, "the host closed the stream before answering")
    first = decode_reply(first)
    if isinstance(first, TaskRefused):
        raise AemError(first.code if first.code else errors.REFUSED, first.detail)
    if not isinstance(first, TaskAccepted):
        raise AemError(errors.WRONG_OBJECT, "host did not accept or refuse")
    if first.price > auth.max_charge:
        raise AemError(errors.REFUSED, f"host accepted at {fmt_credits(first.price)}, more than "
                                       f"its authorised {fmt_credits(auth.max_charge)}")
    max_bytes, max_chunks = output_bound(task)
    chunks = nbytes = 0
    while True:
        frame = yield Recv(MAX_REPLY, timeout_s, "task output")
        if frame is None:
            raise AemError(errors.UNAVAILABLE, "the host closed the stream before the result")
        msg = decode_reply(frame)
        if isinstance(msg, TaskChunk):
            chunks += 1
            nbytes += len(msg.data)
            if chunks > max_chunks or nbytes > max_bytes:
                # A host streaming without end gets cut off, not read for minutes.
                raise AemError(errors.TOO_LARGE, f"host streamed more than the task allows "
                                                 f"({max_chunks} chunks, {max_bytes} bytes)")
            if chunks <= MAX_FORWARDED_CHUNKS:
                yield Call("chunk", (msg.data,))
            continue
        if isinstance(msg, TaskFailed):       # the host's own reason; nothing charged
            raise AemError(msg.code or errors.UNAVAILABLE, msg.detail)
        if isinstance(msg, TaskResult):
            check_result(msg, net, host, task, auth, accepted_price=first.price)
            return msg
        raise AemError(errors.WRONG_OBJECT, f"unexpected {msg.TYPE} from the host")


def to_dispute(seen: list[InferenceWorkReceipt], accepted: bytes) -> list[InferenceWorkReceipt]:
    """When a task ends having accepted receipt ``accepted`` (b"" for none):
    every other receipt seen for its spend key is disputed (§3 step 7)."""
    return [r for r in seen if r.id != accepted]
