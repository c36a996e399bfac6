"""The task sessions of protocol/tasksession.py against the spec's session
vectors (read from specs/task-protocol.md), and host against payer in memory."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import errors
from protocol.admission import DEFAULT_ADMISSION
from protocol.errors import AemError
from protocol.session import Call, Recv, Send
from protocol.taskwire import TaskRefused, TaskRequest, TaskResult, decode_reply
from protocol.tasksession import (AdmissionFacts, Offer, Ran, host_session, judge_funds, payer_session)
from tests import task_vectors as tv

SPEC = (Path(__file__).parent.parent / "specs" / "task-protocol.md").read_text()


def spec_vectors() -> list[dict]:
    return tv.parse(SPEC)


def test_the_spec_section_is_what_the_generator_prints() -> None:
    assert tv.section(SPEC).rstrip("\n") == tv.render().rstrip("\n")
    assert tv.render() == tv.render()          # regeneration is stable: fixed keys, deterministic signatures


def test_the_spec_has_every_vector_the_brief_names() -> None:
    names = {v["name"] for v in spec_vectors()}
    assert {"host/funded", "host/unfunded", "host/other-host", "payer/overcharge", "payer/task-failed",
            "host/oversized"} <= names


def _session(v: dict):
    if v["session"] == "host":
        return host_session(tv.NET, tv.BOB)
    req = TaskRequest.decode(bytes.fromhex(v["steps"][0]["data"]))
    return payer_session(tv.NET, req, tv.BUDGET_S)


@pytest.mark.parametrize("v", spec_vectors(), ids=lambda v: v["name"])
def test_the_session_yields_exactly_the_vector(v: dict) -> None:
    """Replay: the session's every action equals the spec's step; the spec's
    inputs go back in; the outcome is the spec's."""
    gen = _session(v)
    result: Any = None
    for i, step in enumerate(v["steps"]):
        action = gen.send(result)
        assert tv.step_of(action) == {k: x for k, x in step.items() if k != "input"}, f"step {i}"
        if isinstance(action, Send):
            result = None
            continue
        given_ = step["input"]
        if isinstance(given_, dict) and "error" in given_ and isinstance(action, Recv):
            assert v["outcome"] == {"ended_by_driver": given_["error"]}
            assert i == len(v["steps"]) - 1
            return
        if isinstance(action, Recv):
            result = None if given_ is None else bytes.fromhex(given_)
        else:
            result = tv.dec_record(given_)
    try:
        extra = gen.send(result)
    except StopIteration as stop:
        assert tv.outcome_of(stop.value) == v["outcome"]
        return
    except AemError as exc:
        assert {"error": {"code": exc.code, "detail": exc.detail}} == v["outcome"]
        return
    pytest.fail(f"the session yielded {extra!r} after the vector's last step")


def test_refusals_of_the_vectors_are_sent_as_task_refused() -> None:
    by = {v["name"]: v for v in spec_vectors()}
    for name, code in (("host/unfunded", errors.REFUSED), ("host/other-host", errors.REFUSED)):
        sent = [s for s in by[name]["steps"] if s["action"] == "send"]
        msg = decode_reply(bytes.fromhex(sent[-1]["data"]))
        assert isinstance(msg, TaskRefused) and msg.code == code
        ops = [s["op"] for s in by[name]["steps"] if s["action"] == "call"]
        assert "reserve" not in ops and "execute" not in ops and ops[-1] == "refused"
    served = by["host/funded"]["steps"]
    ops = [s.get("op") or s["action"] for s in served]
    # The receipt is logged before the result goes out.
    assert ops.index("append_receipt") < len(ops) - 1 and ops[-1] == "send"
    oversized = by["host/oversized"]["steps"]
    assert len(oversized) == 1 and oversized[0]["limit"] == TaskRequest.MAX_SIZE


# -- host against payer, in memory -------------------------------------------------


class World:
    """The host's log and bookkeeping, in memory: one payer's balance, the
    reservations, the receipts appended."""

    def __init__(self, available: int, reserved: int, price: int, output: bytes) -> None:
        self.available, self.reserved, self.price, self.output = available, reserved, price, output
        self.appended: list = []
        self.chunks: list[bytes] = []
        self.clock = tv.T0 + 20
        self.locked = False

    def host_call(self, op: str, args: tuple, to_payer: list[bytes]) -> Any:
        if op == "now":
            self.clock += 1
            return self.clock
        if op == "capsule":
            return Offer(domain="general", kind="gguf", price=self.price)
        if op == "admission":
            assert not self.locked
            self.locked = True
            return AdmissionFacts(in_flight=False, charged=False, disputed=0, available=self.available,
                                  reserved=self.reserved)
        if op == "reserve":
            assert self.locked
            self.locked = False
            self.reserved += args[2]
            return None
        if op == "refused":
            self.locked = False
            return None
        if op == "execute":
            from protocol.taskwire import TaskChunk
            to_payer.append(TaskChunk(data=self.output).encode())   # the shell streams the chunks
            return Ran(output=self.output, tokens=3)
        if op == "append_receipt":
            self.appended.append(args[0])
            return None
        return None


