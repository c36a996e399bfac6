"""The artefact stream (protocol/artefact.py, aemd/artefacts.py,
specs/artefact-protocol.md): codecs, the two sessions against each other and
against a hostile script, and real fetches between libp2p hosts on 127.0.0.1.

``python -m tests.test_artefact_fetch`` prints the spec's vector block.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import deque
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from aemd.artefacts import DIRECT_CHUNK as DIRECT_BUF
from aemd.artefacts import (ArtefactServer, DirectServer, Served, artefact_proto, fetch_artefact, final_path,
                            partial_path)
from aemd.framing import deadline, read_frame, write_frame
from aemd.p2p import open_p2p
from crypto.hashing import H
from crypto.keys import SigningKey
from protocol import errors
from protocol.artefact import (REPLY_CODES, ArtefactDirect, ArtefactError, ArtefactRange, ArtefactRequest, FetchStats,
                               artefact_protocol_id, decode_reply, decode_request, fetch_client, fetch_server)
from protocol.errors import AemError
from protocol.mesh import ExpertCapsuleManifest
from protocol.session import Call, Recv, Send

NET = H(b"aem test artefact network")
OTHER = H(b"another network")
LOCAL = ["/ip4/127.0.0.1/tcp/0"]
WAIT = 30.0
AUTHOR = SigningKey.from_seed(bytes([7]) * 32)
SPEC = Path(__file__).resolve().parent.parent / "specs" / "artefact-protocol.md"

hashes = st.binary(min_size=32, max_size=32)
u63 = st.integers(0, 2**63 - 1)


def manifest(content_hash: bytes, size: int) -> ExpertCapsuleManifest:
    return ExpertCapsuleManifest(
        net=NET, author=AUTHOR.public, name="test artefact", kind="gguf", content_hash=content_hash,
        size_bytes=size, architecture="llama", n_params=0, quantization="", context_length=0, vram_need_mb=0,
        domain="test", tags=(), eval_claims=(), created_at=1, sig=b"").signed(AUTHOR)


# -- codecs -------------------------------------------------------------------------

@st.composite
def requests(draw):
    by_capsule = draw(st.booleans())
    h = draw(hashes)
    return ArtefactRequest(net=draw(hashes), capsule_id=h if by_capsule else b"",
                           content_hash=b"" if by_capsule else h, offset=draw(u63),
                           length=draw(st.integers(1, 2**63 - 1)), direct=draw(st.booleans()))


@st.composite
def ranges(draw):
    size = draw(u63)
    offset = draw(st.integers(0, size))
    length = draw(st.integers(0, size - offset))
    return ArtefactRange(net=draw(hashes), content_hash=draw(hashes), size=size, offset=offset, length=length)


@st.composite
def direct_replies(draw):
    r = draw(ranges())
    return ArtefactDirect(net=r.net, content_hash=r.content_hash, size=r.size, offset=r.offset, length=r.length,
                          port=draw(st.integers(1, 65535)), token=draw(hashes))


@st.composite
def error_replies(draw):
    return ArtefactError(net=draw(hashes), code=draw(st.sampled_from(REPLY_CODES)),
                         detail=draw(st.text(max_size=60)))


@settings(max_examples=80, deadline=None)
@given(req=requests())
def test_request_round_trips(req: ArtefactRequest) -> None:
    assert decode_request(req.encode()) == req


@settings(max_examples=80, deadline=None)
@given(reply=st.one_of(ranges(), direct_replies(), error_replies()))
def test_reply_round_trips(reply) -> None:
    assert decode_reply(reply.encode()) == reply


@settings(max_examples=150, deadline=None)
@given(junk=st.binary(max_size=400))
def test_junk_is_an_aem_error_or_a_message(junk: bytes) -> None:
    for decode in (decode_request, decode_reply):
        try:
            msg = decode(junk)
        except AemError:
            continue
        assert msg.encode() == junk


@settings(max_examples=60, deadline=None)
@given(req=requests(), cut=st.integers(0, 300))
def test_truncated_or_extended_messages_are_refused(req: ArtefactRequest, cut: int) -> None:
    data = req.encode()
    for bad in (data[: cut % len(data)], data + b"\x00"):
        with pytest.raises(AemError):
            decode_request(bad)


def test_request_names_exactly_one_file() -> None:
    for cid, ch in ((b"", b""), (b"\x01" * 32, b"\x02" * 32)):
        with pytest.raises(AemError) as e:
            ArtefactRequest(net=NET, capsule_id=cid, content_hash=ch, offset=0, length=1)
        assert e.value.code == errors.BAD_VALUE
    with pytest.raises(AemError):
        ArtefactRange(net=NET, content_hash=b"\x01" * 32, size=10, offset=8, length=3)
    with pytest.raises(AemError):
        ArtefactError(net=NET, code="INTERNAL", detail="a host cannot choose any code")


def test_protocol_id() -> None:
    assert artefact_protocol_id(NET) == f"/aem/{NET.hex()}/artefact/1" == artefact_proto(NET)


# -- vectors (specs/artefact-protocol.md) -------------------------------------------

def vector_objects() -> list[tuple[str, object]]:
    ch = H(b"artefact vector file")
    return [
        ("request_by_hash", ArtefactRequest(net=NET, capsule_id=b"", content_hash=ch, offset=0, length=3_000_000)),
        ("request_resume_by_capsule", ArtefactRequest(net=NET, capsule_id=H(b"a capsule"), content_hash=b"",
                                                      offset=1_048_576, length=1_951_424)),
        ("range", ArtefactRange(net=NET, content_hash=ch, size=3_000_000, offset=1_048_576, length=1_951_424)),
        ("request_direct", ArtefactRequest(net=NET, capsule_id=b"", content_hash=ch, offset=0, length=3_000_000,
                                           direct=True)),
        ("direct", ArtefactDirect(net=NET, content_hash=ch, size=3_000_000, offset=0, length=3_000_000, port=40123,
                                  token=H(b"a one-time token"))),
        ("error", ArtefactError(net=NET, code=errors.NOT_FOUND, detail="no such artefact here")),
    ]


def vector_block() -> str:
    lines = []
    for name, obj in vector_objects():
        fields = {k: (v.hex() if isinstance(v, bytes) else v) for k, v in obj.to_map().items()}
        lines.append(json.dumps({"vector": name, "fields": fields, "hex": obj.encode().hex()}, sort_keys=True))
    return "\n".join(lines)


def spec_block() -> str:
    m = re.search(r"```artefact-vectors\n(.*?)\n```", SPEC.read_text(), re.S)
    assert m, "specs/artefact-protocol.md has no artefact-vectors block"
    return m.group(1)


def test_spec_vectors_are_the_code() -> None:
    assert spec_block() == vector_block()
    classes = {"artefact_req": ArtefactRequest, "artefact_range": ArtefactRange, "artefact_err": ArtefactError,
               "artefact_direct": ArtefactDirect}
    for line in spec_block().splitlines():
        v = json.loads(line)
        data = bytes.fromhex(v["hex"])
        cls = classes[v["fields"]["type"]]
        obj = cls.decode(data)
        assert obj.encode() == data
        for k, want in v["fields"].items():
            if k not in ("type", "version"):
                got = getattr(obj, k)
                assert (got.hex() if isinstance(got, bytes) else got) == want


# -- sessions in memory -------------------------------------------------------------

def _step(gen, res):
    try:
        return gen.send(res), False, None
    except StopIteration as stop:
        return None, True, stop.value


def pump(client, server, data: bytes, start: int = 0) -> tuple[object, object, bytearray]:
    """Run both sessions against each other, moving the range bytes from the
    server's ``send`` to the client's ``receive``; returns (client outcome,
    server outcome, the bytes the client received)."""
    to_server: deque = deque()
    to_client: deque = deque()
    pipe, got = bytearray(), bytearray()
    s_act, s_done, s_out = _step(server, None)
    c_act, c_done, c_out = _step(client, None)
    for _ in range(10_000):
        if c_done and s_done:
            return c_out, s_out, got
        moved = False
        if not s_done:
            ready, res = True, None
            if isinstance(s_act, Recv):
                ready = bool(to_server)
                res = to_server.popleft() if ready else None
            elif isinstance(s_act, Send):
                to_client.append(s_act.data)
            elif s_act.op == "lookup":
                res = (H(data), len(data))
            elif s_act.op == "send":
                _, off, n = s_act.args
                pipe += data[off: off + n]
            if ready:
                s_act, s_done, s_out = _step(server, res)
                moved = True
        if not c_done:
            ready, res = True, None
            if isinstance(c_act, Recv):
                ready = bool(to_client)
                res = to_client.popleft() if ready else None
            elif isinstance(c_act, Send):
                to_server.append(c_act.data)
            elif c_act.op == "receive":
                off, n = c_act.args
                assert off == start + len(got)
                ready = len(pipe) >= n
                if ready:
                    got += pipe[:n]
                    del pipe[:n]
            elif c_act.op == "digest":
                res = hashlib.sha256(bytes(got)).digest()
            if ready:
                c_act, c_done, c_out = _step(client, res)
                if c_done:
                    to_server.append(None)      # the client closes the stream
                moved = True
        assert moved, "the sessions wait for each other"
    raise AssertionError("sessions did not finish")


def run_client(script, content_hash: bytes, size: int, have: int = 0, max_bytes: int = 1 << 30, **kw):
    """The client against a scripted host: ``script`` answers each Recv in turn;
    returns (outcome or AemError, the actions seen)."""
    gen = fetch_client(NET, content_hash, size, have, max_bytes, **kw)
    seen: list = []
    res = None
    answers = iter(script)
    try:
        while True:
            a = gen.send(res)
            seen.append(a)
            res = next(answers) if isinstance(a, Recv) else (content_hash if isinstance(a, Call)
                                                              and a.op == "digest" else None)
    except StopIteration as stop:
        return stop.value, seen
    except AemError as exc:
        return exc, seen


def test_sessions_move_a_whole_file_and_check_it() -> None:
    data = random.Random(1).randbytes(10_000)
    c, s, got = pump(fetch_client(NET, H(data), len(data), 0, 1 << 20), fetch_server(NET), data)
    assert bytes(got) == data and c == FetchStats(requests=1, received=len(data)) and s == len(data)
    c, s, got = pump(fetch_client(NET, H(data), len(data), 0, 1 << 20, capsule_id=H(b"cap")), fetch_server(NET),
                     data)
    assert bytes(got) == data and s == len(data)


def test_a_session_for_one_part_leaves_the_digest_to_its_caller() -> None:
    data = random.Random(3).randbytes(10_000)
    c, s, got = pump(fetch_client(NET, H(data), len(data), 2000, 1 << 20, end=7000), fetch_server(NET), data, 2000)
    assert c == FetchStats(requests=1, received=5000) and bytes(got) == data[2000:7000]


def test_a_resumed_session_asks_only_for_the_rest() -> None:
    data = random.Random(2).randbytes(5_000)
    acts = run_client([ArtefactRange(net=NET, content_hash=H(data), size=5000, offset=3000, length=2000).encode()],
                      H(data), 5000, have=3000)
    out, seen = acts
    assert out == FetchStats(requests=1, received=2000)
    req = ArtefactRequest.decode(seen[0].data)
    assert (req.offset, req.length) == (3000, 2000)
    assert [a.op for a in seen if isinstance(a, Call)] == ["receive", "digest"]


def test_a_host_that_serves_less_is_asked_again() -> None:
    ch = H(b"x")
    out, seen = run_client([ArtefactRange(net=NET, content_hash=ch, size=100, offset=0, length=60).encode(),
                            ArtefactRange(net=NET, content_hash=ch, size=100, offset=60, length=40).encode()],
                           ch, 100)
    assert out == FetchStats(requests=2, received=100)


@pytest.mark.parametrize("reply,code", [
    (ArtefactRange(net=NET, content_hash=H(b"x"), size=200, offset=0, length=200), errors.TOO_LARGE),
    (ArtefactRange(net=NET, content_hash=H(b"x"), size=100, offset=10, length=90), errors.BAD_VALUE),
    (ArtefactRange(net=NET, content_hash=H(b"y"), size=100, offset=0, length=100), errors.BAD_VALUE),
    (ArtefactRange(net=NET, content_hash=H(b"x"), size=50, offset=0, length=50), errors.BAD_VALUE),
    (ArtefactRange(net=NET, content_hash=H(b"x"), size=100, offset=0, length=0), errors.BAD_VALUE),
    (ArtefactRange(net=OTHER, content_hash=H(b"x"), size=100, offset=0, length=100), errors.WRONG_NETWORK),
    (ArtefactError(net=NET, code=errors.REFUSED, detail="no"), errors.REFUSED),
    (ArtefactRequest(net=NET, capsule_id=b"", content_hash=H(b"x"), offset=0, length=1), errors.WRONG_OBJECT),
    (None, errors.UNAVAILABLE),
])
def test_a_bad_header_stops_before_any_byte_is_written(reply, code) -> None:
    out, seen = run_client([None if reply is None else reply.encode()], H(b"x"), 100)
    assert isinstance(out, AemError) and out.code == code
    assert not [a for a in seen if isinstance(a, Call)]


def test_a_direct_range_and_the_fallback_when_its_port_is_closed() -> None:
    ch = H(b"x")
    direct = ArtefactDirect(net=NET, content_hash=ch, size=100, offset=0, length=100, port=9, token=H(b"t"))
    gen = fetch_client(NET, ch, 100, 0, 1000, direct=True)
    assert ArtefactRequest.decode(gen.send(None).data).direct is True
    gen.send(None)
    assert gen.send(direct.encode()) == Call("receive_direct", (9, H(b"t"), 0, 100))
    again = gen.send(False)           # no connection: the same range, over the stream
    req = ArtefactRequest.decode(again.data)
    assert (req.offset, req.length, req.direct) == (0, 100, False)
    # A direct answer to a request that did not ask for one is refused.
    out, seen = run_client([direct.encode()], ch, 100)
    assert isinstance(out, AemError) and out.code == errors.BAD_VALUE
    # The server grants, then waits for the connection to be over before the next request.
    srv = fetch_server(NET)
    srv.send(None)
    assert srv.send(ArtefactRequest(net=NET, capsule_id=b"", content_hash=ch, offset=0, length=100,
                                    direct=True).encode()) == Call("lookup", (b"", ch))
    assert srv.send((ch, 100)) == Call("grant_direct", (ch, 0, 100))
    sent = srv.send((9, H(b"t")))
    assert decode_reply(sent.data) == direct
    assert srv.send(None) == Call("await_direct", (H(b"t"),))
    assert isinstance(srv.send(100), Recv)
    with pytest.raises(StopIteration) as stop:
        srv.send(None)
    assert stop.value.value == 100


def test_too_large_for_the_class_is_refused_before_anything() -> None:
    out, seen = run_client([], H(b"x"), 1001, max_bytes=1000)
    assert isinstance(out, AemError) and out.code == errors.TOO_LARGE and seen == []


def test_a_wrong_digest_is_bad_proof() -> None:
    data = b"abc" * 1000
    gen = fetch_client(NET, H(data), len(data), 0, 1 << 20)
    gen.send(None)
    gen.send(None)
    assert gen.send(ArtefactRange(net=NET, content_hash=H(data), size=len(data), offset=0,
                                  length=len(data)).encode()) == Call("receive", (0, len(data)))
    assert gen.send(None) == Call("digest")
    with pytest.raises(AemError) as e:
        gen.send(H(b"something else"))
    assert e.value.code == errors.BAD_PROOF


def test_server_refuses_unknown_files_and_bad_offsets() -> None:
    gen = fetch_server(NET)
    assert isinstance(gen.send(None), Recv)
    req = ArtefactRequest(net=NET, capsule_id=b"", content_hash=H(b"x"), offset=0, length=1)
    assert gen.send(req.encode()) == Call("lookup", (b"", H(b"x")))
    sent = gen.send(None)
    assert decode_reply(sent.data).code == errors.NOT_FOUND
    gen = fetch_server(NET)
    gen.send(None)
    gen.send(ArtefactRequest(net=NET, capsule_id=b"", content_hash=H(b"x"), offset=10, length=1).encode())
    assert decode_reply(gen.send((H(b"x"), 10)).data).code == errors.BAD_VALUE
    gen = fetch_server(NET)
    gen.send(None)
    with pytest.raises(AemError) as e:
        gen.send(ArtefactRequest(net=OTHER, capsule_id=b"", content_hash=H(b"x"), offset=0, length=1).encode())
    assert e.value.code == errors.WRONG_NETWORK


def test_server_clamps_a_range_to_the_file() -> None:
    gen = fetch_server(NET)
    gen.send(None)
    gen.send(ArtefactRequest(net=NET, capsule_id=b"", content_hash=H(b"x"), offset=4, length=100).encode())
    hdr = decode_reply(gen.send((H(b"x"), 10)).data)
    assert (hdr.offset, hdr.length, hdr.size) == (4, 6, 10)
    assert gen.send(None) == Call("send", (H(b"x"), 4, 6))


def test_lookup_over_hosted_capsules(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from aemd.artefacts import lookup_capsules
    m = manifest(H(b"file"), 4)
    caps = [SimpleNamespace(manifest=m, id=m.id, serving=SimpleNamespace(path=str(tmp_path / "f")))]
    lookup = lookup_capsules(lambda: caps)
    assert lookup(b"", m.content_hash) == lookup(m.id, b"") == Served(str(tmp_path / "f"), 4, m.content_hash)
    assert lookup(b"", H(b"other")) is None
    caps[0].serving.path = ""           # a capsule without a file serves nothing
    assert lookup(m.id, b"") is None


# -- real libp2p hosts --------------------------------------------------------------

@asynccontextmanager
async def hosts(n: int = 2) -> AsyncIterator[list]:
    async with AsyncExitStack() as stack:
        out = [await stack.enter_async_context(open_p2p(bytes([60 + i]) * 32, LOCAL)) for i in range(n)]
        for other in out[1:]:
            await other.connect(out[0].listen_multiaddrs()[0])
        yield out


def artefact_file(tmp_path: Path, size: int, seed: int = 1) -> tuple[Path, ExpertCapsuleManifest]:
    data = random.Random(seed).randbytes(size)
    path = tmp_path / f"model-{seed}.gguf"
    path.write_bytes(data)
    return path, manifest(H(data), size)


def serve_file(host, path: Path, m: ExpertCapsuleManifest, **kw) -> ArtefactServer:
    served = Served(path, m.size_bytes, m.content_hash)

    def lookup(capsule_id: bytes, content_hash: bytes):
        return served if content_hash == m.content_hash or capsule_id == m.id else None

    server = ArtefactServer(NET, lookup, **kw)
    host.set_stream_handler(server.protocol_id, server.handler, session_timeout=None)
    return server


@pytest.mark.trio
async def test_full_fetch_by_hash_and_by_capsule_id(tmp_path: Path) -> None:
    path, m = artefact_file(tmp_path, 3_000_000)
    seen: list[tuple[int, int]] = []
    async with hosts() as (host, verifier):
        server = serve_file(host, path, m)
        stats = FetchStats()
        got = await fetch_artefact(verifier, host.peer_id, m, tmp_path / "dl", max_bytes=4_000_000,
                                   timeout_s=WAIT, on_progress=lambda d, t: seen.append((d, t)), stats=stats)
        assert got == final_path(tmp_path / "dl", m.content_hash) and got.read_bytes() == path.read_bytes()
        assert not partial_path(tmp_path / "dl", m.content_hash).exists()
        assert stats.received == m.size_bytes and seen[-1] == (m.size_bytes, m.size_bytes)
        assert len(seen) <= 102 and [d for d, _ in seen] == sorted(d for d, _ in seen)
        # Already there and checked: returned at once, nothing moves.
        again = FetchStats()
        assert await fetch_artefact(verifier, host.peer_id, m, tmp_path / "dl", max_bytes=4_000_000,
                                    timeout_s=WAIT, stats=again) == got
        assert again.received == 0
        by_id = await fetch_artefact(verifier, host.peer_id, m, tmp_path / "dl2", max_bytes=4_000_000,
                                     timeout_s=WAIT, by_capsule_id=True)
        assert by_id.read_bytes() == path.read_bytes()
        assert server.served_bytes == 2 * m.size_bytes


@pytest.mark.trio
async def test_install_server_serves_by_content_hash(tmp_path: Path) -> None:
    from aemd.artefacts import install_server
    path, m = artefact_file(tmp_path, 600_000, seed=14)
    async with hosts() as (host, verifier):
        server = install_server(host, NET, lambda ch: (path, m.size_bytes) if ch == m.content_hash else None,
                                lambda peer: peer == verifier.peer_id)
        got = await fetch_artefact(verifier, host.peer_id, m, tmp_path / "dl", max_bytes=m.size_bytes,
                                   timeout_s=WAIT)
        assert got.read_bytes() == path.read_bytes() and server.served_bytes == m.size_bytes
        with pytest.raises(AemError) as e:      # this lookup knows no capsule ids
            await fetch_artefact(verifier, host.peer_id, m, tmp_path / "dl2", max_bytes=m.size_bytes,
                                 timeout_s=WAIT, by_capsule_id=True)
        assert e.value.code == errors.NOT_FOUND


@pytest.mark.trio
async def test_two_fetches_of_one_file_at_once_move_it_once(tmp_path: Path) -> None:
    path, m = artefact_file(tmp_path, 2_000_000, seed=13)
    async with hosts() as (host, verifier):
        server = serve_file(host, path, m)
        stats = FetchStats()
        got: list[Path] = []

        async def one() -> None:
            got.append(await fetch_artefact(verifier, host.peer_id, m, tmp_path / "dl", max_bytes=m.size_bytes,
                                            timeout_s=WAIT, stats=stats))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(one)
            nursery.start_soon(one)
        assert got[0] == got[1] and got[0].read_bytes() == path.read_bytes()
        assert stats.received == m.size_bytes == server.served_bytes


@pytest.mark.trio
async def test_a_dropped_connection_resumes_with_only_the_remainder(tmp_path: Path) -> None:
    path, m = artefact_file(tmp_path, 4_000_000, seed=2)
    dl = tmp_path / "dl"
    async with hosts() as (host, verifier):
        serve_file(host, path, m)
        half = trio.Event()

        def progress(done: int, total: int) -> None:
            if done >= total // 2:
                half.set()

        async def kill() -> None:
            await half.wait()
            await verifier.disconnect(host.peer_id)

        first = FetchStats()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(kill)
            with pytest.raises(AemError) as e:
                await fetch_artefact(verifier, host.peer_id, m, dl, max_bytes=m.size_bytes, timeout_s=WAIT,
                                     on_progress=progress, stats=first)
        assert e.value.code in (errors.UNAVAILABLE, errors.TIMEOUT)
        part = partial_path(dl, m.content_hash)
        kept = part.stat().st_size
        assert m.size_bytes // 2 <= kept < m.size_bytes and kept == first.received
        assert part.read_bytes() == path.read_bytes()[:kept]

        await verifier.connect(host.listen_multiaddrs()[0])
        second = FetchStats()
        got = await fetch_artefact(verifier, host.peer_id, m, dl, max_bytes=m.size_bytes, timeout_s=WAIT,
                                   stats=second)
        assert second.received == m.size_bytes - kept and second.requests == 1
        assert got.read_bytes() == path.read_bytes() and not part.exists()


@pytest.mark.trio
async def test_a_flipped_byte_is_caught_and_the_partial_removed(tmp_path: Path) -> None:
    path, m = artefact_file(tmp_path, 2_000_000, seed=3)
    data = bytearray(path.read_bytes())
    data[1_234_567] ^= 0x01
    path.write_bytes(bytes(data))      # the host's file is no longer the manifest's
    dl = tmp_path / "dl"
    async with hosts() as (host, verifier):
        serve_file(host, path, m)
        with pytest.raises(AemError) as e:
            await fetch_artefact(verifier, host.peer_id, m, dl, max_bytes=m.size_bytes, timeout_s=WAIT)
        assert e.value.code == errors.BAD_PROOF
        assert not partial_path(dl, m.content_hash).exists() and not final_path(dl, m.content_hash).exists()
        # A kept prefix with a flipped byte is caught too, after the rest is resumed.
        good = tmp_path / "good.gguf"
        good.write_bytes(bytes(data[:1_234_567]) + bytes([data[1_234_567] ^ 0x01]) + bytes(data[1_234_568:]))
        assert H(good.read_bytes()) == m.content_hash
        prefix = bytearray(good.read_bytes()[:1_500_000])
        prefix[10] ^= 0x80
        partial_path(dl, m.content_hash).write_bytes(bytes(prefix))
        host.remove_stream_handler(artefact_proto(NET))
        serve_file(host, good, m)
        stats = FetchStats()
        with pytest.raises(AemError) as e:
            await fetch_artefact(verifier, host.peer_id, m, dl, max_bytes=m.size_bytes, timeout_s=WAIT,
                                 stats=stats)
        assert e.value.code == errors.BAD_PROOF and stats.received == m.size_bytes - 1_500_000
        assert not partial_path(dl, m.content_hash).exists()
        got = await fetch_artefact(verifier, host.peer_id, m, dl, max_bytes=m.size_bytes, timeout_s=WAIT)
        assert got.read_bytes() == good.read_bytes()


@pytest.mark.trio
async def test_oversize_is_refused_before_any_stream_and_from_a_lying_host(tmp_path: Path) -> None:
    path, m = artefact_file(tmp_path, 1_000_000, seed=4)
    async with hosts() as (host, verifier):
        opened: list[str] = []

        async def liar(stream, peer: str) -> None:
            opened.append(peer)
            req = decode_request(await read_frame(stream, 256))
            # A host claiming a bigger file than the manifest, and sending it.
            await write_frame(stream, ArtefactRange(net=NET, content_hash=m.content_hash, size=m.size_bytes + 10,
                                                    offset=req.offset, length=m.size_bytes + 10).encode())
            await stream.write(b"\x00" * (m.size_bytes + 10))

        host.set_stream_handler(artefact_proto(NET), liar)
        with pytest.raises(AemError) as e:
            await fetch_artefact(verifier, host.peer_id, m, tmp_path / "dl", max_bytes=m.size_bytes - 1,
                                 timeout_s=WAIT)
        assert e.value.code == errors.TOO_LARGE and opened == []
        with pytest.raises(AemError) as e:
            await fetch_artefact(verifier, host.peer_id, m, tmp_path / "dl", max_bytes=m.size_bytes,
                                 timeout_s=WAIT)
        assert e.value.code == errors.TOO_LARGE and opened == [verifier.peer_id]
        assert partial_path(tmp_path / "dl", m.content_hash).stat().st_size == 0


@pytest.mark.trio
async def test_a_stalling_host_times_out(tmp_path: Path) -> None:
    path, m = artefact_file(tmp_path, 1_000_000, seed=5)
    async with hosts() as (host, verifier):
        release = trio.Event()

        async def staller(stream, peer: str) -> None:
            req = decode_request(await read_frame(stream, 256))
            await write_frame(stream, ArtefactRange(net=NET, content_hash=m.content_hash, size=m.size_bytes,
                                                    offset=req.offset, length=req.length).encode())
            await stream.write(path.read_bytes()[req.offset:][:100_000])
            with trio.move_on_after(WAIT):
                await release.wait()

        host.set_stream_handler(artefact_proto(NET), staller)
        with deadline(WAIT, "the fetch's own deadline"):
            with pytest.raises(AemError) as e:
                await fetch_artefact(verifier, host.peer_id, m, tmp_path / "dl", max_bytes=m.size_bytes,
                                     timeout_s=WAIT, idle_s=0.5)
        assert e.value.code == errors.TIMEOUT
        assert partial_path(tmp_path / "dl", m.content_hash).stat().st_size == 100_000
        # The whole fetch's bound holds even when each read is within the idle bound.
        with pytest.raises(AemError) as e:
            await fetch_artefact(verifier, host.peer_id, m, tmp_path / "dl", max_bytes=m.size_bytes,
                                 timeout_s=1.0)
        assert e.value.code == errors.TIMEOUT, e.value
        assert partial_path(tmp_path / "dl", m.content_hash).read_bytes() == path.read_bytes()[:200_000]
        release.set()


@pytest.mark.trio
async def test_allow_hook_and_per_peer_limit(tmp_path: Path) -> None:
    path, m = artefact_file(tmp_path, 500_000, seed=6)
    async with hosts(3) as (host, verifier, stranger):
        server = serve_file(host, path, m, allow=lambda peer: peer == verifier.peer_id, max_per_peer=1)
        with pytest.raises(AemError) as e:
            await fetch_artefact(stranger, host.peer_id, m, tmp_path / "s", max_bytes=m.size_bytes, timeout_s=WAIT)
        assert e.value.code == errors.REFUSED
        # One stream of this peer is being served (held open); a second is turned away.
        server._enter(verifier.peer_id)
        with pytest.raises(AemError) as e:
            await fetch_artefact(verifier, host.peer_id, m, tmp_path / "v", max_bytes=m.size_bytes, timeout_s=WAIT)
        assert e.value.code == errors.UNAVAILABLE
        server._leave(verifier.peer_id)
        got = await fetch_artefact(verifier, host.peer_id, m, tmp_path / "v", max_bytes=m.size_bytes,
                                   timeout_s=WAIT)
        assert got.read_bytes() == path.read_bytes() and server.refused == 2
        # Another manifest's file is not served.
        _, other = artefact_file(tmp_path, 1000, seed=7)
        with pytest.raises(AemError) as e:
            await fetch_artefact(verifier, host.peer_id, other, tmp_path / "v", max_bytes=1000, timeout_s=WAIT)
        assert e.value.code == errors.NOT_FOUND


@asynccontextmanager
async def direct_host(host, path: Path, m: ExpertCapsuleManifest, direct: DirectServer | None = None):
    direct = direct or DirectServer()
    async with trio.open_nursery() as nursery:
        await nursery.start(direct.run, "127.0.0.1")
        yield serve_file(host, path, m, direct=direct), direct
        nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_direct_fetch_moves_the_bytes_beside_the_stream(tmp_path: Path) -> None:
    path, m = artefact_file(tmp_path, 3_000_000, seed=8)
    async with hosts() as (host, verifier), direct_host(host, path, m) as (server, direct):
        stats = FetchStats()
        got = await fetch_artefact(verifier, host.peer_id, m, tmp_path / "dl", max_bytes=m.size_bytes,
                                   timeout_s=WAIT, direct=True, stats=stats)
        assert got.read_bytes() == path.read_bytes() and stats == FetchStats(requests=1, received=m.size_bytes)
        assert direct.sent_bytes == m.size_bytes
        # A client that does not ask gets the stream, from the same host.
        plain = await fetch_artefact(verifier, host.peer_id, m, tmp_path / "dl2", max_bytes=m.size_bytes,
                                     timeout_s=WAIT)
        assert plain.read_bytes() == path.read_bytes() and direct.sent_bytes == m.size_bytes


@pytest.mark.trio
async def test_direct_port_unreachable_falls_back_to_the_stream(tmp_path: Path) -> None:
    import socket
    path, m = artefact_file(tmp_path, 1_000_000, seed=9)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    async with hosts() as (host, verifier), direct_host(host, path, m, DirectServer(connect_s=0.5)) as (_, direct):
        direct.port = closed             # what the host grants, where nothing listens
        stats = FetchStats()
        got = await fetch_artefact(verifier, host.peer_id, m, tmp_path / "dl", max_bytes=m.size_bytes,
                                   timeout_s=WAIT, direct=True, stats=stats)
        assert got.read_bytes() == path.read_bytes()
        assert stats == FetchStats(requests=2, received=m.size_bytes) and direct.sent_bytes == 0


class _StallingDirect(DirectServer):
    """Sends the first ``n`` bytes of a range, then nothing until the client closes."""

    def __init__(self, n: int, **kw) -> None:
        super().__init__(**kw)
        self.n = n

    async def _send(self, sock, g) -> None:
        data = Path(g.path).read_bytes()[g.offset: g.offset + self.n]
        while data:
            data = data[await sock.send(data):]
        with trio.move_on_after(WAIT):
            await sock.recv(1)            # until the client gives up and closes


@pytest.mark.trio
async def test_direct_stall_keeps_a_prefix_and_the_stream_resumes(tmp_path: Path) -> None:
    path, m = artefact_file(tmp_path, 4 * DIRECT_BUF + 1000, seed=10)
    dl = tmp_path / "dl"
    async with hosts() as (host, verifier), \
            direct_host(host, path, m, _StallingDirect(DIRECT_BUF + 5000, idle_s=WAIT)):
        first = FetchStats()
        with pytest.raises(AemError) as e:
            await fetch_artefact(verifier, host.peer_id, m, dl, max_bytes=m.size_bytes, timeout_s=WAIT,
                                 idle_s=0.5, direct=True, stats=first)
        assert e.value.code == errors.TIMEOUT
        kept = partial_path(dl, m.content_hash).stat().st_size
        assert kept == DIRECT_BUF + 5000 == first.received      # every byte that arrived was kept
        assert partial_path(dl, m.content_hash).read_bytes() == path.read_bytes()[:kept]
        # The whole fetch's deadline ends a direct range too (its threads with it).
        with deadline(WAIT, "a direct fetch past its own deadline"):
            with pytest.raises(AemError) as e:
                await fetch_artefact(verifier, host.peer_id, m, dl, max_bytes=m.size_bytes, timeout_s=1.0,
                                     direct=True)
        assert e.value.code == errors.TIMEOUT
        kept = partial_path(dl, m.content_hash).stat().st_size
        assert kept == 2 * (DIRECT_BUF + 5000)
        assert partial_path(dl, m.content_hash).read_bytes() == path.read_bytes()[:kept]
        second = FetchStats()
        got = await fetch_artefact(verifier, host.peer_id, m, dl, max_bytes=m.size_bytes, timeout_s=WAIT,
                                   stats=second)
        assert got.read_bytes() == path.read_bytes() and second.received == m.size_bytes - kept


@pytest.mark.trio
async def test_direct_bad_hash_is_checked_again_over_the_stream(tmp_path: Path) -> None:
    path, m = artefact_file(tmp_path, 1_500_000, seed=11)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x10
    path.write_bytes(bytes(data))
    async with hosts() as (host, verifier), direct_host(host, path, m) as (_, direct):
        stats = FetchStats()
        with pytest.raises(AemError) as e:
            await fetch_artefact(verifier, host.peer_id, m, tmp_path / "dl", max_bytes=m.size_bytes,
                                 timeout_s=WAIT, direct=True, stats=stats)
        assert e.value.code == errors.BAD_PROOF
        assert stats.received == 2 * m.size_bytes and direct.sent_bytes == m.size_bytes
        assert not any((tmp_path / "dl").iterdir())


@pytest.mark.real          # TCP ports on 127.0.0.1, without a libp2p host for conftest to see
@pytest.mark.trio
async def test_direct_listener_refuses_bad_tokens_and_drops_a_client_that_stops_reading(tmp_path: Path) -> None:
    path, m = artefact_file(tmp_path, 16_000_000, seed=12)
    direct = DirectServer(connect_s=0.5, idle_s=0.5)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(direct.run, "127.0.0.1")
        with deadline(WAIT, "direct listener"):
            # A token never granted, and a granted one used twice: closed at once, nothing sent.
            port_, token = direct.grant(path, 0, m.size_bytes, "peer")
            assert port_ == port
            bad = await trio.open_tcp_stream("127.0.0.1", port)
            await bad.send_all(H(b"not a token"))
            assert await bad.receive_some(10) == b""
            await bad.aclose()
            lazy = await trio.open_tcp_stream("127.0.0.1", port)
            await lazy.send_all(token)         # ... and never reads
            second = await trio.open_tcp_stream("127.0.0.1", port)
            await second.send_all(token)
            assert await second.receive_some(10) == b""
            await second.aclose()
            sent = await direct.wait(token)
            assert 0 < sent < m.size_bytes and direct.sent_bytes == sent
            await lazy.aclose()
            # A grant nobody claims ends after connect_s.
            _, unused = direct.grant(path, 0, 10, "peer")
            assert await direct.wait(unused) == 0
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    print(vector_block())
