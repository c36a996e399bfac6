"""The pure parts of routing and replication: ranking, fetch planning, the mesh table."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from aemd.meshview import MAX_ADS_PER_HOST, MeshTable
from aemd.router import Reputation, rank
from crypto.hashing import H
from crypto.keys import SigningKey
from protocol.mesh import HostAdvertisement, NodeCard
from protocol.sync import Frontier, plan_fetch
from protocol.task import TaskPacket

NET = H(b"router-test")
PAYER = SigningKey.from_seed(bytes([50]) * 32)
HOSTS = [SigningKey.from_seed(bytes([60 + i]) * 32) for i in range(4)]
NOW = 1_000


def ad(key, *, price=100, domain="general", kind="gguf", tags=(), capsule=b"c", expires=NOW + 100,
       availability=100, issued=NOW):
    return HostAdvertisement(net=NET, host=key.public, capsule_id=H(capsule + key.public), kind=kind,
                             domain=domain, tags=tags, price=price, roles=("inference",),
                             availability=availability, max_concurrency=1, required_receipts=(),
                             issued_at=issued, expires_at=expires, sig=b"").signed(key)


def card(key, load=0, locality=""):
    return NodeCard(net=NET, node=key.public, addrs=(), gpu="", vram_mb=0, ram_mb=0, locality=locality,
                    policies=(), account=key.public, load=load, issued_at=NOW, expires_at=NOW + 100,
                    sig=b"").signed(key)


def task(domain="general", kind="text", tags=(), max_price=1000):
    return TaskPacket(net=NET, payer=PAYER.public, nonce=bytes(16), kind=kind, domain=domain, tags=tags,
                      prompt="hi" if kind == "text" else "", max_tokens=4 if kind == "text" else 0,
                      temperature_milli=0, seed=0, repo_tar=b"", repo_hash=H(b"") if kind != "text" else b"",
                      patch="", test_cmd=() if kind == "text" else ("true",), max_price=max_price,
                      latency_budget_ms=0, created_at=NOW, sig=b"").signed(PAYER)


def test_filters_and_orders():
    a, b, c, d = HOSTS
    ads = [ad(a, price=500), ad(b, price=100), ad(c, domain="other"), ad(d, price=5000),
           ad(a, kind="code_patch", capsule=b"x"), ad(c, expires=NOW, issued=NOW - 10)]
    got = rank(ads, task(), cards={}, reputation={}, self_key=PAYER.public, now=NOW)
    assert [x.host for _, x in got] == [b.public, a.public]     # cheaper first; d too dear; c wrong/expired
    assert got[0][1].score > got[1][1].score


def test_load_reputation_and_tags_count():
    a, b = HOSTS[:2]
    ads = [ad(a, tags=("chat",)), ad(b, tags=("chat", "code"))]
    assert [x.host for _, x in rank(ads, task(tags=("code",)), cards={}, reputation={},
                                    self_key=PAYER.public, now=NOW)] == [b.public]
    cards = {a.public: card(a, load=90), b.public: card(b, load=0)}
    got = rank(ads, task(), cards=cards, reputation={}, self_key=PAYER.public, now=NOW)
    assert got[0][1].host == b.public
    rep = {b.public: Reputation(settled=0, challenged=5)}
    got = rank(ads, task(), cards=cards, reputation=rep, self_key=PAYER.public, now=NOW)
    assert got[0][1].host == a.public


def test_own_ads_are_never_candidates():
    me = HOSTS[0]
    assert rank([ad(me)], task(), cards={}, reputation={}, self_key=me.public, now=NOW) == []


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 2000), st.integers(0, 100)), max_size=12))
def test_rank_is_deterministic_and_one_per_host(spec):
    ads = [ad(HOSTS[h], price=p, availability=av, capsule=bytes([i])) for i, (h, p, av) in enumerate(spec)]
    r1 = rank(ads, task(), cards={}, reputation={}, self_key=PAYER.public, now=NOW)
    r2 = rank(list(reversed(ads)), task(), cards={}, reputation={}, self_key=PAYER.public, now=NOW)
    assert [c for _, c in r1] == [c for _, c in r2]
    hosts = [c.host for _, c in r1]
    assert len(hosts) == len(set(hosts))
    assert all(c.price <= 1000 for _, c in r1)


def test_plan_fetch():
    a, b, c, d = (bytes([i]) * 32 for i in range(4))
    h = lambda x: H(bytes([x]))   # noqa: E731
    local = {a: (5, h(1)), b: (3, h(2)), c: (7, h(3))}
    remote = (Frontier(author=a, seq=9, head=h(4)), Frontier(author=b, seq=3, head=h(5)),
              Frontier(author=c, seq=2, head=h(6)), Frontier(author=d, seq=1000, head=h(7)))
    assert plan_fetch(local, remote, 100) == [(a, 6, 4), (b, 3, 2), (d, 0, 100)]


def test_mesh_table_keeps_newest_and_expires():
    t = MeshTable()
    a = HOSTS[0]
    assert t.offer_ad(ad(a, issued=NOW), NOW)
    assert not t.offer_ad(ad(a, issued=NOW - 1), NOW)            # older: ignored
    assert t.offer_ad(ad(a, issued=NOW + 1, price=7), NOW)
    assert next(iter(t.ads.values())).price == 7
    assert not t.offer_ad(ad(a, expires=NOW, issued=NOW - 10), NOW)             # expired on arrival
    t.expire(NOW + 100)
    assert not t.ads
    for i in range(MAX_ADS_PER_HOST + 5):
        t.offer_ad(ad(a, capsule=bytes([i % 256, i // 256])), NOW)
    assert len(t.ads) == MAX_ADS_PER_HOST
    assert t.offer_card(card(a), NOW) and not t.offer_card(card(a), NOW)


def test_admitted_capsules_only_and_only_from_their_author():
    """With an admitted set (capsule -> author from the admission replay), an
    ad for a capsule not admitted is not a candidate, and neither is another
    host's ad for an admitted capsule: the verifiers measured the author's file."""
    a, b, c, _ = HOSTS
    mine, theirs = ad(a, price=300), ad(b, price=100)
    copy = HostAdvertisement(**{**{k: getattr(mine, k) for k in mine.__dataclass_fields__},
                                "host": c.public, "sig": b""}).signed(c)
    ads = [mine, theirs, copy]
    assert {x.host for _, x in rank(ads, task(), cards={}, reputation={}, self_key=PAYER.public, now=NOW)} \
        == {a.public, b.public, c.public}
    got = rank(ads, task(), cards={}, reputation={}, self_key=PAYER.public, now=NOW,
               admitted={mine.capsule_id: a.public})
    assert [x.host for _, x in got] == [a.public]
    assert rank(ads, task(), cards={}, reputation={}, self_key=PAYER.public, now=NOW, admitted={}) == []
