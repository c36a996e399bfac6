"""The signed log entry: the envelope in which every receipt travels.

Each author keeps one append-only feed: seq counts from 0 and ``prev`` is the
id of the author's entry at seq-1 (empty at seq 0). ``lamport`` is one more
than the largest Lamport clock the author had seen, which gives replay its
total order. ``body`` is the canonical encoding of the object named by
``kind`` and is decoded with that object's own limits.
"""

from __future__ import annotations

from dataclasses import dataclass

from protocol import errors
from protocol.errors import AemError
from protocol.mesh import ExpertCapsuleManifest
from protocol.admission import AdmissionReport
from protocol.receipts import Challenge, ContributionReceipt, Dispute, Transfer
from protocol.schema import HASH, HASH_OR_EMPTY, KEY, SIG, TIME, Bytes, Signed, Str, UInt, f
from protocol.task import InferenceWorkReceipt, ReceiptAck

# kind -> the object class its body holds. One table, used by encoding,
# decoding, the ledger and the spec.
ENTRY_KINDS: dict[str, type[Signed]] = {
    "transfer": Transfer,
    "inference_receipt": InferenceWorkReceipt,
    "receipt_ack": ReceiptAck,
    "contribution": ContributionReceipt,
    "challenge": Challenge,
    "admission": AdmissionReport,
    "capsule_manifest": ExpertCapsuleManifest,
    "dispute": Dispute,
}

MAX_ENTRY = 65536


@dataclass(frozen=True)
class Entry(Signed):
    TYPE = "entry"
    SIGNER = "author"
    MAX_SIZE = MAX_ENTRY

    net: bytes = f(HASH)
    author: bytes = f(KEY)
    seq: int = f(UInt(0, 2**48))
    prev: bytes = f(HASH_OR_EMPTY)
    lamport: int = f(UInt(0, 2**62))
    ts: int = f(TIME)
    kind: str = f(Str(32, choices=tuple(ENTRY_KINDS)))
    body: bytes = f(Bytes(max_len=MAX_ENTRY - 512))
    sig: bytes = f(SIG)

    def _validate(self) -> None:
        if (self.seq == 0) != (self.prev == b""):
            raise AemError(errors.BAD_CHAIN, "entry: prev is empty exactly at seq 0")

    def payload(self) -> Signed:
        """Decode the body as the object its kind names (AemError if it is not)."""
        obj = ENTRY_KINDS[self.kind].decode(self.body)
        if obj.net != self.net:  # type: ignore[attr-defined]
            raise AemError(errors.WRONG_NETWORK, "entry: body is for another network")
        return obj


def make_entry(key, net: bytes, seq: int, prev: bytes, lamport: int, ts: int,
               obj: Signed) -> Entry:
    """Wrap a signed object in a signed entry authored by ``key``."""
    kind = next((k for k, cls in ENTRY_KINDS.items() if type(obj) is cls), None)
    if kind is None:
        raise AemError(errors.BAD_VALUE, f"{type(obj).__name__} cannot be a log entry")
    return Entry(net=net, author=key.public, seq=seq, prev=prev, lamport=lamport, ts=ts,
                 kind=kind, body=obj.encode(), sig=b"").signed(key)