def run_pair(req: TaskRequest, world: World):
    """Pump frames between a host and a payer session until both end."""
    host, payer = host_session(tv.NET, tv.BOB), payer_session(tv.NET, req, tv.BUDGET_S)
    to_host: list[bytes] = []
    to_payer: list[bytes] = []
    ends: dict[str, Any] = {}
    pending = {"host": (host, None), "payer": (payer, None)}
    acts: dict[str, Any] = {}
    for name, (gen, _) in pending.items():
        acts[name] = gen.send(None)
    for _ in range(1000):
        if len(ends) == 2:
            break
        moved = False
        for name, gen, inbox, outbox in (("host", host, to_host, to_payer), ("payer", payer, to_payer, to_host)):
            if name in ends:
                continue
            act = acts[name]
            if isinstance(act, Recv):
                if inbox:
                    result = inbox.pop(0)
                elif ("payer" if name == "host" else "host") in ends:
                    result = None
                else:
                    continue
            elif isinstance(act, Send):
                outbox.append(act.data)
                result = None
            elif isinstance(act, Call):
                result = world.host_call(act.op, act.args, outbox) if name == "host" else world.chunks.append(*act.args)
            moved = True
            try:
                acts[name] = gen.send(result)
            except StopIteration as stop:
                ends[name] = stop.value
            except AemError as exc:
                ends[name] = exc
        assert moved or len(ends) == 2, "deadlock"
    return ends["host"], ends["payer"]


@settings(max_examples=60, deadline=None)
@given(price=st.integers(0, 3_000_000), max_charge=st.integers(0, 3_000_000),
       available=st.integers(0, 5_000_000), reserved=st.integers(0, 2_000_000),
       output=st.binary(min_size=1, max_size=64))
def test_host_and_payer_agree_on_every_price_and_balance(price, max_charge, available, reserved, output) -> None:
    req = tv.request(max_charge=max_charge)
    world = World(available, reserved, price, output)
    host_out, payer_out = run_pair(req, world)
    fundable = price <= max_charge and price <= req.task.max_price and available - reserved >= price
    if fundable:
        assert host_out.status == "served" and host_out.price == price
        assert isinstance(payer_out, TaskResult) and payer_out.output == output
        assert payer_out.receipt.charge == price and world.appended == [payer_out.receipt]
        assert world.chunks == [output] and world.reserved == reserved + price
    else:
        assert host_out.status == "refused" and world.appended == [] and world.reserved == reserved
        assert isinstance(payer_out, AemError) and payer_out.code == errors.REFUSED
        assert payer_out.detail == host_out.detail
    assert not world.locked


@given(available=st.integers(0, 10**9), reserved=st.integers(0, 10**9), price=st.integers(0, 10**9))
def test_judge_funds_refuses_exactly_when_funds_less_reservations_fall_short(available, reserved, price) -> None:
    facts = AdmissionFacts(in_flight=False, charged=False, disputed=0, available=available, reserved=reserved)
    if available - reserved >= price:
        judge_funds(facts, price)
    else:
        with pytest.raises(AemError) as e:
            judge_funds(facts, price)
        assert e.value.code == errors.REFUSED
    for flag in ({"in_flight": True}, {"charged": True}, {"disputed": 1}):
        with pytest.raises(AemError):
            judge_funds(dataclasses.replace(facts, **flag), 0)


def test_the_daemon_runs_these_sessions() -> None:
    """The shell drives the sessions of protocol/tasksession.py, not a copy."""
    from aemd import tasks
    assert tasks.host_session is host_session and tasks.payer_session is payer_session
    import inspect
    src = inspect.getsource(tasks.TaskService.serve) + inspect.getsource(tasks.TaskService._attempt)
    assert "drive(host_session(" in src and "drive(payer_session(" in src


def test_the_node_env_has_exactly_what_the_service_uses() -> None:
    """TaskService reaches its node only through TaskEnv; the daemon's view of
    a node (aemd.services.NodeTaskEnv) provides every member of it."""
    import inspect
    from types import SimpleNamespace

    from aemd import services, tasks
    members = set(tasks.TaskEnv.__annotations__) | {n for n, _ in inspect.getmembers(tasks.TaskEnv, inspect.isfunction)
                                                    if not n.startswith("_")}
    node = SimpleNamespace(key=tv.BOB, net=tv.NET, genesis=SimpleNamespace(challenge_window=3600, admission=DEFAULT_ADMISSION), metrics=None,
                           mesh=None, hostbook=None, home=SimpleNamespace(root=Path("/nonexistent")), capsules=[],
                           opts=SimpleNamespace(capacity={}), p2p=None)
    env = services.NodeTaskEnv(node)
    assert all(hasattr(env, m) for m in members), [m for m in members if not hasattr(env, m)]
    src = inspect.getsource(tasks)
    assert "self.node" not in src and "import Node" not in src
