"""A simulated mesh: nodes on a network, a workload of real ledger entries,
and the invariants checked once it is quiet.

    mesh = Mesh(n=5, seed=7)                 # 5 nodes, real stores, full mesh
    mesh.start()
    mesh.sim.run_until(30)
    mesh.pay(host=0, payer=1, charge=5 * MICRO)
    mesh.finish()                            # faults off, quiet, drain, invariants
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ledger.state import VOIDED
from protocol.admission import AdmissionParams
from protocol.entry import make_entry
from protocol.sync import FORK_HEAD
from tests.ledgerkit import MICRO, T0, TestNet
from tests.sim import hostile as hostile_mod
from tests.sim.core import Sim
from tests.sim.logs import MemLog, StoreLog, VerifyMemo
from tests.sim.net import Network
from tests.sim.node import NodeConfig, SimNode, default_server


class InvariantFailure(AssertionError):
    pass


@dataclass
class Outcome:
    """What :meth:`Mesh.finish` found."""
    failures: list[str] = field(default_factory=list)
    groups: list[list[int]] = field(default_factory=list)
    roots: dict[int, bytes] = field(default_factory=dict)
    trace_hash: str = ""
    events: int = 0
    sim_time_s: float = 0.0


class Mesh:
    def __init__(self, n: int, seed: int, *, log: str = "store", roles: list[str] | None = None,
                 cfg: NodeConfig | None = None, topology: str | int = "full", latency_ms=(2, 40),
                 jitter_ms: float = 5, loss: float = 0.0, reset_p: float = 0.0, keep_trace: bool = False,
                 tracing: bool = True, max_events: int = 3_000_000, max_time_s: float = 36_000,
                 hostile: dict[int, str] | None = None, grant: int = 1_000 * MICRO,
                 admission: AdmissionParams | None = None, verifier_nodes: int = 0) -> None:
        """``admission``: the genesis's admission part (and the admission
        roots become an invariant); ``verifier_nodes``: the first nodes run
        under the genesis verifiers' keys."""
        self.seed = seed
        self.sim = Sim(seed, max_events=max_events, max_time_s=max_time_s, keep_trace=keep_trace, tracing=tracing)
        self.net = Network(self.sim, latency_ms=latency_ms, jitter_ms=jitter_ms, loss=loss, reset_p=reset_p)
        self.t0 = T0 + 60
        self.tn = (TestNet(n_users=n, seed=f"sim-{n}", grant=grant) if admission is None else
                   TestNet(n_users=n, seed=f"sim-{n}", grant=grant, admission_params=admission))
        self.check_admission = admission is not None
        self.genesis = self.tn.genesis
        self.cfg = cfg or NodeConfig()
        self.stopping = False
        self.memo = VerifyMemo(self.genesis) if log == "mem" else None
        roles = roles or [("host", "payer", "payer", "verifier")[i % 4] for i in range(n)]
        self.nodes: list[SimNode] = []
        for i in range(n):
            lg = MemLog(self.genesis, self.memo) if log == "mem" else StoreLog(self.genesis)
            key = self.tn.verifiers[i] if i < verifier_nodes else self.tn.users[i]
            self.nodes.append(SimNode(self, key, lg, roles[i], self.cfg))
        for i, mode in sorted((hostile or {}).items()):
            self.nodes[i].hostile = mode
        self._wire(topology)
        self.equivocators: dict[bytes, int] = {}     # author -> seq it forked at
        self.admission_roots: dict[int, object] = {}    # node -> its AdmissionState at the check
        self.stored_hook = None      # scale bench: stored_hook(node) after a node stores entries
        self.bans: list[tuple[int, int, str]] = []   # (node, banned peer, why)
        self.tasks_done: list[tuple] = []   # (payer, host, error code or None)
        self.crash_in_sync = 0       # crashes still to make right after a sync insert
        self.ad_hook = None          # scale bench: ad_hook(node, ad) when a node takes an ad into its table

    # -- building -----------------------------------------------------------------------

    def _wire(self, topology: str | int) -> None:
        n = len(self.nodes)
        if topology == "full":
            for a in self.nodes:
                a.known = [b.id for b in self.nodes if b is not a]
            return
        k = int(topology)        # each node knows its ring neighbour and k-1 random others
        rng = self.sim.rng
        known = [set() for _ in range(n)]
        for i in range(n):
            known[i].add((i + 1) % n)
            while len(known[i]) < min(k, n - 1):
                j = rng.randrange(n)
                if j != i:
                    known[i].add(j)
        for i in range(n):
            self.nodes[i].known = sorted(known[i])

    def start(self) -> None:
        for node in self.nodes:
            node.on_start()

    def server_session(self, node: SimNode):
        if node.hostile is not None:
            return hostile_mod.server(node, node.hostile)
        return default_server(node)

    def on_stored(self, node: SimNode, ids) -> None:
        if self.stored_hook is not None:
            self.stored_hook(node)

    def on_insert_call(self, node: SimNode) -> None:
        """A sync session just inserted a batch: with ``crash_in_sync`` left,
        crash that node before the session continues (mid-sync), and bring
        it back a few seconds later."""
        if self.crash_in_sync > 0 and self.net.faults and self.sim.rng.random() < 0.4:
            self.crash_in_sync -= 1
            self.sim.note("crash-in-sync", node.id)
            self.sim.at(1, self.net.crash, node.id)
            self.sim.at(int(self.sim.rng.uniform(1, 15) * 1e6), self.net.restart, node.id)

    def honest(self) -> list[SimNode]:
        return [n for n in self.nodes if n.hostile is None]

    # -- faults ---------------------------------------------------------------------------

    def faults(self, on: bool) -> None:
        self.net.faults = on
        self.sim.note("faults", on)

    # -- workload: real entries, authored by the nodes -------------------------------------

    def key(self, i: int):
        return self.nodes[i].key

    def transfer(self, a: int, b: int, amount: int):
        node = self.nodes[a]
        if not node.alive:
            return None
        return node.append(self.tn.transfer(node.key, self.key(b).public, amount, at=node.wall))

    def pay(self, host: int, payer: int, charge: int, ack_after_s: float | None = 2.0):
        """A task's ledger trace: the host logs its receipt under the payer's
        authorisation, and the payer acknowledges it a little later."""
        h, p = self.nodes[host], self.nodes[payer]
        if not h.alive:
            return None
        at = h.wall
        auth = self.tn.spend_auth(p.key, charge, at + 600, host=h.key)
        r = self.tn.receipt(h.key, p.key, charge, at=at - 10, auth=auth)
        e = h.append(r)
        if e is not None and ack_after_s is not None:
            self.sim.at(int(ack_after_s * 1e6), self._ack, payer, r.id)
        return e

    def _ack(self, payer: int, rid: bytes) -> None:
        p = self.nodes[payer]
        if p.alive and not self.stopping:
            p.append(self.tn.ack(p.key, rid, p.wall))

    def double_spend(self, hosts: tuple[int, int], payer: int, charge: int) -> None:
        """One spend authorisation made out to two hosts (the payer re-signs
        it for the second): both log a receipt, the ledger may charge one."""
        p = self.nodes[payer]
        h1, h2 = (self.nodes[i] for i in hosts)
        at = h1.wall
        auth = self.tn.spend_auth(p.key, charge, at + 600, host=h1.key)
        auth2 = auth.replace(host=h2.key.public).signed(p.key)
        for h, a in ((h1, auth), (h2, auth2)):
            if h.alive:
                h.append(self.tn.receipt(h.key, p.key, charge, at=at - 10, auth=a))

    def equivocate(self, author: int, to: int, extra: int = 0) -> bool:
        """``author`` signs a second entry at the seq of its head and hands it
        to node ``to`` only (as if over a connection nobody else sees), and
        ``extra`` more entries on that second branch. Returns whether a fork
        was made."""
        a, t = self.nodes[author], self.nodes[to]
        fr = a.log.frontiers().get(a.public)
        if fr is None or fr[1] == FORK_HEAD or not t.alive:
            return False
        seq = fr[0]
        prev = b""
        if seq > 0:
            below = a.log.linked_ids([(a.public, seq - 1)])[(a.public, seq - 1)]
            prev = sorted(below)[0]
        head = a.log.range(a.public, seq, 1)[0]
        from protocol.entry import Entry
        he = Entry.decode(head)
        obj = self.tn.transfer(a.key, self.key(to).public, 1, at=a.wall)
        e = make_entry(a.key, self.genesis.network_id, seq, prev, he.lamport, max(he.ts, a.wall), obj)
        st = t.log.insert_one(e.encode())
        self.sim.note("equivocate", author, to, seq, st.value)
        last = e
        for k in range(extra):
            obj = self.tn.transfer(a.key, self.key(to).public, 2 + k, at=a.wall)
            last = make_entry(a.key, self.genesis.network_id, last.seq + 1, last.id, last.lamport + 1,
                              max(last.ts, a.wall), obj)
            self.sim.note("equivocate-more", author, to, last.seq, t.log.insert_one(last.encode()).value)
        self.equivocators[a.public] = min(seq, self.equivocators.get(a.public, seq))
        t.announce_heads([a.public])
        return True

    # -- the end: quiet, drain, check ------------------------------------------------------------

    def finish(self, quiet_s: float = 100.0) -> Outcome:
        """Faults off, partitions healed, crashed nodes restarted; run
        ``quiet_s`` of simulated time, stop every loop, drain what is in
        flight, and check the invariants."""
        self.faults(False)
        if self.net.groups is not None:
            self.net.heal()
        for n in self.nodes:
            if not n.alive:
                self.net.restart(n.id)
        self.sim.run_until(self.sim.now + quiet_s)
        self.stopping = True
        self.sim.note("stopping")
        while self.sim.step():
            pass
        out = Outcome(trace_hash=self.sim.trace_hash, events=self.sim.events, sim_time_s=self.sim.now)
        self.check(out)
        # Healed and restarted: the honest nodes must have found each other
        # again (an isolated node would pass every per-group check alone).
        if len(out.groups) > 1:
            out.failures.append(f"honest nodes still apart after the heal: {out.groups}")
        out.trace_hash = self.sim.trace_hash
        return out

    def groups(self) -> list[list[int]]:
        """Connected groups of live honest nodes (over honest connections)."""
        honest = {n.id for n in self.honest() if n.alive}
        seen: set[int] = set()
        out = []
        for a in sorted(honest):
            if a in seen:
                continue
            comp, todo = [], [a]
            seen.add(a)
            while todo:
                x = todo.pop()
                comp.append(x)
                for y in self.net.peers(x):
                    if y in honest and y not in seen:
                        seen.add(y)
                        todo.append(y)
            out.append(sorted(comp))
        return out

    def _check_admission(self, comp: list[int], f: list[str]) -> None:
        """One admission root per group, and the daemon's path (the store's
        admission entries) gives the pure replay's state over every entry."""
        from ledger.admission import replay_admission
        roots = {}
        for i in comp:
            log = self.nodes[i].log
            st = log.admission()
            pure = replay_admission(self.genesis, log.all_entries())
            if st.root != pure.root:
                f.append(f"node {i}: the store's admission root differs from the pure replay's")
            roots[i] = st.root
            self.admission_roots[i] = st
        if len(set(roots.values())) > 1:
            f.append(f"group {comp}: {len(set(roots.values()))} admission roots")

    def check(self, out: Outcome) -> None:
        f = out.failures
        as_of = self.t0 + int(self.sim.now)
        grants = sum(g.amount for g in self.genesis.grants)
        # No session or stream left behind.
        if self.net.runners:
            f.append(f"sessions still running: {sorted(r.name + '@' + str(r.node.id) for r in self.net.runners.values())}")
        if self.net.streams:
            f.append(f"streams still open: {len(self.net.streams)}")
        for n in self.nodes:
            if n.task_host.reserved:
                f.append(f"node {n.id} still holds task reservations {len(n.task_host.reserved)}")
            if n.syncing:
                f.append(f"node {n.id} still marks syncs with {sorted(n.syncing)}")
        out.groups = self.groups()
        for comp in out.groups:
            roots, fronts = {}, {}
            for i in comp:
                node = self.nodes[i]
                res = node.log.replay(as_of)
                roots[i] = res.state_root
                out.roots[i] = res.state_root
                fronts[i] = node.log.frontiers()
                # Conservation: balances add up to what was granted and minted.
                total = sum(a + p for a, p in res.balances.values())
                if total != res.granted + res.minted - res.burned or res.granted != grants:
                    f.append(f"node {i}: conservation broken: balances {total}, granted {res.granted}, "
                             f"minted {res.minted}, burned {res.burned}, genesis grants {grants}")
                # No spend key charged twice.
                st = res.checkpoint.state
                charged: dict[bytes, int] = {}
                for rid, rec in st.receipts.items():
                    if rec[4] != VOIDED:
                        k = st.receipt_keys[rid][32:]
                        charged[k] = charged.get(k, 0) + 1
                twice = [k.hex()[:16] for k, c in charged.items() if c > 1]
                if twice:
                    f.append(f"node {i}: spend keys charged twice: {twice}")
                # An equivocating author is frozen, with the evidence.
                for author, seq in sorted(self.equivocators.items()):
                    fr = fronts[i].get(author)
                    ids = node.log.linked_ids([(author, seq)])[(author, seq)]
                    if fr != (seq, FORK_HEAD) or node.log.forks().get(author) != seq or len(ids) < 2 \
                            or res.frozen.get(author) != seq:
                        f.append(f"node {i}: equivocator {author.hex()[:8]} not frozen at {seq}: frontier {fr}, "
                                 f"forks {node.log.forks().get(author)}, linked at {seq}: {len(ids)}, "
                                 f"replay frozen {res.frozen.get(author)}")
            if self.check_admission:
                self._check_admission(comp, f)
            if len(set(roots.values())) > 1:
                by = {}
                for i, r in roots.items():
                    by.setdefault(r.hex()[:12], []).append(i)
                f.append(f"group {comp}: {len(by)} state roots: {by}")
            if len({tuple(sorted(x.items())) for x in fronts.values()}) > 1:
                f.append(f"group {comp}: frontiers differ")
            # Every ad reaches every node of the group.
            hosts = [self.nodes[i] for i in comp if self.nodes[i].ads]
            for i in comp:
                node = self.nodes[i]
                for h in hosts:
                    if h is node:
                        continue
                    ad = node.table.ads.get((h.public, h.capsule))
                    if ad is None or ad.expires_at <= as_of:
                        f.append(f"node {i}: no ad of host {h.id}")
