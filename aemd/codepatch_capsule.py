"""The code-patch verifier as an admissible capsule
(``specs/admission-codepatch.md``).

A code-patch capsule's artefact is a *runner spec*: a tiny JSON document that
says how the host judges a patch (``judge``: ``tests`` runs the task's tests
on the patched tree; ``applies`` only checks that the patch applies, a
cheaper and worse judge). Its SHA-256 is the manifest's ``content_hash``.
The manifest also carries the capsule's :class:`~protocol.mesh.PatchPolicy`.
A verifier measures the capsule by running the labelled fixture set
(``aemd/evalsets/code-patch-fixtures.json``) through the executor with the
capsule's judge and policy, and scoring agreement with the labels.

Only the canonical encoding of a spec is accepted (compact JSON, keys
sorted, no whitespace): a spec has one byte string per meaning, so two
capsules that judge alike have the same artefact hash and the duplicate gate
sees them as one.
"""

from __future__ import annotations

import functools
import io
import json
import tarfile
import time
from dataclasses import dataclass
from importlib import resources
from typing import NamedTuple

from aemd.executors.codepatch import Limits, run_code_patch
from crypto.hashing import H
from protocol.errors import (BAD_TYPE, BAD_VALUE, MISSING_FIELD, NOT_CANONICAL, NOT_FOUND,
                             UNKNOWN_FIELD, WRONG_OBJECT, AemError)
from protocol import strictjson
from protocol.mesh import JUDGES, PatchPolicy
from protocol.patchfixtures import (FixtureResult, PatchFixtureSet, RepoFiles, agreement_bp,
                                    parse_fixture_set, results_hash, verdict_of)
from protocol.patchpolicy import check_patch, policy_problem

__all__ = ["SPEC_FORMAT", "MAX_SPEC_BYTES", "RunnerSpec", "parse_runner_spec", "runner_spec_bytes",
           "spec_problem", "default_patch_policy", "check_patch", "policy_problem", "EVAL_LIMITS",
           "CodePatchFigures", "evaluate_code_patch", "shipped_fixture_set", "load_fixtures",
           "SHIPPED_FIXTURES", "repo_tar"]

SPEC_FORMAT = "aem-code-patch/1"
MAX_SPEC_BYTES = 256
_SPEC_KEYS = frozenset({"format", "judge"})
SHIPPED_FIXTURES = "code-patch-fixtures.json"


@dataclass(frozen=True)
class RunnerSpec:
    judge: str                         # one of protocol.mesh.JUDGES


def runner_spec_bytes(judge: str = "tests") -> bytes:
    """The canonical artefact of a code-patch capsule with ``judge``."""
    if judge not in JUDGES:
        raise AemError(BAD_VALUE, f"judge must be one of {', '.join(JUDGES)}")
    return json.dumps({"format": SPEC_FORMAT, "judge": judge}, sort_keys=True,
                      separators=(",", ":"), ensure_ascii=True).encode("ascii")


def parse_runner_spec(data: bytes) -> RunnerSpec:
    """Parse a runner spec. Raises ``AemError``: TOO_LARGE, BAD_ENCODING,
    BAD_TYPE, WRONG_OBJECT, UNKNOWN_FIELD, MISSING_FIELD, BAD_VALUE, and
    NOT_CANONICAL for a valid spec in other bytes than
    :func:`runner_spec_bytes` gives."""
    doc = strictjson.loads(data, max_bytes=MAX_SPEC_BYTES, what="a runner spec", integers=False)
    data = bytes(data)
    if type(doc) is not dict:
        raise AemError(BAD_TYPE, "a runner spec is a JSON object")
    if doc.get("format") != SPEC_FORMAT:
        raise AemError(WRONG_OBJECT, f"runner spec format must be {SPEC_FORMAT!r}")
    extra = set(doc) - _SPEC_KEYS
    if extra:
        raise AemError(UNKNOWN_FIELD, f"runner spec: unknown field {sorted(extra)[0][:32]!r}")
    if "judge" not in doc:
        raise AemError(MISSING_FIELD, "runner spec: missing field 'judge'")
    judge = doc["judge"]
    if type(judge) is not str or judge not in JUDGES:
        raise AemError(BAD_VALUE, f"runner spec judge must be one of {', '.join(JUDGES)}")
    if data != runner_spec_bytes(judge):
        raise AemError(NOT_CANONICAL, "runner spec is not in canonical form (compact, sorted keys)")
    return RunnerSpec(judge=judge)


def spec_problem(data: bytes) -> str:
    """"" when ``data`` is a valid runner spec, else why not (for a report's
    ``manifest_problem``)."""
    try:
        parse_runner_spec(data)
    except AemError as exc:
        return f"runner spec: {exc.detail}"[:128]
    return ""


#: What a patch may touch by default (specs/admission-codepatch.md §2.3):
#: source and documentation files, at any depth.
DEFAULT_ALLOWED = ("**/*.c", "**/*.h", "**/*.md", "**/*.py", "**/*.pyi", "**/*.rst")
#: What judges a patch, for the test commands a code-patch task runs
#: (``python -m unittest``, ``python -m pytest``, ``make test``): the test
#: files and directories unittest and pytest collect, pytest's conftest and
#: configuration files, the Makefile, .pth files and the interpreter's
#: startup hooks, and top-level modules that would shadow the test runner.
DEFAULT_PROTECTED = (
    "**/tests", "**/test", "**/test_*", "**/*_test.py", "**/conftest.py", "**/pytest.ini",
    "**/tox.ini", "**/setup.cfg", "**/pyproject.toml", "**/noxfile.py", "**/Makefile",
    "**/*.pth", "**/sitecustomize.py", "**/usercustomize.py", "unittest*", "pytest*", "_pytest*",
    "pluggy*",
)
DEFAULT_MAX_DIFF = 64 << 10


