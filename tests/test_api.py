"""The HTTP API of `aemd start`, driven with the official `openai` client
against real nodes on 127.0.0.1: chat and completions (streamed and not)
through a mesh, with the real SmolLM2 model and the tiny random one; errors
in OpenAI's shape; the bearer token; the status page in headless Chromium;
Prometheus metrics; `aemctl status` and `ledger-replay`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.request

import pytest

from aemd.executors import TINY_MODEL, write_tiny_llama_gguf
from aemd.identity import atomic_write
from tests.nodekit import BIN, FAST_CONFIG, Mesh, wait_for
from tests.test_tasks import add_expert, aemctl

openai = pytest.importorskip("openai", reason="the openai client is installed by scripts/test.sh")

GRANT = 1_000_000_000
TOKEN = "s3cret-token"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FRANCE = [{"role": "system", "content": "You are a helpful assistant."},
          {"role": "user", "content": "What is the capital of France?"}]



def client(node, token: str = "unused") -> "openai.OpenAI":
    # max_retries=0: an error must surface as it is, not be retried into something else.
    return openai.OpenAI(base_url=node.api + "/v1", api_key=token, max_retries=0, timeout=120)


def get(url: str, token: str | None = None) -> tuple[int, bytes, str]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read(), r.headers.get("content-type", "")
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers.get("content-type", "")


@pytest.fixture(scope="module")
def api_mesh(tmp_path_factory):
    """n0 pays through its API; n1 hosts the tiny random model (domain
    "tiny"); n2 hosts SmolLM2-135M-Instruct (domain "smol"); n3 has no
    credits and an API that requires a bearer token."""
    from aemd.executors.models import smollm2_path
    root = tmp_path_factory.mktemp("api")
    tiny = write_tiny_llama_gguf(root / "tiny.gguf", **TINY_MODEL)
    mesh = Mesh(root, 4, grant=GRANT, unfunded=(3,))
    p, h_tiny, h_smol, poor = mesh.nodes
    atomic_write(poor.home.config, (FAST_CONFIG + f'token = "{TOKEN}"\n').encode())
    add_expert(h_tiny, str(tiny), "--domain", "tiny", "--price", "0.5")
    add_expert(h_smol, str(smollm2_path()), "--domain", "smol", "--price", "0.25")
    mesh.start_line()
    try:
        assert all(n.api.startswith("http://127.0.0.1:") for n in mesh.nodes), [n.api for n in mesh.nodes]
        wait_for("ads at every node", lambda: all(len(n.call("ads")) == 2 for n in mesh.nodes), timeout=90)
        yield mesh
    except BaseException:
        print(mesh.logs())
        raise
    finally:
        mesh.close()


def aem(obj) -> dict:
    """The response's extension field ``aem`` (the client keeps unknown fields)."""
    extra = obj.model_extra or {}
    assert "aem" in extra, f"no aem field in {obj!r}"
    return extra["aem"]


def settled_receipts(node, *, after_s: int = 7200) -> set[str]:
    """Receipt ids the node's replay applies: replayed past the challenge
    window, each applied receipt shows up as a settlement event."""
    out = aemctl(node.home, "ledger-replay", "--json", "--events", "--as-of", str(int(time.time()) + after_s))
    assert out.returncode == 0, out.stderr
    return {e["object"] for e in json.loads(out.stdout)["events"] if e["event"] == "settle"}


