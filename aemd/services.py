"""Task serving wired into a node: the task stream protocol for the node's
capsules, and the control commands that submit tasks and show traces.

The task service sees the node only through ``TaskEnv`` (aemd/tasks.py);
:class:`NodeTaskEnv` is that view of a daemon node."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from aemd.tasks import TaskEnv, TaskService
from protocol import errors
from protocol.errors import AemError

if TYPE_CHECKING:
    from aemd.capsules import LocalCapsule
    from aemd.node import Node


class NodeTaskEnv:
    """A node as the task service's :class:`~aemd.tasks.TaskEnv`. Members are
    read through to the node when used: its host, store and capsules exist
    only once the node runs."""

    def __init__(self, node: "Node") -> None:
        self._node = node
        self.key = node.key
        self.net = node.net
        self.challenge_window = node.genesis.challenge_window
        self.metrics = node.metrics
        self.mesh = node.mesh
        self.hostbook = node.hostbook
        self.traces_path: Path = node.home.root / "traces.sqlite"
        self.admission_params = node.genesis.admission

    @property
    def capsules(self) -> list:
        return self._node.capsules

    @property
    def capacity(self) -> dict:
        return self._node.opts.capacity

    @property
    def p2p(self) -> Any:
        return self._node.p2p

    def now(self) -> int:
        return self._node.now()

    async def ledger(self, now: int) -> Any:
        return await self._node.store.ledger(now)

    async def append(self, obj: Any) -> Any:
        return await self._node.append(obj)

    async def admission(self) -> Any:
        return await self._node.store.admission()

    def set_load(self, percent: int) -> None:
        self._node.load = percent

    def set_insert_hook(self, hook: Callable[[list[bytes]], None]) -> None:
        self._node.store.on_insert = hook

    def gpu_layers_for(self, cap: "LocalCapsule") -> int:
        return self._node.gpu_layers_for(cap)


def node_env(node: "Node") -> TaskEnv:
    return NodeTaskEnv(node)


def install(node: "Node", cfg: dict) -> TaskService:
    """Register task serving on ``node`` (before it runs)."""
    svc = TaskService(node_env(node), cfg)
    node.add_extension(svc.start)
    node.add_closer(svc.close)

    async def submit_task(args: dict, emit) -> dict:
        return await svc.submit(args, emit)

    async def trace(args: dict, emit) -> dict:
        prefix = args.get("task_id")
        if not isinstance(prefix, str) or len(prefix) < 4:
            raise AemError(errors.BAD_VALUE, "give at least 4 hex digits of the task id")
        import trio
        t = await trio.to_thread.run_sync(svc.traces.get, prefix)
        return t.to_map()

    node.control_handlers.update({"submit_task": submit_task, "trace": trace})
    return svc
