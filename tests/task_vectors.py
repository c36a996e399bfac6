"""The session vectors of specs/task-protocol.md ("Session vectors"): fixed
runs of the host and payer sessions of ``protocol/tasksession.py``, built
from fixed keys and times (those of tests/vectors.py).

Each vector lists the session's actions in order: ``recv`` (limit,
timeout_s, what, and the ``input`` the driver hands back: the frame's hex,
``null`` for the end of the stream, or ``{"error": CODE}`` when the driver
itself ends the session, e.g. an announced length above the limit), ``send``
(the frame's hex), ``call`` (op, args, and the ``input`` returned). Bytes
are hex; a wire object is the hex of its canonical encoding; a record of the
session's interface (Offer, AdmissionFacts, Ran, RunFailed, PayerGone) is a
map with its ``type``. The vector ends with the session's ``outcome``.

``python -m tests.task_vectors`` prints the spec section; the test
``test_task_session.py`` reads the vectors back from the spec and replays them.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable

from crypto.keys import SigningKey
from protocol import errors
from protocol.errors import AemError
from protocol.schema import WireObject
from protocol.session import Call, Recv, Send, Session
from protocol.task import SpendAuthorization, TaskPacket
from protocol.taskwire import TaskAccepted, TaskChunk, TaskFailed, TaskRequest, TaskResult
from protocol.tasksession import (AdmissionFacts, HostOutcome, Offer, PayerGone, Ran, RunFailed, host_session,
                                  payer_session)
from tests.vectors import ALICE, BOB, T0, genesis

CAROL = SigningKey.from_seed(bytes([5]) * 32)      # another host
NET = genesis().network_id
CAPSULE = bytes([9]) * 32
PRICE = 1_500_000
BUDGET_S = 90.0
RECORDS = {c.__name__: c for c in (Offer, AdmissionFacts, Ran, RunFailed, PayerGone)}
HEADING = "## Session vectors"


def task() -> TaskPacket:
    return TaskPacket(net=NET, payer=ALICE.public, nonce=bytes(range(16)), kind="text", domain="general",
                      tags=(), prompt="Hello, mesh", max_tokens=16, temperature_milli=0, seed=42, repo_tar=b"",
                      repo_hash=b"", patch="", test_cmd=(), max_price=2_000_000, latency_budget_ms=0,
                      created_at=T0 + 10, sig=b"").signed(ALICE)


def request(host: bytes = BOB.public, max_charge: int = PRICE) -> TaskRequest:
    t = task()
    auth = SpendAuthorization(net=NET, payer=ALICE.public, host=host, spend_key=bytes([7]) * 32, task_hash=t.id,
                              max_charge=max_charge, expires_at=T0 + 600, sig=b"").signed(ALICE)
    return TaskRequest(capsule_id=CAPSULE, task=t, spend_auth=auth)


# -- values as JSON ---------------------------------------------------------------


def enc(v: Any) -> Any:
    if isinstance(v, WireObject):
        return v.encode().hex()
    if isinstance(v, (bytes, bytearray)):
        return bytes(v).hex()
    if dataclasses.is_dataclass(v) and type(v).__name__ in RECORDS:
        return {"type": type(v).__name__, **{f.name: enc(getattr(v, f.name)) for f in dataclasses.fields(v)}}
    if isinstance(v, (tuple, list)):
        return [enc(x) for x in v]
    return v


def dec_record(m: Any) -> Any:
    """A Call's input back from JSON: a record by its type, else as is."""
    if not isinstance(m, dict):
        return m
    cls = RECORDS[m["type"]]
    return cls(**{f.name: bytes.fromhex(m[f.name]) if f.type in ("bytes", bytes) else m[f.name]
                  for f in dataclasses.fields(cls)})


def step_of(action: Any) -> dict:
    if isinstance(action, Send):
        return {"action": "send", "data": action.data.hex()}
    if isinstance(action, Recv):
        return {"action": "recv", "limit": action.limit, "timeout_s": action.timeout_s, "what": action.what}
    if isinstance(action, Call):
        return {"action": "call", "op": action.op, "args": enc(list(action.args))}
    raise TypeError(type(action).__name__)


