"""The node's view of the mesh: the current valid NodeCards and
HostAdvertisements of every peer, learned from gossip.

Pure: the caller passes the time. A newer object (by ``issued_at``) from the
same signer replaces the older; expired ones are dropped. The table is bounded
so a flood of valid-looking ads cannot grow it without limit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from protocol.mesh import HostAdvertisement, NodeCard

MAX_CARDS = 10_000
MAX_ADS = 50_000
MAX_ADS_PER_HOST = 64


@dataclass
class MeshTable:
    cards: dict[bytes, NodeCard] = field(default_factory=dict)                       # node -> card
    ads: dict[tuple[bytes, bytes], HostAdvertisement] = field(default_factory=dict)  # (host, capsule)

    def offer_card(self, card: NodeCard, now: int) -> bool:
        """Keep ``card`` if it is unexpired and newer than what we hold.
        The caller has verified it. Returns whether the table changed."""
        if card.expires_at <= now:
            return False
        old = self.cards.get(card.node)
        if old is not None and old.issued_at >= card.issued_at:
            return False
        if old is None and len(self.cards) >= MAX_CARDS:
            self.expire(now)
            if len(self.cards) >= MAX_CARDS:
                return False
        self.cards[card.node] = card
        return True

    def offer_ad(self, ad: HostAdvertisement, now: int) -> bool:
        if ad.expires_at <= now:
            return False
        key = (ad.host, ad.capsule_id)
        old = self.ads.get(key)
        if old is not None and old.issued_at >= ad.issued_at:
            return False
        if old is None:
            if sum(1 for h, _ in self.ads if h == ad.host) >= MAX_ADS_PER_HOST:
                return False
            if len(self.ads) >= MAX_ADS:
                self.expire(now)
                if len(self.ads) >= MAX_ADS:
                    return False
        self.ads[key] = ad
        return True

    def withdraw_ads(self, host: bytes, keep: set[bytes]) -> None:
        """Forget ``host``'s ads for capsules not in ``keep`` (our own removals)."""
        for k in [k for k in self.ads if k[0] == host and k[1] not in keep]:
            del self.ads[k]

    def expire(self, now: int) -> None:
        self.cards = {k: c for k, c in self.cards.items() if c.expires_at > now}
        self.ads = {k: a for k, a in self.ads.items() if a.expires_at > now}

    def ads_for(self, domain: str, now: int) -> list[HostAdvertisement]:
        return [a for a in self.ads.values() if a.domain == domain and a.expires_at > now]
