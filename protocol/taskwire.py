"""Messages of the task stream (specs/task-protocol.md).

One task per stream: the payer's node sends a TaskRequest; the host answers
TaskRefused, or TaskAccepted, then output chunks as they are produced, then
TaskResult carrying the full output and the host-signed receipt, or TaskFailed
(the work failed or produced nothing: no receipt, no charge).
"""

from __future__ import annotations

from dataclasses import dataclass

from protocol import errors
from protocol.errors import AemError
from protocol.schema import AMOUNT, HASH, TEXT, Bytes, Obj, Str, UInt, WireObject, decode_one_of, f
from protocol.task import InferenceWorkReceipt, SpendAuthorization, TaskPacket

MAX_CHUNK = 16384
MAX_OUTPUT = 1 << 20
PROTOCOL_VERSION = 1


def task_protocol_id(network_id: bytes) -> str:
    return f"/aem/{network_id.hex()}/task/{PROTOCOL_VERSION}"


@dataclass(frozen=True)
class TaskRequest(WireObject):
    TYPE = "task_req"
    MAX_SIZE = TaskPacket.MAX_SIZE + SpendAuthorization.MAX_SIZE + 256
    capsule_id: bytes = f(HASH)
    task: TaskPacket = f(Obj(TaskPacket))
    spend_auth: SpendAuthorization = f(Obj(SpendAuthorization))

    def _validate(self) -> None:
        a, t = self.spend_auth, self.task
        if a.task_hash != t.id or a.payer != t.payer or a.net != t.net:
            raise AemError(errors.BAD_VALUE, "task_req: spend_auth does not authorise this task")


@dataclass(frozen=True)
class TaskRefused(WireObject):
    TYPE = "task_refused"
    MAX_SIZE = 1024
    code: str = f(Str(32))
    detail: str = f(TEXT)


@dataclass(frozen=True)
class TaskFailed(WireObject):
    """After task_accepted, instead of task_result: the work failed (or a text
    task produced no output), no receipt was made and nothing is charged."""
    TYPE = "task_failed"
    MAX_SIZE = 1024
    code: str = f(Str(32))
    detail: str = f(TEXT)


@dataclass(frozen=True)
class TaskAccepted(WireObject):
    TYPE = "task_accepted"
    MAX_SIZE = 128
    price: int = f(AMOUNT)


@dataclass(frozen=True)
class TaskChunk(WireObject):
    TYPE = "chunk"
    MAX_SIZE = MAX_CHUNK + 64
    data: bytes = f(Bytes(max_len=MAX_CHUNK))


@dataclass(frozen=True)
class TaskResult(WireObject):
    TYPE = "task_result"
    MAX_SIZE = MAX_OUTPUT + InferenceWorkReceipt.MAX_SIZE + 256
    output: bytes = f(Bytes(max_len=MAX_OUTPUT))
    tokens_out: int = f(UInt())
    receipt: InferenceWorkReceipt = f(Obj(InferenceWorkReceipt))


REPLIES = {c.TYPE: c for c in (TaskRefused, TaskAccepted, TaskChunk, TaskResult, TaskFailed)}
MAX_REPLY = TaskResult.MAX_SIZE


def decode_reply(data: bytes) -> WireObject:
    """Decode any host reply on the task stream by its ``type``."""
    return decode_one_of(data, REPLIES, MAX_REPLY)
