"""The discrete-event core of the mesh simulator: one seeded RNG, one
simulated clock in integer microseconds, one heap of events.

Nothing here reads the wall clock, starts a thread or awaits anything, so a
run is a pure function of its seed: the same seed gives the same events in
the same order, which :attr:`Sim.trace_hash` fingerprints (the replay
determinism test compares it across runs and across ``PYTHONHASHSEED``s).

Every run is bounded twice: by an event cap and by a simulated-time cap.
Hitting either is a :class:`SimLimit`, a failure of the scenario (a mesh
that never goes quiet), never a hang.
"""

from __future__ import annotations

import hashlib
import heapq
import random
from typing import Any, Callable

SECOND = 1_000_000
MS = 1_000


class SimLimit(Exception):
    """The run hit its event cap or its simulated-time cap."""


class Sim:
    def __init__(self, seed: int, *, max_events: int = 2_000_000, max_time_s: float = 24 * 3600,
                 keep_trace: bool = False, tracing: bool = True) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.now_us = 0
        self.max_events = max_events
        self.max_time_us = int(max_time_s * SECOND)
        self.events = 0
        self._q: list[tuple[int, int, Callable[..., Any], tuple]] = []
        self._n = 0
        self._cancelled: set[int] = set()
        self._trace = hashlib.sha256(f"seed {seed}".encode())
        self.keep_trace = keep_trace
        self.tracing = tracing          # off for large meshes: the hash then covers nothing
        self.trace_lines: list[str] = []

    # -- time -----------------------------------------------------------------------

    @property
    def now(self) -> float:
        """Simulated seconds since the start."""
        return self.now_us / SECOND

    # -- scheduling -------------------------------------------------------------------

    def at(self, delay_us: int, fn: Callable[..., Any], *args: Any) -> int:
        """Run ``fn(*args)`` ``delay_us`` from now; returns a handle for :meth:`cancel`.
        Ties run in scheduling order (the counter), so order never depends on
        anything but the seed."""
        self._n += 1
        heapq.heappush(self._q, (self.now_us + max(0, int(delay_us)), self._n, fn, args))
        return self._n

    def cancel(self, handle: int | None) -> None:
        if handle is not None:
            self._cancelled.add(handle)

    def pending(self) -> int:
        return len(self._q) - len(self._cancelled)

    def step(self) -> bool:
        """Run the next event; False when none is left."""
        while self._q:
            t, n, fn, args = heapq.heappop(self._q)
            if n in self._cancelled:
                self._cancelled.discard(n)
                continue
            if t > self.max_time_us:
                raise SimLimit(f"simulated time cap {self.max_time_us / SECOND:.0f} s reached")
            self.events += 1
            if self.events > self.max_events:
                raise SimLimit(f"event cap {self.max_events} reached at t={t / SECOND:.3f} s")
            self.now_us = t
            fn(*args)
            return True
        return False

    def run_until(self, t_s: float) -> None:
        """Run every event up to simulated time ``t_s`` and move the clock there."""
        end = int(t_s * SECOND)
        while self._q:
            t, n, _, _ = self._q[0]
            if n in self._cancelled:
                heapq.heappop(self._q)
                self._cancelled.discard(n)
                continue
            if t > end:
                break
            self.step()
        self.now_us = max(self.now_us, end)

    def run_while(self, busy: Callable[[], bool], limit_s: float) -> bool:
        """Run events while ``busy()`` holds, at most until ``limit_s``
        simulated seconds from now; returns whether ``busy()`` stopped holding."""
        end = self.now_us + int(limit_s * SECOND)
        while busy():
            if not self._q or self._q[0][0] > end:
                return not busy()
            self.step()
        return True

    # -- trace -------------------------------------------------------------------------

    def note(self, *parts: Any) -> None:
        """Record one step of the run in the trace (and its hash)."""
        if not self.tracing:
            return
        line = f"{self.now_us} " + " ".join(p.hex()[:16] if isinstance(p, bytes) else str(p) for p in parts)
        self._trace.update(line.encode())
        self._trace.update(b"\n")
        if self.keep_trace:
            self.trace_lines.append(line)

    @property
    def trace_hash(self) -> str:
        return self._trace.hexdigest()
