"""Choosing hosts for a task: pure ranking of the mesh's advertisements.

Per task, never per token. Inputs are values (ads, cards, reputation, the
task), output is an ordered candidate list with integer scores, so a
RouteTrace can record exactly why a host was chosen and a test can check it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from protocol.mesh import HostAdvertisement, NodeCard
from protocol.task import Candidate, TaskPacket
from protocol.tasksession import KIND_FOR_TASK

MAX_CANDIDATES = 16


@dataclass(frozen=True)
class Reputation:
    settled: int = 0
    challenged: int = 0


def score(ad: HostAdvertisement, task: TaskPacket, card: NodeCard | None, rep: Reputation,
          locality: str) -> int:
    """Higher is better. Price dominates, then load and reputation; every
    term is an integer so two routers score identically."""
    s = 0
    if task.max_price:
        s += (task.max_price - ad.price) * 1000 // task.max_price        # 0..1000
    s += ad.availability * 2                                             # 0..200
    if card is not None:
        s += (100 - card.load) * 3                                       # 0..300
        if locality and card.locality == locality:
            s += 200
    s += max(-500, min(300, rep.settled * 10 - rep.challenged * 100))
    return s


def rank(ads: list[HostAdvertisement], task: TaskPacket, *, cards: dict[bytes, NodeCard],
         reputation: dict[bytes, Reputation], self_key: bytes, now: int, locality: str = "",
         admitted: Mapping[bytes, bytes] | None = None,
         limit: int | None = MAX_CANDIDATES) -> list[tuple[HostAdvertisement, Candidate]]:
    """The hosts that can do ``task``, best first (ties broken by host key).

    A host qualifies when its ad is unexpired, for the task's domain and kind,
    carries every tag the task asks for, costs at most the task's max price,
    and (when ``admitted`` is given: capsule id -> its author, from the
    admission replay) is for an admitted capsule, advertised by the host
    that authored it (another host's word that it serves the same file is
    not what the verifiers measured). At most
    ``limit`` (None: all; the payer filters by its hostbook first, then cuts,
    so unreachable hosts cannot crowd reachable ones out of the list).
    """
    want_kind = KIND_FOR_TASK[task.kind]
    out = []
    for ad in ads:
        if (ad.expires_at <= now or ad.domain != task.domain or ad.kind != want_kind
                or ad.host == self_key or ad.price > task.max_price
                or not set(task.tags) <= set(ad.tags)
                or (admitted is not None and admitted.get(ad.capsule_id) != ad.host)):
            continue
        sc = score(ad, task, cards.get(ad.host), reputation.get(ad.host, Reputation()), locality)
        out.append((ad, Candidate(host=ad.host, capsule_id=ad.capsule_id, price=ad.price, score=sc)))
    out.sort(key=lambda p: (-p[1].score, p[0].host, p[0].capsule_id))
    # One candidate per host: a retry should go to another machine.
    seen: set[bytes] = set()
    unique = []
    for ad, cand in out:
        if ad.host not in seen:
            seen.add(ad.host)
            unique.append((ad, cand))
    return unique if limit is None else unique[:limit]
