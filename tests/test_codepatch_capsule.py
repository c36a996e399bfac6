"""The code-patch verifier as an admissible capsule: its runner spec, its
patch policy on hostile patches, the labelled fixture set and the scores the
two judges get on it (real sandbox runs of the shipped fixtures)."""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import re
import shutil
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aemd import codepatch_capsule as cc
from aemd.executors import codepatch
from aemd.executors.codepatch import run_code_patch
from aemd.executors.fixtures import (FIXTURE_TEST_COMMAND, build_tar, fixture_patch,
                                     fixture_repo_tar)
from crypto.hashing import H
from crypto.keys import SigningKey
from protocol import patchfixtures as pf
from protocol.admission import manifest_problem
from protocol.errors import (BAD_ENCODING, BAD_TYPE, BAD_VALUE, MISSING_FIELD, NOT_CANONICAL,
                             TOO_LARGE, UNKNOWN_FIELD, WRONG_OBJECT, AemError)
from protocol.mesh import ExpertCapsuleManifest, PatchPolicy, TeacherPolicyCard
from protocol.patchpolicy import check_pattern, diff_names, pattern_matches, policy_problem

ROOT = os.geteuid() == 0
SANDBOX = any(codepatch._probe(lv, ROOT) for lv in ("bwrap", "unshare"))
needs_sandbox = pytest.mark.skipif(not SANDBOX or shutil.which("patch") is None,
                                   reason="no sandbox or no GNU patch on this machine")
SPEC = Path(__file__).resolve().parent.parent / "specs" / "admission-codepatch.md"
POLICY = cc.default_patch_policy()
NET = H(b"codepatch-capsule-test-net")
KEY = SigningKey.from_seed(bytes([11]) * 32)


# -- the runner spec ------------------------------------------------------------------

def test_runner_spec_round_trips():
    for judge in ("tests", "applies"):
        data = cc.runner_spec_bytes(judge)
        assert data == b'{"format":"aem-code-patch/1","judge":"%s"}' % judge.encode()
        assert cc.parse_runner_spec(data).judge == judge
    with pytest.raises(AemError) as e:
        cc.runner_spec_bytes("vibes")
    assert e.value.code == BAD_VALUE


@pytest.mark.parametrize("data, code", [
    (b'{"format": "aem-code-patch/1", "judge": "tests"}', NOT_CANONICAL),
    (b'{"judge":"tests","format":"aem-code-patch/1"}', NOT_CANONICAL),
    (b'{"format":"aem-code-patch/1","judge":"tests","x":"y"}', UNKNOWN_FIELD),
    (b'{"format":"aem-code-patch/1"}', MISSING_FIELD),
    (b'{"format":"aem-code-patch/1","judge":"always"}', BAD_VALUE),
    (b'{"format":"aem-code-patch/1","judge":1}', BAD_TYPE),
    (b'{"format":"aem-code-patch/2","judge":"tests"}', WRONG_OBJECT),
    (b'{"format":"aem-code-patch/1","judge":"tests","judge":"tests"}', BAD_ENCODING),
    (b'["aem-code-patch/1"]', BAD_TYPE),
    (b'\xff', BAD_ENCODING),
    (b"{" * 300, TOO_LARGE),
    (b"aem code-patch verifier v1", BAD_ENCODING),
])
def test_runner_spec_refuses(data, code):
    with pytest.raises(AemError) as e:
        cc.parse_runner_spec(data)
    assert e.value.code == code
    assert cc.spec_problem(data).startswith("runner spec: ") and cc.spec_problem(cc.runner_spec_bytes()) == ""


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_runner_spec_parser_takes_any_bytes(data):
    try:
        spec = cc.parse_runner_spec(data)
    except AemError:
        return
    assert data == cc.runner_spec_bytes(spec.judge)


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=12),
                           lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
                           max_leaves=8)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["format", "judge", "x"]),
                       st.sampled_from(["aem-code-patch/1", "tests", "applies"]) | json_values, max_size=3),
       st.booleans())
def test_runner_spec_parser_takes_any_document(doc, compact):
    data = json.dumps(doc, sort_keys=compact, separators=(",", ":") if compact else None).encode()
    try:
        spec = cc.parse_runner_spec(data)
    except AemError:
        return
    assert doc == {"format": "aem-code-patch/1", "judge": spec.judge}


