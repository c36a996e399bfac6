"""Contributions that mint on a measured delta (specs/growth.md).

Pure parts first (the document and its commitment, shingling and
contamination, the attest decision, the command's refusals, the spec's
vectors); then one real mesh: four `aemd start` processes on 127.0.0.1, n0
hosts SmolLM2-135M-Instruct and contributes, n1..n3 are the genesis verifiers
(quorum 2). SmolLM2 is admitted to the `zorblax` domain first (its target set
holds eight made-up facts and two real ones: it knows the real ones only);
then a licensed knowledge file of the made-up facts lifts that eval and mints
once on every node's replay, the same file again mints nothing, a file holding
the eval's items measures 0, and a receipt attested by non-verifiers mints
nothing.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crypto.keys import SigningKey
from protocol import canonical, errors
from protocol.errors import AemError
from protocol.evalset import EvalItem
from protocol.growth import (CONTEXT_BUDGET_BYTES, CONTEXT_PREFIX, ContributionDocument, Figure,
                             attest_problem, best_expert, build_core, check_licence, contaminated_items,
                             context_text, decode_msg, encode_msg, eval_improvement, near_duplicate_of,
                             parse_request, shingles, words)

ROOT = Path(__file__).resolve().parent.parent
KNOWLEDGE = Path(__file__).resolve().parent / "fixtures" / "zorblax-knowledge.txt"
SPEC = ROOT / "specs" / "growth.md"
RATE = 1000                       # micro-credits per basis point of eval_improvement in the test genesis


def doc_of(data: bytes = b"some facts", **kw) -> ContributionDocument:
    args = dict(type="knowledge", domain="zorblax", licence="CC0-1.0", source_policy="written by the tester",
                training_use="any use", teacher_policy=None, distilled_from=None, data=data)
    args.update(kw)
    return ContributionDocument.make(**args)


# --- the document and its commitment -----------------------------------------------------

policy = st.text(st.characters(min_codepoint=33, max_codepoint=0x2FF, blacklist_categories=("Zs", "Cc")),
               min_size=1, max_size=40)


@given(lic=st.sampled_from(["CC0-1.0", "CC-BY-4.0", "MIT", "Apache-2.0", "GPL-2.0+", "LicenseRef-mine"]),
       other=st.sampled_from(["CC-BY-SA-4.0", "BSD-3-Clause", "MPL-2.0"]), src=policy, use=policy,
       data=st.binary(min_size=1, max_size=64).map(lambda b: b.hex().encode()))
@settings(max_examples=60, deadline=None)
def test_the_commitment_binds_the_licence_the_policies_and_the_file(lic, other, src, use, data):
    d = doc_of(data, licence=lic, source_policy=src, training_use=use)
    assert ContributionDocument.from_map(canonical.decode(d.encode(), 1 << 16)) == d
    assert d.commitment == ContributionDocument.from_map(d.to_map()).commitment
    changed = [doc_of(data, licence=other, source_policy=src, training_use=use),
               doc_of(data, licence=lic, source_policy=src + "x", training_use=use),
               doc_of(data, licence=lic, source_policy=src, training_use=use + "x"),
               doc_of(data + b"0", licence=lic, source_policy=src, training_use=use),
               doc_of(data, licence=lic, source_policy=src, training_use=use, domain="other")]
    assert len({c.commitment for c in changed} | {d.commitment}) == 6


def test_a_document_map_with_an_unknown_field_or_a_bad_licence_is_refused():
    m = doc_of().to_map()
    with pytest.raises(AemError) as e:
        ContributionDocument.from_map({**m, "extra": 1})
    assert e.value.code == errors.UNKNOWN_FIELD
    with pytest.raises(AemError):
        ContributionDocument.from_map({**m, "licence": "NOASSERTION"})
    with pytest.raises(AemError):
        ContributionDocument.from_map({**m, "file_size": 0})


@pytest.mark.parametrize("bad", [None, "", "  ", "CC BY 4.0", "MIT OR Apache-2.0", "NONE", "-MIT", "x" * 80])
def test_a_licence_must_be_one_spdx_id(bad):
    with pytest.raises(AemError) as e:
        check_licence(bad)
    assert e.value.code == errors.REFUSED


@given(src=policy, use=policy, delta=st.integers(0, 10_000), op=st.sampled_from(["measure", "attest"]))
@settings(max_examples=40, deadline=None)
def test_attest_requests_round_trip(src, use, delta, op):
    d = doc_of(b"facts", source_policy=src, training_use=use)
    core = build_core(net=b"\x07" * 32, contributor=b"\x01" * 32, doc=d, eval_id="ab" * 32, delta=delta,
                      created_at=9)
    m = {"op": op, "doc": d.to_map(), **({"core": core.to_map()} if op == "attest" else {})}
    assert parse_request(encode_msg(m, 1 << 16)) == (op, d, core if op == "attest" else None)


@given(st.binary(max_size=300))
@settings(max_examples=200, deadline=None)
def test_a_malformed_request_raises_only_aem_errors(data):
    try:
        parse_request(data)
    except AemError:
        pass


# --- contamination and the figure ---------------------------------------------------------

word = st.text(st.sampled_from("abcdefghij"), min_size=1, max_size=6)
other_word = st.text(st.sampled_from("klmnopqrst"), min_size=1, max_size=6)


@given(prompt=st.lists(word, min_size=1, max_size=14), answer=st.lists(word, min_size=1, max_size=3),
       before=st.lists(other_word, max_size=30), after=st.lists(other_word, max_size=30),
       sep=st.sampled_from([" ", "\n", " -- ", ", "]))
@settings(max_examples=150, deadline=None)
def test_an_item_copied_into_a_contribution_is_found_and_unrelated_text_is_not(prompt, answer, before, after, sep):
    item = EvalItem(" ".join(prompt) + "?", " ".join(answer))
    text = " ".join(before) + sep + item.prompt.upper() + sep + item.answer + sep + " ".join(after)
    assert contaminated_items(text, [item]) == [0]
    assert contaminated_items(" ".join(before + after), [item]) == []


def test_rephrased_facts_are_not_contamination_but_the_items_themselves_are():
    from aemd.evaluate import load_evalset
    s = load_evalset("zorblax-target")
    assert contaminated_items(KNOWLEDGE.read_text(), s.items) == []
    copied = "\n".join(f"Q: {i.prompt}\nA: {i.answer}" for i in s.items[:3])
    assert contaminated_items(copied, s.items) == [0, 1, 2]


def test_shingles_words_and_the_context():
    assert words("Hello, Wörld! 2x-y") == ["hello", "wörld", "2x", "y"]
    assert shingles(["a", "b"], 8) == {("a", "b")}
    assert len(shingles([str(i) for i in range(10)], 8)) == 3
    assert shingles([], 8) == set()
    long = ("é" * CONTEXT_BUDGET_BYTES).encode()
    ctx = context_text(long)
    assert ctx.startswith(CONTEXT_PREFIX) and len(ctx[len(CONTEXT_PREFIX):].encode()) <= CONTEXT_BUDGET_BYTES
    assert eval_improvement([True, True, False], [True, False, False]) == 3333
    assert eval_improvement([False] * 3, [True] * 3) == 0
    assert best_expert([(b"\x02" * 32, "z", "gguf", 10), (b"\x01" * 32, "z", "gguf", 10),
                        (b"\x00" * 32, "z", "code_patch", 99), (b"\x03" * 32, "y", "gguf", 99)], "z") == b"\x01" * 32
    assert best_expert([], "z") is None


def test_a_near_duplicate_is_the_same_file_under_another_document():
    a = doc_of(b"facts")
    b = doc_of(b"facts", training_use="no training")
    table = {a.file_hash: a.commitment}
    assert near_duplicate_of(table, a) is None
    assert near_duplicate_of(table, b) == a.commitment
    assert near_duplicate_of({}, b) is None


def test_a_verifier_attests_only_its_own_figure():
    key, other = SigningKey.generate(), SigningKey.generate()
    net = b"\x07" * 32
    d = doc_of(b"facts")
    fig = Figure(d.commitment, "ab" * 32, b"\x01" * 32, 7000, 8000, 1000, "")
    core = build_core(net=net, contributor=key.public, doc=d, eval_id=fig.eval_id, delta=7000, created_at=5)
    assert attest_problem(core, d, net=net, contributor=key.public, figure=fig) == ""
    assert "measured 7000" in attest_problem(core.replace(measured_delta=7001), d, net=net,
                                             contributor=key.public, figure=fig)
    assert attest_problem(core, d, net=net, contributor=other.public, figure=fig)
    assert attest_problem(core, d, net=b"\x08" * 32, contributor=key.public, figure=fig)
    assert attest_problem(core.replace(eval_id="cd" * 32), d, net=net, contributor=key.public, figure=fig)
    assert attest_problem(core.replace(training_use="other"), d, net=net, contributor=key.public, figure=fig)
    assert attest_problem(core, doc_of(b"other"), net=net, contributor=key.public, figure=fig)
    # Attestations of the core verify for the signed receipt that carries them.
    v = SigningKey.generate()
    signed = core.replace(attestations=(core.attested_by(v),)).signed(key)
    assert signed.valid_attesters(frozenset({v.public})) == {v.public}
    # The request frame carries the document and the core; anything else is refused.
    req = encode_msg({"op": "attest", "doc": d.to_map(), "core": core.to_map()}, 1 << 16)
    op, d2, c2 = parse_request(req)
    assert (op, d2, c2) == ("attest", d, core)
    for bad in ({"op": "mint", "doc": d.to_map()}, {"op": "measure", "doc": d.to_map(), "core": 1},
                {"op": "measure"}):
        with pytest.raises(AemError):
            parse_request(encode_msg(bad, 1 << 16))
    with pytest.raises(AemError):
        decode_msg(b"\x01" * 10, 5)


# --- the command's refusals -----------------------------------------------------------------

def ctl(capsys, *args: str) -> tuple[int, str]:
    """`aemctl ARGS` in this process: (exit code, stderr)."""
    from aemd.ctl import main
    capsys.readouterr()
    rc = main(list(args))
    return rc, capsys.readouterr().err


def test_the_command_refuses_missing_terms_and_a_forbidden_teacher(tmp_path, capsys):
    f = tmp_path / "k.txt"
    f.write_text("Zorblax facts")
    home = ["--home", str(tmp_path / "nohome")]
    base = ["contribute", "--type", "knowledge", "--file", str(f), "--domain", "zorblax", *home]
    full = ["--license", "CC0-1.0", "--source-policy", "mine", "--training-use", "any"]
    cases = {
        "no --license": [*base, "--source-policy", "mine", "--training-use", "any"],
        "not an SPDX licence id": [*base, "--license", "my own licence", "--source-policy", "x", "--training-use", "y"],
        "no --source-policy": [*base, "--license", "MIT", "--training-use", "any"],
        "no --training-use": [*base, "--license", "MIT", "--source-policy", "mine"],
        "without --teacher-policy": [*base, *full, "--distilled-from", "BigModel-70B"],
        "not measurable yet": ["contribute", "--type", "skill", "--file", str(f), "--domain", "zorblax", *home,
                               *full],
    }
    forbidden = tmp_path / "card.json"
    forbidden.write_text(json.dumps({"teacher": "BigModel-70B", "licence": "proprietary",
                                     "distillation": "forbidden", "terms": "no distillation"}))
    cases["distillation is 'forbidden'"] = [*base, *full, "--teacher-policy", str(forbidden)]
    for want, argv in cases.items():
        rc, err = ctl(capsys, *argv)
        lines = err.strip().splitlines()
        assert rc == 1 and len(lines) == 1 and want in lines[0], (want, err)
    assert not (tmp_path / "nohome" / "contributions").exists()    # nothing kept for a refused one
    # An allowed teacher passes the command's checks (and then finds no node here).
    allowed = tmp_path / "ok.json"
    allowed.write_text(json.dumps({"teacher": "BigModel-70B", "licence": "Apache-2.0",
                                   "distillation": "allowed", "terms": "outputs may be distilled"}))
    rc, err = ctl(capsys, *base, *full, "--teacher-policy", str(allowed), "--distilled-from", "BigModel-70B")
    assert rc == 3, err


# --- the spec's vectors ------------------------------------------------------------------------

def spec_vectors() -> dict:
    block = re.search(r"```json vectors\n(.*?)```", SPEC.read_text(), re.S)
    assert block, "specs/growth.md has no ```json vectors block"
    return json.loads(block.group(1))


def test_the_spec_vectors_hold():
    v = spec_vectors()
    doc = v["document"]
    m = {**doc["map"], "file_hash": bytes.fromhex(doc["map"]["file_hash"])}
    d = ContributionDocument.from_map(m)
    assert canonical.encode(d.to_map()).hex() == doc["canonical_hex"]
    assert d.commitment.hex() == doc["commitment"]
    assert doc_of(doc["file_text"].encode()).file_hash.hex() == doc["map"]["file_hash"]
    c = v["contamination"]
    items = [EvalItem(i["prompt"], i["answer"]) for i in c["items"]]
    for case in c["texts"]:
        assert contaminated_items(case["text"], items) == case["found"], case


def current_vectors() -> dict:
    """What the vectors block should hold (``python -m tests.test_growth`` prints it)."""
    text = "The capital city of Zorblax is Quenthar.\n"
    d = doc_of(text.encode(), source_policy="written for aem's tests", training_use="any use, no attribution")
    items = [{"prompt": "What is the capital of the planet Zorblax?", "answer": "Quenthar"}]
    texts = ["The capital city of Zorblax is Quenthar.",
             "Q: What is the capital of the planet Zorblax? A: Quenthar",
             "what is the capital of the planet zorblax",
             "Tell me what is the capital of the planet called Zorblax. It is Quenthar, of course."]
    ev = [EvalItem(**i) for i in items]
    return {"document": {"file_text": text, "map": {**d.to_map(), "file_hash": d.file_hash.hex()},
                         "canonical_hex": d.encode().hex(), "commitment": d.commitment.hex()},
            "contamination": {"items": items,
                              "texts": [{"text": t, "found": contaminated_items(t, ev)} for t in texts]}}


def test_the_spec_vectors_are_current():
    assert spec_vectors() == current_vectors()


# --- end to end on real nodes ----------------------------------------------------------------------

VERIFIER_CONFIG = """
[verifier]
enabled = true
poll_s = 1
eval_threads = 1
"""
HOST, VERIFIERS = 0, (1, 2, 3)
WAIT_S = 900


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from aemd.evaluate import load_evalset
    from aemd.executors.models import smollm2_path
    from protocol.admission import DEFAULT_ADMISSION, DomainEvals, NodeClass
    from protocol.genesis import MintRate
    import tests.nodekit as nodekit
    root = tmp_path_factory.mktemp("growth")
    admission = DEFAULT_ADMISSION.replace(
        admitted_only=True, classes=(NodeClass(name="cpu", memory_mb=8192),),
        domains=(DomainEvals(domain="zorblax", target_eval=load_evalset("zorblax-target").hash,
                             general_eval=b"", baseline_bp=0, general_baseline_bp=0),),
        reeval_interval_s=0)
    mesh = nodekit.Mesh(root, 4, verifier_nodes=VERIFIERS, quorum=2, admission=admission,
                        node_configs={i: VERIFIER_CONFIG for i in VERIFIERS},
                        mint_rates=(MintRate(basis="eval_improvement", micro_per_unit=RATE),))
    assert mesh.genesis.mint_rates[0].basis == "eval_improvement"
    smol = root / "smol.gguf"
    shutil.copyfile(smollm2_path(), smol)
    mesh.start_line()
    try:
        host = mesh.nodes[HOST]
        out = aemctl(host, "expert", "add", str(smol), "--domain", "zorblax", "--price", "0.1", "--class", "cpu",
                     "--submit", "--json")
        assert out.returncode == 0, out.stderr
        cid = json.loads(out.stdout)["capsule_id"]

        def admitted():
            mesh.sync_now()
            rows = [json.loads(aemctl(n, "experts", "--json").stdout)["experts"] for n in mesh.nodes]
            return all(any(r["capsule_id"] == cid and r["status"] == "admitted" for r in rs) for rs in rows)
        from tests.nodekit import wait_for
        try:
            wait_for("SmolLM2 admitted in zorblax on every node", admitted, timeout=WAIT_S, every=1.0)
        except AssertionError:
            print(mesh.logs())
            raise
        yield mesh, cid, root
    finally:
        mesh.close()


def aemctl(node, *args: str, timeout: float = WAIT_S + 60) -> subprocess.CompletedProcess:
    from tests.nodekit import BIN
    return subprocess.run([str(BIN / "aemctl"), *args, "--home", str(node.home.root)], capture_output=True,
                          text=True, timeout=timeout)


def contribute(node, path: Path, *extra: str) -> tuple[int, dict | None, str]:
    out = aemctl(node, "contribute", "--type", "knowledge", "--file", str(path), "--domain", "zorblax",
                 *extra, "--wait", str(WAIT_S), "--json")
    return out.returncode, (json.loads(out.stdout) if out.stdout.strip() else None), out.stderr


TERMS = ("--license", "CC0-1.0", "--source-policy", "written for aem's tests", "--training-use", "any use")


def replays(mesh) -> list[dict]:
    return [json.loads(aemctl(n, "ledger-replay", "--json").stdout) for n in mesh.nodes]


def agreed_replays(mesh, entries: int) -> list[dict]:
    """Every node's replay once each holds at least ``entries`` log entries."""
    from tests.nodekit import wait_for

    def done():
        mesh.sync_now()
        rs = replays(mesh)
        return rs if all(r["entries"] >= entries for r in rs) and len({r["state_root"] for r in rs}) == 1 else None
    return wait_for(f"every node at {entries} entries, one state root", done, timeout=120, every=1.0)