def test_real_model_answers_through_the_api_streamed_and_not(api_mesh):
    mesh = api_mesh
    p, _, h_smol, _ = mesh.nodes
    c = client(p)

    models = {m.id: m for m in c.models.list().data}
    assert set(models) == {"tiny", "smol"}
    hosts = aem(models["smol"])["hosts"]
    assert [(x["peer_id"], x["price"]) for x in hosts] == [(h_smol.peer_id, 250_000)]

    r = c.chat.completions.create(model="smol", messages=FRANCE, max_tokens=24)
    answer = r.choices[0].message.content
    assert "Paris" in answer, answer
    # The same chat through llama.cpp directly: the host applied the model's own template.
    from aemd.executors import no_extra_bufts
    from aemd.executors.models import smollm2_path
    import llama_cpp
    with no_extra_bufts():
        llm = llama_cpp.Llama(model_path=str(smollm2_path()), n_ctx=512, n_threads=1, verbose=False)
    try:
        direct = llm.create_chat_completion(FRANCE, max_tokens=24, temperature=0, seed=0)
    finally:
        llm.close()
    assert answer == direct["choices"][0]["message"]["content"]
    assert r.usage.completion_tokens == direct["usage"]["completion_tokens"]
    assert r.choices[0].message.role == "assistant"
    ext = aem(r)
    assert ext["host"] == h_smol.account.hex() and ext["peer_id"] == h_smol.peer_id
    assert ext["price"] == 250_000 and ext["price_credits"] == "0.250000"
    assert r.id == f"chatcmpl-{ext['task_id']}"
    assert 0 < r.usage.completion_tokens <= 24

    # The same task streamed: deterministic (temperature 0), so the same answer, in pieces.
    chunks = list(c.chat.completions.create(model="smol", messages=FRANCE,
                                            max_tokens=24, stream=True))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == answer
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    sext = aem(chunks[-1])
    assert sext["host"] == h_smol.account.hex() and sext["receipt_id"] != ext["receipt_id"]

    comp = c.completions.create(model="smol", prompt="The capital of France is", max_tokens=8)
    assert comp.choices[0].text.strip(), comp
    cext = aem(comp)

    # Every receipt the answers name is in every node's replay, and they agree.
    want = {ext["receipt_id"], sext["receipt_id"], cext["receipt_id"]}

    def everywhere():
        return all(want <= settled_receipts(n) for n in mesh.nodes)
    wait_for("the receipts in every node's replay", everywhere, timeout=90, every=1)
    roots = wait_for("one state root", lambda: len({n.call("ledger_replay")["state_root"] for n in mesh.nodes}) == 1,
                     timeout=60)
    assert roots


def test_tiny_model_stream_equals_non_stream(api_mesh):
    p, h_tiny, _, _ = api_mesh.nodes
    c = client(p)
    full = c.completions.create(model="tiny", prompt="Once upon a time", max_tokens=32, seed=3)
    ext = aem(full)
    assert ext["host"] == h_tiny.account.hex() and ext["price"] == 500_000
    assert full.usage.completion_tokens > 0
    stream = list(c.completions.create(model="tiny", prompt="Once upon a time", max_tokens=32, seed=3,
                                       stream=True, stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in stream if ch.choices) == full.choices[0].text
    assert stream[-1].usage.completion_tokens == full.usage.completion_tokens   # the usage chunk
    assert stream[-1].choices == []
    # The tiny model has no chat template: its host refuses chat, so every host failed (503),
    # streamed too (the failure comes after the task found a host: a last error event).
    msgs = [{"role": "user", "content": "Hello"}]
    with pytest.raises(openai.InternalServerError) as e:
        c.chat.completions.create(model="tiny", messages=msgs, max_tokens=8)
    assert e.value.status_code == 503 and e.value.code == "UNAVAILABLE"
    with pytest.raises(openai.APIError) as e:
        list(c.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, stream=True))
    assert e.value.code == "UNAVAILABLE"


