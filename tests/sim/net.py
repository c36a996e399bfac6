"""The simulated network: connections, streams and gossip links between
simulated nodes, with seeded faults.

* **Delay.** Each connection draws a base latency when it is first used (a
  few ms to tens of ms); each message adds seeded jitter. Messages of one
  stream arrive in order (a stream is ordered, as over TCP or yamux);
  messages of different streams, and gossip, reorder freely.
* **Loss.** While faults are on, a gossip message is lost with probability
  ``loss``; a stream message is never silently lost: a lost stream message
  resets the stream, and both ends' sessions end with an error, as a
  transport reset does.
* **Partitions.** :meth:`Network.partition` splits the nodes into groups that
  cannot reach each other: connections across groups drop at once, and dials
  across them fail until :meth:`Network.heal`.
* **Crash and restart.** :meth:`Network.crash` drops the node's connections
  and sessions (and everything in flight to it); its log survives, what it
  had not yet inserted is lost. :meth:`Network.restart` brings it back empty
  of everything but its log and its list of known peers.

Counters (messages, bytes, per kind) are kept for the scale benchmark.
"""

from __future__ import annotations

from collections import Counter, deque
from typing import TYPE_CHECKING, Any

from tests.sim.core import MS, Sim

if TYPE_CHECKING:
    from tests.sim.drive import Runner


class Stream:
    """One bidirectional, ordered stream between ``a`` (who opened it) and ``b``."""

    __slots__ = ("net", "sid", "a", "b", "proto", "inbox", "waiter", "last", "reset", "closed", "ends_done")

    def __init__(self, net: Network, sid: int, a: int, b: int, proto: str) -> None:
        self.net, self.sid, self.a, self.b, self.proto = net, sid, a, b, proto
        self.inbox: dict[int, deque] = {a: deque(), b: deque()}
        self.waiter: dict[int, Runner | None] = {a: None, b: None}
        self.last = {a: 0, b: 0}             # arrival time of the last message into each end
        self.reset = False
        self.closed = {a: False, b: False}   # this end has closed its writing half
        self.ends_done = {a: False, b: False}

    def other(self, end: int) -> int:
        return self.b if end == self.a else self.a

    def send(self, frm: int, data: bytes | None) -> bool:
        """Queue ``data`` (None: end of stream) towards the other end; False
        when the stream is already reset or closed for writing."""
        if self.reset or self.closed[frm]:
            return False
        net = self.net
        to = self.other(frm)
        if data is None:
            self.closed[frm] = True
        else:
            net.count("stream", len(data), frm, to)
            if net.faults and net.rng.random() < net.reset_p:
                net.sim.note("stream-lost", self.sid, frm, to, len(data))
                net.sim.at(net.delay(frm, to), self.do_reset, "lost message")
                return True
        t = max(net.sim.now_us + net.delay(frm, to), self.last[to] + 1)
        self.last[to] = t
        net.sim.at(t - net.sim.now_us, self._arrive, to, data)
        return True

    def _arrive(self, to: int, data: bytes | None) -> None:
        if self.reset:
            return
        self.net.sim.note("frame", self.sid, to, "eof" if data is None else len(data))
        self.inbox[to].append(data)
        w = self.waiter[to]
        if w is not None:
            self.waiter[to] = None
            w.wake()

    def do_reset(self, why: str) -> None:
        if self.reset:
            return
        self.reset = True
        self.net.sim.note("stream-reset", self.sid, why)
        for end in (self.a, self.b):
            w = self.waiter[end]
            self.waiter[end] = None
            if w is not None:
                w.on_reset(why)
        self.net.drop_stream(self)

    def end_done(self, end: int) -> None:
        """The session on ``end`` is over: close its writing half."""
        self.ends_done[end] = True
        self.send(end, None)
        if all(self.ends_done.values()):
            self.net.drop_stream(self)


