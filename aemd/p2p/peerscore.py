"""Penalties and bans as a pure table: events and explicit times in, decisions out.

No trio, no libp2p: peers are any hashable key (the host uses libp2p ``ID``\\s,
tests use strings), times are plain floats on one clock the caller chooses
(the host passes ``trio.current_time()``). The host (:class:`aemd.p2p.host.P2PNode`)
turns the decisions into effects: a pubsub blacklist, a disconnect, refused
streams and dials.

Rules (defaults in :class:`aemd.p2p.settings.P2PConfig`):

* Penalty points decay with a half-life; reaching ``ban_threshold`` asks for
  a ban (:meth:`PeerScore.penalize` returns ``banned=True``) unless the peer
  already has one.
* A ban lasts until a time; it is in force while that time is in the future,
  and :meth:`PeerScore.expired` names the bans to lift. Lifting a ban also
  forgets the peer's points (a fresh start).
* A fresh identity costs nothing, so bans also count per remote IP: once
  ``ip_ban_after`` distinct peers from one address are banned, that address
  is banned (:meth:`PeerScore.ip_banned`) until the last of those bans ends.
  ``ip_ban_after=0`` turns it off.
* The tables are bounded by ``max_tracked_peers``: past it, the
  least-penalised half of the unbanned peers is forgotten, and expired IP
  bans are pruned.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from typing import NamedTuple

from protocol.errors import BAD_VALUE, AemError

__all__ = ["Penalty", "PeerScore"]


class Penalty(NamedTuple):
    """What one penalty did: the peer's points after it, and whether it now
    crossed the threshold with no ban in force (the caller bans it)."""

    points: float
    banned: bool


class PeerScore:
    """Decaying penalty points, bans with an end time, and bans per address."""

    def __init__(self, *, ban_threshold: float, ban_seconds: float, penalty_half_life: float,
                 max_tracked_peers: int, ip_ban_after: int) -> None:
        if not (ban_threshold > 0 and ban_seconds > 0 and penalty_half_life > 0 and max_tracked_peers > 0):
            raise AemError(BAD_VALUE, "PeerScore needs positive threshold, ban length, half-life and bound")
        if ip_ban_after < 0:
            raise AemError(BAD_VALUE, "PeerScore ip_ban_after must be >= 0")
        self.ban_threshold = float(ban_threshold)
        self.ban_seconds = float(ban_seconds)
        self.penalty_half_life = float(penalty_half_life)
        self.max_tracked_peers = int(max_tracked_peers)
        self.ip_ban_after = int(ip_ban_after)
        self._points: dict[Hashable, tuple[float, float]] = {}   # peer -> (points, at)
        self._bans: dict[Hashable, float] = {}                   # peer -> until
        self._ip_bans: dict[str, dict[Hashable, float]] = {}     # ip -> {peer: until}

    # -- penalties ---------------------------------------------------------------

    def penalize(self, peer: Hashable, points: float, now: float) -> Penalty:
        """Add ``points`` (ignored unless positive) at time ``now``."""
        if not points > 0:
            return Penalty(self.points(peer, now), False)
        total = self.points(peer, now) + float(points)
        self._points[peer] = (total, now)
        if len(self._points) > self.max_tracked_peers:
            self._evict_points(now)
        return Penalty(total, total >= self.ban_threshold and peer not in self._bans)

    def points(self, peer: Hashable, now: float) -> float:
        """Current (decayed) penalty points of ``peer``."""
        entry = self._points.get(peer)
        if entry is None:
            return 0.0
        points, at = entry
        return points * math.pow(0.5, max(0.0, now - at) / self.penalty_half_life)

    def all_points(self, now: float) -> dict[Hashable, float]:
        """Every tracked peer's current points."""
        return {peer: self.points(peer, now) for peer in self._points}

    def _evict_points(self, now: float) -> None:
        # Keep the table bounded: forget the least-penalised half.
        ranked = sorted(self._points, key=lambda p: self.points(p, now))
        for peer in ranked[: len(ranked) // 2]:
            if peer not in self._bans:
                del self._points[peer]

    # -- bans ----------------------------------------------------------------------

    def ban(self, peer: Hashable, now: float, seconds: float | None = None, ip: str | None = None) -> float:
        """Ban ``peer`` for ``seconds`` (default ``ban_seconds``) from ``now``;
        a longer ban in force is kept. ``ip``: its remote address, counted
        toward the address ban. Returns the time the ban ends."""
        duration = self.ban_seconds if seconds is None else float(seconds)
        until = now + duration
        self._bans[peer] = max(until, self._bans.get(peer, until))
        if ip is not None and self.ip_ban_after > 0:
            banned_here = self._ip_bans.setdefault(ip, {})
            banned_here[peer] = self._bans[peer]
            if len(self._ip_bans) > self.max_tracked_peers:
                self._prune_ip_bans(now)
        return self._bans[peer]

    def lift(self, peer: Hashable) -> None:
        """End ``peer``'s ban (expired or not) and forget its points; its
        address keeps counting it until that ban's end (see :meth:`unban`)."""
        self._bans.pop(peer, None)
        self._points.pop(peer, None)

    def unban(self, peer: Hashable) -> None:
        """An explicit unban: :meth:`lift`, and no longer counted against its address."""
        self.lift(peer)
        for banned_here in self._ip_bans.values():
            banned_here.pop(peer, None)

    def has_ban(self, peer: Hashable) -> bool:
        """Whether ``peer`` has a ban not yet lifted (in force or just expired)."""
        return peer in self._bans

    def is_banned(self, peer: Hashable, now: float) -> bool:
        """Whether ``peer``'s ban is in force at ``now``."""
        until = self._bans.get(peer)
        return until is not None and until > now

    def banned(self, now: float) -> list[Hashable]:
        """Peers whose ban is in force at ``now``."""
        return [peer for peer in self._bans if self.is_banned(peer, now)]

    def expired(self, now: float) -> list[Hashable]:
        """Peers whose ban has run out by ``now`` (the caller lifts them)."""
        return [peer for peer, until in self._bans.items() if until <= now]

    def next_expiry(self) -> float:
        """When the next ban ends (``math.inf``: none)."""
        return min(self._bans.values(), default=math.inf)

    # -- addresses -------------------------------------------------------------------

    def ip_banned(self, ip: str, now: float) -> bool:
        """Whether ``ip_ban_after`` distinct peers from ``ip`` are banned at ``now``."""
        need = self.ip_ban_after
        banned_here = self._ip_bans.get(ip)
        if need <= 0 or not banned_here:
            return False
        for peer in [p for p, until in banned_here.items() if until <= now]:
            del banned_here[peer]
        if not banned_here:
            del self._ip_bans[ip]
            return False
        return len(banned_here) >= need

    def _prune_ip_bans(self, now: float) -> None:
        for ip in list(self._ip_bans):
            self._ip_bans[ip] = {p: u for p, u in self._ip_bans[ip].items() if u > now}
            if not self._ip_bans[ip]:
                del self._ip_bans[ip]