def test_errors_in_openai_shape(api_mesh):
    p = api_mesh.nodes[0]
    c = client(p)
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.NotFoundError) as e:
        c.chat.completions.create(model="no-such-domain", messages=msgs)
    assert e.value.status_code == 404 and e.value.code == "NOT_FOUND"
    with pytest.raises(openai.NotFoundError) as e:        # streamed: the status still tells
        list(c.chat.completions.create(model="no-such-domain", messages=msgs, stream=True))
    assert e.value.code == "NOT_FOUND"
    with pytest.raises(openai.NotFoundError) as e:        # the only host asks 0.5, the limit is 0.1
        c.chat.completions.create(model="tiny", messages=msgs, extra_body={"aem_max_price": 0.1})
    assert e.value.code == "NOT_FOUND"
    for bad in ({"temperature": 5}, {"n": 2}, {"max_tokens": -1}, {"seed": "x"}, {"stop": ["\n"]}):
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model="tiny", messages=msgs, **bad)
        assert e.value.status_code == 400 and e.value.code == "BAD_VALUE", bad
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="tiny", messages=[{"role": "tool", "content": "x"}])
    assert e.value.code == "BAD_VALUE"

    # Raw HTTP: not JSON, too large, unknown path; each an OpenAI error body.
    def post(body: bytes) -> tuple[int, dict]:
        req = urllib.request.Request(p.api + "/v1/chat/completions", data=body,
                                     headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())
    assert post(b"{nope") == (400, {"error": {"message": "request body is not JSON", "type": "invalid_request_error",
                                              "code": "BAD_ENCODING", "param": None}})
    assert post(b"[" * 100_000)[1]["error"]["code"] == "BAD_ENCODING"
    # A declared body over the limit is refused before any of it is read.
    import http.client
    from urllib.parse import urlsplit
    u = urlsplit(p.api)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    try:
        conn.putrequest("POST", "/v1/chat/completions")
        conn.putheader("content-type", "application/json")
        conn.putheader("content-length", str(2 << 20))
        conn.endheaders()
        resp = conn.getresponse()
        assert resp.status == 413 and json.loads(resp.read())["error"]["code"] == "TOO_LARGE"
    finally:
        conn.close()
    st, raw, _ = get(p.api + "/v1/nothing")
    assert st == 404 and json.loads(raw)["error"]["code"] == "NOT_FOUND"


def test_bearer_token_and_unfunded_payer(api_mesh):
    poor = api_mesh.nodes[3]
    msgs = [{"role": "user", "content": "hi"}]
    for token in ("unused", TOKEN + "x"):
        with pytest.raises(openai.AuthenticationError) as e:
            client(poor, token).models.list()
        assert e.value.status_code == 401
    assert get(poor.api + "/metrics")[0] == 401 and get(poor.api + "/")[0] == 401
    assert get(poor.api + "/metrics", TOKEN)[0] == 200
    c = client(poor, TOKEN)
    assert {m.id for m in c.models.list().data} == {"tiny", "smol"}
    with pytest.raises(openai.APIStatusError) as e:
        c.chat.completions.create(model="tiny", messages=msgs)
    assert e.value.status_code == 402 and e.value.code == "REFUSED"
    assert "not enough credits" in e.value.message