def default_patch_policy() -> PatchPolicy:
    """The patch policy ``aemctl expert add --code-patch`` puts in a manifest."""
    return PatchPolicy(allowed_paths=DEFAULT_ALLOWED, protected_paths=DEFAULT_PROTECTED,
                       max_diff_bytes=DEFAULT_MAX_DIFF)


# --- fixtures -------------------------------------------------------------------------

def shipped_fixture_set() -> PatchFixtureSet:
    """The fixture set shipped in ``aemd/evalsets``."""
    return _shipped_sets()[SHIPPED_FIXTURES]


@functools.lru_cache(maxsize=1)
def _shipped_sets() -> dict[str, PatchFixtureSet]:
    """Every fixture set in ``aemd/evalsets``, by file name (eval sets of other
    formats, the qa and probe sets, are skipped)."""
    out = {}
    for entry in sorted(resources.files("aemd").joinpath("evalsets").iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".json"):
            continue
        try:
            out[entry.name] = parse_fixture_set(entry.read_bytes())
        except AemError as exc:
            if exc.code != WRONG_OBJECT:
                raise                        # a shipped fixture set that does not parse is a bug
    return out


def load_fixtures(hash_or_name: bytes | str) -> PatchFixtureSet:
    """The shipped fixture set with this content hash (32 bytes or 64 hex
    digits) or this name; ``AemError(NOT_FOUND)`` when there is none."""
    want = hash_or_name
    if isinstance(want, str) and len(want) == 64:
        try:
            want = bytes.fromhex(want)
        except ValueError:
            pass
    for fs in _shipped_sets().values():
        if fs.hash == want or fs.name == want:
            return fs
    shown = want.hex() if isinstance(want, bytes) else str(want)
    raise AemError(NOT_FOUND, f"no code-patch fixture set {shown[:64]}")


def repo_tar(repo: RepoFiles) -> bytes:
    """A fixture repository as the deterministic tar the executor takes (the
    layout of ``aemd.executors.fixtures.build_tar``: sorted, mtime 0, 0644)."""
    dirs: set[str] = set()
    for path, _ in repo.files:
        parts = path.split("/")
        dirs.update("/".join(parts[:k]) for k in range(1, len(parts)))
    buf = io.BytesIO()
    entries = sorted([(d, None) for d in dirs] + list(repo.files))
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, text in entries:
            info = tarfile.TarInfo(name)
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            if text is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tf.addfile(info)
            else:
                data = text.encode("utf-8")
                info.size, info.mode = len(data), 0o644
                tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


# --- measurement ----------------------------------------------------------------------

#: A fixture's tests take well under a second; these bound a hostile one.
EVAL_LIMITS = Limits(cpu_s=10, wall_s=20.0, memory_mb=1024, nproc=64)


class CodePatchFigures(NamedTuple):
    """What evaluating a code-patch capsule measures: the target score (basis
    points of fixtures whose verdict agrees with the label), the hash of the
    per-fixture records, the capsule's tensor hash (``H`` of its spec), the
    records themselves, the fixture set's hash and the time it took."""
    target_bp: int
    results_hash: bytes
    tensor_hash: bytes
    items: tuple[FixtureResult, ...]
    target_eval: bytes
    elapsed_ms: int


def evaluate_code_patch(spec_bytes: bytes, policy: PatchPolicy, fixtures: PatchFixtureSet, *,
                        isolation: str = "auto", limits=None) -> CodePatchFigures:
    """Run every fixture through the code-patch executor with the capsule's
    judge and patch policy, and score agreement with the labels. Blocking
    (run it in a worker thread); deterministic: the figures depend only on
    the spec, the policy and the set. Raises ``AemError`` on a bad spec or
    policy (gate 6 should have refused the capsule first) and UNAVAILABLE
    when this machine has no sandbox."""
    t0 = time.monotonic()
    spec = parse_runner_spec(spec_bytes)
    problem = policy_problem(policy)
    if problem:
        raise AemError(BAD_VALUE, problem)
    tars = {r.name: repo_tar(r) for r in fixtures.repos}
    results: list[FixtureResult] = []
    for k, fx in enumerate(fixtures.fixtures):
        repo = fixtures.repo(fx.repo)
        report = run_code_patch(tars[fx.repo], fx.patch, repo.test_command,
                                limits=limits or EVAL_LIMITS, isolation=isolation,
                                judge=spec.judge, policy=policy)
        verdict = verdict_of(report.outcome)
        results.append(FixtureResult(fixture=k, outcome=verdict, agree=verdict == fx.expect))
    return CodePatchFigures(target_bp=agreement_bp(results),
                            results_hash=results_hash(fixtures.hash, results),
                            tensor_hash=H(bytes(spec_bytes)), items=tuple(results),
                            target_eval=fixtures.hash,
                            elapsed_ms=int((time.monotonic() - t0) * 1000))