# -- patterns and the patch policy ----------------------------------------------------

@pytest.mark.parametrize("pattern, path, hit", [
    ("tests", "tests/a.py", True), ("tests/", "tests/a.py", True), ("tests", "src/tests/a.py", False),
    ("**/tests", "src/tests/a.py", True), ("**/tests", "tests", True), ("**/tests", "testsx/a.py", False),
    ("**/test_*", "test_calc.py", True), ("**/test_*", "pkg/test_x/y.py", True),
    ("**/test_*", "pkg/contest_x.py", False), ("**/*.py", "a.py", True), ("**/*.py", "a/b/c.py", True),
    ("**/*.py", "a.pyc", False), ("src/**/*.py", "src/a.py", True), ("src/**/*.py", "src/x/y/a.py", True),
    ("src/**/*.py", "lib/a.py", False), ("unittest*", "unittest/__init__.py", True),
    ("unittest*", "pkg/unittest.py", False), ("a*b*c", "aXbYc", True), ("a*b*c", "acb", False),
])
def test_pattern_matching(pattern, path, hit):
    assert pattern_matches(pattern, tuple(path.split("/"))) is hit


@pytest.mark.parametrize("pattern", ["", "/abs", "a/../b", "a//b", "./a", "a/./b", "***", "a**b",
                                     "a[b]", "a?", "a b", "a\\b", "x" * 300, "/"])
def test_bad_patterns(pattern):
    with pytest.raises(AemError):
        check_pattern(pattern)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["a", "b", "ab", "x.py", "tests"]), min_size=1, max_size=5),
       st.lists(st.sampled_from(["a", "b", "ab", "x.py", "tests", "*", "**", "a*", "*.py"]),
                min_size=1, max_size=5))
def test_pattern_matching_agrees_with_a_reference(path, pat):
    def ref(pat, path):              # the grammar, written as its definition reads
        if not pat:
            return not path
        if pat[0] == "**":
            return ref(pat[1:], path) or (bool(path) and ref(pat, path[1:]))
        return bool(path) and fnmatch.fnmatchcase(path[0], pat[0]) and ref(pat[1:], path[1:])
    want = any(ref(tuple(pat), tuple(path[:k])) for k in range(1, len(path) + 1))
    assert pattern_matches("/".join(pat), tuple(path)) is want


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="ab*", min_size=1, max_size=8).filter(lambda p: "**" not in p and p.count("*") <= 4),
       st.text(alphabet="ab", min_size=1, max_size=10))
def test_name_glob_agrees_with_fnmatch(pat, name):
    assert pattern_matches(pat, (name,)) is fnmatch.fnmatchcase(name, pat)


def test_default_policy_is_well_formed_and_admissible():
    assert policy_problem(POLICY) == ""
    assert manifest_problem(manifest(policy=(POLICY,)), NET) == ""


def _diff(old: str, new: str, body: str = "@@ -1 +1 @@\n-x\n+y\n", head: str = "") -> str:
    return f"{head}--- {old}\n+++ {new}\n{body}"


GOOD = fixture_patch("good")


