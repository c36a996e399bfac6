"""The one driver of sans-I/O sessions (protocol/session.py) on a stream.

Sync (protocol/syncsession.py) and the task stream's host and payer
(protocol/tasksession.py) decide everything in pure generators; this module
performs what they yield: a ``Send`` is a frame written, a ``Recv`` a frame
read under its deadline, a ``Call`` an async method of the node's narrow
interface for that session (``target``), awaited. The simulator in
``tests/sim/`` drives the same generators with its own pump.
"""

from __future__ import annotations

from typing import Any, Callable

import trio

from aemd.framing import deadline, read_frame_or_eof, write_frame
from protocol import errors
from protocol.errors import AemError
from protocol.session import Call, Recv, Send, Session

WRITE_TIMEOUT_S = 30.0      # a Send without its own bound: a peer that stops reading holds us no longer


async def drive(session: Session, stream, target: Any,
                send_limit: Callable[[int], tuple[float, str]] | None = None) -> Any:
    """Run ``session`` to its end on ``stream``; returns its outcome.

    ``send_limit(size)`` gives ``(seconds, what)`` for a Send that names no
    bound of its own (the payer's request write is bounded by the host's
    acceptance deadline, which grows with the request). An ``AemError`` of
    the stream (a timeout, a reset, an oversized frame) ends the session and
    propagates; a best-effort ``Send`` that fails is passed over."""
    result: Any = None
    try:
        while True:
            try:
                action = session.send(result)
            except StopIteration as stop:
                return stop.value
            result = await _perform(action, stream, target, send_limit)
    finally:
        session.close()     # a session left mid-way (an error, a cancellation) ends here, not at GC


async def _perform(action: Any, stream, target: Any, send_limit) -> Any:
    if isinstance(action, Send):
        if action.timeout_s is not None:
            bound, what = action.timeout_s, action.what
        elif send_limit is not None:
            bound, what = send_limit(len(action.data))
        else:
            bound, what = WRITE_TIMEOUT_S, action.what
        if action.best_effort:
            try:
                with trio.move_on_after(bound):
                    await write_frame(stream, action.data)
            except AemError:
                pass
        else:
            with deadline(bound, what):
                await write_frame(stream, action.data)
        return None
    if isinstance(action, Recv):
        with deadline(action.timeout_s, action.what):
            return await read_frame_or_eof(stream, action.limit)
    if isinstance(action, Call):
        return await getattr(target, action.op)(*action.args)
    raise AemError(errors.INVARIANT, f"a session yielded {type(action).__name__}, not an action")
