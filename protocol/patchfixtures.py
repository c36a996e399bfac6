"""Labelled code-patch fixture sets: the target eval of a code-patch
verifier capsule (``specs/admission-codepatch.md`` §3).

A fixture set is a JSON file: small repositories (their files inline, as
text, so the set is one self-contained document with one content hash), and
fixtures, each a patch to one repository with the outcome an honest verifier
must report: ``pass`` (it applies and the tests pass), ``fail`` (it does not
apply, or the tests fail, crash or run out of time) or ``refused`` (the
capsule's patch policy must refuse it before anything runs). A capsule is
scored by its agreement with the labels.

Like eval sets (``protocol/evalset.py``), the set's hash is
``H(canonical.encode(document))`` of the validated document. Pure: bytes in,
values out; the daemon's shell (``aemd/codepatch_capsule.py``) runs the
fixtures.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

from crypto.hashing import H
from protocol import canonical, strictjson
from protocol.errors import BAD_TYPE, BAD_VALUE, WRONG_OBJECT, AemError

__all__ = ["FORMAT", "RESULTS_FORMAT", "EXPECTS", "MAX_SET_BYTES", "MAX_REPOS", "MAX_FILES",
           "MAX_FILE_BYTES", "MAX_FIXTURES", "MAX_PATCH_BYTES", "RepoFiles", "PatchFixture",
           "PatchFixtureSet", "FixtureResult", "parse_fixture_set", "fixture_set_from_document",
           "verdict_of", "results_hash", "agreement_bp"]

FORMAT = "aem-patch-fixtures/1"
RESULTS_FORMAT = "aem-patch-results/1"
EXPECTS = ("pass", "fail", "refused")
BP = 10_000

MAX_SET_BYTES = 1 << 20
MAX_REPOS = 8
MAX_FILES = 64
MAX_FILE_BYTES = 64 << 10
MAX_FIXTURES = 32
MAX_PATCH_BYTES = 64 << 10
MAX_ARGS = 16
MAX_ARG_BYTES = 256
MAX_PATH_BYTES = 256
MAX_DEPTH = 16

_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")
_PATH_PART = re.compile(r"[A-Za-z0-9_.+@~=,%-]+")
_TOP = frozenset({"format", "name", "repos", "fixtures"})
_REPO = frozenset({"name", "test_command", "files"})
_FILE = frozenset({"path", "text"})
_FIXTURE = frozenset({"name", "repo", "patch", "expect"})


@dataclass(frozen=True)
class RepoFiles:
    """A fixture repository: its files (sorted by path) and its test command."""
    name: str
    test_command: tuple[str, ...]
    files: tuple[tuple[str, str], ...]      # (path, text)


@dataclass(frozen=True)
class PatchFixture:
    name: str
    repo: str
    patch: str
    expect: str                             # one of EXPECTS


@dataclass(frozen=True)
class PatchFixtureSet:
    """A validated fixture set; ``hash`` is its content hash (32 bytes)."""
    name: str
    repos: tuple[RepoFiles, ...]
    fixtures: tuple[PatchFixture, ...]
    hash: bytes

    def repo(self, name: str) -> RepoFiles:
        return next(r for r in self.repos if r.name == name)

    def document(self) -> dict:
        return {"format": FORMAT, "name": self.name,
                "repos": [{"name": r.name, "test_command": list(r.test_command),
                           "files": [{"path": p, "text": t} for p, t in r.files]} for r in self.repos],
                "fixtures": [{"name": x.name, "repo": x.repo, "patch": x.patch, "expect": x.expect}
                             for x in self.fixtures]}

    def to_json(self) -> bytes:
        return (json.dumps(self.document(), ensure_ascii=False, indent=1) + "\n").encode("utf-8")


@dataclass(frozen=True)
class FixtureResult:
    """One fixture's measurement: the canonical per-item record."""
    fixture: int
    outcome: str                            # the capsule's verdict, one of EXPECTS
    agree: bool

    def record(self) -> dict:
        return {"fixture": self.fixture, "outcome": self.outcome, "agree": self.agree}


# --- parsing --------------------------------------------------------------------------

def parse_fixture_set(data: bytes) -> PatchFixtureSet:
    """Parse and validate a fixture-set file. Only ``AemError`` leaves it."""
    doc = strictjson.loads(data, max_bytes=MAX_SET_BYTES, what="a fixture set")
    return fixture_set_from_document(doc)


def _list(v: object, where: str, lo: int, hi: int) -> list:
    if type(v) is not list:
        raise AemError(BAD_TYPE, f"{where} must be a list")
    if not lo <= len(v) <= hi:
        raise AemError(BAD_VALUE, f"{where} holds {lo}..{hi} entries")
    return v


def _name(v: object, where: str) -> str:
    if type(v) is not str or not _NAME.fullmatch(v):
        raise AemError(BAD_VALUE, f"{where} must match [a-z0-9][a-z0-9-]{{0,63}}")
    return v