@pytest.mark.real
@pytest.mark.model
def test_a_licensed_knowledge_file_that_lifts_the_eval_mints_once_everywhere(world):
    mesh, cid, _ = world
    host = mesh.nodes[HOST]
    before = replays(mesh)[0]
    rc, job, err = contribute(host, KNOWLEDGE, *TERMS)
    assert rc == 0 and job["state"] == "appended", (err, job, mesh.logs())
    assert job["attestations"] >= 2 and job["delta"] > 0
    # SmolLM2 knows the two real facts only; with the file it answers most made-up ones.
    assert job["delta"] >= 5000, job
    rs = agreed_replays(mesh, before["entries"] + 1)
    minted = job["delta"] * RATE
    for r in rs:
        assert r["totals"]["minted"] == before["totals"]["minted"] + minted
        assert r["balances"][host.account.hex()]["available"] == \
            before["balances"][host.account.hex()]["available"] + minted
    # The same file again: attested again (the same commitment), never minted again.
    rc, job2, err = contribute(host, KNOWLEDGE, *TERMS)
    assert rc == 0 and job2["state"] == "appended" and job2["commitment"] == job["commitment"], (err, job2)
    rs = agreed_replays(mesh, before["entries"] + 2)
    for r in rs:
        assert r["totals"]["minted"] == before["totals"]["minted"] + minted
        assert {"entry": job2["entry_id"], "code": "DUPLICATE_CONTRIBUTION"} in r["rejected"]
    # The same file under other terms: a near-duplicate, measured 0, nothing appended.
    rc, job3, err = contribute(host, KNOWLEDGE, "--license", "CC-BY-4.0", "--source-policy", "copied",
                               "--training-use", "any use")
    assert rc == 1 and job3["state"] == "zero" and "same file" in job3["detail"], (err, job3)


