"""The shape of every sans-I/O protocol session (sync, task host, task payer).

A session is a generator function. It never touches a socket, a file or a
clock: it *yields* an action, and whoever drives it (the daemon's shell in
``aemd/``, a test replaying a spec vector, the mesh simulator in
``tests/sim/``) performs the action and sends the result back in with
``gen.send(result)``. The session's outcome is the generator's return value
(``StopIteration.value``). The same generator object runs in the daemon and
in the simulator, so a spec vector that checks it checks the daemon.

Actions:

* :class:`Send` -- write one frame holding ``data`` (the session encodes)
  within ``timeout_s`` (None: the driver's own bound), ``what`` naming the
  write in a timeout error; the result is ``None``. A failed write is the
  driver's ``AemError`` and ends the session, unless ``best_effort``: then
  a timeout or a broken stream is ignored and the session goes on (for a
  courtesy such as a final "done", whose loss changes nothing).
* :class:`Recv` -- read one frame of at most ``limit`` bytes within
  ``timeout_s``; the result is the frame's bytes, or ``None`` at a clean end
  of stream. A timeout, a reset or an oversized frame is the driver's
  ``AemError`` and ends the session (the driver does not throw it in).
* :class:`Call` -- ask the node's narrow service interface (a log view, a
  task service) ``op(*args)``; the result is its return value. The set of
  ``op`` names a session uses *is* its interface to the node.

Time is an argument of the session (or of a ``Call`` that answers it), never
read inside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generator


@dataclass(frozen=True, slots=True)
class Send:
    data: bytes
    timeout_s: float | None = None
    what: str = "frame write"
    best_effort: bool = False


@dataclass(frozen=True, slots=True)
class Recv:
    limit: int
    timeout_s: float
    what: str            # named in the timeout error: "sync range", "task result"


@dataclass(frozen=True, slots=True)
class Call:
    op: str
    args: tuple = ()


Action = Send | Recv | Call
Session = Generator[Action, Any, Any]
