"""Building ledgers for tests: a test network, its actors' feeds, and every
kind of entry, valid or deliberately broken.

    net = TestNet()                       # genesis with grants to net.users
    t = net.transfer(net.users[0], net.users[1], 5_000)
    e = net.append(net.users[0], t)       # the next entry of that author's feed
    data = e.encode()

Each author's feed (seq, prev, Lamport clock) is tracked here, so entries
chain correctly unless a helper is asked to break them (``forge``,
``fork``, ``detach``). :func:`scenario` draws a realistic random ledger for
hypothesis tests, and :func:`bulk` builds large ones for benchmarks.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field

from crypto.hashing import H
from crypto.keys import SigningKey
from protocol.admission import DEFAULT_ADMISSION, AdmissionParams, AdmissionReport, Measurements
from protocol.entry import Entry, make_entry
from protocol.genesis import DEFAULT_LIMITS, Genesis, Grant, MintRate
from protocol.mesh import ExpertCapsuleManifest
from protocol.receipts import Challenge, ContributionReceipt, Dispute, Transfer
from protocol.schema import Signed
from protocol.task import InferenceWorkReceipt, ReceiptAck, SpendAuthorization

T0 = 1_800_000_000
MICRO = 1_000_000
WINDOW = 3600


def key(name: str | int) -> SigningKey:
    """A deterministic key for a test actor."""
    return SigningKey.from_seed(H(f"ledgerkit/{name}".encode()))


@dataclass
class FeedHead:
    seq: int = -1
    head: bytes = b""
    lamport: int = 0
    ids: list = field(default_factory=list)   # id of the entry at each seq


@dataclass
class TestNet:
    """A genesis and the feeds of its actors. ``users`` get grants; ``verifiers``
    are the genesis verifiers (``quorum`` of them must attest a mint)."""
    __test__ = False     # not a pytest test class, despite its name
    n_users: int = 6
    n_verifiers: int = 3
    quorum: int = 2
    grant: int = 1_000 * MICRO
    window: int = WINDOW
    mint_rate: int = 10_000          # micro-credits per unit of delta, every basis
    max_mint: int = 500 * MICRO
    seed: str = "net"
    admission_params: AdmissionParams = DEFAULT_ADMISSION   # the genesis's admission part
    feeds: dict = field(default_factory=dict)
    clock: int = 0                   # largest Lamport clock handed out

    def __post_init__(self) -> None:
        self.founder = key(f"{self.seed}/founder")
        self.users = [key(f"{self.seed}/user{i}") for i in range(self.n_users)]
        self.verifiers = sorted((key(f"{self.seed}/verifier{i}") for i in range(self.n_verifiers)),
                                key=lambda k: k.public)
        self.outsider = key(f"{self.seed}/outsider")     # no grant, not a verifier
        grants = sorted((Grant(account=u.public, amount=self.grant) for u in self.users),
                        key=lambda g: g.account)
        from protocol.genesis import CREDIT_BASES
        self.genesis = Genesis(
            network_name="ledgerkit", created_at=T0, founder=self.founder.public,
            verifiers=tuple(v.public for v in self.verifiers), quorum=self.quorum,
            grants=tuple(grants), challenge_window=self.window,
            mint_rates=tuple(MintRate(basis=b, micro_per_unit=self.mint_rate) for b in sorted(CREDIT_BASES)),
            max_mint_per_receipt=self.max_mint, limits=DEFAULT_LIMITS, sig=b"",
            admission=self.admission_params,
        ).signed(self.founder)
        self.net = self.genesis.network_id
        self._n = 0

    def _nonce(self) -> bytes:
        self._n += 1
        return H(f"{self.seed}/nonce/{self._n}".encode())[:16]

    # -- objects -----------------------------------------------------------

    def transfer(self, sender: SigningKey, recipient: SigningKey | bytes, amount: int,
                 at: int = T0) -> Transfer:
        to = recipient if isinstance(recipient, bytes) else recipient.public
        return Transfer(net=self.net, sender=sender.public, recipient=to, amount=amount,
                        nonce=self._nonce(), created_at=at, sig=b"").signed(sender)

    def spend_auth(self, payer: SigningKey, max_charge: int, expires_at: int,
                   task: bytes | None = None, spend_key: bytes | None = None,
                   host: SigningKey | bytes | None = None) -> SpendAuthorization:
        """An authorisation made out to ``host`` (None: filled in by
        :meth:`receipt`, which re-signs it for the receipt's host)."""
        task = task or H(self._nonce())
        to = host if isinstance(host, bytes) else host.public if host is not None else bytes(32)
        return SpendAuthorization(net=self.net, payer=payer.public, host=to,
                                  spend_key=spend_key or H(b"sk" + self._nonce()),
                                  task_hash=task, max_charge=max_charge, expires_at=expires_at,
                                  sig=b"").signed(payer)

    def receipt(self, host: SigningKey, payer: SigningKey, charge: int, at: int = T0,
                auth: SpendAuthorization | None = None, duration: int = 5) -> InferenceWorkReceipt:
        auth = auth or self.spend_auth(payer, max(charge, 1), at + 600)
        if auth.host != host.public and auth.host == bytes(32):
            # An authorisation drawn without a host: made out to this one by its payer.
            auth = auth.replace(host=host.public).signed(_key_of(self, auth.payer))
        return InferenceWorkReceipt(
            net=self.net, host=host.public, payer=auth.payer, task_hash=auth.task_hash,
            capsule_id=H(b"capsule"), spend_auth=auth, charge=charge, output_hash=H(self._nonce()),
            tokens_out=42, started_at=at, finished_at=at + duration, sig=b"").signed(host)

    def challenge(self, verifier: SigningKey, receipt_id: bytes, at: int) -> Challenge:
        return Challenge(net=self.net, verifier=verifier.public, receipt_id=receipt_id,
                         reason="wrong output", evidence_hash=H(self._nonce()), created_at=at,
                         sig=b"").signed(verifier)

    def contribution(self, contributor: SigningKey, delta: int, attesters: list[SigningKey],
                     at: int = T0, basis: str = "accepted_delta",
                     commitment: bytes | None = None) -> ContributionReceipt:
        c = ContributionReceipt(
            net=self.net, contributor=contributor.public, contribution_type="skill",
            credit_basis=basis, source_policy="own work", training_use="open",
            anti_distillation="not distilled", content_commitment=commitment or H(self._nonce()),
            eval_id="ledgerkit-eval", measured_delta=delta, created_at=at, attestations=(), sig=b"")
        return c.replace(attestations=tuple(c.attested_by(v) for v in attesters)).signed(contributor)

    def dispute(self, payer: SigningKey, receipt_id: bytes, at: int = T0) -> Dispute:
        return Dispute(net=self.net, payer=payer.public, receipt_id=receipt_id,
                       reason="work never received", created_at=at, sig=b"").signed(payer)

    def ack(self, payer: SigningKey, receipt_id: bytes, at: int = T0) -> ReceiptAck:
        return ReceiptAck(net=self.net, payer=payer.public, receipt_id=receipt_id, accepted=True,
                          created_at=at, sig=b"").signed(payer)

    def measurements(self, content_hash: bytes = b"", target_bp: int = 6000, **changes) -> Measurements:
        """What an honest verifier measures of a capsule that passes every
        gate of ``admission_params`` (its first domain, class ``cpu``)."""
        p = self.admission_params
        dom = p.domains[0] if p.domains else None
        m = Measurements(
            artefact_hash=content_hash, artefact_ok=True, manifest_ok=True, manifest_problem="",
            tensor_hash=H(b"tensors" + content_hash), memory_mb=512, node_class="cpu",
            target_eval=dom.target_eval if dom else H(b"ledgerkit-eval"), target_bp=target_bp,
            general_eval=dom.general_eval if dom else b"", general_bp=5000, trigger_divergence_bp=0,
            fingerprint=H(b"fp" + content_hash) + H(b"fp2" + content_hash), results_hash=H(b"results" + content_hash))
        return dataclasses.replace(m, **changes)

    def admission(self, verifier: SigningKey, at: int = T0, capsule_id: bytes | None = None,
                  m: Measurements | None = None, purpose: str = "admission", round: bytes = b"",
                  failed: tuple = (), trace: bytes | None = None) -> AdmissionReport:
        """A verifier's report (default: of a fresh capsule id, admit)."""
        return AdmissionReport(
            net=self.net, verifier=verifier.public, capsule_id=capsule_id or H(self._nonce()),
            purpose=purpose, round=round, measurements=m or self.measurements(),
            route_trace_hash=H(self._nonce()) if trace is None else trace,
            verdict="reject" if failed else "admit", failed=failed, created_at=at,
            sig=b"").signed(verifier)

    def manifest(self, author: SigningKey, at: int = T0, domain: str = "code", node_class: str = "cpu",
                 content_hash: bytes | None = None) -> ExpertCapsuleManifest:
        return ExpertCapsuleManifest(
            net=self.net, author=author.public, name="tiny expert", kind="gguf",
            content_hash=content_hash or H(self._nonce()), size_bytes=1 << 20, architecture="llama",
            n_params=1_000_000, quantization="q4_0", context_length=2048, vram_need_mb=512, domain=domain,
            tags=("python",), eval_claims=(), created_at=at, sig=b"", node_class=node_class).signed(author)

    # -- entries -----------------------------------------------------------

    def head(self, author: SigningKey) -> FeedHead:
        return self.feeds.setdefault(author.public, FeedHead())

    def append(self, author: SigningKey, obj: Signed, ts: int = T0, lamport: int | None = None) -> Entry:
        """The next entry of ``author``'s feed, holding ``obj``."""
        h = self.head(author)
        lam = lamport if lamport is not None else max(self.clock, h.lamport) + 1
        e = make_entry(author, self.net, h.seq + 1, h.head, lam, ts, obj)
        h.seq, h.head, h.lamport = e.seq, e.id, lam
        h.ids.append(e.id)
        self.clock = max(self.clock, lam)
        return e

    def fork(self, author: SigningKey, at_seq: int, obj: Signed, ts: int = T0,
             lamport: int | None = None) -> Entry:
        """A second, validly linked entry at ``at_seq`` of ``author``'s feed
        (an equivocation); the feed's head does not move."""
        h = self.head(author)
        prev = h.ids[at_seq - 1] if at_seq > 0 else b""
        self.clock += 1
        return make_entry(author, self.net, at_seq, prev, lamport if lamport is not None else self.clock,
                          ts, obj)

    def forge(self, e: Entry) -> bytes:
        """``e`` with its signature broken (same length)."""
        bad = bytes([e.sig[0] ^ 1]) + e.sig[1:]
        return e.replace(sig=bad).encode()


# -- random ledgers -------------------------------------------------------------

# Operation -> weight in a random scenario.
OPS = {
    "transfer": 20, "receipt": 22, "double_spend": 6, "overdraft": 5, "challenge_in": 6,
    "challenge_late": 4, "contribution": 6, "weak_contribution": 3, "forged": 2, "fork": 2,
    "ack": 3, "foreign_author": 2, "expired_auth": 3, "self_transfer": 1, "challenge_first": 2,
    "acked_retry": 4, "dispute": 4, "payer_ack": 3,
}


def scenario(rnd: random.Random, n_ops: int, net: TestNet | None = None) -> tuple[TestNet, list[bytes]]:
    """A random ledger: a mix of valid entries and every kind of bad one.

    Returns the network and the entries' bytes in authoring order. Times
    spread over a few challenge windows, so replaying as of different times
    settles different receipts.
    """
    net = net or TestNet(seed=f"scn{rnd.random()}", n_users=rnd.randint(3, 6),
                         grant=rnd.choice([5, 50, 1_000]) * MICRO)
    users, vs = net.users, net.verifiers
    out: list[bytes] = []
    receipts: list[tuple[InferenceWorkReceipt, int]] = []
    t = T0
    for _ in range(n_ops):
        t += rnd.randint(0, net.window // 2)
        op = rnd.choices(list(OPS), weights=list(OPS.values()))[0]
        a, b = rnd.sample(users, 2)
        amount = rnd.choices([1, 10, 1_000, net.grant // 20, net.grant // 4, 2 * net.grant],
                             weights=[2, 2, 3, 6, 3, 1])[0] or 1
        if op in ("transfer", "overdraft", "self_transfer"):
            if op == "overdraft":
                amount = net.grant * 3
            to = a if op == "self_transfer" else b
            out.append(net.append(a, net.transfer(a, to, amount, t), ts=t).encode())
        elif op in ("receipt", "expired_auth"):
            auth = net.spend_auth(b, amount, t - 1 if op == "expired_auth" else t + 600)
            r = net.receipt(a, b, amount, t, auth=auth)
            receipts.append((r, t))
            out.append(net.append(a, r, ts=t).encode())
        elif op == "double_spend":
            auth = net.spend_auth(b, amount, t + 600)
            hosts = rnd.sample(users[:] if len(users) > 2 else users, 2)
            hosts = [h for h in hosts if h.public != b.public] or [a]
            for h in hosts:
                r = net.receipt(h, b, amount, t, auth=auth)
                receipts.append((r, t))
                out.append(net.append(h, r, ts=t).encode())
        elif op in ("challenge_in", "challenge_late") and receipts:
            r, rt = rnd.choice(receipts)
            v = rnd.choice(vs)
            late = op == "challenge_late"
            at = rt + (net.window + 700 if late else rnd.randint(1, net.window // 2))
            t = max(t, at)
            out.append(net.append(v, net.challenge(v, r.id, at), ts=at).encode())
        elif op == "challenge_first":
            # A verifier's challenge that sorts before the receipt it names.
            r = net.receipt(a, b, amount, t, auth=net.spend_auth(b, amount, t + 600))
            v = rnd.choice(vs)
            out.append(net.append(v, net.challenge(v, r.id, t + 1), ts=t + 1).encode())
            receipts.append((r, t))
            out.append(net.append(a, r, ts=t + 2).encode())
        elif op in ("contribution", "weak_contribution"):
            k = net.quorum if op == "contribution" else net.quorum - 1
            c = net.contribution(a, rnd.randint(0, 5_000), rnd.sample(vs, k), t)
            out.append(net.append(a, c, ts=t).encode())
        elif op == "forged":
            e = net.append(a, net.transfer(a, b, amount, t), ts=t)
            out.append(net.forge(e))
            # the real one stays unpublished: a's next entry is unlinked
        elif op == "fork":
            h = net.head(a)
            if h.seq >= 0:
                at_seq = max(0, h.seq - rnd.randint(0, 2))
                out.append(net.fork(a, at_seq, net.transfer(a, b, 1, t), ts=t).encode())
        elif op == "ack" and receipts:
            r, _ = rnd.choice(receipts)
            out.append(net.append(b, net.ack(b, r.id, t), ts=t).encode())
        elif op == "payer_ack" and receipts:
            r, _ = rnd.choice(receipts)
            p = _key_of(net, r.payer)
            out.append(net.append(p, net.ack(p, r.id, t), ts=t).encode())
        elif op == "acked_retry":
            # A host that refused logs its own receipt for the spend key with a
            # small Lamport clock; the payer acknowledges the host that did the work.
            others = [u for u in users if u.public != b.public]
            thief, honest = (rnd.sample(others, 2) if len(others) > 1 else (others[0], others[0]))
            sk = H(b"retry" + net._nonce())
            task = H(net._nonce())
            stolen = net.receipt(thief, b, amount, t, auth=net.spend_auth(b, amount, t + 600, task, sk))
            paid = net.receipt(honest, b, max(1, amount // 4), t,
                               auth=net.spend_auth(b, max(1, amount // 4), t + 600, task, sk))
            receipts += [(stolen, t), (paid, t)]
            th = net.head(thief)     # as small a clock as its own feed allows
            out.append(net.append(thief, stolen, ts=t, lamport=th.lamport + 1 if th.seq >= 0 else 0).encode())
            out.append(net.append(honest, paid, ts=t).encode())
            out.append(net.append(b, net.ack(b, paid.id, t + 1), ts=t + 1).encode())
            if rnd.random() < 0.5:
                out.append(net.append(b, net.dispute(b, stolen.id, t + 2), ts=t + 2).encode())
        elif op == "dispute" and receipts:
            r, rt = rnd.choice(receipts)
            p = _key_of(net, r.payer) if rnd.random() < 0.85 else a
            at = rt + rnd.choice([1, net.window // 2, net.window + 700])
            t = max(t, at)
            out.append(net.append(p, net.dispute(p, r.id, at), ts=at).encode())
        elif op == "foreign_author":
            # a's transfer wrapped in b's entry: WRONG_AUTHOR
            out.append(net.append(b, net.transfer(a, b, 1, t), ts=t).encode())
    return net, out


# -- large realistic ledgers (benchmarks, load tests) ---------------------------------

BULK_MIX = {"receipt": 45, "transfer": 28, "ack": 8, "contribution": 5, "challenge": 3,
            "admission": 6, "manifest": 5}


def bulk(n: int, *, users: int = 2000, hosts: int = 200, seed: int = 0, start: int = T0,
         every: int = 26, progress=None) -> tuple[TestNet, list[bytes]]:
    """A realistic ledger of ``n`` entries in authoring order, one every
    ``every`` seconds (100,000 take a month): many accounts, a few hundred
    hosts, 7 verifiers (quorum 4), every kind of entry, about 2% of them
    refused by a rule (double spends, overdrafts, contributions short of a
    quorum, late challenges). Deterministic for a seed."""
    rnd = random.Random(seed)
    net = TestNet(n_users=users, n_verifiers=7, quorum=4, seed=f"bulk{seed}", max_mint=50 * MICRO)
    us, vs = net.users, net.verifiers
    hs = us[:hosts]
    kinds, weights = list(BULK_MIX), list(BULK_MIX.values())
    recent: list[tuple[InferenceWorkReceipt, int]] = []
    out: list[bytes] = []
    for i in range(n):
        t = start + i * every
        op = rnd.choices(kinds, weights)[0]
        if op in ("ack", "challenge") and not recent:
            op = "transfer"
        if op == "receipt":
            host = rnd.choice(hs)
            payer = rnd.choice(us)
            while payer is host:
                payer = rnd.choice(us)
            charge = rnd.randint(1, 20 * MICRO)
            if recent and rnd.random() < 0.01:                  # a double spend
                auth = recent[-1][0].spend_auth.replace(host=bytes(32))   # re-made out to this host
                payer = next(u for u in us if u.public == auth.payer)
                charge = min(charge, auth.max_charge)
            else:
                auth = net.spend_auth(payer, charge + rnd.randint(0, MICRO), t + 600)
            r = net.receipt(host, payer, charge, at=t - 5, auth=auth)
            recent.append((r, t))
            del recent[:-500]
            out.append(net.append(host, r, ts=t).encode())
        elif op == "transfer":
            a, b = rnd.sample(us, 2)
            amount = rnd.randint(1, 5 * MICRO) if rnd.random() > 0.01 else 10_000 * MICRO
            out.append(net.append(a, net.transfer(a, b, amount, t), ts=t).encode())
        elif op == "ack":
            r, _ = rnd.choice(recent[-50:])
            payer = _key_of(net, r.payer)
            out.append(net.append(payer, net.ack(payer, r.id, t), ts=t).encode())
        elif op == "contribution":
            a = rnd.choice(us)
            k = net.quorum if rnd.random() > 0.05 else net.quorum - 1
            c = net.contribution(a, rnd.randint(1, 2_000), rnd.sample(vs, k), t)
            out.append(net.append(a, c, ts=t).encode())
        elif op == "challenge":
            v = rnd.choice(vs)
            r, rt = rnd.choice(recent[-200:])
            at = t if rnd.random() > 0.1 else rt + net.window + 700
            out.append(net.append(v, net.challenge(v, r.id, at), ts=max(t, at)).encode())
        elif op == "admission":
            v = rnd.choice(vs)
            out.append(net.append(v, net.admission(v, t), ts=t).encode())
        else:
            h = rnd.choice(hs)
            out.append(net.append(h, net.manifest(h, t), ts=t).encode())
        if progress is not None and (i + 1) % 1000 == 0:
            progress(i + 1)
    return net, out


def _key_of(net: TestNet, public: bytes) -> SigningKey:
    idx = getattr(net, "_by_public", None)
    if idx is None:
        idx = net._by_public = {k.public: k for k in net.users + net.verifiers + [net.outsider]}
    return idx[public]
