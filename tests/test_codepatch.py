"""The code-patch verifier: real patches, real sandboxes, hostile code.

Hostile runs are made with every sandbox that works on this machine ("bwrap" needs
the Debian package bubblewrap, "unshare" util-linux); a level that is missing is
skipped, and "auto" must find one."""

from __future__ import annotations

import hashlib
import io
import os
import secrets
import socket
import tarfile
import shutil
import tempfile

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from aemd.executors import codepatch
from aemd.executors.codepatch import (Limits, VerifierReport, arun_code_patch,
                                      available_isolation, run_code_patch)
from aemd.executors.fixtures import (FIXTURE_TEST_COMMAND, build_tar, fixture_dir,
                                     fixture_patch, fixture_repo_tar)
from protocol.errors import BAD_VALUE, TOO_LARGE, AemError

ROOT = os.geteuid() == 0
LEVELS = [lv for lv in ("bwrap", "unshare") if codepatch._probe(lv, ROOT)]
BEST = LEVELS[0] if LEVELS else "none"
sandboxed = pytest.mark.parametrize("level", LEVELS or [pytest.param(
    "none", marks=pytest.mark.skip(reason="no sandbox on this machine"))])
needs_patch = pytest.mark.skipif(shutil.which("patch") is None,
                                 reason="GNU patch is not installed (Debian package 'patch')")
HOSTILE = Limits(cpu_s=1, wall_s=2.0)        # keeps the fork bomb and the loop short
GENEROUS = Limits(wall_s=60.0)


@pytest.fixture(scope="module")
def repo():
    return fixture_repo_tar()


@pytest.fixture(autouse=True)
def no_workspace_left():
    tmp = tempfile.gettempdir()
    before = {n for n in os.listdir(tmp) if n.startswith("aem-codepatch-")}
    yield
    after = {n for n in os.listdir(tmp) if n.startswith("aem-codepatch-")}
    assert after <= before, "a workspace was left behind"


def sandbox_processes() -> int:
    n = 0
    for name in os.listdir("/proc"):
        try:
            if name.isdigit() and os.stat(f"/proc/{name}").st_uid >= codepatch.SANDBOX_UID_BASE:
                n += 1
        except FileNotFoundError:
            pass
    return n


def run(repo, name, level=BEST, limits=GENEROUS, **subst) -> VerifierReport:
    return run_code_patch(repo, fixture_patch(name, **subst), FIXTURE_TEST_COMMAND,
                          limits=limits, isolation=level)


def test_fixture_tar_is_deterministic(repo):
    assert build_tar(fixture_dir() / "repo") == repo
    with tarfile.open(fileobj=io.BytesIO(repo)) as tf:
        members = tf.getmembers()
    assert [m.name for m in members] == sorted(m.name for m in members)
    assert {(m.mtime, m.uid, m.gid, m.uname) for m in members} == {(0, 0, 0, "")}
    assert "test_calc.py" in {m.name for m in members}


@pytest.mark.skipif(not LEVELS, reason="no sandbox on this machine")
def test_auto_isolation_finds_a_sandbox():
    assert available_isolation() == LEVELS[0]


@needs_patch
@pytest.mark.parametrize("level", [*LEVELS, "none"])
def test_good_passes_and_bad_fails(repo, level):
    good = run(repo, "good", level)
    assert (good.outcome, good.patch_applied, good.exit_code) == ("passed", True, 0)
    assert good.isolation == level
    assert "OK" in good.stderr_tail
    bad = run(repo, "bad", level)
    assert (bad.outcome, bad.patch_applied) == ("failed", True)
    assert "FAILED" in bad.stderr_tail
    assert good.repo_hash == bad.repo_hash == hashlib.sha256(repo).digest()
    assert good.patch_hash == hashlib.sha256(fixture_patch("good").encode()).digest()
    assert good.output_hash == hashlib.sha256(good.content_bytes()).digest()
    assert good.output_hash != bad.output_hash
    assert good.limits["nproc"] == (None if level == "none" else Limits().nproc)