@pytest.mark.parametrize("diff, why", [
    (GOOD, ""),
    (_diff("a/pkg/mod.py", "b/pkg/mod.py"), ""),
    (_diff("a/README.md", "b/README.md"), ""),
    (_diff("/dev/null", "b/pkg/new.py", "@@ -0,0 +1 @@\n+x\n"), ""),
    (_diff("a/../calc.py", "b/../calc.py"), "'..'"),
    (_diff("a/calc.py", "b/x/../../etc/passwd.py"), "'..'"),
    (_diff("/etc/calc.py", "/etc/calc.py"), "absolute"),
    (_diff("a/tests/x.py", "b/tests/x.py"), "protected"),
    (_diff("tests/x.py", "tests/x.py"), "protected"),          # no prefix: -p1 or not, refused
    (_diff("a/pkg/tests/helper.py", "b/pkg/tests/helper.py"), "protected"),
    (_diff("a/test_calc.py", "b/test_calc.py"), "protected"),
    (_diff("a/calc.py", "b/test_calc.py"), "protected"),
    (_diff("a/test_calc.py", "/dev/null", "@@ -1 +0,0 @@\n-x\n"), "protected"),   # deleting a test
    (_diff("a/conftest.py", "b/conftest.py"), "protected"),
    (_diff("a/pyproject.toml", "b/pyproject.toml"), "protected"),
    (_diff("a/pkg/x_test.py", "b/pkg/x_test.py"), "protected"),
    (_diff('"a/tests/x.py"', '"b/tests/x.py"'), "protected"),    # quoted names
    (_diff("a/calc.py\t2020-01-01", "b/tests/x.py\t2020-01-01"), "protected"),
    (_diff("a/data.json", "b/data.json"), "outside the allowed"),
    (_diff("a/Makefile", "b/Makefile"), "protected"),
    ("diff --git a/calc.py b/tests/calc.py\nsimilarity index 100%\nrename from calc.py\n"
     "rename to tests/calc.py\n--- a/calc.py\n+++ b/tests/calc.py\n", "protected"),                       # a rename into the tests
    ("diff --git a/test_calc.py b/calc2.py\nsimilarity index 100%\nrename from test_calc.py\n"
     "rename to calc2.py\n--- a/test_calc.py\n+++ b/calc2.py\n", "protected"),   # ... and out of them
    ("diff --git a/calc.py b/tests/c.py\ncopy from calc.py\ncopy to tests/c.py\n--- a/calc.py\n"
     "+++ b/tests/c.py\n", "protected"),
    (_diff("/dev/null", "b/unittest.py", "@@ -0,0 +1 @@\n+x\n"), "protected"),
    (_diff("/dev/null", "b/argparse.py", "@@ -0,0 +1 @@\n+x\n"), "top-level module"),
    (_diff("a/argparse.py\t1970-01-01 00:00:00", "b/argparse.py", "@@ -0,0 +1 @@\n+x\n"),
     "top-level module"),                                           # diff -N's new file
    (_diff("/dev/null", "b/json/__init__.py", "@@ -0,0 +1 @@\n+x\n"), "top-level module"),
    ("diff --git a/calc.py b/calc.py\nnew mode 120000\n--- a/calc.py\n+++ b/calc.py\n@@ -1 +1 @@\n-x\n+y\n",
     "regular files"),                                              # into a symlink
    ("diff --git a/x.py b/x.py\nGIT binary patch\nliteral 0\n", "unified"),
    ("1c1\n< x\n---\n> y\n", "unified"),                           # a normal diff
    ("1c\nimport os\n.\nw tests/x.py\n", "unified"),                # an ed script
    ("*** a/calc.py\n--- b/calc.py\n***************\n", "unified"),   # a context diff
    ("Index: tests/x.py\n" + GOOD, "unified"),
    ("@@ -1 +1 @@\n-x\n+y\n", "hunk without"),
    (_diff("a/calc.py", "b/calc.py", "@@ -1,3 +1,3 @@\n-x\n"), "ends inside"),
    (_diff("a/calc.py", "b/calc.py", "@@ -1 +1 @@\n?x\n+y\n"), "malformed"),
    ("", "no file"),
    (_diff("a/calc.py", "b/calc.py", "@@ -1 +1 @@\n-x\n+" + "y" * 70_000 + "\n"), "more than"),
    ("--- a/calc.py\n+++ b/calc.py\x00\n", "NUL"),
])
def test_check_patch(diff, why):
    problem = cc.check_patch(POLICY, diff)
    assert (problem == "") if not why else (why in problem), problem
    assert len(problem) <= 128


def test_check_patch_takes_only_text():
    assert "not text" in cc.check_patch(POLICY, b"--- a/x.py\n")
    assert "UTF-8" in cc.check_patch(POLICY, "--- a/x\ud800.py\n")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(list("-+@ ,0123456789abt/._\n\t\"\\") + [
    "--- ", "+++ ", "@@ -", "a/", "b/", "tests/", "/dev/null", "diff --git ", "\n+", "\n-", "\n "]),
    max_size=80).map("".join))