def test_public_listen_needs_a_token(tmp_path):
    mesh = Mesh(tmp_path, 1)
    node = mesh.nodes[0]
    atomic_write(node.home.config, (FAST_CONFIG.replace('listen = "127.0.0.1:0"', 'listen = "0.0.0.0:0"')).encode())
    out = subprocess.run([str(BIN / "aemd"), "start", "--home", str(node.home.root)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode != 0
    assert out.stderr.strip().splitlines()[-1].startswith("error: CONFIG: api.listen 0.0.0.0:0 is not a loopback")


def test_metrics_parse_and_count_tasks(api_mesh):
    from prometheus_client.parser import text_string_to_metric_families
    p, h_tiny, _, _ = api_mesh.nodes
    client(p).completions.create(model="tiny", prompt="Hello", max_tokens=4)

    def samples(node) -> dict:
        st, raw, ctype = get(node.api + "/metrics")
        assert st == 200 and ctype.startswith("text/plain")
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(raw.decode()) for s in fam.samples}

    h = wait_for("the host's served counter", lambda: (s := samples(h_tiny))[("aem_tasks_served_total", ())] >= 1 and s)
    assert h[("aem_tokens_generated_total", ())] > 0
    assert h[("aem_credits_earned_total", ())] >= 0.5
    assert h[("aem_peers", ())] >= 1
    assert h[("aem_gossip_messages_in_total", (("topic", "cards"),))] > 0
    assert h[("aem_gossip_messages_out_total", (("topic", "ads"),))] > 0
    assert h[("aem_log_entries", ())] >= 1
    assert h[("aem_replay_seconds_count", ())] >= 1
    assert h[("aem_sync_lag_seconds", ())] >= 0            # it has synced with a peer
    s = samples(p)
    assert s[("aem_tasks_routed_total", (("outcome", "ok"),))] >= 1
    assert s[("aem_tasks_served_total", ())] == 0


def test_status_and_ledger_replay_show_own_balance(api_mesh):
    p = api_mesh.nodes[0]
    # Receipts of earlier tests may still be arriving: wait until the log stops changing.
    wait_for("one state root", lambda: len({n.call("ledger_replay")["state_root"] for n in api_mesh.nodes}) == 1,
             timeout=60)
    rep = p.call("ledger_replay")
    mine = rep["balances"][p.account.hex()]
    out = aemctl(p.home, "status", "--json")
    assert out.returncode == 0, out.stderr
    st = json.loads(out.stdout)
    assert st["api"] == p.api
    assert {k: st["balance"][k] for k in ("available", "pending")} == mine
    text = aemctl(p.home, "status").stdout
    from aemd.cliutil import fmt_credits
    assert f"balance      {fmt_credits(mine['available'])} available, {fmt_credits(mine['pending'])} pending" in text
    assert f"api          {p.api}" in text
    lr = aemctl(p.home, "ledger-replay")
    assert lr.returncode == 0, lr.stderr
    marked = [ln for ln in lr.stdout.splitlines() if ln.startswith(p.account.hex())]
    assert len(marked) == 1 and marked[0].rstrip().endswith("(this node)"), lr.stdout
    others = [ln for ln in lr.stdout.splitlines() if "(this node)" in ln]
    assert others == marked
    js = json.loads(aemctl(p.home, "ledger-replay", "--json").stdout)
    assert js["self"] == p.account.hex()


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="chromium is not installed (scripts/test.sh installs it)")
def test_status_page_in_headless_chromium(api_mesh, tmp_path):
    p, h_tiny, h_smol, poor = api_mesh.nodes
    client(p).completions.create(model="tiny", prompt="page", max_tokens=2)   # a recent task to show

    def chromium(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}", *args],
            capture_output=True, text=True, timeout=120)

    out = chromium("--dump-dom", p.api + "/")
    assert out.returncode == 0, out.stderr[-2000:]
    dom = out.stdout
    rep = p.call("ledger_replay")
    from aemd.cliutil import fmt_credits
    mine = rep["balances"][p.account.hex()]
    assert f'<span id="balance-available">{fmt_credits(mine["available"])}</span>' in dom
    assert f'<span id="balance-pending">{fmt_credits(mine["pending"])}</span>' in dom
    assert f'<code id="peer-id">{p.peer_id}</code>' in dom
    for peer in (h_tiny, h_smol, poor):                      # every other node, as a peer
        assert f'data-peer-id="{peer.peer_id}"' in dom
    assert dom.count('class="ad"') == 2 and '<td>smol</td>' in dom
    assert 'class="task"' in dom

    # The host's page lists its expert and its earnings so far.
    out = chromium("--dump-dom", h_tiny.api + "/")
    assert out.returncode == 0, out.stderr[-2000:]
    assert '<td class="domain">tiny</td>' in out.stdout
    assert 'id="balance-next-amount"' in out.stdout           # its pending receipts settle later

    shot = tmp_path / "page.png"
    out = chromium(f"--screenshot={shot}", "--window-size=1200,1600", p.api + "/")
    assert out.returncode == 0, out.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000


# -- pure parts, in process ----------------------------------------------------------

