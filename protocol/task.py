"""A task and what it leaves behind: the TaskPacket a payer sends, the
SpendAuthorization that lets a host charge for it, the host's
InferenceWorkReceipt, the payer's ReceiptAck, and the router's RouteTrace."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from crypto.hashing import H
from protocol import errors
from protocol.errors import AemError
from protocol.schema import (AMOUNT, HASH, HASH_OR_EMPTY, KEY, NAME, NONCE, SIG, TAG, TEXT,
                             TIME, Bool, Bytes, ListOf, Obj, SInt, Signed, Str, UInt,
                             WireObject, f)

TASK_KINDS = ("text", "code_patch")
MAX_REPO_TAR = 8 << 20
MAX_PATCH = 1 << 20
MAX_PROMPT = 64 << 10
MAX_TOKENS = 8192
# A text answer may run this many tokens past max_tokens: llama.cpp's
# completion finishes a UTF-8 sequence begun at the limit (specs/task-protocol.md §3).
UTF8_TAIL_TOKENS = 3
CHAT_ROLES = ("system", "user", "assistant")
MAX_MESSAGES = 64
# Whether a task's prompt and output may become training data
# (specs/task-protocol.md, distillation memory): the payer says so in its
# TaskPacket, the host in its receipt; an export needs both to say "allowed".
TRAINING_USES = ("allowed", "forbidden")
TRAINING_DEFAULT = "forbidden"     # nobody's work is trained on unless they opted in


def _wire_default(value, kind):
    """A wire field (required when decoding) that constructors may omit."""
    return dataclasses.field(default=value, metadata={"kind": kind})


TRAINING_USE = Str(16, choices=TRAINING_USES)
MAX_USES = 4
USES = ListOf(HASH, MAX_USES, unique=True)


@dataclass(frozen=True)
class ChatMessage(WireObject):
    """One turn of a chat task. The host renders the whole list with its
    model's own chat template (specs/task-protocol.md, chat tasks)."""
    role: str = f(Str(16, choices=CHAT_ROLES))
    content: str = f(Str(MAX_PROMPT))


@dataclass(frozen=True)
class TaskPacket(Signed):
    """One unit of work. ``text`` tasks use max_tokens/temperature/seed and
    exactly one of ``prompt`` (a raw completion) or ``messages`` (a chat,
    rendered by the host's chat template); ``code_patch`` tasks use
    repo_tar/repo_hash/patch/test_cmd. The fields of the other kind are empty,
    so every packet has the same shape."""
    TYPE = "task"
    SIGNER = "payer"
    MAX_SIZE = MAX_REPO_TAR + MAX_PATCH + MAX_PROMPT + 65536

    net: bytes = f(HASH)
    payer: bytes = f(KEY)
    nonce: bytes = f(NONCE)
    kind: str = f(Str(16, choices=TASK_KINDS))
    domain: str = f(NAME)
    tags: tuple = f(ListOf(TAG, 32, unique=True))
    prompt: str = f(Str(MAX_PROMPT))
    max_tokens: int = f(UInt(0, MAX_TOKENS))
    temperature_milli: int = f(UInt(0, 2000))
    seed: int = f(UInt(0, 2**32 - 1))
    repo_tar: bytes = f(Bytes(max_len=MAX_REPO_TAR))
    repo_hash: bytes = f(HASH_OR_EMPTY)
    patch: str = f(Str(MAX_PATCH))
    test_cmd: tuple = f(ListOf(Str(1024), 64))
    max_price: int = f(AMOUNT)
    latency_budget_ms: int = f(UInt(0, 3_600_000))
    created_at: int = f(TIME)
    sig: bytes = f(SIG)
    # Last, with a default, so code that builds raw-completion packets need not
    # name it; on the wire it is required like every field (keys are sorted).
    messages: tuple = dataclasses.field(
        default=(), metadata={"kind": ListOf(Obj(ChatMessage), MAX_MESSAGES)})
    # The payer's policy for training on this task's prompt and output.
    training_use: str = _wire_default(TRAINING_DEFAULT, TRAINING_USE)
    # The skill and operator contributions (by commitment) the task applies:
    # counted from the log for their verified_skill_use / operator_adoption
    # (specs/growth.md), so the payer names them and the host's receipt repeats them.
    uses: tuple = _wire_default((), USES)

    def _validate(self) -> None:
        if self.kind == "text":
            if self.repo_tar or self.repo_hash or self.patch or self.test_cmd:
                raise AemError(errors.BAD_VALUE, "task: a text task carries no repository")
            if bool(self.prompt) == bool(self.messages):
                raise AemError(errors.BAD_VALUE, "task: a text task carries exactly one of prompt or messages")
            # Each message is bounded by the schema; together they get the prompt's budget.
            if sum(len(m.content.encode("utf-8")) for m in self.messages) > MAX_PROMPT:
                raise AemError(errors.TOO_LARGE, f"task: messages longer than {MAX_PROMPT} bytes together")
        else:
            if self.prompt or self.max_tokens or self.messages:
                raise AemError(errors.BAD_VALUE, "task: a code_patch task carries no prompt or messages")
            if not self.test_cmd:
                raise AemError(errors.BAD_VALUE, "task: a code_patch task needs a test command")
            if self.repo_hash != H(self.repo_tar):
                raise AemError(errors.BAD_VALUE, "task: repo_hash does not match repo_tar")