def outcome_of(value: Any) -> dict:
    if isinstance(value, HostOutcome):
        return {"host": {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}}
    if isinstance(value, TaskResult):
        return {"result": {"receipt_id": value.receipt.id.hex(), "charge": value.receipt.charge,
                           "tokens_out": value.tokens_out}}
    raise TypeError(type(value).__name__)


# -- recording a run ----------------------------------------------------------------


def record(session: Session, answer: Callable[[Any], Any]) -> tuple[list[dict], dict]:
    """Run ``session`` with ``answer`` playing the driver: it returns what a
    Recv or Call gets back (raw), or raises AemError to end the session as
    a driver does (a frame over its limit, a timeout). Returns the steps and
    the outcome, as JSON values."""
    steps: list[dict] = []
    result: Any = None
    while True:
        try:
            action = session.send(result)
        except StopIteration as stop:
            return steps, outcome_of(stop.value)
        except AemError as exc:
            return steps, {"error": {"code": exc.code, "detail": exc.detail}}
        step = step_of(action)
        steps.append(step)
        if isinstance(action, Send):
            result = None
            continue
        try:
            result = answer(action)
        except AemError as exc:
            step["input"] = {"error": exc.code}
            session.close()
            return steps, {"ended_by_driver": exc.code}
        step["input"] = None if result is None else result.hex() if isinstance(action, Recv) else enc(result)


def host_world(req_frame: bytes, facts: AdmissionFacts, ran: Any, clock: list[int]) -> Callable[[Any], Any]:
    def answer(action: Any) -> Any:
        if isinstance(action, Recv):
            return req_frame
        op = action.op
        if op == "now":
            return clock.pop(0)
        if op == "capsule":
            return Offer(domain="general", kind="gguf", price=PRICE) if action.args[0] == CAPSULE else None
        if op == "admission":
            return facts
        if op == "execute":
            return ran
        return None                # reserve, refused, failed, append_receipt
    return answer


def payer_world(frames: list[bytes]) -> Callable[[Any], Any]:
    def answer(action: Any) -> Any:
        if isinstance(action, Recv):
            return frames.pop(0) if frames else None
        return None                # chunk
    return answer


def host_receipt(req: TaskRequest, output: bytes, tokens: int, charge: int = PRICE):
    from crypto.hashing import H
    from protocol.task import InferenceWorkReceipt
    return InferenceWorkReceipt(net=NET, host=BOB.public, payer=ALICE.public, task_hash=req.task.id,
                                capsule_id=CAPSULE, spend_auth=req.spend_auth, charge=charge, output_hash=H(output),
                                tokens_out=tokens, started_at=T0 + 21, finished_at=T0 + 22, sig=b"").signed(BOB)