def _path(v: object, where: str) -> tuple[str, ...]:
    p = strictjson.text(v, where, MAX_PATH_BYTES)
    parts = tuple(p.split("/"))
    if len(parts) > MAX_DEPTH or any(x in (".", "..") or not _PATH_PART.fullmatch(x) for x in parts):
        raise AemError(BAD_VALUE, f"{where}: {p[:64]!r} is not a plain relative path")
    return parts


def _repo(obj: object, where: str) -> RepoFiles:
    d = strictjson.fields(obj, _REPO, where)
    name = _name(d["name"], f"{where} name")
    cmd = tuple(strictjson.text(a, f"{where} test_command", MAX_ARG_BYTES)
                for a in _list(d["test_command"], f"{where} test_command", 1, MAX_ARGS))
    files: list[tuple[str, str]] = []
    seen: set[tuple[str, ...]] = set()
    for k, f in enumerate(_list(d["files"], f"{where} files", 1, MAX_FILES)):
        fd = strictjson.fields(f, _FILE, f"{where} file {k}")
        parts = _path(fd["path"], f"{where} file {k} path")
        text = strictjson.text(fd["text"], f"{where} file {k} text", MAX_FILE_BYTES, empty=True)
        seen.add(parts)
        files.append(("/".join(parts), text))
    paths = [p for p, _ in files]
    if paths != sorted(set(paths)):
        raise AemError(BAD_VALUE, f"{where}: files must be sorted by path, one each")
    for parts in seen:                   # a file cannot also be a directory
        if any(parts[:k] in seen for k in range(1, len(parts))):
            raise AemError(BAD_VALUE, f"{where}: {'/'.join(parts)[:64]!r} lies under a file")
    return RepoFiles(name=name, test_command=cmd, files=tuple(files))


def fixture_set_from_document(doc: object) -> PatchFixtureSet:
    """Validate a decoded document (as JSON gives it) and return the set."""
    if type(doc) is not dict:
        raise AemError(BAD_TYPE, "a fixture set is a JSON object")
    if doc.get("format") != FORMAT:
        raise AemError(WRONG_OBJECT, f"format must be {FORMAT!r}")
    d = strictjson.fields(doc, _TOP, "fixture set")
    name = _name(d["name"], "name")
    repos = tuple(_repo(r, f"repo {k}") for k, r in enumerate(_list(d["repos"], "repos", 1, MAX_REPOS)))
    rnames = [r.name for r in repos]
    if rnames != sorted(set(rnames)):
        raise AemError(BAD_VALUE, "repos must be sorted by name, one each")
    fixtures: list[PatchFixture] = []
    for k, x in enumerate(_list(d["fixtures"], "fixtures", 1, MAX_FIXTURES)):
        where = f"fixture {k}"
        fd = strictjson.fields(x, _FIXTURE, where)
        fname = _name(fd["name"], f"{where} name")
        repo = fd["repo"]
        if repo not in rnames:
            raise AemError(BAD_VALUE, f"{where} names no repo of the set")
        patch = strictjson.text(fd["patch"], f"{where} patch", MAX_PATCH_BYTES)
        expect = fd["expect"]
        if expect not in EXPECTS:
            raise AemError(BAD_VALUE, f"{where} expect must be one of {', '.join(EXPECTS)}")
        fixtures.append(PatchFixture(name=fname, repo=repo, patch=patch, expect=expect))
    if len({x.name for x in fixtures}) != len(fixtures):
        raise AemError(BAD_VALUE, "fixture names repeat")
    unhashed = PatchFixtureSet(name=name, repos=repos, fixtures=tuple(fixtures), hash=b"")
    return dataclasses.replace(unhashed, hash=H(canonical.encode(unhashed.document())))


# --- scoring --------------------------------------------------------------------------

#: How a verifier report's outcome reads as a verdict: anything but a clean
#: pass or a policy refusal is a failed patch.
_VERDICT = {"passed": "pass", "refused": "refused"}


def verdict_of(outcome: str) -> str:
    """The verdict (one of EXPECTS) of a code-patch verifier report's outcome."""
    if type(outcome) is not str or not outcome:
        raise AemError(BAD_VALUE, "an outcome is a non-empty string")
    return _VERDICT.get(outcome, "fail")


def results_hash(set_hash: bytes, results: Iterable[FixtureResult]) -> bytes:
    """``H(canonical.encode({"format": RESULTS_FORMAT, "set": set_hash,
    "results": [record...]}))``, records in fixture order."""
    if type(set_hash) is not bytes or len(set_hash) != 32:
        raise AemError(BAD_VALUE, "the set hash is 32 bytes")
    records = []
    for r in results:
        if type(r.fixture) is not int or r.fixture < 0 or r.outcome not in EXPECTS \
                or type(r.agree) is not bool:
            raise AemError(BAD_VALUE, "a fixture result is (index >= 0, verdict, bool)")
        records.append(r.record())
    return H(canonical.encode({"format": RESULTS_FORMAT, "set": set_hash, "results": records}))


def agreement_bp(results: Sequence[FixtureResult]) -> int:
    """Fixtures whose verdict agrees with the label * 10000 // fixtures."""
    if not results:
        raise AemError(BAD_VALUE, "no fixtures to score")
    return sum(1 for r in results if r.agree) * BP // len(results)
