"""Task serving wired into a node: the task stream protocol for the node's
capsules, and the control commands that submit tasks and show traces."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aemd.tasks import TaskService
from protocol import errors
from protocol.errors import AemError

if TYPE_CHECKING:
    from aemd.node import Node


def install(node: "Node", cfg: dict) -> TaskService:
    """Register task serving on ``node`` (before it runs)."""
    svc = TaskService(node, cfg)
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