def test_api_settings_refuse_what_would_expose_credits():
    from aemd.api.settings import api_settings
    from aemd.config import DEFAULTS
    from protocol.errors import AemError

    def cfg(**kw):
        a = dict(DEFAULTS["api"])
        a.update(kw)
        return {"api": a}
    s = api_settings(cfg())
    assert (s.host, s.port, s.loopback, s.max_price) == ("127.0.0.1", 8411, True, 1_000_000)
    assert api_settings(cfg(listen="[::1]:0")).host == "::1"
    assert api_settings(cfg(listen="0.0.0.0:80", token="t")).loopback is False
    assert api_settings(cfg(listen="0.0.0.0:80", enabled=False)).enabled is False    # off: no token needed
    for bad in (dict(listen="0.0.0.0:8411"), dict(listen="192.168.1.5:1"), dict(listen="8411"),
                dict(listen="example.org:80"), dict(listen="127.0.0.1:99999"), dict(token="a b"),
                dict(max_price="1.0000001"), dict(max_price="lots")):
        with pytest.raises(AemError) as e:
            api_settings(cfg(**bad))
        assert e.value.code == "CONFIG", bad


def test_status_page_escapes_what_peers_send():
    from types import SimpleNamespace

    from aemd.api import page
    evil = '<script>alert(1)</script>"\'&'
    st = {"peer_id": "12D3KooWpeer", "account": "ab" * 32, "network_name": evil, "network_id": "00" * 32,
          "addrs": [evil], "log_entries": 3, "state_root": "11" * 32, "load": 0, "peers_connected": 1}
    peers = [{"peer_id": evil, "node": "x", "connected": True, "load": 5, "gpu": evil, "vram_mb": 0,
              "locality": evil}]
    ads = [{"peer_id": "p", "capsule_id": "cd" * 32, "kind": "gguf", "domain": evil, "tags": [evil],
            "price": 500_000, "availability": 100, "expires_at": 0}]
    bal = {"available": 1_500_000, "pending": 0, "next_settlement": {"at": 1, "amount": 2, "in_s": 3}}
    html = page.render(SimpleNamespace(url="http://127.0.0.1:1"), st, bal, peers, ads, [], [])
    assert "<script>" not in html and evil not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;&quot;&#x27;&amp;" in html
    assert '<span id="balance-available">1.500000</span>' in html
    assert '<span id="balance-next-amount">0.000002</span>' in html


def test_next_settlement_is_the_earliest_pending_receipt():
    from types import SimpleNamespace

    from aemd.api.views import balance_of
    from ledger.state import PENDING, SETTLED
    me, other = b"m" * 32, b"o" * 32
    receipts = {b"r1": (me, other, 5, 200, PENDING), b"r2": (me, other, 7, 150, PENDING),
                b"r3": (me, other, 9, 150, PENDING), b"r4": (other, me, 11, 120, PENDING),
                b"r5": (me, other, 13, 90, SETTLED), b"r6": (me, other, 17, 140, PENDING)}
    state = SimpleNamespace(receipts=receipts, challenged={b"r6": ()})
    res = SimpleNamespace(balances={me: (100, 21)}, as_of=100, checkpoint=SimpleNamespace(state=state))
    assert balance_of(res, me) == {"available": 100, "pending": 21,
                                   "next_settlement": {"at": 150, "amount": 16, "in_s": 50}}
    assert balance_of(res, b"x" * 32)["next_settlement"] is None


