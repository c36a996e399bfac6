"""Ledger-facing objects besides inference receipts: contributions (the only
way credits are minted), challenges, payers' disputes and transfers.
Admission reports are in protocol/admission.py."""

from __future__ import annotations

from dataclasses import dataclass

from crypto import domains
from protocol import canonical
from protocol.errors import AemError
from protocol.genesis import CREDIT_BASES
from protocol.schema import (HASH, HASH_OR_EMPTY, KEY, NAME, NONCE, SIG, TEXT, TIME,
                             Bytes, ListOf, Obj, Signed, Str, UInt, WireObject, f)

CONTRIBUTION_TYPES = ("knowledge", "skill", "data_shard", "eval", "curriculum", "operator")


@dataclass(frozen=True)
class Attestation(WireObject):
    """A verifier's signature over a contribution's measured delta."""
    verifier: bytes = f(KEY)
    sig: bytes = f(Bytes(64))


@dataclass(frozen=True)
class ContributionReceipt(Signed):
    """A contribution with a measured delta. It mints credit only when a quorum
    of the genesis verifiers attests the same core (everything but ``sig`` and
    ``attestations``), under the ``contribution_attest`` domain."""
    TYPE = "contribution"
    SIGNER = "contributor"
    MAX_SIZE = 16384

    net: bytes = f(HASH)
    contributor: bytes = f(KEY)
    contribution_type: str = f(Str(16, choices=CONTRIBUTION_TYPES))
    credit_basis: str = f(Str(32, choices=CREDIT_BASES))
    source_policy: str = f(TEXT)        # where the content came from, under which terms
    training_use: str = f(TEXT)         # what others may train on it
    anti_distillation: str = f(TEXT)    # declared: not distilled from third-party models
    content_commitment: bytes = f(HASH)
    eval_id: str = f(NAME)
    measured_delta: int = f(UInt(0, 1_000_000))   # units of the basis, e.g. basis points
    created_at: int = f(TIME)
    attestations: tuple = f(ListOf(Obj(Attestation), 64))
    sig: bytes = f(SIG)

    def attest_bytes(self) -> bytes:
        m = self.to_map()
        del m["sig"], m["attestations"]
        return domains.signable("contribution_attest", self.net, canonical.encode(m))

    def attested_by(self, key) -> Attestation:
        """A verifier's attestation (``key``: crypto.keys.SigningKey)."""
        return Attestation(verifier=key.public, sig=key.sign_raw(self.attest_bytes()))

    def valid_attesters(self, verifiers: frozenset[bytes]) -> set[bytes]:
        """The distinct genesis verifiers whose attestation verifies."""
        msg = self.attest_bytes()
        good: set[bytes] = set()
        for a in self.attestations:
            if a.verifier in verifiers and a.verifier not in good:
                try:
                    domains.verify(a.verifier, msg, a.sig)
                except AemError:
                    continue
                good.add(a.verifier)
        return good


@dataclass(frozen=True)
class Challenge(Signed):
    """A verifier's claim that a receipt is bad; inside the challenge window it
    voids the receipt and refunds the payer."""
    TYPE = "challenge"
    SIGNER = "verifier"
    MAX_SIZE = 1024

    net: bytes = f(HASH)
    verifier: bytes = f(KEY)
    receipt_id: bytes = f(HASH)
    reason: str = f(TEXT)
    evidence_hash: bytes = f(HASH_OR_EMPTY)
    created_at: int = f(TIME)
    sig: bytes = f(SIG)


@dataclass(frozen=True)
class Dispute(Signed):
    """A payer's claim that it never received the work a receipt charges it
    for. Inside the challenge window, for a receipt the payer never
    acknowledged, it voids the receipt and refunds the payer; every dispute
    stays on record in the payer's feed (specs/ledger.md section 5.5)."""
    TYPE = "dispute"
    SIGNER = "payer"
    MAX_SIZE = 1024

    net: bytes = f(HASH)
    payer: bytes = f(KEY)
    receipt_id: bytes = f(HASH)
    reason: str = f(TEXT)
    created_at: int = f(TIME)
    sig: bytes = f(SIG)


@dataclass(frozen=True)
class Transfer(Signed):
    TYPE = "transfer"
    SIGNER = "sender"
    MAX_SIZE = 512

    net: bytes = f(HASH)
    sender: bytes = f(KEY)
    recipient: bytes = f(KEY)
    amount: int = f(UInt(1, 2**62))
    nonce: bytes = f(NONCE)
    created_at: int = f(TIME)
    sig: bytes = f(SIG)
