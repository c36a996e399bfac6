"""What this node has seen of each host it routes tasks to: pure, explicit time.

The router ranks advertisements, which any key can sign; the hostbook is what
this node has *observed*, and it alone decides which ranked hosts a task may
be tried on (``specs/task-protocol.md`` §3, routing):

* **Backoff.** A host that failed an attempt (no connection, a stream or
  protocol failure, a refusal, a bad result) is skipped until
  ``base_s * 2**(failures-1)`` seconds have passed (capped at ``max_s``); a
  timeout counts as two failures, because a host that holds a stream and never
  answers costs the payer the most. A success clears the record. Locally and at
  once: the next task already skips it, whatever the host's ads claim.
* **Reachability.** A host's ads are ranked only if its peer was connected to
  this node, or answered a stream, within ``reachable_s`` seconds. A card is a
  claim; a connection is evidence. Hosts nobody has reached yet are probed
  (dialled) by the caller before they are tried, and a failed probe is a failure.
* **Standing.** Hosts with settled receipts in the ledger (the work record
  every node replays) and reachable hosts are the last the mesh table evicts
  (:meth:`standing`), so a flood of fresh keys cannot push them out.

Bounded: at most ``max_hosts`` entries; beyond it the entries with the oldest
activity are forgotten (a forgotten host is simply unknown again: it must be
reached again before it is ranked).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["HostBook", "HostRecord"]


@dataclass
class HostRecord:
    failures: int = 0          # consecutive failed attempts (a timeout counts 2)
    retry_at: float = 0.0      # skipped before this time
    reached_at: float | None = None   # last time the host's peer was connected or answered
    touched: float = 0.0       # last activity, for eviction


class HostBook:
    def __init__(self, *, base_s: float = 10.0, max_s: float = 900.0, reachable_s: float = 900.0,
                 max_hosts: int = 10_000) -> None:
        if not (0 < base_s <= max_s) or reachable_s <= 0 or max_hosts <= 0:
            raise ValueError("HostBook needs 0 < base_s <= max_s, reachable_s > 0, max_hosts > 0")
        self.base_s, self.max_s, self.reachable_s, self.max_hosts = base_s, max_s, reachable_s, max_hosts
        self._hosts: dict[bytes, HostRecord] = {}
        self._settled: dict[bytes, int] = {}

    # -- observations ------------------------------------------------------------

    def failed(self, host: bytes, now: float, *, timeout: bool = False) -> float:
        """Record a failed attempt; returns the time before which the host is skipped."""
        rec = self._record(host, now)
        rec.failures = min(rec.failures + (2 if timeout else 1), 64)
        rec.retry_at = now + self.delay(rec.failures)
        return rec.retry_at

    def succeeded(self, host: bytes, now: float) -> None:
        """The host delivered: clear its failures, and it answered, so it is reachable."""
        rec = self._record(host, now)
        rec.failures, rec.retry_at = 0, 0.0
        rec.reached_at = now

    def reached(self, host: bytes, at: float) -> None:
        """The host's peer was connected (or answered a stream) at ``at``."""
        rec = self._record(host, at)
        if rec.reached_at is None or at > rec.reached_at:
            rec.reached_at = at

    def note_receipts(self, settled: dict[bytes, int]) -> None:
        """The ledger's count of settled receipts per host (replaces the previous one)."""
        self._settled = {h: n for h, n in settled.items() if n > 0}

    # -- questions ---------------------------------------------------------------

    def delay(self, failures: int) -> float:
        if failures <= 0:
            return 0.0
        return min(self.max_s, self.base_s * 2.0 ** min(failures - 1, 32))

    def backing_off(self, host: bytes, now: float) -> bool:
        rec = self._hosts.get(host)
        return rec is not None and rec.retry_at > now

    def retry_at(self, host: bytes) -> float:
        rec = self._hosts.get(host)
        return rec.retry_at if rec is not None else 0.0

    def failures(self, host: bytes) -> int:
        rec = self._hosts.get(host)
        return rec.failures if rec is not None else 0

    def is_reachable(self, host: bytes, now: float) -> bool:
        rec = self._hosts.get(host)
        return rec is not None and rec.reached_at is not None and now - rec.reached_at <= self.reachable_s

    def standing(self, host: bytes, now: float) -> int:
        """Higher is kept longer by the mesh table: settled work first, then reachability."""
        return (2 if self._settled.get(host, 0) > 0 else 0) + (1 if self.is_reachable(host, now) else 0)

    def usable(self, hosts: list[bytes], now: float) -> tuple[list[bytes], list[bytes], list[bytes]]:
        """Split ``hosts`` (keeping their order) into (reachable and not backing
        off, never or not recently reached and not backing off: to probe,
        backing off: skipped)."""
        ready, probe, skipped = [], [], []
        for h in hosts:
            if self.backing_off(h, now):
                skipped.append(h)
            elif self.is_reachable(h, now):
                ready.append(h)
            else:
                probe.append(h)
        return ready, probe, skipped

    def __len__(self) -> int:
        return len(self._hosts)

    # -- internals ---------------------------------------------------------------

    def _record(self, host: bytes, now: float) -> HostRecord:
        rec = self._hosts.get(host)
        if rec is None:
            if len(self._hosts) >= self.max_hosts:
                self._evict(now)
            rec = self._hosts[host] = HostRecord()
        rec.touched = max(rec.touched, now)
        return rec

    def _evict(self, now: float) -> None:
        # Forget the least recently active quarter, but never a host still in
        # backoff (forgetting it would lift the penalty).
        by_age = sorted(self._hosts.items(), key=lambda kv: kv[1].touched)
        drop = max(1, len(by_age) // 4)
        for host, rec in by_age:
            if drop == 0:
                break
            if rec.retry_at > now:
                continue
            del self._hosts[host]
            drop -= 1
        if len(self._hosts) >= self.max_hosts:   # everything is backing off: oldest goes anyway
            self._hosts.pop(by_age[0][0], None)
