"""Pubsub plumbing: GossipSub subscriptions, validators and publishing.

The :class:`PubsubMixin` methods are part of :class:`aemd.p2p.host.P2PNode`;
the quirks they work around (silent drops, own publishes, raising
validators, forwarders) are in :mod:`aemd.p2p.quirks`.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio
from libp2p.peer.id import ID

from protocol.errors import BAD_VALUE, REFUSED, TOO_LARGE, UNAVAILABLE, AemError

if TYPE_CHECKING:
    from aemd.p2p.host import P2PNode

log = logging.getLogger("aemd.p2p")

#: ``fn(forwarder_peer_id, data) -> bool`` (or an async function returning bool).
Validator = Callable[[str, bytes], "bool | Awaitable[bool]"]


class _CountingSend:
    """Stands in for a subscription's send channel in ``pubsub.subscribed_topics_send``.

    Pubsub calls ``send_nowait`` (dropping on ``trio.WouldBlock``) and ``aclose``.
    """

    def __init__(self, send: trio.MemorySendChannel[Any]) -> None:
        self._send = send
        self.dropped = 0

    def send_nowait(self, msg: Any) -> None:
        try:
            self._send.send_nowait(msg)
        except trio.WouldBlock:
            self.dropped += 1
            raise
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.dropped += 1

    def close(self) -> None:
        self._send.close()

    async def aclose(self) -> None:
        await self._send.aclose()


class Subscription:
    """Messages of one topic as ``(origin_peer_id, data)``; an async iterator.

    Ends when unsubscribed (:meth:`aclose`, or leaving ``async with``) or when the
    node closes. ``dropped`` counts messages lost to a full buffer: read promptly.
    """

    def __init__(self, node: P2PNode, topic: str, recv: trio.MemoryReceiveChannel[Any],
                 sender: _CountingSend, include_own: bool) -> None:
        self._node = node
        self.topic = topic
        self._recv = recv
        self._sender = sender
        self._include_own = include_own
        self._own_id = node._host.get_id().to_bytes()
        #: The neighbour that delivered the message last returned (its origin if unknown).
        self.last_forwarder = ""

    @property
    def dropped(self) -> int:
        return self._sender.dropped

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> tuple[str, bytes]:
        while True:
            try:
                msg = await self._recv.receive()
            except (trio.EndOfChannel, trio.ClosedResourceError):
                raise StopAsyncIteration from None
            if not self._include_own and msg.from_id == self._own_id:
                continue
            origin = ID(msg.from_id).to_base58()
            self.last_forwarder = self._node._forwarders.pop((bytes(msg.from_id), bytes(msg.seqno)), origin)
            return origin, bytes(msg.data)

    async def aclose(self) -> None:
        await self._node._unsubscribe(self.topic, self)

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _check_topic(topic: str) -> None:
    if not isinstance(topic, str) or not topic or len(topic) > 256:
        raise AemError(BAD_VALUE, f"bad topic: {topic!r}")


class PubsubMixin:
    """The pubsub half of :class:`~aemd.p2p.host.P2PNode` (its state is set there)."""

    def set_topic_validator(self, topic: str, fn: Validator) -> None:
        """Install ``fn(forwarder_peer_id, data) -> bool`` for ``topic`` (replaces any).

        ``fn`` may be sync or async (async ones time out after 5 s: rejection).
        It runs on every message before delivery and forwarding, own publishes
        included; False or an exception rejects (not delivered, not forwarded,
        forwarder penalised when ``penalize_invalid``).
        """
        _check_topic(topic)
        is_async = inspect.iscoroutinefunction(fn)
        node = self

        def rejected(forwarder: ID) -> None:
            if node._config.penalize_invalid and forwarder != node._id:
                node.penalize(forwarder.to_base58(), 1.0, f"invalid message on {topic}")

        def verdict(forwarder: ID, msg: Any, ok: bool) -> bool:
            if not ok:
                rejected(forwarder)
            else:
                node._note_forwarder(msg, forwarder)
            return ok

        def raised() -> bool:
            log.warning("validator for %s raised; message rejected", topic, exc_info=True)
            return False

        if is_async:
            async def validator(forwarder: ID, msg: Any) -> bool:
                try:
                    ok = bool(await fn(forwarder.to_base58(), bytes(msg.data)))  # type: ignore[misc]
                except Exception:
                    ok = raised()
                return verdict(forwarder, msg, ok)
        else:
            def validator(forwarder: ID, msg: Any) -> bool:  # type: ignore[misc]
                try:
                    ok = bool(fn(forwarder.to_base58(), bytes(msg.data)))
                except Exception:
                    ok = raised()
                return verdict(forwarder, msg, ok)

        self._validators[topic] = fn
        self._pubsub.set_topic_validator(topic, validator, is_async)

    def _note_forwarder(self, msg: Any, forwarder: ID) -> None:
        # Bounded: a message whose subscription never reads it is forgotten.
        key = (bytes(msg.from_id), bytes(msg.seqno))
        self._forwarders[key] = forwarder.to_base58()
        while len(self._forwarders) > 4 * self._config.subscription_buffer:
            self._forwarders.popitem(last=False)

    def _still_valid(self, msg: Any) -> bool:
        """Whether a cached message still passes its topics' (sync) validators now."""
        for t in msg.topicIDs:
            fn = self._validators.get(t)
            if fn is None or inspect.iscoroutinefunction(fn):
                continue  # an async validator cannot run inside libp2p's sync cache lookup
            try:
                if not fn(self.peer_id, bytes(msg.data)):
                    return False
            except Exception:
                return False
        return True

    def remove_topic_validator(self, topic: str) -> None:
        self._validators.pop(topic, None)
        self._pubsub.remove_topic_validator(topic)

    async def subscribe(self, topic: str, *, include_own: bool = False) -> Subscription:
        """Join ``topic``; returns a :class:`Subscription` (one per topic at a time).

        Own publishes are skipped unless ``include_own``. Raises AemError(REFUSED)
        if this node already holds a subscription to ``topic``.
        """
        _check_topic(topic)
        self._require_running()
        if topic in self._subs:
            raise AemError(REFUSED, f"already subscribed to {topic!r}")
        lsub = await self._pubsub.subscribe(topic)
        send, recv = trio.open_memory_channel[Any](self._config.subscription_buffer)
        sender = _CountingSend(send)
        old_send = self._pubsub.subscribed_topics_send[topic]
        self._pubsub.subscribed_topics_send[topic] = sender  # type: ignore[assignment]
        # Move what arrived while subscribe() awaited (no await in between: nothing is lost).
        while True:
            try:
                msg = lsub.receive_channel.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
            try:
                sender.send_nowait(msg)
            except trio.WouldBlock:
                pass
        old_send.close()
        lsub.receive_channel = recv  # keep libp2p's subscription object consistent
        sub = Subscription(self, topic, recv, sender, include_own)
        self._subs[topic] = sub
        return sub

    async def _unsubscribe(self, topic: str, sub: Subscription) -> None:
        if self._subs.get(topic) is not sub:
            return
        del self._subs[topic]
        if self._running:
            try:
                await self._pubsub.unsubscribe(topic)
            except Exception as exc:
                log.debug("unsubscribe %s: %s", topic, exc)
        sub._sender.close()

    def topic_peers(self, topic: str) -> list[str]:
        """Peers known to be subscribed to ``topic``."""
        return sorted(p.to_base58() for p in self._pubsub.peer_topics.get(topic, ()))

    def mesh_peers(self, topic: str) -> list[str]:
        """Peers in this node's GossipSub mesh for ``topic`` (where a publish goes)."""
        return sorted(p.to_base58() for p in self._gossipsub.mesh.get(topic, ()))

    async def publish(self, topic: str, data: bytes) -> None:
        """Publish ``data`` on ``topic`` (signed by the host key).

        Raises AemError: TOO_LARGE (over ``max_publish_bytes``, which libp2p would
        drop silently), REFUSED (own validator rejects it, or own rate above
        ``max_messages_per_topic_per_second``, both silent drops in libp2p),
        UNAVAILABLE (pubsub failed). Returning does not mean any peer got it.
        """
        _check_topic(topic)
        self._require_running()
        if not isinstance(data, (bytes, bytearray)):
            raise AemError(BAD_VALUE, f"publish data must be bytes, not {type(data).__name__}")
        if len(data) > self._config.max_publish_bytes:
            raise AemError(TOO_LARGE, f"{len(data)} bytes > publish limit {self._config.max_publish_bytes}")
        data = bytes(data)
        fn = self._validators.get(topic)
        if fn is not None:
            try:
                verdict = fn(self.peer_id, data)
                if inspect.isawaitable(verdict):
                    verdict = await verdict
            except Exception as exc:
                raise AemError(REFUSED, f"own validator for {topic!r} raised: {exc}") from exc
            if not verdict:
                raise AemError(REFUSED, f"own validator for {topic!r} rejects this message")
        self._check_own_rate(topic)
        try:
            await self._pubsub.publish(topic, data)
        except AemError:
            raise
        except Exception as exc:
            raise AemError(UNAVAILABLE, f"publish on {topic!r} failed: {type(exc).__name__}: {exc}") from exc

    def _check_own_rate(self, topic: str) -> None:
        # Same window and clock as GossipSub._check_spam_protection, run first, so
        # whenever libp2p would drop our own publish we have already refused it.
        limit = self._config.max_messages_per_topic_per_second
        now = time.time()
        times = self._own_publish_times.setdefault(topic, deque())
        while times and times[0] <= now - 1.0:
            times.popleft()
        if len(times) >= limit:
            raise AemError(REFUSED, f"own publish rate on {topic!r} above {limit:g}/s")
        times.append(now)