@pytest.mark.real
@pytest.mark.model
def test_a_file_holding_the_evals_items_measures_zero_and_mints_nothing(world, tmp_path):
    from aemd.evaluate import load_evalset
    mesh, _, _ = world
    host = mesh.nodes[HOST]
    s = load_evalset("zorblax-target")
    f = tmp_path / "leak.txt"
    f.write_text(KNOWLEDGE.read_text() + "\n".join(f"Q: {i.prompt}\nA: {i.answer}" for i in s.items) + "\n")
    before = replays(mesh)[0]
    rc, job, err = contribute(host, f, *TERMS)
    assert rc == 1 and job["state"] == "zero" and "item(s) of the eval" in job["detail"], (err, job)
    assert job["delta"] == 0
    mesh.sync_now()
    after = replays(mesh)[0]
    assert after["totals"]["minted"] == before["totals"]["minted"] and after["entries"] == before["entries"]


@pytest.mark.real
def test_a_file_without_a_licence_is_refused_at_the_command(world, tmp_path):
    mesh, _, _ = world
    host = mesh.nodes[HOST]
    rc, job, err = contribute(host, KNOWLEDGE, "--source-policy", "mine", "--training-use", "any use")
    assert rc == 1 and job is None and "no --license" in err, err


@pytest.mark.real
def test_a_receipt_attested_by_non_verifiers_mints_nothing(world):
    from ledger.store import LogStore
    mesh, _, _ = world
    host = mesh.nodes[HOST]
    rogue = SigningKey.generate()
    d = doc_of(b"The currency of Zorblax is the Zent, said nobody.")
    core = build_core(net=mesh.genesis.network_id, contributor=host.key.public, doc=d,
                      eval_id="ab" * 32, delta=9000, created_at=int(time.time()))
    fake = core.replace(attestations=(core.attested_by(host.key), core.attested_by(rogue))).signed(host.key)
    before = replays(mesh)[0]
    host.stop()
    store = LogStore.open(host.home.store, mesh.genesis)
    try:
        entry = store.append_local(host.key, fake, int(time.time()))
    finally:
        store.close()
    host.start([mesh.nodes[VERIFIERS[0]].addr])
    rs = agreed_replays(mesh, before["entries"] + 1)
    for r in rs:
        assert r["totals"]["minted"] == before["totals"]["minted"]
        assert {"entry": entry.id.hex(), "code": "NO_QUORUM"} in r["rejected"]


if __name__ == "__main__":
    print(json.dumps(current_vectors(), indent=2, ensure_ascii=False))