def test_check_patch_takes_any_text(diff):
    problem = cc.check_patch(POLICY, diff)
    assert isinstance(problem, str) and len(problem) <= 128
    if not problem:                 # what the policy lets through the executor's own check takes
        codepatch.check_diff(diff)
        names, _ = diff_names(diff)
        assert not any("tests" in n.split("/") for n in names)


COMPONENTS = ["a", "b", "src", "pkg", "tests", "test", "test_x.py", "x_test.py", "x.py", "..", ".",
              "conftest.py", "README.md", "data.json", "unittest.py", "setup.cfg", ""]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(COMPONENTS), min_size=1, max_size=5), st.booleans())
def test_check_patch_on_any_path(parts, prefixed):
    name = "/".join(parts)
    diff = _diff(f"a/{name}" if prefixed else name, f"b/{name}" if prefixed else name)
    problem = cc.check_patch(POLICY, diff)
    plain = [p for p in parts if p not in ("", ".")]
    judged = {"tests", "test", "test_x.py", "x_test.py", "conftest.py", "setup.cfg"}
    if ".." in plain or not plain or (not prefixed and name.startswith("/")):
        assert problem
    elif judged & set(plain):
        assert "protected" in problem
    elif not {"x.py", "README.md", "unittest.py"} & set(plain):
        assert problem                           # data.json, or a directory name: not allowed
    elif plain[0] == "unittest.py" or (prefixed and plain[:1] == ["unittest.py"]):
        assert "protected" in problem            # shadows the test runner


def test_policy_problems():
    assert "no allowed" in policy_problem(PatchPolicy(allowed_paths=(), protected_paths=("tests",),
                                                      max_diff_bytes=10))
    assert "no protected" in policy_problem(PatchPolicy(allowed_paths=("src",), protected_paths=(),
                                                        max_diff_bytes=10))
    bad = PatchPolicy(allowed_paths=("../src",), protected_paths=("tests",), max_diff_bytes=10)
    assert "bad component" in policy_problem(bad)
    assert "bad component" in cc.check_patch(bad, GOOD)


# -- manifests: gate 6 ----------------------------------------------------------------

def manifest(kind="code_patch", policy=(), distilled_from="", cards=()) -> ExpertCapsuleManifest:
    spec = cc.runner_spec_bytes()
    return ExpertCapsuleManifest(
        net=NET, author=KEY.public, name="patcher", kind=kind, content_hash=H(spec),
        size_bytes=len(spec), architecture="", n_params=0, quantization="", context_length=0,
        vram_need_mb=0, domain="code", tags=(), eval_claims=(), created_at=1, sig=b"",
        node_class="cpu", patch_policy=policy, distilled_from=distilled_from,
        teacher_policy=cards).signed(KEY)


def card(terms: str, teacher="big-teacher") -> TeacherPolicyCard:
    return TeacherPolicyCard(teacher=teacher, licence="custom", distillation=terms, terms="the terms")


@pytest.mark.parametrize("kwargs, why", [
    (dict(), "must carry its patch policy"),
    (dict(policy=(PatchPolicy(allowed_paths=("../x",), protected_paths=("tests",),
                              max_diff_bytes=100),)), "bad component"),
    # Protected wins over allowed when a patch is checked: a nested protected path is fine.
    (dict(policy=(PatchPolicy(allowed_paths=("src",), protected_paths=("src/tests",),
                              max_diff_bytes=100),)), ""),
    (dict(policy=(PatchPolicy(allowed_paths=("src",), protected_paths=(), max_diff_bytes=100),)),
     "no protected paths"),
    (dict(kind="gguf", policy=(POLICY,)), "only a code-patch"),
    (dict(policy=(POLICY,), distilled_from="big-teacher", cards=(card("forbidden"),)), "do not allow"),
    (dict(policy=(POLICY,), distilled_from="big-teacher", cards=(card("non_competing"),)), "do not allow"),
    (dict(policy=(POLICY,), distilled_from="big-teacher"), "without a teacher policy card"),
    (dict(policy=(POLICY,), cards=(card("allowed"),)), "without distilled_from"),
    (dict(policy=(POLICY,), distilled_from="big-teacher", cards=(card("allowed", "other"),)),
     "another teacher"),
    (dict(policy=(POLICY,), distilled_from="big-teacher", cards=(card("allowed"),)), ""),
])
def test_manifest_gate(kwargs, why):
    problem = manifest_problem(manifest(**kwargs), NET)
    assert (problem == "") if not why else (why in problem), problem