@needs_patch
def test_unpatched_repo_fails_and_patch_that_does_not_apply(repo):
    r = run_code_patch(repo, fixture_patch("good").replace("-    return a - b",
                                                           "-    return a / b"),
                       FIXTURE_TEST_COMMAND, limits=GENEROUS, isolation=BEST)
    assert (r.outcome, r.patch_applied) == ("patch_failed", False)
    assert r.exit_code != 0


@needs_patch
@sandboxed
def test_network_is_isolated(repo, level):
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        srv.setblocking(False)
        r = run(repo, "net", level, port=srv.getsockname()[1])
        with pytest.raises(BlockingIOError):
            srv.accept()                       # nothing reached the host's listener
    assert r.outcome == "failed" and r.patch_applied
    assert "NETWORK-REACHED" not in r.stdout_tail
    assert "ConnectionRefusedError" in r.stderr_tail or "unreachable" in r.stderr_tail


@needs_patch
@sandboxed
def test_writes_outside_the_tree_do_not_reach_the_host(repo, level):
    token = secrets.token_hex(8)
    r = run(repo, "escape", level, token=token)
    assert r.patch_applied
    for d in ("/tmp", "/var/tmp"):
        assert not os.path.exists(f"{d}/aem-escape-{token}")
    if level == "bwrap":                       # no /tmp at all: the write itself fails
        assert r.outcome == "failed"
        assert "FileNotFoundError" in r.stderr_tail or "Read-only" in r.stderr_tail


@needs_patch
@sandboxed
def test_fork_bomb_is_contained(repo, level):
    r = run(repo, "forkbomb", level, limits=HOSTILE)
    assert r.outcome in ("timeout", "killed")
    assert r.limits["nproc"] == HOSTILE.nproc
    assert sandbox_processes() == 0
    assert run(repo, "good", level).outcome == "passed"


@needs_patch
@sandboxed
def test_infinite_loop_is_stopped(repo, level):
    r = run(repo, "infinite", level, limits=HOSTILE)
    assert r.outcome in ("timeout", "killed")
    if r.outcome == "killed":
        assert r.signal in (9, 24)             # SIGKILL or SIGXCPU (the CPU limit)
    assert sandbox_processes() == 0
    assert run(repo, "good", level).outcome == "passed"


@needs_patch
def test_missing_command_is_an_error(repo):
    r = run_code_patch(repo, fixture_patch("good"), ["no-such-test-runner"], limits=GENEROUS,
                       isolation=BEST)
    assert r.outcome == "error" and r.patch_applied
    assert "no-such-test-runner" in r.stderr_tail


@needs_patch
def test_async_run_and_cancellation(repo):
    async def main():
        limiter = trio.CapacityLimiter(2)
        r = await arun_code_patch(repo, fixture_patch("good"), FIXTURE_TEST_COMMAND,
                                  limits=GENEROUS, isolation=BEST, limiter=limiter)
        assert r.outcome == "passed"
        with trio.move_on_after(0.5) as scope:
            await arun_code_patch(repo, fixture_patch("infinite"), FIXTURE_TEST_COMMAND,
                                  limits=Limits(cpu_s=60, wall_s=60), isolation=BEST,
                                  limiter=limiter)
        assert scope.cancelled_caught
        # the abandoned worker kills the sandbox and cleans up at its next poll
        for _ in range(500):
            if sandbox_processes() == 0 and not any(
                    n.startswith("aem-codepatch-") for n in os.listdir(tempfile.gettempdir())):
                break
            await trio.sleep(0.01)
        assert sandbox_processes() == 0

    trio.run(main)


# --- input checks: nothing is extracted or run ----------------------------------------

def make_tar(entries) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for name, kind, extra in entries:
            info = tarfile.TarInfo(name)
            if kind == "file":
                info.size = len(extra)
                tf.addfile(info, io.BytesIO(extra))
            else:
                info.type = kind
                if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
                    info.linkname = extra
                tf.addfile(info)
    return buf.getvalue()


