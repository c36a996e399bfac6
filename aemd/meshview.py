"""The node's view of the mesh: the current valid NodeCards and
HostAdvertisements of every peer, learned from gossip.

Pure: the caller passes the time. A newer object (by ``issued_at``) from the
same signer replaces the older; expired ones are dropped. Any key can sign a
card or an ad, so the table is bounded and fair (``specs/sync-protocol.md`` §2):

* **Lifetime.** An object whose ``expires_at - issued_at`` exceeds the
  genesis ``limits.max_announce_lifetime_s``, or whose ``issued_at`` lies more
  than :data:`MAX_CLOCK_SKEW_S` in the future, is refused
  (:func:`lifetime_problem`, also the gossip validator's rule). So nothing
  squats in the table for longer than one lifetime without being re-signed,
  and a far-future ``issued_at`` cannot make an object unreplaceable.
* **Per key.** At most :data:`MAX_ADS_PER_HOST` ads per host key (one card per
  key by construction).
* **Per peer.** Each entry remembers the peer that delivered it (``via``).
  When the table is full, room is made by evicting, among entries whose host
  has no better standing than the newcomer's, those delivered by the peer that
  holds the most entries: a peer that floods the table loses its own entries
  first, and cannot push out what others delivered.
* **Standing.** ``standing(host, now)`` (the node passes
  :meth:`aemd.hostbook.HostBook.standing`: settled receipts, then reachability)
  orders eviction: hosts with a record of settled work go last. A newcomer
  never evicts a host of better standing; if only such hosts remain, it is
  refused.

Eviction works in batches (an eighth of the table at a time), so a sustained
flood costs O(log n) per offer, not a scan of the table each time.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from protocol.mesh import HostAdvertisement, NodeCard

MAX_CARDS = 10_000
MAX_ADS = 50_000
MAX_ADS_PER_HOST = 64
#: How far in the future an ``issued_at`` may be (clock skew between honest nodes).
MAX_CLOCK_SKEW_S = 300
#: Lifetime cap used when the caller gives none (the genesis default).
DEFAULT_MAX_LIFETIME_S = 3600
EVICT_FRACTION = 8

Standing = Callable[[bytes, int], int]


def lifetime_problem(issued_at: int, expires_at: int, now: int, max_lifetime_s: int) -> str | None:
    """Why a card or ad with this validity window is refused at ``now``, or None."""
    if expires_at <= now:
        return "expired"
    if expires_at - issued_at > max_lifetime_s:
        return f"lifetime {expires_at - issued_at} s exceeds the network's {max_lifetime_s} s"
    if issued_at > now + MAX_CLOCK_SKEW_S:
        return f"issued {issued_at - now} s in the future"
    return None


def _no_standing(host: bytes, now: int) -> int:
    return 0


class MeshTable:
    def __init__(self, *, max_lifetime_s: int = DEFAULT_MAX_LIFETIME_S, standing: Standing | None = None,
                 max_cards: int = MAX_CARDS, max_ads: int = MAX_ADS,
                 max_ads_per_host: int = MAX_ADS_PER_HOST) -> None:
        self.max_lifetime_s = max_lifetime_s
        self.standing: Standing = standing or _no_standing
        self.max_cards, self.max_ads, self.max_ads_per_host = max_cards, max_ads, max_ads_per_host
        self.cards: dict[bytes, NodeCard] = {}                                # node -> card
        self.ads: dict[tuple[bytes, bytes], HostAdvertisement] = {}           # (host, capsule) -> ad
        self._card_via: dict[bytes, str] = {}
        self._ad_via: dict[tuple[bytes, bytes], str] = {}
        self._card_via_count: Counter[str] = Counter()
        self._ad_via_count: Counter[str] = Counter()
        self._host_ads: Counter[bytes] = Counter()
        self.refused = 0        # offers refused for lifetime, quota or a full table
        self.evicted = 0

    # -- offers -------------------------------------------------------------------

    def offer_card(self, card: NodeCard, now: int, via: str = "") -> bool:
        """Keep ``card`` if it is within its lifetime and newer than what we hold.
        The caller has verified it. Returns whether the table changed."""
        if lifetime_problem(card.issued_at, card.expires_at, now, self.max_lifetime_s):
            return False
        old = self.cards.get(card.node)
        if old is not None and old.issued_at >= card.issued_at:
            return False
        if old is None and len(self.cards) >= self.max_cards:
            self._expire_cards(now)
            if len(self.cards) >= self.max_cards and not self._evict(
                    self.cards, self._card_via, self._card_via_count, card.node, now, self.max_cards):
                self.refused += 1
                return False
        self._set_via(self._card_via, self._card_via_count, card.node, via)
        self.cards[card.node] = card
        return True

    def offer_ad(self, ad: HostAdvertisement, now: int, via: str = "") -> bool:
        if lifetime_problem(ad.issued_at, ad.expires_at, now, self.max_lifetime_s):
            return False
        key = (ad.host, ad.capsule_id)
        old = self.ads.get(key)
        if old is not None and old.issued_at >= ad.issued_at:
            return False
        if old is None:
            if self._host_ads[ad.host] >= self.max_ads_per_host:
                self.refused += 1
                return False
            if len(self.ads) >= self.max_ads:
                self._expire_ads(now)
                if len(self.ads) >= self.max_ads and not self._evict(
                        self.ads, self._ad_via, self._ad_via_count, ad.host, now, self.max_ads):
                    self.refused += 1
                    return False
            self._host_ads[ad.host] += 1
        self._set_via(self._ad_via, self._ad_via_count, key, via)
        self.ads[key] = ad
        return True

    # -- removal ------------------------------------------------------------------

    def withdraw_ads(self, host: bytes, keep: set[bytes]) -> None:
        """Forget ``host``'s ads for capsules not in ``keep`` (our own removals)."""
        for k in [k for k in self.ads if k[0] == host and k[1] not in keep]:
            self._drop_ad(k)

    def expire(self, now: int) -> None:
        self._expire_cards(now)
        self._expire_ads(now)

    def ads_for(self, domain: str, now: int) -> list[HostAdvertisement]:
        return [a for a in self.ads.values() if a.domain == domain and a.expires_at > now]

    def via_counts(self) -> dict[str, int]:
        """Entries (cards and ads) held per delivering peer."""
        return dict(self._card_via_count + self._ad_via_count)

    # -- internals ------------------------------------------------------------------

    @staticmethod
    def _set_via(vias: dict, counts: Counter, key, via: str) -> None:
        old = vias.get(key)
        if old is not None:
            counts[old] -= 1
            if counts[old] <= 0:
                del counts[old]
        vias[key] = via
        counts[via] += 1

    @staticmethod
    def _unset_via(vias: dict, counts: Counter, key) -> None:
        old = vias.pop(key, None)
        if old is not None:
            counts[old] -= 1
            if counts[old] <= 0:
                del counts[old]

    def _drop_ad(self, key: tuple[bytes, bytes]) -> None:
        if self.ads.pop(key, None) is not None:
            self._host_ads[key[0]] -= 1
            if self._host_ads[key[0]] <= 0:
                del self._host_ads[key[0]]
        self._unset_via(self._ad_via, self._ad_via_count, key)

    def _expire_cards(self, now: int) -> None:
        for k in [k for k, c in self.cards.items() if c.expires_at <= now]:
            del self.cards[k]
            self._unset_via(self._card_via, self._card_via_count, k)

    def _expire_ads(self, now: int) -> None:
        for k in [k for k, a in self.ads.items() if a.expires_at <= now]:
            self._drop_ad(k)

    def _evict(self, table: dict, vias: dict, counts: Counter, newcomer: bytes, now: int, cap: int) -> bool:
        """Make room in a full ``table`` for an entry of host ``newcomer``; False if none can be made."""
        mine = self.standing(newcomer, now)
        host_of = (lambda k: k[0]) if table is self.ads else (lambda k: k)
        standing_cache: dict[bytes, int] = {}

        def standing(host: bytes) -> int:
            s = standing_cache.get(host)
            if s is None:
                s = standing_cache[host] = self.standing(host, now)
            return s

        candidates = [k for k in table if standing(host_of(k)) <= mine]
        if not candidates:
            return False
        # Lowest standing first; among equals, the biggest deliverer's entries,
        # then those closest to expiry.
        candidates.sort(key=lambda k: (standing(host_of(k)), -counts.get(vias.get(k, ""), 0),
                                       table[k].expires_at))
        for k in candidates[:max(1, cap // EVICT_FRACTION)]:
            if table is self.ads:
                self._drop_ad(k)
            else:
                del table[k]
                self._unset_via(vias, counts, k)
            self.evicted += 1
        return True


class RateGate:
    """Token buckets per key (pure, explicit time): ``allow(key, now)`` spends one.

    Used for syncs that head announcements trigger: an announcement costs its
    sender one message but the receiver a whole sync session, so each sender
    gets ``burst`` sessions and then ``rate`` per second. Bounded: beyond
    ``max_keys`` the fullest buckets (those that cost nothing to forget) go.
    """

    def __init__(self, rate: float, burst: float, max_keys: int = 10_000) -> None:
        if not (rate > 0 and burst >= 1 and max_keys > 0):
            raise ValueError("RateGate needs rate > 0, burst >= 1, max_keys > 0")
        self.rate, self.burst, self.max_keys = rate, burst, max_keys
        self._buckets: dict[str, tuple[float, float]] = {}   # key -> (tokens, at)
        self.refused = 0

    def tokens(self, key: str, now: float) -> float:
        tokens, at = self._buckets.get(key, (self.burst, now))
        return min(self.burst, tokens + max(0.0, now - at) * self.rate)

    def allow(self, key: str, now: float) -> bool:
        tokens = self.tokens(key, now)
        if tokens < 1:
            self._buckets[key] = (tokens, now)
            self.refused += 1
            return False
        self._buckets[key] = (tokens - 1, now)
        if len(self._buckets) > self.max_keys:
            full = sorted(self._buckets, key=lambda k: -self.tokens(k, now))
            for k in full[: len(full) // 2]:
                del self._buckets[k]
        return True
