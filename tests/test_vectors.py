"""specs/wire-format.md must agree with the code: its vectors and its field tables."""

import re
from pathlib import Path

import pytest

from crypto import domains
from protocol.admission import AdmissionReport
from protocol.checkpoint import LogCheckpoint
from protocol.entry import ENTRY_KINDS, Entry
from protocol.genesis import Genesis
from protocol.mesh import ExpertCapsuleManifest, HostAdvertisement, NodeCard
from protocol.receipts import Challenge, ContributionReceipt, Dispute, Transfer
from protocol.schema import WireObject
from protocol.task import (InferenceWorkReceipt, ReceiptAck, RouteTrace, SpendAuthorization,
                           TaskPacket)
from tests import vectors

SPEC = (Path(__file__).resolve().parent.parent / "specs" / "wire-format.md").read_text()
TYPES = {c.TYPE: c for c in (Genesis, NodeCard, HostAdvertisement, ExpertCapsuleManifest,
                             TaskPacket, SpendAuthorization, InferenceWorkReceipt, ReceiptAck,
                             ContributionReceipt, AdmissionReport, Challenge, Dispute, Transfer, RouteTrace,
                             Entry, LogCheckpoint)}


def spec_vectors() -> dict[str, dict[str, str]]:
    block = re.search(r"```vectors\n(.*?)```", SPEC, re.S).group(1)
    out: dict[str, dict[str, str]] = {}
    current = None
    for line in block.splitlines():
        if line.startswith("object "):
            current = out.setdefault(line.split()[1], {})
        elif line.startswith("  ") and current is not None:
            k, _, v = line.strip().partition("=")
            current[k] = v
    return out


def test_spec_has_a_vector_for_every_signed_type():
    assert set(spec_vectors()) == set(TYPES) == set(domains.TAGS) - {"contribution_attest"}


@pytest.mark.parametrize("name", sorted(TYPES))
def test_vector_matches_code(name):
    want = spec_vectors()[name]
    obj = vectors.build()[name]
    assert obj.encode().hex() == want["canonical"]
    assert obj.signable().hex() == want["signable"]
    assert obj.sig.hex() == want["sig"]
    assert obj.id.hex() == want["id"]
    # And the other direction: the spec's bytes decode to an object that verifies.
    decoded = TYPES[name].decode(bytes.fromhex(want["canonical"]))
    assert decoded == obj
    decoded.verify(None if name == "genesis" else vectors.genesis().network_id)


def _records(cls, seen):
    from protocol.schema import ListOf, Obj
    for _, kind in cls._schema():
        while isinstance(kind, ListOf):
            kind = kind.item
        if isinstance(kind, Obj) and kind.cls not in seen:
            seen.add(kind.cls)
            _records(kind.cls, seen)
    return seen


@pytest.mark.parametrize("cls", sorted(set(TYPES.values()) | set().union(*(_records(c, set()) for c in TYPES.values())),
                                       key=lambda c: c.__name__))
def test_field_table_matches_schema(cls: type[WireObject]):
    title = f"`{cls.TYPE}` ({cls.__name__})" if cls.TYPE else f"record {cls.__name__}"
    m = re.search(r"#+ " + re.escape(title) + r"\n(.*?)(?=\n#|\Z)", SPEC, re.S)
    assert m, f"no section for {title}"
    assert vectors.field_table(cls) in m.group(1)


def test_entry_kinds_are_listed():
    section = SPEC.split("### `entry` (Entry)")[1]
    for kind, cls in ENTRY_KINDS.items():
        assert f"- `{kind}`: {cls.__name__}" in section
