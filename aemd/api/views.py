"""What the status page, `aemctl status` and the API show about the node,
gathered from the node's state as plain data (bytes as hex)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aemd import p2p

if TYPE_CHECKING:
    from aemd.node import Node

MAX_MODEL_HOSTS = 64


def balance_of(res, account: bytes) -> dict:
    """``account``'s balance in a ReplayResult: available and pending
    micro-credits, and its next settlement (the earliest pending receipt that
    pays it: when, and how much becomes available then; null when none).

    Settlement time comes from the replayed receipts: a receipt pays its host
    once its challenge window has passed, unless a challenge voids it."""
    from ledger.state import PENDING
    available, pending = res.balances.get(account, (0, 0))
    st = res.checkpoint.state
    due: dict[int, int] = {}
    for rid, (host, _payer, amount, settle_at, status) in st.receipts.items():
        if host == account and status == PENDING and settle_at > res.as_of and rid not in st.challenged:
            due[settle_at] = due.get(settle_at, 0) + amount
    nxt = None
    if due:
        at = min(due)
        nxt = {"at": at, "amount": due[at], "in_s": at - res.as_of}
    return {"available": available, "pending": pending, "next_settlement": nxt}


async def balance(node: "Node") -> dict:
    """This node's own balance, from a replay as of now (incremental: ms)."""
    res = await node.store.ledger(node.now())
    return balance_of(res, node.key.public)


def text_models(node: "Node") -> list[dict]:
    """The text domains other hosts of the mesh serve (what the router can
    send a chat or completion task to), each with its hosts, cheapest first."""
    now = node.now()
    by_domain: dict[str, list] = {}
    for ad in node.mesh.ads.values():
        if ad.kind != "gguf" or ad.expires_at <= now or ad.host == node.key.public:
            continue
        by_domain.setdefault(ad.domain, []).append(ad)
    out = []
    for domain in sorted(by_domain):
        ads = sorted(by_domain[domain], key=lambda a: (a.price, a.host))
        card_load = {a.host: (node.mesh.cards[a.host].load if a.host in node.mesh.cards else None) for a in ads}
        out.append({
            "domain": domain,
            "created": min(a.issued_at for a in ads),
            "min_price": ads[0].price,
            "hosts": [{"host": a.host.hex(), "peer_id": p2p.peer_id_from_public(a.host),
                       "capsule_id": a.capsule_id.hex(), "price": a.price, "tags": list(a.tags),
                       "availability": a.availability, "max_concurrency": a.max_concurrency,
                       "load": card_load[a.host], "expires_at": a.expires_at}
                      for a in ads[:MAX_MODEL_HOSTS]],
        })
    return out


def hosted(node: "Node", svc) -> list[dict]:
    """This node's own capsules, with the tasks running on each now."""
    out = []
    for cap in node.capsules:
        m = cap.manifest
        lim = svc._limiters.get(cap.id) if svc is not None else None
        out.append({
            "capsule_id": cap.id.hex(), "kind": m.kind, "domain": m.domain, "tags": list(m.tags),
            "price": cap.serving.price, "max_concurrency": cap.serving.max_concurrency,
            "running": int(lim.borrowed_tokens) if lim is not None else 0,
            "concurrency": svc.concurrency(cap) if svc is not None else cap.serving.max_concurrency,
        })
    return out


def recent_tasks(svc, limit: int = 20) -> list[dict]:
    """The tasks this node routed most recently, from its RouteTraces."""
    out = []
    for t in svc.traces.recent(limit):
        out.append({"task_id": t.task_id.hex(), "created_at": t.created_at, "outcome": t.outcome,
                    "chosen": t.chosen.hex(), "peer_id": p2p.peer_id_from_public(t.chosen) if t.chosen else "",
                    "attempts": len(t.attempts), "candidates": len(t.candidates),
                    "price": next((c.price for c in t.candidates if c.host == t.chosen), None),
                    "receipt_id": t.receipt_id.hex()})
    return out
