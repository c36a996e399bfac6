"""The status page at ``/``: one server-rendered HTML page, no script.

Identity, balance, peers, hosted experts and their load, the mesh's
advertisements and the tasks this node routed recently. Every value that
comes from a peer (card fields, domains, tags) or from the log is escaped
with :func:`html.escape`; nothing is inserted unescaped. The page refreshes
itself every few seconds (a meta refresh, so it works without JavaScript).
Elements that tests and scripts read carry stable ``id``s or ``data-``
attributes (``#balance-available``, ``tr.peer[data-peer-id]``...).
"""

from __future__ import annotations

import time
from html import escape
from typing import TYPE_CHECKING, Iterable

from aemd.cliutil import fmt_credits

if TYPE_CHECKING:
    from aemd.api.app import ApiContext

REFRESH_S = 5
MAX_ROWS = 200

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.3em;margin:0 0 .3em} h2{font-size:1.05em;margin:1.4em 0 .4em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;background:#fff} td,th{padding:.2em .7em;border:1px solid #e3e3e3;text-align:left}
th{background:#f0f0f0;font-weight:600} code,.mono{font-family:ui-monospace,monospace;font-size:.92em}
.num{text-align:right;font-variant-numeric:tabular-nums} .muted{color:#777} .ok{color:#176f2c} .bad{color:#a31515}
"""


def _e(v: object) -> str:
    return escape("" if v is None else str(v), quote=True)


def _utc(t: int | None) -> str:
    if not t:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(t))


def _table(cls: str, headers: Iterable[str], rows: list[str], empty: str) -> str:
    if not rows:
        return f'<p class="muted" id="{cls}-none">{_e(empty)}</p>'
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    return f'<table id="{cls}s"><tr>{head}</tr>{"".join(rows[:MAX_ROWS])}</table>'


def render(ctx: "ApiContext", st: dict, bal: dict, peers: list, ads: list, hosted: list, tasks: list) -> str:
    nxt = bal.get("next_settlement")
    if nxt:
        next_html = (f'<span id="balance-next-amount">{_e(fmt_credits(nxt["amount"]))}</span> credits at '
                     f'<span id="balance-next-at" data-at="{_e(nxt["at"])}">{_e(_utc(nxt["at"]))}</span> '
                     f'(in {_e(nxt["in_s"])} s)')
    else:
        next_html = '<span id="balance-next-none" class="muted">nothing pending</span>'
    identity = [
        ("peer id", f'<code id="peer-id">{_e(st["peer_id"])}</code>'),
        ("account", f'<code id="account">{_e(st["account"])}</code>'),
        ("network", f'<span id="network">{_e(st["network_name"])}</span> '
                    f'<code class="muted">{_e(st["network_id"])}</code>'),
        ("listen", "<br>".join(f'<code class="addr">{_e(a)}</code>' for a in st["addrs"])),
        ("api", f'<code id="api-url">{_e(ctx.url)}</code>'),
        ("log", f'<span id="log-entries">{_e(st.get("log_entries"))}</span> entries'),
        ("state root", f'<code id="state-root">{_e(st.get("state_root"))}</code>'),
        ("load", f'<span id="load">{_e(st.get("load"))}</span>%'),
    ]
    ident_html = "".join(f"<tr><th>{_e(k)}</th><td>{v}</td></tr>" for k, v in identity)

    peer_rows = []
    for p in peers:
        pid = p["peer_id"]
        if p.get("node") is None:
            peer_rows.append(f'<tr class="peer" data-peer-id="{_e(pid)}"><td><code>{_e(pid)}</code></td>'
                             f'<td class="ok">connected</td><td colspan="4" class="muted">no card yet</td></tr>')
            continue
        flag = '<td class="ok">connected</td>' if p["connected"] else '<td class="muted">via gossip</td>'
        peer_rows.append(
            f'<tr class="peer" data-peer-id="{_e(pid)}"><td><code>{_e(pid)}</code></td>{flag}'
            f'<td class="num">{_e(p["load"])}%</td><td>{_e(p["gpu"] or "-")}</td>'
            f'<td class="num">{_e(p["vram_mb"])} MB</td><td>{_e(p["locality"] or "")}</td></tr>')

    hosted_rows = [
        f'<tr class="expert" data-capsule-id="{_e(h["capsule_id"])}"><td><code>{_e(h["capsule_id"][:16])}</code></td>'
        f'<td>{_e(h["kind"])}</td><td class="domain">{_e(h["domain"])}</td>'
        f'<td class="num">{_e(fmt_credits(h["price"]))}</td>'
        f'<td class="num running">{_e(h["running"])} / {_e(h["concurrency"])}</td></tr>'
        for h in hosted]

    ad_rows = [
        f'<tr class="ad" data-capsule-id="{_e(a["capsule_id"])}" data-peer-id="{_e(a["peer_id"])}">'
        f'<td><code>{_e(a["peer_id"])}</code></td><td>{_e(a["kind"])}</td><td>{_e(a["domain"])}</td>'
        f'<td>{_e(", ".join(a["tags"]))}</td><td class="num">{_e(fmt_credits(a["price"]))}</td>'
        f'<td class="num">{_e(a["availability"])}%</td><td>{_e(_utc(a["expires_at"]))}</td></tr>'
        for a in ads]

    task_rows = [
        f'<tr class="task" data-task-id="{_e(t["task_id"])}"><td>{_e(_utc(t["created_at"]))}</td>'
        f'<td><code>{_e(t["task_id"][:16])}</code></td>'
        f'<td class="{"ok" if t["outcome"] == "ok" else "bad"}">{_e(t["outcome"])}</td>'
        f'<td><code>{_e(t["peer_id"] or "-")}</code></td>'
        f'<td class="num">{_e(fmt_credits(t["price"]) if t["price"] is not None else "-")}</td>'
        f'<td class="num">{_e(t["attempts"])} of {_e(t["candidates"])}</td>'
        f'<td><code>{_e(t["receipt_id"][:16] or "-")}</code></td></tr>'
        for t in tasks]

    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="refresh" content="{REFRESH_S}">
<title>aem node {_e(st["peer_id"][:12])}</title><style>{_CSS}</style></head>
<body>
<h1>aem node on <span>{_e(st["network_name"])}</span></h1>
<p class="muted">as of {_e(_utc(int(time.time())))}; refreshes every {REFRESH_S} s;
<a href="/metrics">metrics</a>, <a href="/v1/models">models</a></p>
<table id="identity">{ident_html}</table>

<h2>Balance</h2>
<table id="balance">
<tr><th>available</th><td class="num"><span id="balance-available">{_e(fmt_credits(bal["available"]))}</span> credits</td></tr>
<tr><th>pending</th><td class="num"><span id="balance-pending">{_e(fmt_credits(bal["pending"]))}</span> credits</td></tr>
<tr><th>next settlement</th><td>{next_html}</td></tr>
</table>

<h2>Peers (<span id="peer-count">{len(peers)}</span>; {_e(st.get("peers_connected"))} connected)</h2>
{_table("peer", ["peer id", "", "load", "gpu", "vram", "locality"], peer_rows, "no peers known")}

<h2>Hosted experts (<span id="expert-count">{len(hosted)}</span>)</h2>
{_table("expert", ["capsule", "kind", "domain", "price (credits)", "running / max"], hosted_rows,
        "this node hosts no expert (aemctl expert add)")}

<h2>Mesh advertisements (<span id="ad-count">{len(ads)}</span>)</h2>
{_table("ad", ["host", "kind", "domain", "tags", "price (credits)", "availability", "expires"], ad_rows,
        "no advertisements known")}

<h2>Recent tasks</h2>
{_table("task", ["time", "task", "outcome", "host", "price", "attempts", "receipt"], task_rows,
        "this node has routed no task yet")}
</body></html>
"""