# -- the executor with a judge and a policy -------------------------------------------

def test_refused_before_anything_runs():
    repo = fixture_repo_tar()
    r = run_code_patch(repo, fixture_patch("escape"), FIXTURE_TEST_COMMAND, policy=POLICY)
    assert (r.outcome, r.patch_applied, r.isolation, r.exit_code) == ("refused", False, "", None)
    assert "protected" in r.stderr_tail and r.limits["nproc"] is None
    assert r.output_hash == H(r.content_bytes())
    # an invalid diff is refused too, where without a policy it raises
    r = run_code_patch(repo, "--- a/../x\n+++ b/../x\n", FIXTURE_TEST_COMMAND, policy=POLICY)
    assert r.outcome == "refused"
    with pytest.raises(AemError):
        run_code_patch(repo, "--- a/../x\n+++ b/../x\n", FIXTURE_TEST_COMMAND)
    with pytest.raises(AemError) as e:
        run_code_patch(repo, GOOD, FIXTURE_TEST_COMMAND, judge="always")
    assert e.value.code == BAD_VALUE
    with pytest.raises(AemError) as e:
        run_code_patch(repo, GOOD, FIXTURE_TEST_COMMAND, policy={"allowed_paths": ["**"]})
    assert e.value.code == BAD_VALUE


def test_a_path_through_a_symlink_is_refused(tmp_path):
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "helper.py").write_text("x\n")
    (tmp_path / "calc.py").write_text("x\n")
    os.symlink("tests", tmp_path / "src")
    diff = _diff("a/src/helper.py", "b/src/helper.py")
    assert cc.check_patch(POLICY, diff) == ""           # the diff alone looks harmless
    r = run_code_patch(build_tar(tmp_path), diff, FIXTURE_TEST_COMMAND, policy=POLICY)
    assert r.outcome == "refused" and "symlink" in r.stderr_tail


@needs_sandbox
def test_judges_on_a_patch_that_applies_but_fails():
    repo = fixture_repo_tar()
    bad = fixture_patch("bad")
    assert run_code_patch(repo, bad, FIXTURE_TEST_COMMAND, policy=POLICY).outcome == "failed"
    r = run_code_patch(repo, bad, FIXTURE_TEST_COMMAND, judge="applies", policy=POLICY)
    assert (r.outcome, r.patch_applied, r.exit_code) == ("passed", True, 0)
    r = run_code_patch(repo, fixture_patch("good").replace("-    return a - b", "-    return a / b"),
                       FIXTURE_TEST_COMMAND, judge="applies")
    assert r.outcome == "patch_failed"


# -- the fixture set ------------------------------------------------------------------

def test_shipped_fixture_set():
    fs = cc.shipped_fixture_set()
    assert cc.repo_tar(fs.repo("calc")) == fixture_repo_tar()   # the executor's own fixture repo
    assert {x.expect for x in fs.fixtures} == set(pf.EXPECTS)
    assert 4 <= len(fs.fixtures) <= 8
    assert pf.parse_fixture_set(fs.to_json()).hash == fs.hash
    assert fs.hash == H(__import__("protocol.canonical", fromlist=["x"]).encode(fs.document()))
    byname = {x.name: x for x in fs.fixtures}
    assert byname["good"].patch == fixture_patch("good") and byname["bad"].patch == fixture_patch("bad")
    # the two refused fixtures name paths only the policy stops: without it they pass
    for name in ("weakens-tests", "shadows-runner"):
        assert byname[name].expect == "refused" and cc.check_patch(POLICY, byname[name].patch)


def test_load_fixtures():
    fs = cc.shipped_fixture_set()
    assert cc.load_fixtures(fs.hash) is fs and cc.load_fixtures(fs.hash.hex()) is fs
    assert cc.load_fixtures("code-patch-fixtures") is fs
    for missing in (bytes(32), "nope"):
        with pytest.raises(AemError) as e:
            cc.load_fixtures(missing)
        assert e.value.code == "NOT_FOUND"


def _doc() -> dict:
    return json.loads(cc.shipped_fixture_set().to_json())


