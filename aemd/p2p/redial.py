"""Staying connected: the redial loop with bounded exponential backoff and jitter.

libp2p's own bootstrap gives up after 3 failures and its auto-connector is
off (see :mod:`aemd.p2p.quirks`): this is the dial policy.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence

import trio

from aemd.p2p.host import P2PNode, _single_leaf
from aemd.p2p.identity import _parse_p2p_multiaddr
from protocol.errors import BAD_VALUE, AemError

log = logging.getLogger("aemd.p2p")


def backoff_delay(failures: int, base_delay: float, max_delay: float, rng: random.Random) -> float:
    """Delay before the next dial after ``failures`` consecutive failures.

    Exponential (``base_delay * 2**failures``, capped at ``max_delay``) with
    "equal jitter": uniformly in [d/2, d], so peers spread out but never
    hammer a dead address.
    """
    d = min(max_delay, base_delay * (2.0 ** min(max(failures, 0), 32)))
    return d / 2 + rng.uniform(0.0, d / 2)


async def keep_connected(
    node: P2PNode,
    multiaddrs: Sequence[str],
    *,
    base_delay: float = 0.5,
    max_delay: float = 30.0,
    stop_event: trio.Event | None = None,
    rng: random.Random | None = None,
    max_attempts: int | None = None,
) -> None:
    """Keep a connection to each peer named in ``multiaddrs`` until ``stop_event`` is set.

    Addresses are ``/…/p2p/<peer id>``; several for one peer are tried in
    turn, and the node's own id is skipped (one bootstrap list can serve every
    node). Per peer: dial at once if not connected; after a failed attempt
    (every address failed) wait :func:`backoff_delay` (growing with
    consecutive failures, jitter from ``rng``) and retry; when a connection
    drops, wait ``backoff_delay(failures)`` and redial, where a connection
    that lived less than ``max_delay`` counts as a failure (a flapping peer
    backs off too) and a longer one resets the count. Every dial clears the
    swarm's 60 s negative dial cache first (:meth:`P2PNode.connect`). Banned
    peers are not dialed until the ban ends. ``max_attempts`` (consecutive
    failures per peer) bounds the effort; None retries until stopped.
    Returns when ``stop_event`` is set, when every peer has exhausted
    ``max_attempts``, or when the node closes; cancellation works as usual.
    """
    if not 0 < base_delay <= max_delay:
        raise AemError(BAD_VALUE, "keep_connected needs 0 < base_delay <= max_delay")
    if max_attempts is not None and max_attempts <= 0:
        raise AemError(BAD_VALUE, "max_attempts must be positive")
    targets: dict[str, list[str]] = {}
    for maddr in multiaddrs:
        _, info = _parse_p2p_multiaddr(maddr)
        peer_id = info.peer_id.to_base58()
        if peer_id != node.peer_id and maddr not in targets.setdefault(peer_id, []):
            targets[peer_id].append(maddr)
    targets = {pid: addrs for pid, addrs in targets.items() if addrs}
    rng = rng if rng is not None else random.Random()
    stop = stop_event if stop_event is not None else trio.Event()

    async def watch_stop(scope: trio.CancelScope) -> None:
        await stop.wait()
        scope.cancel()

    async def dial_any(peer_id: str, addrs: list[str]) -> bool:
        for maddr in addrs:
            try:
                await node.connect(maddr)
                return True
            except AemError as exc:
                log.debug("dial %s failed: %s", maddr, exc)
        return False

    async def keep_one(peer_id: str, addrs: list[str]) -> None:
        failures = 0
        while node._running:
            if node.is_connected(peer_id):
                since = trio.current_time()
                await node.wait_disconnected(peer_id)
                failures = 0 if trio.current_time() - since >= max_delay else failures + 1
            elif not node.is_banned(peer_id) and await dial_any(peer_id, addrs):
                if node.is_connected(peer_id):
                    continue
                failures += 1  # connected and dropped at once: back off, no tight loop
            else:
                failures += 1
            if max_attempts is not None and failures >= max_attempts:
                log.info("giving up on %s after %d failures", peer_id, failures)
                return
            await trio.sleep(backoff_delay(failures, base_delay, max_delay, rng))

    try:
        async with trio.open_nursery() as outer:
            outer.start_soon(watch_stop, outer.cancel_scope)
            async with trio.open_nursery() as inner:
                for peer_id, addrs in targets.items():
                    inner.start_soon(keep_one, peer_id, addrs)
            outer.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        leaf = _single_leaf(group)
        if leaf is group:
            raise
        raise leaf from None
