"""The genesis document: the signed definition of one aem network.

Its id (the SHA-256 of its canonical signed bytes) is the network id that every
other signed object, gossip topic and stream protocol name carries, so two
networks never mix.
"""

from __future__ import annotations

from dataclasses import dataclass

import dataclasses

from crypto.hashing import H
from protocol.admission import DEFAULT_ADMISSION, AdmissionParams
from protocol import errors
from protocol.errors import AemError
from protocol.schema import (AMOUNT, KEY, NAME, SIG, TIME, ListOf, Obj, Signed, Str,
                             UInt, WireObject, f)

# The credit bases a contribution may be minted on (see specs/ledger.md).
CREDIT_BASES = (
    "accepted_delta",
    "verified_skill_use",
    "eval_improvement",
    "curation_quality",
    "operator_adoption",
)


@dataclass(frozen=True)
class Grant(WireObject):
    """An initial balance given by the genesis."""
    account: bytes = f(KEY)
    amount: int = f(AMOUNT)


@dataclass(frozen=True)
class MintRate(WireObject):
    """Micro-credits minted per unit of measured delta on one credit basis."""
    basis: str = f(Str(32, choices=CREDIT_BASES))
    micro_per_unit: int = f(AMOUNT)


@dataclass(frozen=True)
class Limits(WireObject):
    """Network-wide size and batch limits (bytes unless named otherwise)."""
    max_entry_bytes: int = f(UInt(1024, 1 << 20))
    max_task_bytes: int = f(UInt(4096, 32 << 20))
    max_gossip_bytes: int = f(UInt(1024, 1 << 20))
    max_sync_batch: int = f(UInt(1, 10_000))
    #: Longest validity window (``expires_at - issued_at``, seconds) of a NodeCard
    #: or HostAdvertisement: what any key can make the mesh remember before it
    #: must sign again (specs/sync-protocol.md §2).
    max_announce_lifetime_s: int = f(UInt(60, 7 * 86400))


DEFAULT_LIMITS = Limits(max_entry_bytes=65536, max_task_bytes=12 << 20,
                        max_gossip_bytes=16384, max_sync_batch=512,
                        max_announce_lifetime_s=3600)


@dataclass(frozen=True)
class Genesis(Signed):
    TYPE = "genesis"
    SIGNER = "founder"
    MAX_SIZE = 1 << 20

    network_name: str = f(NAME)
    created_at: int = f(TIME)
    founder: bytes = f(KEY)
    verifiers: tuple = f(ListOf(KEY, 64, unique=True))
    quorum: int = f(UInt(1, 64))
    grants: tuple = f(ListOf(Obj(Grant), 4096))
    challenge_window: int = f(UInt(0, 30 * 86400))
    mint_rates: tuple = f(ListOf(Obj(MintRate), len(CREDIT_BASES)))
    max_mint_per_receipt: int = f(AMOUNT)
    limits: Limits = f(Obj(Limits))
    sig: bytes = f(SIG)
    # The admission gates' thresholds, node classes and eval sets
    # (specs/admission.md §1). Required on the wire; a default only so code
    # building a genesis need not name it.
    admission: AdmissionParams = dataclasses.field(default=DEFAULT_ADMISSION,
                                                   metadata={"kind": Obj(AdmissionParams)})

    def network(self) -> bytes:
        return b""  # the genesis defines the network id, so it cannot name it

    def _validate(self) -> None:
        if self.quorum > len(self.verifiers):
            raise AemError(errors.BAD_VALUE, "genesis.quorum exceeds the number of verifiers")
        if list(self.verifiers) != sorted(self.verifiers):
            raise AemError(errors.BAD_VALUE, "genesis.verifiers must be sorted")
        accounts = [g.account for g in self.grants]
        if accounts != sorted(set(accounts)):
            raise AemError(errors.BAD_VALUE, "genesis.grants must be sorted by account, one each")
        bases = [r.basis for r in self.mint_rates]
        if bases != sorted(set(bases)):
            raise AemError(errors.BAD_VALUE, "genesis.mint_rates must be sorted by basis, one each")
        if sum(g.amount for g in self.grants) > 2**62:
            raise AemError(errors.BAD_VALUE, "genesis grants exceed the credit range")

    @property
    def network_id(self) -> bytes:
        return H(self.encode())

    def mint_rate(self, basis: str) -> int:
        for r in self.mint_rates:
            if r.basis == basis:
                return r.micro_per_unit
        return 0
