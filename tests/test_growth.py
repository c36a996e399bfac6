"""Contributions that mint on a measured delta (specs/growth.md).

Pure parts first (the document and its commitment, shingling and
contamination, the attest decision, the command's refusals, the spec's
vectors); then one real mesh: four `aemd start` processes on 127.0.0.1, n0
hosts SmolLM2-135M-Instruct and contributes, n1..n3 are the genesis verifiers
(quorum 2). Two experts are admitted to the `zorblax` domain first (the test
genesis asks for no gain over the best): a random tiny model (0 bp), then
SmolLM2 (its target set holds eight made-up facts and two real ones: it knows
the real ones only). A licensed knowledge file of the made-up facts lifts that
eval and mints once on every node's replay, the same file again mints nothing,
a file holding the eval's items measures 0; an eval of real capitals that
SmolLM2 answers and the random model does not separates the two and mints
once, a reformatted copy of the domain's target set and a set made mostly of
its items mint nothing; a receipt attested by non-verifiers mints nothing.
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
from protocol.evalset import EvalItem, evalset_from_document, parse_evalset
from protocol.growth import (CONTEXT_BUDGET_BYTES, CONTEXT_PREFIX, ContributionDocument, Figure,
                             attest_problem, basis_of, best_expert, build_core, check_eval_file,
                             check_licence, contaminated_items, context_text, copied_items, copy_of,
                             decode_msg, encode_msg, eval_improvement, near_duplicate_of, parse_request,
                             separation_bp, shingles, words)

ROOT = Path(__file__).resolve().parent.parent
KNOWLEDGE = Path(__file__).resolve().parent / "fixtures" / "zorblax-knowledge.txt"
CAPITALS = Path(__file__).resolve().parent / "fixtures" / "capitals-eval.json"
SPEC = ROOT / "specs" / "growth.md"
RATE = 1000                       # micro-credits per basis point (either basis) in the test genesis


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
    assert parse_request(encode_msg(m, 1 << 16)) == (op, d, core if op == "attest" else None, None)


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
    op, d2, c2, as_of = parse_request(req)
    assert (op, d2, c2, as_of) == ("attest", d, core, None)
    for bad in ({"op": "mint", "doc": d.to_map()}, {"op": "measure", "doc": d.to_map(), "core": 1},
                {"op": "measure"}):
        with pytest.raises(AemError):
            parse_request(encode_msg(bad, 1 << 16))
    with pytest.raises(AemError):
        decode_msg(b"\x01" * 10, 5)


# --- eval contributions: the copy rule and the separation --------------------------------------

def qa_set(items: list[tuple[str, str]], name: str = "some-set", max_tokens: int = 16):
    return evalset_from_document({"format": "aem-evalset/1", "name": name, "kind": "qa",
                                  "scorer": "first_line_contains", "max_tokens": max_tokens,
                                  "items": [{"prompt": p, "answer": a} for p, a in items]})


prompt_words = st.lists(word, min_size=1, max_size=14)


@given(source=st.lists(prompt_words, min_size=1, max_size=6, unique_by=tuple),
       fresh=st.lists(st.lists(other_word, min_size=1, max_size=12), min_size=1, max_size=6, unique_by=tuple),
       take=st.integers(0, 6), upper=st.booleans(), data=st.data())
@settings(max_examples=120, deadline=None)
def test_an_eval_made_mostly_of_an_existing_sets_prompts_is_a_copy(source, fresh, take, upper, data):
    src = [EvalItem(" ".join(p) + "?", "yes") for p in source]
    taken = src[:min(take, len(src))]
    # Copied prompts keep their words whatever the case, spacing or punctuation; answers do not count.
    copied = [(("  ".join(w.upper() if upper else w for w in it.prompt[:-1].split())) + " ?!", "no")
              for it in taken]
    new = [(" ".join(p) + "?", "x") for p in fresh]
    items = data.draw(st.permutations(copied + new))
    s = qa_set(items)
    found = copied_items(s.items, src)
    assert sorted(s.items[i].prompt for i in found) == sorted(p for p, _ in copied)
    reason = copy_of(s, [("src", b"\x00" * 32, src)])
    assert bool(reason) == (len(copied) * 2 >= len(items)), (reason, len(copied), len(items))
    # Nothing is a copy of a set that shares no words with it, but every set is a copy of itself.
    assert copy_of(qa_set(new), [("src", b"\x00" * 32, src)]) == ""
    assert copy_of(s, [("itself", s.hash, ())]) == "the same eval set as itself"


def test_a_reformatted_file_of_a_set_is_the_same_set_and_a_copy():
    from aemd.evaluate import SHIPPED_DIR, load_evalset
    target = load_evalset("zorblax-target")
    raw = json.loads((SHIPPED_DIR / "zorblax-target.json").read_text())
    data = json.dumps(raw, indent=None, separators=(",", ":"), sort_keys=True).encode()
    assert data != (SHIPPED_DIR / "zorblax-target.json").read_bytes()
    assert check_eval_file(data).hash == target.hash
    assert copy_of(check_eval_file(data), [("zorblax-target", target.hash, target.items)]) \
        == "the same eval set as zorblax-target"
    # A short prompt of the source's words in a row is one shingle: found; a rephrasing is not.
    assert copied_items([EvalItem("capital of France", "Paris"), EvalItem("What's France's capital?", "Paris")],
                        target.items) == [0]
    # The shipped capitals fixture copies no shipped set.
    mine = parse_evalset(CAPITALS.read_bytes())
    from aemd.evaluate import shipped_evalsets
    assert copy_of(mine, [(s.name, s.hash, s.items) for s in shipped_evalsets()]) == ""


@given(st.lists(st.integers(0, 10_000), max_size=8))
@settings(max_examples=100, deadline=None)
def test_the_separation_is_the_spread_of_the_scores(scores):
    sep = separation_bp(scores)
    assert sep == (max(scores) - min(scores) if len(scores) >= 2 else 0)
    assert 0 <= sep <= 10_000 and separation_bp(list(reversed(scores))) == sep


def test_the_separation_refuses_what_is_not_a_score():
    for bad in ([1, 10_001], [-1, 5], [1.5, 2]):
        with pytest.raises(AemError):
            separation_bp(bad)


def test_an_eval_contribution_is_credited_on_accepted_delta():
    d = doc_of(CAPITALS.read_bytes(), type="eval")
    assert basis_of("eval") == "accepted_delta" and basis_of("knowledge") == "eval_improvement"
    core = build_core(net=b"\x07" * 32, contributor=b"\x01" * 32, doc=d, eval_id="ab" * 32, delta=10_000,
                      created_at=9)
    assert core.credit_basis == "accepted_delta" and core.contribution_type == "eval"
    fig = Figure(d.commitment, "ab" * 32, b"\x01" * 32, 10_000, 10_000, 0, "")
    assert attest_problem(core, d, net=b"\x07" * 32, contributor=b"\x01" * 32, figure=fig) == ""
    # A receipt claiming the other basis for the same document is not attested.
    assert "credit_basis" in attest_problem(core.replace(credit_basis="eval_improvement"), d, net=b"\x07" * 32,
                                            contributor=b"\x01" * 32, figure=fig)
    assert basis_of("skill") == "verified_skill_use"     # counted from the log (tests/test_skill_use.py)


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
        "required (or --recount": ["contribute", "--type", "skill", *home, *full],
        "--recount takes the registered document": ["contribute", "--recount", "ab" * 32, "--type", "skill", *home],
    }
    forbidden = tmp_path / "card.json"
    forbidden.write_text(json.dumps({"teacher": "BigModel-70B", "licence": "proprietary",
                                     "distillation": "forbidden", "terms": "no distillation"}))
    cases["distillation is 'forbidden'"] = [*base, *full, "--teacher-policy", str(forbidden)]
    # An eval contribution is a qa eval set: a probe set or another file is refused at the command.
    from aemd.evaluate import SHIPPED_DIR
    ev = ["contribute", "--type", "eval", "--domain", "zorblax", *home, *full, "--file"]
    cases["of kind qa, not probes"] = [*ev, str(SHIPPED_DIR / "probes.json")]
    cases["is an aem-evalset/1 file"] = [*ev, str(f)]
    cases["aem-evalset/1 file: format must be"] = [*ev, str(SHIPPED_DIR / "code-patch-fixtures.json")]
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
    rc, err = ctl(capsys, *ev, str(CAPITALS))     # a qa set passes too
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
    cp = v["copy"]
    source = [EvalItem(i["prompt"], i["answer"]) for i in cp["source"]]
    for case in cp["sets"]:
        s = qa_set([(i["prompt"], i["answer"]) for i in case["items"]])
        assert copied_items(s.items, source) == case["copied"], case
        assert copy_of(s, [("source", b"\x00" * 32, source)]) == case["reason"], case
    for case in cp["separations"]:
        assert separation_bp(case["scores"]) == case["separation_bp"], case


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
    source = [{"prompt": "What is the capital of the planet Zorblax?", "answer": "Quenthar"},
              {"prompt": "Which metal is mined in the Zorblax mountains of Vresh?", "answer": "Lumarite"}]
    sets = [[{"prompt": "WHAT is the capital of the planet Zorblax", "answer": "Quenthar"},
             {"prompt": "What is the capital of Ireland?", "answer": "Dublin"}],
            [{"prompt": "Which metal is mined in the mountains of Vresh on Zorblax?", "answer": "Lumarite"},
             {"prompt": "What is the capital of Ireland?", "answer": "Dublin"}],
            [{"prompt": "What is the capital of Ireland?", "answer": "Dublin"},
             {"prompt": "What is the capital of Hungary?", "answer": "Budapest"},
             {"prompt": "capital of the planet Zorblax", "answer": "Quenthar"}]]
    src = [EvalItem(**i) for i in source]

    def copy_case(items):
        s = qa_set([(i["prompt"], i["answer"]) for i in items])
        return {"items": items, "copied": copied_items(s.items, src),
                "reason": copy_of(s, [("source", b"\x00" * 32, src)])}
    return {"document": {"file_text": text, "map": {**d.to_map(), "file_hash": d.file_hash.hex()},
                         "canonical_hex": d.encode().hex(), "commitment": d.commitment.hex()},
            "contamination": {"items": items,
                              "texts": [{"text": t, "found": contaminated_items(t, ev)} for t in texts]},
            "copy": {"source": source, "sets": [copy_case(x) for x in sets],
                     "separations": [{"scores": sc, "separation_bp": separation_bp(sc)}
                                     for sc in ([10_000, 0], [4000, 10_000, 7000], [6000], [])]}}


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
    from aemd.executors.tinygguf import TINY_MODEL, write_tiny_llama_gguf
    from protocol.admission import DEFAULT_ADMISSION, DomainEvals, NodeClass
    from protocol.genesis import MintRate
    import tests.nodekit as nodekit
    root = tmp_path_factory.mktemp("growth")
    admission = DEFAULT_ADMISSION.replace(
        admitted_only=True, classes=(NodeClass(name="cpu", memory_mb=8192),),
        domains=(DomainEvals(domain="zorblax", target_eval=load_evalset("zorblax-target").hash,
                             general_eval=b"", baseline_bp=0, general_baseline_bp=0),),
        # No gain over the best asked: the random model (0 bp) is admitted
        # first, then SmolLM2 (1000 bp); an eval contribution needs two experts.
        min_gain_bp=0, probe_set=load_evalset("probes").hash, reeval_interval_s=0)
    mesh = nodekit.Mesh(root, 4, verifier_nodes=VERIFIERS, quorum=2, admission=admission,
                        node_configs={i: VERIFIER_CONFIG for i in VERIFIERS},
                        mint_rates=(MintRate(basis="eval_improvement", micro_per_unit=RATE),
                                    MintRate(basis="accepted_delta", micro_per_unit=RATE)))
    assert {r.basis for r in mesh.genesis.mint_rates} == {"eval_improvement", "accepted_delta"}
    smol = root / "smol.gguf"
    shutil.copyfile(smollm2_path(), smol)
    write_tiny_llama_gguf(root / "random.gguf", seed=7, **TINY_MODEL)
    mesh.start_line()
    try:
        host = mesh.nodes[HOST]
        from tests.nodekit import wait_for

        def admit(path: Path, what: str) -> str:
            out = aemctl(host, "expert", "add", str(path), "--domain", "zorblax", "--price", "0.1",
                         "--class", "cpu", "--submit", "--json")
            assert out.returncode == 0, out.stderr
            cid = json.loads(out.stdout)["capsule_id"]

            def admitted():
                mesh.sync_now()
                rows = [json.loads(aemctl(n, "experts", "--json").stdout)["experts"] for n in mesh.nodes]
                return all(any(r["capsule_id"] == cid and r["status"] == "admitted" for r in rs) for rs in rows)
            try:
                wait_for(f"{what} admitted in zorblax on every node", admitted, timeout=WAIT_S, every=1.0)
            except AssertionError:
                print(mesh.logs())
                raise
            return cid
        admit(root / "random.gguf", "the random model")
        cid = admit(smol, "SmolLM2")
        yield mesh, cid, root
    finally:
        mesh.close()


def aemctl(node, *args: str, timeout: float = WAIT_S + 60) -> subprocess.CompletedProcess:
    from tests.nodekit import BIN
    return subprocess.run([str(BIN / "aemctl"), *args, "--home", str(node.home.root)], capture_output=True,
                          text=True, timeout=timeout)


def contribute(node, path: Path, *extra: str, kind: str = "knowledge") -> tuple[int, dict | None, str]:
    out = aemctl(node, "contribute", "--type", kind, "--file", str(path), "--domain", "zorblax",
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
@pytest.mark.model
def test_an_eval_that_separates_the_two_experts_mints_once_and_a_copy_mints_nothing(world, tmp_path):
    from aemd.evaluate import SHIPPED_DIR
    mesh, _, _ = world
    host = mesh.nodes[HOST]
    before = replays(mesh)[0]
    rc, job, err = contribute(host, CAPITALS, *TERMS, kind="eval")
    assert rc == 0 and job["state"] == "appended", (err, job, mesh.logs())
    assert job["attestations"] >= 2 and job["eval_id"] == parse_evalset(CAPITALS.read_bytes()).hash.hex()
    # SmolLM2 names these capitals; the random model names none.
    assert job["delta"] >= 6000, job
    rs = agreed_replays(mesh, before["entries"] + 1)
    minted = job["delta"] * RATE
    for r in rs:
        assert r["totals"]["minted"] == before["totals"]["minted"] + minted
        assert r["balances"][host.account.hex()]["available"] == \
            before["balances"][host.account.hex()]["available"] + minted
    # The same eval file again: the same commitment, attested again, never minted again.
    rc, job2, err = contribute(host, CAPITALS, *TERMS, kind="eval")
    assert rc == 0 and job2["state"] == "appended" and job2["commitment"] == job["commitment"], (err, job2)
    rs = agreed_replays(mesh, before["entries"] + 2)
    for r in rs:
        assert r["totals"]["minted"] == before["totals"]["minted"] + minted
        assert {"entry": job2["entry_id"], "code": "DUPLICATE_CONTRIBUTION"} in r["rejected"]
    # The same set in another layout, offered anew: a copy of the eval contribution the verifiers attested.
    again = tmp_path / "capitals-again.json"
    again.write_text(json.dumps(json.loads(CAPITALS.read_text()), sort_keys=True))
    rc, job5, err = contribute(host, again, *TERMS, kind="eval")
    assert rc == 1 and job5["state"] == "zero" and "the same eval set as eval contribution" in job5["detail"], \
        (err, job5)
    # The domain's own target set in another layout (another file hash, the same set): a copy.
    raw = json.loads((SHIPPED_DIR / "zorblax-target.json").read_text())
    copy = tmp_path / "copy.json"
    copy.write_text(json.dumps(raw, sort_keys=True, indent=1))
    rc, job3, err = contribute(host, copy, *TERMS, kind="eval")
    assert rc == 1 and job3["state"] == "zero" and "same eval set as zorblax's target set" in job3["detail"], \
        (err, job3)
    # Most of its items renamed into a new set, with one new item: a copy too.
    near = tmp_path / "near.json"
    near.write_text(json.dumps({**raw, "name": "my-zorblax", "items": raw["items"][:3] + [
        {"prompt": "What is the capital of Ireland?", "answer": "Dublin"}]}))
    rc, job4, err = contribute(host, near, *TERMS, kind="eval")
    assert rc == 1 and job4["state"] == "zero" and "3 of its 4 items come from" in job4["detail"], (err, job4)
    mesh.sync_now()
    after = replays(mesh)[0]
    assert after["totals"]["minted"] == before["totals"]["minted"] + minted
    assert after["entries"] == before["entries"] + 2


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


def test_data_shards_and_curricula_are_measured_as_context_like_knowledge():
    from protocol.growth import CONTEXT_TYPES, ContributionDocument, basis_of
    for t in CONTEXT_TYPES:
        assert basis_of(t) == "eval_improvement"
        doc = ContributionDocument.make(type=t, domain="zorblax", licence="CC-BY-4.0", source_policy="mine",
                                        training_use="any", teacher_policy=None, distilled_from=None,
                                        data=b"Zorblax facts.")
        assert doc.type == t
    with pytest.raises(AemError, match="UTF-8 text"):
        ContributionDocument.make(type="data_shard", domain="zorblax", licence="CC-BY-4.0", source_policy="mine",
                                  training_use="any", teacher_policy=None, distilled_from=None, data=b"\xff\xfe")
    assert (basis_of("skill"), basis_of("operator")) == ("verified_skill_use", "operator_adoption")