def build() -> list[dict]:
    funded = AdmissionFacts(in_flight=False, charged=False, disputed=0, available=100_000_000, reserved=0)
    out_text = b"Hello back, payer."
    vectors: list[dict] = []

    def host(name: str, note: str, frame: bytes, facts=funded, ran: Any = Ran(output=out_text, tokens=5)):
        steps, outcome = record(host_session(NET, BOB), host_world(frame, facts, ran, [T0 + 20, T0 + 21, T0 + 22]))
        vectors.append({"name": name, "session": "host", "note": note, "steps": steps, "outcome": outcome})

    def payer(name: str, note: str, req: TaskRequest, frames: list[bytes]):
        steps, outcome = record(payer_session(NET, req, BUDGET_S), payer_world(list(frames)))
        vectors.append({"name": name, "session": "payer", "note": note, "steps": steps, "outcome": outcome})

    req = request()
    host("host/funded", "a funded task is admitted, reserved, run, receipted (appended before the result is sent)",
         req.encode())
    host("host/unfunded", "the payer's available balance less its reservations here is below the price: refused",
         req.encode(), facts=dataclasses.replace(funded, available=2_000_000, reserved=1_000_000))
    host("host/other-host", "an authorisation made out to another host is refused before any lookup",
         request(host=CAROL.public).encode())
    host("host/failed", "accepted work that fails: task_failed with the host's reason, no receipt",
         req.encode(), ran=RunFailed(code=errors.UNAVAILABLE, detail="the host's executor failed (RuntimeError)"))
    host("host/empty-output", "a text task that produced nothing is a failure: nothing is charged",
         req.encode(), ran=Ran(output=b"", tokens=0))
    host("host/undecodable", "a frame within the limit that does not decode is refused with the decoder's code",
         b"\x81\xa4type\xa8task_req")

    def oversized(action: Any) -> Any:
        raise AemError(errors.TOO_LARGE, f"frame of {action.limit + 1} bytes announced, limit is {action.limit}")
    steps, outcome = record(host_session(NET, BOB), oversized)
    vectors.append({"name": "host/oversized", "session": "host",
                    "note": "the request's limit is TaskRequest.MAX_SIZE: the driver refuses a longer announced "
                            "frame before reading or decoding it, and the session ends there",
                    "steps": steps, "outcome": outcome})

    receipt = host_receipt(req, out_text, 5)
    result = TaskResult(output=out_text, tokens_out=5, receipt=receipt).encode()
    accepted = TaskAccepted(price=PRICE).encode()
    payer("payer/served", "accepted, one chunk forwarded, the result checked and returned",
          req, [accepted, TaskChunk(data=out_text).encode(), result])
    payer("payer/overcharge", "the receipt charges more than the price the host accepted at: refused, never acked",
          req, [TaskAccepted(price=1_000_000).encode(), result])
    payer("payer/accepted-above-authorisation", "task_accepted at more than max_charge: refused at once",
          req, [TaskAccepted(price=PRICE + 1).encode()])
    payer("payer/task-failed", "task_failed reaches the payer with the host's code and reason",
          req, [accepted, TaskFailed(code=errors.UNAVAILABLE,
                                     detail="the host's executor failed (RuntimeError)").encode()])
    return vectors


def render(vectors: list[dict] | None = None) -> str:
    """The spec section: a heading, a short note, one JSON block per vector."""
    out = [HEADING, "",
           "Generated by `python -m tests.task_vectors` (fixed keys: payer `alice` and host `bob` of",
           "`specs/wire-format.md`, another host from seed `05`*32; times from 1800000000). Each vector",
           "is one run of a session of `protocol/tasksession.py`: its actions in order (`recv` with the",
           "frame limit, timeout and the input handed back, `null` at the end of the stream or",
           "`{\"error\": CODE}` where the driver ends the session; `send` with the frame; `call` with",
           "op, args and the value returned), then its outcome. Bytes are hex, wire objects the hex of",
           "their canonical encoding, records of the session interface a map with their `type`.",
           "An implementation of either end must yield exactly these actions for these inputs.", ""]
    for v in build() if vectors is None else vectors:
        lines = [f'{{"name": {json.dumps(v["name"])}, "session": {json.dumps(v["session"])},',
                 f' "note": {json.dumps(v["note"])},', ' "steps": [']
        lines += [f"  {json.dumps(s)}{',' if i < len(v['steps']) - 1 else ''}" for i, s in enumerate(v["steps"])]
        lines += [" ],", f' "outcome": {json.dumps(v["outcome"])}}}']
        out += ["```json", *lines, "```", ""]
    return "\n".join(out).rstrip("\n") + "\n"


def parse(spec: str) -> list[dict]:
    """The vectors of the spec's "Session vectors" section."""
    import re
    start = spec.index(HEADING)
    nxt = spec.find("\n## ", start + len(HEADING))
    section = spec[start:] if nxt < 0 else spec[start:nxt + 1]
    return [json.loads(b) for b in re.findall(r"```json\n(.*?)```", section, re.S)]


def section(spec: str) -> str:
    start = spec.index(HEADING)
    nxt = spec.find("\n## ", start + len(HEADING))
    return spec[start:] if nxt < 0 else spec[start:nxt + 1]


if __name__ == "__main__":
    print(render(), end="")