@pytest.mark.parametrize("change, code", [
    (lambda d: d.update(format="aem-patch-fixtures/2"), WRONG_OBJECT),
    (lambda d: d.update(extra="x"), UNKNOWN_FIELD),
    (lambda d: d.pop("fixtures"), MISSING_FIELD),
    (lambda d: d["fixtures"][0].update(expect="maybe"), BAD_VALUE),
    (lambda d: d["fixtures"][0].update(repo="nope"), BAD_VALUE),
    (lambda d: d["fixtures"][1].update(name=d["fixtures"][0]["name"]), BAD_VALUE),
    (lambda d: d["repos"][0]["files"].reverse(), BAD_VALUE),
    (lambda d: d["repos"][0]["files"][0].update(path="../x"), BAD_VALUE),
    (lambda d: d["repos"][0]["files"][0].update(path="/x"), BAD_VALUE),
    (lambda d: d["repos"][0]["files"].append({"path": "test_calc.py/x", "text": ""}), BAD_VALUE),
    (lambda d: d["repos"][0].update(test_command=[]), BAD_VALUE),
    (lambda d: d["fixtures"][0].update(patch=""), BAD_VALUE),
    (lambda d: d["fixtures"][0].update(patch="x" * 70_000), TOO_LARGE),
    (lambda d: d["fixtures"].clear(), BAD_VALUE),
    (lambda d: d.update(name="Has Space"), BAD_VALUE),
])
def test_fixture_set_refuses(change, code):
    doc = _doc()
    change(doc)
    with pytest.raises(AemError) as e:
        pf.parse_fixture_set(json.dumps(doc).encode())
    assert e.value.code == code


def test_fixture_set_bytes_refused():
    for data, code in ((b"\xff", BAD_ENCODING), (b"{}" + b" " * (1 << 20), TOO_LARGE),
                       (b'{"format": 1.5}', BAD_TYPE), (b"[" * 100_000, BAD_ENCODING),
                       (b'{"a": "1", "a": "2"}', BAD_ENCODING)):
        with pytest.raises(AemError) as e:
            pf.parse_fixture_set(data)
        assert e.value.code in (code, "TOO_DEEP"), data[:20]


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_fixture_set_parser_takes_any_mutation(data):
    doc = _doc()
    target = data.draw(st.sampled_from(["top", "repo", "file", "fixture"]))
    obj = {"top": doc, "repo": doc["repos"][0], "file": doc["repos"][0]["files"][0],
           "fixture": doc["fixtures"][0]}[target]
    key = data.draw(st.sampled_from(sorted(obj) + ["zz"]))
    obj[key] = data.draw(json_values)
    try:
        fs = pf.fixture_set_from_document(doc)
    except AemError:
        return
    assert pf.parse_fixture_set(fs.to_json()) == fs


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(pf.EXPECTS), st.booleans()), min_size=1, max_size=8))
def test_results_hash_and_agreement(items):
    results = [pf.FixtureResult(fixture=k, outcome=o, agree=a) for k, (o, a) in enumerate(items)]
    bp = pf.agreement_bp(results)
    assert bp == sum(a for _, a in items) * 10_000 // len(items)
    h = pf.results_hash(bytes(32), results)
    assert h == pf.results_hash(bytes(32), list(results)) and h != pf.results_hash(b"\x01" * 32, results)
    flipped = [dataclasses.replace(results[0], agree=not results[0].agree)]
    assert pf.results_hash(bytes(32), flipped + results[1:]) != h


def test_verdicts():
    assert [pf.verdict_of(o) for o in codepatch.OUTCOMES] == [
        "pass", "fail", "fail", "fail", "fail", "fail", "refused"]


# -- measurement ----------------------------------------------------------------------

