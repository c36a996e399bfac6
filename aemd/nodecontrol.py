"""Control-socket commands of a running node: status, peers, ads, transfer,
ledger replay. Each takes the request's args and returns plain data (bytes as
hex in the CLI's JSON)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Protocol

import trio

from aemd import p2p
from aemd.cliutil import fmt_credits, to_jsonable
from protocol import errors
from protocol.errors import AemError
from protocol.receipts import Transfer
from protocol.schema import AMOUNT

AMOUNT_MAX = AMOUNT.hi

if TYPE_CHECKING:
    from ledger.replay import ReplayResult


class ControlledNode(Protocol):
    """What the control commands use of a running node (``aemd.node.Node``).

    Named here, not imported, so this module sits below the node: the node
    builds its control table from :func:`handlers`, and this module never
    imports ``aemd.node`` (no circular import; ``.importlinter`` keeps it so).
    """

    key: Any
    net: bytes
    genesis: Any
    home: Any
    opts: Any
    store: Any
    p2p: Any
    mesh: Any
    capsules: Any
    gpu_layers: dict
    api_url: str

    def now(self) -> int: ...
    def status(self) -> dict: ...
    async def append(self, obj: Any) -> Any: ...
    async def withdraw_capsules(self, caps: list) -> None: ...
    def reannounce_soon(self, *, coalesce: bool = True) -> None: ...
    async def sync_with(self, peer: str, only: Any = None) -> Any: ...


def _card_summary(card) -> dict:
    return {
        "node": card.node.hex(), "peer_id": p2p.peer_id_from_public(card.node),
        "addrs": list(card.addrs), "gpu": card.gpu, "vram_mb": card.vram_mb, "ram_mb": card.ram_mb,
        "locality": card.locality, "load": card.load, "account": card.account.hex(),
        "issued_at": card.issued_at, "expires_at": card.expires_at, "gpu_layers": card.gpu_layers,
    }


def _ad_summary(ad) -> dict:
    return {
        "host": ad.host.hex(), "peer_id": p2p.peer_id_from_public(ad.host),
        "capsule_id": ad.capsule_id.hex(), "kind": ad.kind, "domain": ad.domain,
        "tags": list(ad.tags), "price": ad.price, "roles": list(ad.roles),
        "availability": ad.availability, "max_concurrency": ad.max_concurrency,
        "issued_at": ad.issued_at, "expires_at": ad.expires_at,
        "model": ad.model, "size_bytes": ad.size_bytes, "quantization": ad.quantization,
    }


def _newest_head_ts(store) -> int | None:
    """The largest author timestamp among the authors' newest entries (None
    for an empty log). Runs in the store's worker thread."""
    from protocol.entry import Entry
    newest = None
    for _seq, eid in store.frontiers().values():
        data = store.get(eid)
        if data is None:
            continue
        try:
            ts = Entry.decode(data).ts
        except AemError:
            continue
        newest = ts if newest is None else max(newest, ts)
    return newest


def replay_json(res: "ReplayResult") -> dict:
    """A replay as ``aemctl ledger-replay --json`` prints it, without events
    (the control socket's answer; the store hands out the value)."""
    out = res.to_json()
    out.pop("events", None)
    return to_jsonable(out)


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


def handlers(node: ControlledNode) -> dict[str, Any]:
    async def status(args: dict, emit) -> dict:
        st = node.status()
        st["log_entries"] = await node.store.count()
        # The root of the replay as of the newest head entry's time (capped at now),
        # not as of now: the root covers the time (settlements fall due), so
        # "as of now" changes every second with no new entry. Nodes holding
        # the same entries show the same root.
        now = node.now()
        newest = await node.store._run(_newest_head_ts, node.store.store)
        # An empty log: as of the network's creation (the grants alone).
        as_of = min(now, node.genesis.created_at if newest is None else newest)
        st["state_root"] = (await node.store.replay(as_of)).state_root.hex()
        st["state_root_as_of"] = as_of
        from aemd import gpu
        g = await trio.to_thread.run_sync(gpu.summary)
        g["n_gpu_layers"] = node.opts.n_gpu_layers
        g["layers_offloaded"] = sum(node.gpu_layers.values())
        st["gpu"] = g
        from aemd.api.views import balance
        st["balance"] = await balance(node)      # this node's own account, as of now
        st["api"] = node.api_url or None          # http://HOST:PORT of the HTTP API; None: off
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

    transfer_lock = trio.Lock()   # one check-then-append at a time, so two cannot both pass

    async def transfer(args: dict, emit) -> dict:
        recipient = _hex_arg(args, "to", 32)
        amount = _int_arg(args, "amount", 1)
        if amount > AMOUNT_MAX:
            raise AemError(errors.BAD_VALUE, f"amount must be at most {AMOUNT_MAX} micro-credits")
        if recipient == node.key.public:
            raise AemError(errors.BAD_VALUE, "a transfer to this node's own account changes nothing")
        async with transfer_lock:
            # Refuse here what every node's replay would refuse (no negative
            # balance), instead of appending an entry that never applies.
            available = (await node.store.ledger(node.now())).available(node.key.public)
            if amount > available:
                raise AemError(errors.REFUSED, f"this account has {fmt_credits(available)} credits available, "
                                               f"the transfer needs {fmt_credits(amount)}")
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
        return replay_json(await node.store.replay(as_of))

    async def reload_capsules(args: dict, emit) -> dict:
        from aemd.capsules import load_capsules
        before = node.capsules
        node.capsules = await trio.to_thread.run_sync(load_capsules, node.home)
        kept = {c.id for c in node.capsules}
        await node.withdraw_capsules([c for c in before if c.id not in kept])   # peers drop them now
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
        if not isinstance(addr, str) or "/p2p/" not in addr or len(addr) > 1024:
            raise AemError(errors.BAD_VALUE, "addr must be a multiaddr ending in /p2p/PEER_ID")
        pid = addr.rsplit("/p2p/", 1)[1]
        if node.p2p.is_connected(pid):
            # libp2p keeps one connection per peer and would return at once
            # without dialling: say so, rather than "connected" for an
            # address that may be dead.
            return {"peer_id": pid, "dialled": False, "already_connected": True}
        return {"peer_id": await node.p2p.connect(addr), "dialled": True, "already_connected": False}

    return {"connect": connect, "status": status, "peers": peers, "ads": ads, "transfer": transfer,
            "ledger_replay": ledger_replay, "reload_capsules": reload_capsules, "sync_now": sync_now}