@pytest.mark.parametrize("entries", [
    [("/etc/evil", "file", b"x")],
    [("../evil", "file", b"x")],
    [("a/../../evil", "file", b"x")],
    [("link", tarfile.SYMTYPE, "/etc/passwd")],
    [("link", tarfile.SYMTYPE, "../../etc")],
    [("s", tarfile.SYMTYPE, "."), ("l", tarfile.SYMTYPE, "s/..")],   # escapes via a chain
    [("hard", tarfile.LNKTYPE, "/etc/passwd")],
    [("dev", tarfile.CHRTYPE, "")],
    [("fifo", tarfile.FIFOTYPE, "")],
    [("a", "file", b"1"), ("a", "file", b"2")],
    [("d", tarfile.SYMTYPE, "sub"), ("d/x", "file", b"x")],
    [("f", "file", b"x"), ("f/x", "file", b"x")],
])
def test_hostile_tars_are_refused(entries):
    tar = make_tar(entries)
    with pytest.raises(AemError) as e:
        run_code_patch(tar, fixture_patch("good"), FIXTURE_TEST_COMMAND)
    assert e.value.code == BAD_VALUE


def test_size_limits():
    with pytest.raises(AemError) as e:
        run_code_patch(bytes(codepatch.MAX_REPO_TAR + 1), fixture_patch("good"), ["true"])
    assert e.value.code == TOO_LARGE
    many = make_tar([(f"f{i}", "file", b"") for i in range(codepatch.MAX_MEMBERS + 1)])
    with pytest.raises(AemError) as e:
        run_code_patch(many, fixture_patch("good"), ["true"])
    assert e.value.code == TOO_LARGE
    with pytest.raises(AemError) as e:
        run_code_patch(make_tar([]), "+" * (codepatch.MAX_DIFF + 1), ["true"])
    assert e.value.code == TOO_LARGE


@pytest.mark.parametrize("diff", [
    "--- /etc/passwd\n+++ /etc/passwd\n@@ -1 +1 @@\n-a\n+b\n",
    "--- a/../x\n+++ b/../x\n@@ -1 +1 @@\n-a\n+b\n",
    "diff --git a/x b/../../y\nrename from x\nrename to ../../y\n--- a/x\n+++ b/x\n",
    "no headers at all\n",
    "",
])
def test_hostile_diffs_are_refused(repo, diff):
    with pytest.raises(AemError) as e:
        run_code_patch(repo, diff, FIXTURE_TEST_COMMAND)
    assert e.value.code == BAD_VALUE


def test_hunk_content_is_not_taken_for_headers():
    # a removed line "-- x" reads "--- x" inside a hunk; it is not a file name
    diff = "--- a/f.sql\n+++ b/f.sql\n@@ -1,2 +1,1 @@\n--- /etc/passwd\n a\n"
    codepatch.check_diff(diff)


@pytest.mark.parametrize("cmd", [[], "python -m unittest", [""], ["a\x00b"], [1], ["x"] * 65])
def test_bad_commands_are_refused(repo, cmd):
    with pytest.raises(AemError) as e:
        run_code_patch(repo, fixture_patch("good"), cmd)
    assert e.value.code == BAD_VALUE


def test_empty_repository_is_refused():
    for tar in (make_tar([]), bytes(1024)):
        with pytest.raises(AemError) as e:
            run_code_patch(tar, fixture_patch("good"), FIXTURE_TEST_COMMAND)
        assert e.value.code == BAD_VALUE


@settings(max_examples=40, deadline=None)
@given(st.binary(max_size=2048))
def test_random_tar_bytes_only_give_aem_error(data):
    with pytest.raises(AemError) as e:
        run_code_patch(data, fixture_patch("good"), FIXTURE_TEST_COMMAND)
    assert e.value.code in (BAD_VALUE, TOO_LARGE)
