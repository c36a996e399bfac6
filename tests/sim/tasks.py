"""Paid tasks in the simulator: the real task sessions of
protocol/tasksession.py (``host_session``, ``payer_session``) over simulated
streams, with a deterministic fake executor. The host answers the
session's ``Call``s as ``aemd/tasks.py`` does: admission facts from the
replay of its log, reservations held while work runs, the receipt logged
(and announced) before the result is sent. A crash loses the reservations
and the work in progress, never a logged receipt.
"""

from __future__ import annotations

from crypto.hashing import H
from protocol.task import TaskPacket
from protocol.taskwire import TaskRequest
from protocol.tasksession import AdmissionFacts, Offer, Ran, host_session, payer_session
from tests.sim.drive import Runner

TASK = "task"
PRICE = 1_000
EXECUTE_US = 200_000          # the fake model's simulated run time


class HostService:
    """The host's side of the task Calls (the narrow interface of aemd/tasks.py)."""

    def __init__(self, node) -> None:
        self.node = node
        self.reserved: dict[tuple[bytes, bytes], int] = {}   # (payer, spend key) -> price

    def now(self) -> int:
        return self.node.wall

    def capsule(self, capsule_id: bytes):
        return Offer(domain="code", kind="gguf", price=PRICE) if capsule_id == self.node.capsule else None

    def admission(self, payer: bytes, spend_key: bytes) -> AdmissionFacts:
        res = self.node.log.replay(self.node.wall)
        host = self.node.public
        return AdmissionFacts(
            in_flight=(payer, spend_key) in self.reserved,
            charged=res.spend_key_blocks(payer, spend_key, host),
            disputed=res.disputes(payer, host),
            available=res.available(payer),
            reserved=sum(p for (a, _), p in self.reserved.items() if a == payer))

    def reserve(self, payer: bytes, spend_key: bytes, price: int) -> None:
        self.reserved[(payer, spend_key)] = price

    def refused(self, code: str, detail: str) -> None:
        self.node.sim.note("task-refused", self.node.id, code)

    def execute(self, capsule_id: bytes, task: TaskPacket):
        return Ran(output=b"out:" + H(task.id)[:8], tokens=min(8, max(1, task.max_tokens)))

    def failed(self, code: str, detail: str) -> None:
        self.node.sim.note("task-failed", self.node.id, code)

    def append_receipt(self, receipt) -> None:
        self.reserved.pop((receipt.payer, receipt.spend_auth.spend_key), None)
        if self.node.append(receipt) is None:
            from protocol import errors
            from protocol.errors import AemError
            raise AemError(errors.REFUSED, "receipt not logged")

    def end(self, payer: bytes, spend_key: bytes) -> None:
        self.reserved.pop((payer, spend_key), None)


class PayerService:
    def chunk(self, data: bytes) -> None:
        pass


def task_cost(op: str, args: tuple, result) -> int:
    return EXECUTE_US if op == "execute" else 0


def serve(node, stream) -> None:
    """An inbound task stream: the real host session."""
    svc = node.task_host
    state = {}

    def done(outcome, err) -> None:
        # A session that ends anywhere but at its receipt leaves no reservation.
        if state.get("key") is not None:
            svc.end(*state["key"])
        node.sim.note("task-host-end", node.id, getattr(outcome, "status", None) if err is None else err.code)

    class _Watch:
        def __getattr__(self, op):
            fn = getattr(svc, op)
            if op == "reserve":
                def reserve(payer, sk, price):
                    state["key"] = (payer, sk)
                    return fn(payer, sk, price)
                return reserve
            return fn

    Runner(node.net, node, host_session(node.netid, node.key), stream, node.id, "task host", done, task_cost,
           target=_Watch()).start()


def run_task(mesh, payer: int, host: int, *, max_tokens: int = 16) -> None:
    """One payer attempt on one host; on an accepted result the payer logs its ack."""
    p, h = mesh.nodes[payer], mesh.nodes[host]
    if not p.alive or mesh.stopping:
        return
    at = p.wall
    task = TaskPacket(net=mesh.genesis.network_id, payer=p.public, nonce=H(b"n" + mesh.tn._nonce())[:16],
                      kind="text", domain="code", tags=(), prompt="sim", max_tokens=max_tokens,
                      temperature_milli=0, seed=1, repo_tar=b"", repo_hash=b"", patch="", test_cmd=(),
                      max_price=10 * PRICE, latency_budget_ms=30_000, created_at=at, sig=b"").signed(p.key)
    auth = mesh.tn.spend_auth(p.key, 10 * PRICE, at + 600, task=task.id, host=h.key)
    req = TaskRequest(capsule_id=h.capsule, task=task, spend_auth=auth)
    stream = mesh.net.open_stream(p.id, h.id, TASK)
    if stream is None:
        mesh.sim.note("task-no-stream", payer, host)
        return
    epoch = p.epoch

    def done(result, err) -> None:
        mesh.tasks_done.append((payer, host, None if err is None else err.code))
        if err is None and p.alive and p.epoch == epoch:
            p.append(mesh.tn.ack(p.key, result.receipt.id, p.wall))

    Runner(mesh.net, p, payer_session(mesh.genesis.network_id, req, 30.0), stream, p.id, "task payer", done,
           None).start()