@needs_sandbox
def test_the_two_judges_on_the_shipped_fixtures():
    fs = cc.shipped_fixture_set()
    tests = cc.evaluate_code_patch(cc.runner_spec_bytes("tests"), POLICY, fs)
    applies = cc.evaluate_code_patch(cc.runner_spec_bytes("applies"), POLICY, fs)
    assert tests.target_bp == 10_000 and all(i.agree for i in tests.items)
    assert applies.target_bp == 6666 and applies.target_bp + 3000 <= tests.target_bp
    # the applies judge passes what applies: the two patches that break the code
    assert [i.fixture for i in applies.items if not i.agree] == [1, 2]
    for f, judge in ((tests, "tests"), (applies, "applies")):
        assert f.tensor_hash == H(cc.runner_spec_bytes(judge)) and f.target_eval == fs.hash
        assert f.results_hash == pf.results_hash(fs.hash, f.items)
    again = cc.evaluate_code_patch(cc.runner_spec_bytes("tests"), POLICY, fs)
    assert again[:5] == tests[:5]                        # all but the time it took
    assert tests.results_hash != applies.results_hash
    # a capsule that runs the tests but lets a patch touch them is caught too
    # (the shadowing module is still refused: that rule is not the policy's)
    lax = PatchPolicy(allowed_paths=("**/*.py",), protected_paths=("docs",), max_diff_bytes=1 << 16)
    lax_figures = cc.evaluate_code_patch(cc.runner_spec_bytes("tests"), lax, fs)
    assert lax_figures.target_bp == 8333
    assert [i.fixture for i in lax_figures.items if not i.agree] == [4]


def test_evaluate_refuses_a_bad_spec_or_policy():
    fs = cc.shipped_fixture_set()
    with pytest.raises(AemError):
        cc.evaluate_code_patch(b"aem code-patch verifier v1", POLICY, fs)
    with pytest.raises(AemError):
        cc.evaluate_code_patch(cc.runner_spec_bytes(), PatchPolicy(allowed_paths=(), protected_paths=("x",),
                                                                    max_diff_bytes=1), fs)


# -- the spec's vectors ---------------------------------------------------------------

def _block(name: str) -> str:
    text = SPEC.read_text()
    m = re.search(r"<!-- vector: " + re.escape(name) + r" -->\n```[a-z]*\n(.*?)```", text, re.DOTALL)
    assert m, f"no vector {name} in {SPEC.name}"
    return m.group(1)


def _vector_results(fs, outcomes):
    return [pf.FixtureResult(fixture=k, outcome=pf.verdict_of(o), agree=pf.verdict_of(o) == x.expect)
            for k, (x, o) in enumerate(zip(fs.fixtures, outcomes))]


def _hashes() -> dict:
    return dict(line.split(" = ") for line in _block("hashes").strip().splitlines())


def test_spec_vectors():
    assert _block("spec-tests").strip().encode() == cc.runner_spec_bytes("tests")
    hashes = _hashes()
    assert hashes["H(spec tests)"] == H(cc.runner_spec_bytes("tests")).hex()
    assert hashes["H(spec applies)"] == H(cc.runner_spec_bytes("applies")).hex()
    fs = pf.parse_fixture_set(_block("fixture-set").encode())
    assert hashes["fixture set"] == fs.hash.hex()
    assert [x.name for x in fs.fixtures] == ["good", "weakens-tests"]
    for outcomes in (("passed", "refused"), ("passed", "passed")):
        results = _vector_results(fs, outcomes)
        assert hashes[f"results ({', '.join(outcomes)})"] == pf.results_hash(fs.hash, results).hex()
        assert hashes[f"target_bp ({', '.join(outcomes)})"] == str(pf.agreement_bp(results))
    assert hashes["shipped set"] == cc.shipped_fixture_set().hash.hex()


@needs_sandbox
def test_spec_vector_measured():
    fs = pf.parse_fixture_set(_block("fixture-set").encode())
    for judge in ("tests", "applies"):
        f = cc.evaluate_code_patch(cc.runner_spec_bytes(judge), POLICY, fs)
        assert f.results_hash.hex() == _hashes()["results (passed, refused)"]


@needs_sandbox
def test_the_trio_wrapper_passes_judge_and_policy():
    import trio
    from aemd.executors.codepatch import arun_code_patch

    async def main():
        repo = fixture_repo_tar()
        a = await arun_code_patch(repo, fixture_patch("bad"), FIXTURE_TEST_COMMAND, judge="applies")
        b = await arun_code_patch(repo, fixture_patch("net"), FIXTURE_TEST_COMMAND, policy=POLICY)
        return a.outcome, b.outcome
    assert trio.run(main) == ("passed", "refused")
