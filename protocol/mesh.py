"""What nodes gossip about themselves: NodeCards, HostAdvertisements, and the
manifests of the expert capsules they serve."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from protocol import errors
from protocol.errors import AemError
from protocol.schema import (AMOUNT, HASH, KEY, NAME, SIG, TAG, TEXT, TIME, ListOf, Obj,
                             Signed, Str, UInt, WireObject, f)

CAPSULE_KINDS = ("gguf", "code_patch")
ROLES = ("inference", "verifier", "code_patch")
ADDR = Str(256, pattern=r"/[\x21-\x7e]+")


def _wire_default(value, kind):
    """A wire field (required when decoding) that constructors may omit."""
    return dataclasses.field(default=value, metadata={"kind": kind})


class _Expiring:
    def _check_window(self) -> None:
        if self.expires_at <= self.issued_at:  # type: ignore[attr-defined]
            raise AemError(errors.BAD_VALUE, f"{self.TYPE}: expires_at must follow issued_at")  # type: ignore[attr-defined]


@dataclass(frozen=True)
class NodeCard(_Expiring, Signed):
    TYPE = "node_card"
    SIGNER = "node"
    MAX_SIZE = 8192

    net: bytes = f(HASH)
    node: bytes = f(KEY)
    addrs: tuple = f(ListOf(ADDR, 16))
    gpu: str = f(Str(64))
    vram_mb: int = f(UInt(0, 1 << 24))
    ram_mb: int = f(UInt(0, 1 << 26))
    locality: str = f(Str(32))
    policies: tuple = f(ListOf(TAG, 16, unique=True))
    account: bytes = f(KEY)
    load: int = f(UInt(0, 100))         # percent of task capacity in use
    issued_at: int = f(TIME)
    expires_at: int = f(TIME)
    sig: bytes = f(SIG)
    # Required on the wire like every field; a default only so that code
    # building a card need not name it (dataclass defaults go last).
    gpu_layers: int = _wire_default(0, UInt(0, 1 << 16))   # model layers it runs on a GPU now

    def _validate(self) -> None:
        self._check_window()


@dataclass(frozen=True)
class HostAdvertisement(_Expiring, Signed):
    TYPE = "host_ad"
    SIGNER = "host"
    MAX_SIZE = 4096

    net: bytes = f(HASH)
    host: bytes = f(KEY)
    capsule_id: bytes = f(HASH)
    kind: str = f(Str(16, choices=CAPSULE_KINDS))
    domain: str = f(NAME)
    tags: tuple = f(ListOf(TAG, 32, unique=True))
    price: int = f(AMOUNT)               # micro-credits per task
    roles: tuple = f(ListOf(Str(16, choices=ROLES), 3, unique=True))
    availability: int = f(UInt(0, 100))  # percent of the time the host expects to serve
    max_concurrency: int = f(UInt(1, 1024))
    required_receipts: tuple = f(ListOf(TAG, 8, unique=True))
    issued_at: int = f(TIME)
    expires_at: int = f(TIME)
    sig: bytes = f(SIG)
    # What the capsule is, as its manifest says (the host's claim, for people
    # choosing a host; routing does not trust it). Empty/0 for code-patch.
    model: str = _wire_default("", Str(128))
    size_bytes: int = _wire_default(0, UInt())
    quantization: str = _wire_default("", Str(32))

    def _validate(self) -> None:
        self._check_window()


@dataclass(frozen=True)
class EvalClaim(WireObject):
    eval: str = f(NAME)
    score_bp: int = f(UInt(0, 10_000))    # basis points


TEACHER_TERMS = ("allowed", "non_competing", "forbidden")
JUDGES = ("tests", "applies")


@dataclass(frozen=True)
class PatchPolicy(WireObject):
    """What a code-patch capsule lets a patch touch: the paths it may change,
    the largest diff, and the paths that judge it (its tests, the test
    command's files), which a patch may never touch (specs/admission.md §2.6)."""
    allowed_paths: tuple = f(ListOf(Str(256), 32, unique=True))     # path prefixes
    protected_paths: tuple = f(ListOf(Str(256), 32, unique=True))   # path prefixes
    max_diff_bytes: int = f(UInt(1, 1 << 20))


@dataclass(frozen=True)
class TeacherPolicyCard(WireObject):
    """The terms under which a teacher model's outputs may be distilled into
    a capsule; only ``allowed`` admits a capsule into an open mesh (aem's
    experts compete with the teacher's own service)."""
    teacher: str = f(Str(128))
    licence: str = f(Str(64))
    distillation: str = f(Str(16, choices=TEACHER_TERMS))
    terms: str = f(TEXT)


@dataclass(frozen=True)
class ExpertCapsuleManifest(Signed):
    """The signed description of one expert capsule; its id is the capsule id."""
    TYPE = "capsule_manifest"
    SIGNER = "author"
    MAX_SIZE = 8192

    net: bytes = f(HASH)
    author: bytes = f(KEY)
    name: str = f(TEXT)
    kind: str = f(Str(16, choices=CAPSULE_KINDS))
    content_hash: bytes = f(HASH)
    size_bytes: int = f(UInt())
    architecture: str = f(Str(64))
    n_params: int = f(UInt())
    quantization: str = f(Str(32))
    context_length: int = f(UInt(0, 1 << 24))
    vram_need_mb: int = f(UInt(0, 1 << 24))
    domain: str = f(NAME)
    tags: tuple = f(ListOf(TAG, 32, unique=True))
    eval_claims: tuple = f(ListOf(Obj(EvalClaim), 32))
    created_at: int = f(TIME)
    sig: bytes = f(SIG)
    # Admission claims (specs/admission.md): the node class it fits, the
    # patch policy of a code-patch capsule, the teacher it was distilled from
    # and that teacher's policy card. Required on the wire; defaults only so
    # code building a manifest need not name them.
    node_class: str = _wire_default("", Str(64))
    patch_policy: tuple = _wire_default((), ListOf(Obj(PatchPolicy), 1))
    distilled_from: str = _wire_default("", Str(128))
    teacher_policy: tuple = _wire_default((), ListOf(Obj(TeacherPolicyCard), 1))