@dataclass(frozen=True)
class SpendAuthorization(Signed):
    """The payer's permission for ``host``, and no one else, to charge at most
    ``max_charge`` (that host's price) for one task. A retry on another host
    gets its own authorisation with the same ``spend_key``, which the whole
    ledger charges once (specs/ledger.md section 5.3)."""
    TYPE = "spend_auth"
    SIGNER = "payer"
    MAX_SIZE = 1024

    net: bytes = f(HASH)
    payer: bytes = f(KEY)
    host: bytes = f(KEY)
    spend_key: bytes = f(Bytes(32))
    task_hash: bytes = f(HASH)
    max_charge: int = f(AMOUNT)
    expires_at: int = f(TIME)
    sig: bytes = f(SIG)


@dataclass(frozen=True)
class InferenceWorkReceipt(Signed):
    """The host's signed record that it did a task, and the charge."""
    TYPE = "inference_receipt"
    SIGNER = "host"
    MAX_SIZE = 2048

    net: bytes = f(HASH)
    host: bytes = f(KEY)
    payer: bytes = f(KEY)
    task_hash: bytes = f(HASH)
    capsule_id: bytes = f(HASH)
    spend_auth: SpendAuthorization = f(Obj(SpendAuthorization))
    charge: int = f(AMOUNT)
    output_hash: bytes = f(HASH)
    tokens_out: int = f(UInt())
    started_at: int = f(TIME)
    finished_at: int = f(TIME)
    sig: bytes = f(SIG)
    # The host's policy for training on this output: signed with the output's
    # hash and logged, so a training set's use of it is checkable from the log.
    training_use: str = _wire_default(TRAINING_DEFAULT, TRAINING_USE)
    # The task's ``uses``, copied: what the log counts a use from.
    uses: tuple = _wire_default((), USES)

    def _validate(self) -> None:
        a = self.spend_auth
        if a.payer != self.payer or a.task_hash != self.task_hash or a.net != self.net:
            raise AemError(errors.BAD_VALUE, "inference_receipt: spend_auth is for another payer, task or network")
        if a.host != self.host:
            # Every host the payer tried saw the authorisation: only the one
            # it was made out to may charge it.
            raise AemError(errors.BAD_VALUE, "inference_receipt: spend_auth is made out to another host")
        if self.charge > a.max_charge:
            raise AemError(errors.BAD_VALUE, "inference_receipt: charge exceeds max_charge")
        if self.finished_at < self.started_at:
            raise AemError(errors.BAD_VALUE, "inference_receipt: finished before it started")

    def _verify_nested(self, now: int | None) -> None:
        # The authorization was valid when the work was done, not necessarily now.
        self.spend_auth.verify(self.net)


@dataclass(frozen=True)
class ReceiptAck(Signed):
    """The payer's acknowledgement of a receipt it received. With ``accepted``
    true it makes that receipt the one that charges its spend key and shields
    it from the payer's own dispute (specs/ledger.md section 5.5)."""
    TYPE = "receipt_ack"
    SIGNER = "payer"
    MAX_SIZE = 512

    net: bytes = f(HASH)
    payer: bytes = f(KEY)
    receipt_id: bytes = f(HASH)
    accepted: bool = f(Bool())
    created_at: int = f(TIME)
    sig: bytes = f(SIG)


@dataclass(frozen=True)
class Candidate(WireObject):
    host: bytes = f(KEY)
    capsule_id: bytes = f(HASH)
    price: int = f(AMOUNT)
    score: int = f(SInt())


@dataclass(frozen=True)
class Attempt(WireObject):
    host: bytes = f(KEY)
    outcome: str = f(Str(32))
    detail: str = f(TEXT)
    elapsed_ms: int = f(UInt())


@dataclass(frozen=True)
class RouteTrace(Signed):
    """Why a router sent a task where it did: candidates, scores, each attempt."""
    TYPE = "route_trace"
    SIGNER = "router"
    MAX_SIZE = 32768

    net: bytes = f(HASH)
    router: bytes = f(KEY)
    task_id: bytes = f(HASH)
    candidates: tuple = f(ListOf(Obj(Candidate), 64))
    attempts: tuple = f(ListOf(Obj(Attempt), 64))
    chosen: bytes = f(Bytes(0, 32))
    outcome: str = f(Str(32))
    receipt_id: bytes = f(HASH_OR_EMPTY)
    created_at: int = f(TIME)
    sig: bytes = f(SIG)