def _stream(events: list[dict], result: dict | Exception, chat: bool = True) -> tuple[int, list]:
    """Run a TaskStream as hypercorn would (ASGI send/receive), with a task
    service that replays ``events`` and then returns ``result`` (or raises it)."""
    from types import SimpleNamespace

    import trio

    from aemd.api.openai_routes import TaskStream

    class ScriptedService:
        async def submit(self, args, emit):
            for ev in events:
                await emit(ev)
            if isinstance(result, Exception):
                raise result
            return result

    sent: list[dict] = []

    async def main():
        ctx = SimpleNamespace(svc=ScriptedService(), node=None, settings=None)
        ts = TaskStream(ctx, {"domain": "d", "max_tokens": 0, "max_price": 1}, chat=chat, include_usage=False)

        async def receive():
            await trio.sleep_forever()

        async def send(msg):
            sent.append(msg)
        await ts({"type": "http"}, receive, send)
    trio.run(main)
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    assert sent[-1]["type"] == "http.response.body" and not sent[-1].get("more_body")    # the end of the body
    if sent[0]["status"] != 200:
        return sent[0]["status"], [json.loads(body)]
    datas = [ln[6:] for ln in body.decode().split("\n\n") if ln.startswith("data: ")]
    return sent[0]["status"], [d if d == "[DONE]" else json.loads(d) for d in datas]


RESULT = {"task_id": "ab" * 32, "host": "cd" * 32, "peer_id": "12D3KooW", "price": 5, "receipt_id": "ef" * 32,
          "tokens_out": 3, "attempts": 2}


def test_stream_keeps_characters_whole_and_skips_what_a_retry_repeats():
    evs = [{"event": "task", "task_id": "ab" * 32},
           {"event": "chunk", "data": "Hé".encode()[:2]},                 # 'H' and half of 'é'
           {"event": "chunk", "data": "Hé".encode()[2:] + b"llo w"},
           {"event": "attempt", "host": "x", "outcome": "UNAVAILABLE"},   # that host died mid-stream
           {"event": "chunk", "data": "Héllo".encode()},                  # the next one starts over
           {"event": "chunk", "data": b" world"}]
    status, datas = _stream(evs, dict(RESULT, output="Héllo world".encode()))
    assert status == 200 and datas[-1] == "[DONE]"
    chunks = datas[:-1]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text == "Héllo world"
    assert all("\ufffd" not in (c["choices"][0]["delta"].get("content") or "") for c in chunks)
    last = chunks[-1]
    assert last["choices"][0]["finish_reason"] == "stop" and last["aem"]["receipt_id"] == "ef" * 32
    assert "restarted" not in last["aem"] and {c["id"] for c in chunks} == {"chatcmpl-" + "ab" * 32}


def test_stream_failures_before_and_after_the_first_byte():
    from protocol.errors import AemError
    # Before the task found a host: a plain error response with its status.
    status, datas = _stream([], AemError("NOT_FOUND", "no host"))
    assert status == 404 and datas == [{"error": {"message": "no host", "type": "not_found_error",
                                                  "code": "NOT_FOUND", "param": None}}]
    # After: the stream ends with an error event (what OpenAI's client raises).
    status, datas = _stream([{"event": "task", "task_id": "ab" * 32}, {"event": "chunk", "data": b"par"}],
                            AemError("UNAVAILABLE", "all 2 hosts failed"), chat=False)
    assert status == 200
    assert datas[-1] == {"error": {"message": "all 2 hosts failed", "type": "service_unavailable",
                                   "code": "UNAVAILABLE", "param": None}}
    assert datas[1]["choices"][0]["text"] == "par" and datas[1]["object"] == "text_completion"


def test_a_taken_port_leaves_the_node_running_without_its_api(tmp_path):
    import socket
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen(1)
    port = held.getsockname()[1]
    mesh = Mesh(tmp_path, 1)
    node = mesh.nodes[0]
    atomic_write(node.home.config, FAST_CONFIG.replace('listen = "127.0.0.1:0"', f'listen = "127.0.0.1:{port}"').encode())
    try:
        node.start()
        assert node.api == ""                                   # no api line in the banner
        assert node.call("status")["api"] is None
        out = aemctl(node.home, "status")
        assert out.returncode == 0 and "api          off" in out.stdout
        assert f"api: cannot listen on 127.0.0.1:{port}" in node.log_path.read_text()
    finally:
        mesh.close()
        held.close()
