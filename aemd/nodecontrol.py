"""Control-socket commands of a running node: status, peers, ads, transfer,
ledger replay. Each takes the request's args and returns plain data (bytes as
hex in the CLI's JSON)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from aemd import p2p
from protocol import errors
from protocol.errors import AemError
from protocol.receipts import Transfer

if TYPE_CHECKING:
    from aemd.node import Node


def _card_summary(card) -> dict:
    return {
        "node": card.node.hex(), "peer_id": p2p.peer_id_from_public(card.node),
        "addrs": list(card.addrs), "gpu": card.gpu, "vram_mb": card.vram_mb, "ram_mb": card.ram_mb,
        "locality": card.locality, "load": card.load, "account": card.account.hex(),
        "issued_at": card.issued_at, "expires_at": card.expires_at,
    }


def _ad_summary(ad) -> dict:
    return {
        "host": ad.host.hex(), "peer_id": p2p.peer_id_from_public(ad.host),
        "capsule_id": ad.capsule_id.hex(), "kind": ad.kind, "domain": ad.domain,
        "tags": list(ad.tags), "price": ad.price, "roles": list(ad.roles),
        "availability": ad.availability, "max_concurrency": ad.max_concurrency,
        "issued_at": ad.issued_at, "expires_at": ad.expires_at,
    }


def _hex_arg(args: dict, name: str, length: int) -> bytes:
    try:
        b = bytes.fromhex(str(args.get(name, "")))
    except ValueError:
        b = b""
    if len(b) != length:
        raise AemError(errors.BAD_VALUE, f"{name} must be {length} bytes of hex")
    return b


def _int_arg(args: dict, name: str, lo: int = 0) -> int:
    v = args.get(name)
    if type(v) is not int or v < lo:
        raise AemError(errors.BAD_VALUE, f"{name} must be an integer >= {lo}")
    return v


def handlers(node: "Node") -> dict[str, Any]:
    async def status(args: dict, emit) -> dict:
        st = node.status()
        st["log_entries"] = await node.store.count()
        st["state_root"] = (await node.store.replay(node.now()))["state_root"]
        return st

    async def peers(args: dict, emit) -> list:
        now = node.now()
        connected = set(node.p2p.connected_peers())
        out = []
        for card in sorted(node.mesh.cards.values(), key=lambda c: c.node):
            if card.node == node.key.public or card.expires_at <= now:
                continue
            s = _card_summary(card)
            s["connected"] = s["peer_id"] in connected
            out.append(s)
        known = {s["peer_id"] for s in out}
        for pid in sorted(connected - known):
            out.append({"peer_id": pid, "connected": True, "node": None})
        return out

    async def ads(args: dict, emit) -> list:
        now = node.now()
        return [_ad_summary(a) for _, a in sorted(node.mesh.ads.items()) if a.expires_at > now]

    async def transfer(args: dict, emit) -> dict:
        recipient = _hex_arg(args, "to", 32)
        amount = _int_arg(args, "amount", 1)
        t = Transfer(net=node.net, sender=node.key.public, recipient=recipient, amount=amount,
                     nonce=os.urandom(16), created_at=node.now(), sig=b"").signed(node.key)
        entry = await node.append(t)
        return {"entry_id": entry.id.hex(), "seq": entry.seq, "transfer_id": t.id.hex()}

    async def ledger_replay(args: dict, emit) -> dict:
        as_of = args.get("as_of")
        if as_of is None:
            as_of = node.now()
        elif type(as_of) is not int or as_of < 0:
            raise AemError(errors.BAD_VALUE, "as_of must be Unix seconds")
        return await node.store.replay(as_of)

    async def reload_capsules(args: dict, emit) -> dict:
        from aemd.capsules import list_capsules
        node.capsules = list_capsules(node.home)
        node.reannounce_soon(coalesce=False)
        return {"capsules": len(node.capsules)}

    async def sync_now(args: dict, emit) -> dict:
        peers = node.p2p.connected_peers()
        added = 0
        for pid in peers:
            stats = await node.sync_with(pid)
            added += stats.added if stats else 0
        return {"peers": len(peers), "added": added}

    async def connect(args: dict, emit) -> dict:
        addr = args.get("addr")
        if not isinstance(addr, str) or "/p2p/" not in addr:
            raise AemError(errors.BAD_VALUE, "addr must be a multiaddr ending in /p2p/PEER_ID")
        return {"peer_id": await node.p2p.connect(addr)}

    return {"connect": connect, "status": status, "peers": peers, "ads": ads, "transfer": transfer,
            "ledger_replay": ledger_replay, "reload_capsules": reload_capsules, "sync_now": sync_now}