class Network:
    def __init__(self, sim: Sim, *, latency_ms: tuple[float, float] = (2, 40), jitter_ms: float = 5,
                 loss: float = 0.0, reset_p: float = 0.0) -> None:
        self.sim = sim
        self.rng = sim.rng
        self.nodes: list[Any] = []
        self.conns: dict[int, set[int]] = {}
        self.groups: dict[int, int] | None = None
        self.latency_ms = latency_ms
        self.jitter_ms = jitter_ms
        self.loss = loss
        self.reset_p = reset_p
        self.faults = False              # loss and resets apply only while faults are on
        self._lat: dict[tuple[int, int], int] = {}
        self._sid = 0
        self.streams: dict[int, Stream] = {}
        self.runners: dict[int, Runner] = {}    # every live session, by id
        self.messages: Counter[str] = Counter()
        self.bytes: Counter[str] = Counter()
        self.lost = 0
        # Per node, by kind ("gossip", "stream"): (node, kind) -> count; a
        # message lost on the way still counts as received (it was sent to it).
        self.sent: Counter[tuple[int, str]] = Counter()
        self.sent_bytes: Counter[tuple[int, str]] = Counter()
        self.received: Counter[tuple[int, str]] = Counter()
        self.received_bytes: Counter[tuple[int, str]] = Counter()

    # -- nodes ------------------------------------------------------------------------

    def add(self, node: Any) -> int:
        self.nodes.append(node)
        self.conns[len(self.nodes) - 1] = set()
        return len(self.nodes) - 1

    def count(self, kind: str, size: int, frm: int | None = None, to: int | None = None) -> None:
        self.messages[kind] += 1
        self.bytes[kind] += size
        if frm is not None:
            self.sent[frm, kind] += 1
            self.sent_bytes[frm, kind] += size
            self.received[to, kind] += 1
            self.received_bytes[to, kind] += size

    def delay(self, a: int, b: int) -> int:
        k = (a, b) if a < b else (b, a)
        base = self._lat.get(k)
        if base is None:
            lo, hi = self.latency_ms
            base = self._lat[k] = int(self.rng.uniform(lo, hi) * MS)
        return base + int(self.rng.expovariate(1.0 / max(self.jitter_ms, 1e-3)) * MS)

    def reachable(self, a: int, b: int) -> bool:
        if a == b or not (self.nodes[a].alive and self.nodes[b].alive):
            return False
        return self.groups is None or self.groups.get(a, -1) == self.groups.get(b, -1)

    def peers(self, a: int) -> list[int]:
        return sorted(self.conns[a])

    # -- connections ----------------------------------------------------------------------

    def dial(self, a: int, b: int) -> None:
        """``a`` dials ``b``: connected one round trip later if reachable then."""
        if b in self.conns[a] or not self.reachable(a, b):
            return
        self.count("dial", 0)
        self.sim.at(2 * self.delay(a, b), self._establish, a, b)

    def _establish(self, a: int, b: int) -> None:
        if b in self.conns[a] or not self.reachable(a, b):
            return
        self.conns[a].add(b)
        self.conns[b].add(a)
        self.sim.note("connect", a, b)
        self.nodes[a].on_connect(b)
        self.nodes[b].on_connect(a)

    def disconnect(self, a: int, b: int, why: str) -> None:
        if b not in self.conns[a]:
            return
        self.conns[a].discard(b)
        self.conns[b].discard(a)
        self.sim.note("disconnect", a, b, why)
        for s in [s for s in self.streams.values() if {s.a, s.b} == {a, b}]:
            s.do_reset(why)
        for n in (a, b):
            if self.nodes[n].alive:
                self.nodes[n].on_disconnect(b if n == a else a)

    def partition(self, groups: list[list[int]]) -> None:
        self.groups = {n: g for g, members in enumerate(groups) for n in members}
        self.sim.note("partition", groups)
        for a in range(len(self.nodes)):
            for b in self.peers(a):
                if a < b and not self.reachable(a, b):
                    self.disconnect(a, b, "partition")

    def heal(self) -> None:
        self.groups = None
        self.sim.note("heal")
        for n in self.nodes:
            if n.alive:
                n.redial()

    def crash(self, a: int) -> None:
        node = self.nodes[a]
        if not node.alive:
            return
        self.sim.note("crash", a)
        node.alive = False           # first: nothing it does from here on may start anything
        for b in self.peers(a):
            self.disconnect(a, b, "crash")
        node.on_crash()
        for s in [s for s in self.streams.values() if a in (s.a, s.b)]:
            s.do_reset("crash")

    def restart(self, a: int) -> None:
        node = self.nodes[a]
        if node.alive:
            return
        self.sim.note("restart", a)
        node.alive = True
        node.on_start()

    # -- streams ---------------------------------------------------------------------------

    def open_stream(self, a: int, b: int, proto: str) -> Stream | None:
        if b not in self.conns[a]:
            return None
        self._sid += 1
        s = Stream(self, self._sid, a, b, proto)
        self.streams[s.sid] = s
        self.count("stream_open", 0)
        self.sim.at(self.delay(a, b), self._accept, s)
        return s

    def _accept(self, s: Stream) -> None:
        if s.reset:
            return
        if s.b not in self.conns[s.a]:
            s.do_reset("not connected")
            return
        self.nodes[s.b].accept(s)

    def drop_stream(self, s: Stream) -> None:
        self.streams.pop(s.sid, None)

    # -- gossip ---------------------------------------------------------------------------------

    def gossip(self, frm: int, to: int, msg: tuple) -> None:
        """One pubsub frame from ``frm`` to its peer ``to``; ``msg`` is
        (topic, message id, origin, data)."""
        self.count("gossip", len(msg[3]), frm, to)
        if self.faults and self.rng.random() < self.loss:
            self.lost += 1
            return
        self.sim.at(self.delay(frm, to), self._gossip_arrive, frm, to, msg)

    def _gossip_arrive(self, frm: int, to: int, msg: tuple) -> None:
        if frm in self.conns[to] and self.nodes[to].alive:
            self.sim.note("gossip", msg[0], frm, to, len(msg[3]))
            self.nodes[to].on_gossip(frm, msg)

    def control(self, frm: int, to: int, what: str) -> None:
        """A pubsub control message (GRAFT/PRUNE): applied at once, counted."""
        self.count("control", 0)
        node = self.nodes[to]
        if node.alive and frm in self.conns[to]:
            node.on_control(frm, what)

    # -- views for the invariants ------------------------------------------------------------------

    def components(self) -> list[list[int]]:
        """Connected groups of live nodes, by the connections now up."""
        seen: set[int] = set()
        out = []
        for a in range(len(self.nodes)):
            if a in seen or not self.nodes[a].alive:
                continue
            comp, todo = [], [a]
            seen.add(a)
            while todo:
                x = todo.pop()
                comp.append(x)
                for y in self.peers(x):
                    if y not in seen:
                        seen.add(y)
                        todo.append(y)
            out.append(sorted(comp))
        return out
