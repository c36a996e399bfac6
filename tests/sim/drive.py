"""The simulator's synchronous driver for sans-I/O sessions
(protocol/session.py): the same generators the daemon runs in
``aemd/sync.py``'s ``drive``, pumped by events instead of awaits.

* ``Send`` -- queue the frame on the simulated stream (delivered after the
  link's delay, in order); a reset stream ends the session, except for a
  ``best_effort`` send, which then just returns.
* ``Recv`` -- the next frame if one has arrived, else park until one does,
  the stream ends (``None``) or ``timeout_s`` of simulated time passes (a
  timeout ends the session, and resets the stream as a real driver's
  cancelled read does). A frame over ``limit`` ends the session (TOO_LARGE).
* ``Call`` -- answered at once by the node's target (its log, a task
  service); ``cost_us(op, args, result)`` of simulated CPU time may pass
  before the session continues.

A session's outcome is reported once to ``done(result, error)``; a driver
error (reset, timeout, oversized frame) is never thrown into the generator,
which is closed instead.
"""

from __future__ import annotations

from typing import Any, Callable

from protocol import errors
from protocol.errors import AemError
from protocol.session import Call, Recv, Send, Session
from tests.sim.core import SECOND
from tests.sim.net import Stream

_ids = 0


class Runner:
    def __init__(self, net, node: Any, gen: Session, stream: Stream, end: int, name: str,
                 done: Callable[[Any, AemError | None], None],
                 cost_us: Callable[[str, tuple, Any], int] | None = None, target: Any = None) -> None:
        global _ids
        _ids += 1
        self.rid = _ids
        self.net, self.node, self.gen, self.stream, self.end = net, node, gen, stream, end
        self.name = name
        self.done_cb = done
        self.cost_us = cost_us
        self.target = target          # what answers the Calls (default: node.target(name))
        self.finished = False
        self._timer: int | None = None
        self._limit = 0
        self.net.runners[self.rid] = self

    def start(self) -> None:
        self._step(None, first=True)

    # -- events -------------------------------------------------------------------

    def wake(self) -> None:
        """A frame (or the end of stream) arrived while parked on Recv."""
        self.net.sim.cancel(self._timer)
        self._timer = None
        self._take()

    def on_reset(self, why: str) -> None:
        self._fail(AemError(errors.UNAVAILABLE, f"{self.name}: stream reset ({why})"))

    def _timeout(self, what: str) -> None:
        self._timer = None
        if self.finished:
            return
        self.stream.waiter[self.end] = None
        err = AemError(errors.TIMEOUT,
                       f"{self.name}: {what} timed out")
        self._fail(err)
        self.stream.do_reset("timeout")

    def kill(self, why: str) -> None:
        """The node crashed: the session is gone, whatever it was doing."""
        self.net.sim.cancel(self._timer)
        self._fail(AemError(errors.UNAVAILABLE, f"{self.name}: {why}"))

    # -- the pump -------------------------------------------------------------------------

    def _take(self) -> None:
        data = self.stream.inbox[self.end].popleft()
        if data is not None and len(data) > self._limit:
            self._fail(AemError(errors.TOO_LARGE, f"{self.name}: frame of {len(data)} bytes over {self._limit}"))
            self.stream.do_reset("oversized frame")
            return
        self._step(data)

    def _step(self, value: Any, first: bool = False) -> None:
        if self.finished:
            return
        sim = self.net.sim
        while True:
            try:
                action = next(self.gen) if first else self.gen.send(value)
            except StopIteration as stop:
                self._finish(stop.value, None)
                return
            except AemError as exc:
                self._finish(None, exc)
                return
            first = False
            if isinstance(action, Call):
                try:
                    tgt = self.target if self.target is not None else self.node.target(self.name)
                    value = getattr(tgt, action.op)(*action.args)
                except AemError as exc:
                    self._fail(exc)
                    return
                if self.cost_us is not None:
                    cost = self.cost_us(action.op, action.args, value)
                    if cost > 0:
                        sim.at(cost, self._resume, value)
                        return
            elif isinstance(action, Send):
                if not self.stream.send(self.end, action.data) and not action.best_effort:
                    self._fail(AemError(errors.UNAVAILABLE, f"{self.name}: {action.what}: stream closed"))
                    return
                value = None
            elif isinstance(action, Recv):
                if self.stream.reset:
                    self._fail(AemError(errors.UNAVAILABLE, f"{self.name}: {action.what}: stream reset"))
                    return
                self._limit = action.limit
                if self.stream.inbox[self.end]:
                    data = self.stream.inbox[self.end].popleft()
                    if data is not None and len(data) > action.limit:
                        self._fail(AemError(errors.TOO_LARGE, f"{self.name}: oversized frame"))
                        self.stream.do_reset("oversized frame")
                        return
                    value = data
                    continue
                self.stream.waiter[self.end] = self
                self._timer = sim.at(int(action.timeout_s * SECOND), self._timeout, action.what)
                return
            else:
                self._fail(AemError(errors.BAD_VALUE, f"{self.name}: unknown action {action!r}"))
                return

    def _resume(self, value: Any) -> None:
        self._step(value)

    # -- the end ---------------------------------------------------------------------------------

    def _fail(self, err: AemError) -> None:
        if self.finished:
            return
        try:
            self.gen.close()
        except Exception:     # a session that misbehaves on close still ends here
            pass
        self._finish(None, err)

    def _finish(self, result: Any, err: AemError | None) -> None:
        if self.finished:
            return
        self.finished = True
        self.net.sim.cancel(self._timer)
        self._timer = None
        self.net.runners.pop(self.rid, None)
        if self.stream.waiter[self.end] is self:
            self.stream.waiter[self.end] = None
        self.stream.end_done(self.end)
        self.net.sim.note("session-end", self.name, self.node.id, self.stream.sid,
                          "ok" if err is None else err.code)
        self.done_cb(result, err)
