"""The code-patch verifier: apply a stranger's diff to a repository snapshot and run
the task's tests, isolated.

Input: the repository as (uncompressed) tar bytes, a unified diff, and a test
command (an argv list). Output: a :class:`VerifierReport` saying whether the patch
applied and how the tests ended, with the tails of their output, the isolation and
limits that were in force, and hashes that bind the report to its inputs.

Everything here runs code we did not write, so:

0. With a capsule's patch policy (``policy``, a protocol.mesh.PatchPolicy), a patch
   the policy does not permit (``protocol.patchpolicy.check_patch``: protected paths,
   paths outside the allowed ones, size, anything but a plain unified diff), or one
   that names a path through a symlink of the tree, is ``refused`` before anything
   runs (``specs/admission-codepatch.md`` §2). ``judge="applies"`` stops after the
   patch step: a patch that applies is ``passed`` without running the tests.
1. Inputs are checked before any work: sizes (tar 16 MiB, diff 1 MiB), the diff's
   file names (no absolute paths, no ``..``), the tar's members (regular files,
   directories and symlinks only; no absolute names, ``..``, duplicates, members
   under a file or a link, hard links, devices or FIFOs; at most 10 000 members and
   64 MiB unpacked; every symlink must resolve inside the tree).
2. The tree is extracted into a fresh temporary directory. Both ``patch`` (GNU
   patch) and the tests run in the sandbox, so a hostile diff cannot write outside
   the tree either.
3. The sandbox, best first (:func:`available_isolation`):

   ``bwrap``  bubblewrap: new pid, network, ipc, uts (and user, when not root)
              namespaces; a read-only root that holds only ``/usr`` (and the
              ``/bin``, ``/lib*`` links), the Python installation (read-only, so
              ``python -m unittest`` and ``python -m pytest`` work), ``/proc``, a
              minimal ``/dev``, and the task tree (the only writable place,
              mounted at ``/task``). No ``/tmp``, no ``/home``, no ``/etc``: a write
              anywhere else fails. ``--die-with-parent``, ``--new-session``.
   ``unshare`` util-linux ``unshare``: new pid, network, mount, ipc and uts
              namespaces; private tmpfs over ``/tmp``, ``/var/tmp``, ``/dev/shm``.
              The rest of the file system stays visible (read-only only through
              permissions): weaker than bwrap.
   ``none``   resource limits only; for development. ``isolation="auto"`` never
              picks it; it must be asked for by name.

4. Resource limits, set inside the sandbox by a tiny init program just before it
   executes the command: CPU seconds (SIGXCPU, then SIGKILL), address space, open
   files, file size (which also bounds the captured output: stdout and stderr go to
   files), no core dumps, ``PR_SET_NO_NEW_PRIVS``, and the number of processes.
   Plus a wall-clock limit: the whole process group is killed with SIGKILL, and
   killing the sandbox's parent tears down its pid namespace with everything in it.

Process count, and fork bombs when the daemon runs as root. ``RLIMIT_NPROC`` is
not enforced for processes of the real root user (the kernel exempts uid 0 in the
initial user namespace, even inside a user namespace that maps to it), so a fork
bomb run as root is stopped only by the wall clock, after it may have exhausted the
machine's pids. As root, therefore, each run gets its own unprivileged uid/gid
(random, in ``SANDBOX_UID_BASE`` + [0, 2**24)): the tree is chowned to it, the
sandbox is built as root (so it can bind an interpreter under ``/root``), and the
init program drops to that uid (``setgroups([])``, ``setresgid``, ``setresuid``)
before setting ``RLIMIT_NPROC``, which the kernel then enforces for that uid alone.
After the run every process of that uid is killed. As an ordinary user, the limit
is set inside the sandbox's own user namespace (bwrap, or ``unshare
--map-root-user``), where the kernel counts only the sandbox's processes. In mode
``none`` no process limit can be applied safely, and the report says so
(``limits["nproc"] is None``).

The report's ``output_hash`` is SHA-256 over a domain tag and the canonical JSON of
every field except ``output_hash`` itself and ``duration_ms``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import re
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import trio

from protocol.errors import BAD_VALUE, TOO_LARGE, UNAVAILABLE, AemError
from protocol.mesh import PatchPolicy
from protocol.patchpolicy import check_patch, diff_names, readings, skip_hunk

__all__ = [
    "Limits",
    "VerifierReport",
    "run_code_patch",
    "arun_code_patch",
    "available_isolation",
    "ISOLATION_LEVELS",
    "OUTCOMES",
    "JUDGES",
]

MAX_REPO_TAR = 16 << 20
MAX_DIFF = 1 << 20
MAX_MEMBERS = 10_000
MAX_UNPACKED = 64 << 20
MAX_NAME = 1024
MAX_DEPTH = 64
MAX_ARGS = 64
MAX_ARG_LEN = 4096
TAIL_BYTES = 8192
POLL_S = 0.02
PATCH_WALL_S = 30.0
SANDBOX_UID_BASE = 3_000_000_000
REPORT_DOMAIN = b"aem/codepatch-report/v1\x00"

ISOLATION_LEVELS = ("bwrap", "unshare", "none")
OUTCOMES = ("passed", "failed", "error", "timeout", "killed", "patch_failed", "refused")
#: "tests": apply the patch, then run the tests (the verifier). "applies":
#: pass a patch that applies cleanly, without running anything else: a
#: cheaper and worse judge, which admission must be able to tell apart.
JUDGES = ("tests", "applies")


@dataclass(frozen=True)
class Limits:
    cpu_s: int = 30            # CPU seconds per process (RLIMIT_CPU)
    wall_s: float = 60.0       # wall clock for the test command
    memory_mb: int = 1024      # address space per process (RLIMIT_AS)
    nproc: int = 64            # processes of the sandbox (RLIMIT_NPROC, see module doc)
    fsize_mb: int = 16         # largest file written, captured output included
    nofile: int = 256          # open files per process

    def check(self) -> None:
        for name, lo, hi in (("cpu_s", 1, 3600), ("memory_mb", 64, 1 << 20),
                             ("nproc", 4, 1 << 16), ("fsize_mb", 1, 1 << 16),
                             ("nofile", 16, 1 << 16)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
                raise AemError(BAD_VALUE, f"limit {name} must be an integer in {lo}..{hi}")
        if not isinstance(self.wall_s, (int, float)) or not 0 < self.wall_s <= 3600:
            raise AemError(BAD_VALUE, "limit wall_s must be in (0, 3600]")


@dataclass(frozen=True)
class VerifierReport:
    patch_applied: bool
    outcome: str                     # one of OUTCOMES
    exit_code: int | None            # exit status of the test (or patch); None on timeout
    signal: int | None               # the signal that ended it (None on timeout)
    isolation: str                   # "bwrap" | "unshare" | "none"; "" when refused (nothing ran)
    limits: dict                     # limits in force; nproc None when not enforced
    test_command: tuple[str, ...]
    stdout_tail: str                 # last TAIL_BYTES bytes, UTF-8 with replacement
    stderr_tail: str
    repo_hash: bytes                 # SHA-256 of the tar bytes
    patch_hash: bytes                # SHA-256 of the diff (UTF-8)
    output_hash: bytes               # SHA-256 of this report's content (module doc)
    duration_ms: int

    def content_bytes(self) -> bytes:
        """The canonical bytes that ``output_hash`` covers."""
        return _report_content(asdict(self))


def _report_content(d: dict) -> bytes:
    body = {k: (v.hex() if isinstance(v, bytes) else list(v) if isinstance(v, tuple) else v)
            for k, v in d.items() if k not in ("output_hash", "duration_ms")}
    return REPORT_DOMAIN + json.dumps(body, sort_keys=True, separators=(",", ":"),
                                      ensure_ascii=True).encode()


# --- input checks ---------------------------------------------------------------------

def _check_rel_path(p: str, what: str) -> tuple[str, ...]:
    if not p or "\x00" in p or len(p) > MAX_NAME:
        raise AemError(BAD_VALUE, f"{what}: bad path {p[:80]!r}")
    if p.startswith("/"):
        raise AemError(BAD_VALUE, f"{what}: absolute path {p[:80]!r}")
    parts = tuple(x for x in p.split("/") if x not in ("", "."))
    if ".." in parts:
        raise AemError(BAD_VALUE, f"{what}: path with '..' {p[:80]!r}")
    if len(parts) > MAX_DEPTH:
        raise AemError(BAD_VALUE, f"{what}: path too deep {p[:80]!r}")
    return parts


_HUNK = re.compile(r"^@@ -\d+(?:,(\d+))? \+\d+(?:,(\d+))? @@")


def _diff_path(s: str) -> str:
    s = s.split("\t", 1)[0].rstrip("\r")
    if s.startswith('"') and s.endswith('"') and len(s) >= 2:
        s = s[1:-1]
    return s


def check_diff(diff: str) -> bytes:
    """Check a unified diff's size and every file name it names; return its bytes."""
    if not isinstance(diff, str):
        raise AemError(BAD_VALUE, "diff must be a string")
    if len(diff) > MAX_DIFF:
        raise AemError(TOO_LARGE, f"diff larger than {MAX_DIFF} bytes")
    try:
        data = diff.encode("utf-8")
    except UnicodeEncodeError:
        raise AemError(BAD_VALUE, "diff is not valid UTF-8 text") from None
    if len(data) > MAX_DIFF:
        raise AemError(TOO_LARGE, f"diff larger than {MAX_DIFF} bytes")
    if "\x00" in diff:
        raise AemError(BAD_VALUE, "diff contains NUL bytes")
    headers = 0
    lines = diff.split("\n")
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        m = _HUNK.match(line)
        if m:                                   # skip the hunk body by its line counts
            i, _, _ = skip_hunk(lines, i, int(m.group(1) or 1), int(m.group(2) or 1))
            continue
        names: list[str] = []
        if line.startswith(("--- ", "+++ ")):
            names.append(_diff_path(line[4:]))
            headers += line.startswith("+++ ")
        elif line.startswith("diff --git "):
            names.extend(_diff_path(x) for x in line[len("diff --git "):].split(" ")[:2])
        elif line.startswith(("rename from ", "rename to ", "copy from ", "copy to ")):
            names.append(_diff_path(line.split(" ", 2)[2]))
        for n in names:
            if n != "/dev/null":
                _check_rel_path(n, "diff")
    if headers == 0:
        raise AemError(BAD_VALUE, "diff names no file (no '+++' header)")
    return data


def _check_command(cmd: Sequence[str]) -> tuple[str, ...]:
    if isinstance(cmd, (str, bytes)) or not isinstance(cmd, (list, tuple)):
        raise AemError(BAD_VALUE, "test command must be a list of strings")
    if not 1 <= len(cmd) <= MAX_ARGS:
        raise AemError(BAD_VALUE, f"test command must have 1..{MAX_ARGS} arguments")
    for a in cmd:
        if not isinstance(a, str) or not a or len(a) > MAX_ARG_LEN or "\x00" in a:
            raise AemError(BAD_VALUE, f"bad test command argument {str(a)[:80]!r}")
    return tuple(cmd)


def _extract(tar_bytes: bytes, dest: Path) -> None:
    """Extract a plain tar into ``dest`` under the rules in the module doc. All
    members are checked before anything is written."""
    files: dict[tuple[str, ...], tarfile.TarInfo] = {}
    dirs: set[tuple[str, ...]] = set()
    links: dict[tuple[str, ...], str] = {}
    total = 0
    count = 0
    try:
        tf = tarfile.open(fileobj=io.BytesIO(tar_bytes), mode="r:")
        for m in tf:                                  # pass 1: check every header
            count += 1
            if count > MAX_MEMBERS:
                raise AemError(TOO_LARGE, f"repository has more than {MAX_MEMBERS} members")
            name = m.name[:80]
            parts = _check_rel_path(m.name, "repository") if m.name not in (".", "./") else ()
            if not parts:
                if m.isdir():
                    continue
                raise AemError(BAD_VALUE, f"repository: bad member name {name!r}")
            if parts in files or parts in dirs or parts in links:
                raise AemError(BAD_VALUE, f"repository: duplicate member {name!r}")
            if m.isdir():
                dirs.add(parts)
            elif m.issym():
                target = m.linkname
                if (not target or target.startswith("/") or "\x00" in target
                        or len(target) > MAX_NAME):
                    raise AemError(BAD_VALUE, f"repository: link {name!r} points outside the tree")
                resolved = posixpath.normpath(posixpath.join("/".join(parts[:-1]), target))
                if resolved == ".." or resolved.startswith("../"):
                    raise AemError(BAD_VALUE, f"repository: link {name!r} points outside the tree")
                links[parts] = target
            elif m.isreg() and not m.issparse():
                total += m.size
                if total > MAX_UNPACKED:
                    raise AemError(TOO_LARGE, f"repository unpacks to more than {MAX_UNPACKED} bytes")
                files[parts] = m
            else:
                raise AemError(BAD_VALUE, f"repository: member {name!r} is not a file, "
                                          f"directory or symlink")
        if not files:
            raise AemError(BAD_VALUE, "repository has no files")
        for parts in (*files, *dirs, *links):
            for k in range(1, len(parts)):
                if parts[:k] in files or parts[:k] in links:
                    raise AemError(BAD_VALUE, f"repository: member under a file or link "
                                              f"{'/'.join(parts)[:80]!r}")
        for parts in sorted(dirs):                    # pass 2: write
            dest.joinpath(*parts).mkdir(parents=True, exist_ok=True)
        for parts, m in files.items():
            path = dest.joinpath(*parts)
            path.parent.mkdir(parents=True, exist_ok=True)
            src = tf.extractfile(m)
            if src is None:
                raise AemError(BAD_VALUE, f"repository: unreadable member {m.name[:80]!r}")
            with open(path, "xb") as out:
                remaining = m.size
                while remaining:
                    chunk = src.read(min(remaining, 1 << 20))
                    if not chunk:
                        raise AemError(BAD_VALUE, "repository: truncated member")
                    out.write(chunk)
                    remaining -= len(chunk)
            os.chmod(path, 0o755 if m.mode & 0o111 else 0o644)
    except AemError:
        raise
    except Exception as e:  # noqa: BLE001 - any parse failure of hostile bytes
        raise AemError(BAD_VALUE, f"repository is not a valid tar: {type(e).__name__}: {e}") from None
    for parts, target in links.items():
        path = dest.joinpath(*parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, path)
    root = os.path.realpath(dest)
    for parts in links:                  # chains of links: resolve them for real
        real = os.path.realpath(dest.joinpath(*parts))
        if real != root and not real.startswith(root + os.sep):
            raise AemError(BAD_VALUE, f"repository: link {'/'.join(parts)[:80]!r} resolves "
                                      f"outside the tree")


# --- the sandbox ----------------------------------------------------------------------

# The init program: runs inside the sandbox's namespaces, as (namespace) root when
# the sandbox has to drop to a private uid; sets up private mounts (unshare mode),
# drops privileges, sets the resource limits and executes the command. It reports
# on the status fd: b"R" once running, b"E<message>" if it cannot run the command.
_INIT = r"""
import ctypes, json, os, resource, sys
cfg = json.loads(sys.argv[1])
argv = sys.argv[2:]
st = cfg["status_fd"]
def fail(msg):
    try:
        os.write(st, b"E" + msg.encode("utf-8", "replace")[:500])
    finally:
        os._exit(127)
os.write(st, b"R")
libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
def mount(src, dst, fstype, flags, data=None):
    enc = lambda s: None if s is None else s.encode()
    if libc.mount(enc(src), enc(dst), enc(fstype), flags, enc(data)) != 0:
        fail("mount %s: %s" % (dst, os.strerror(ctypes.get_errno())))
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC = 1, 2, 4, 8, 32, 4096, 16384
ST = ((os.ST_NOSUID, MS_NOSUID), (os.ST_NODEV, MS_NODEV), (os.ST_NOEXEC, MS_NOEXEC),
      (os.ST_NOATIME, 1024), (os.ST_NODIRATIME, 2048), (os.ST_RELATIME, 1 << 21))
m = cfg.get("mounts")
if m:
    os.umask(0o022)
    keep = [(p, os.open(p, os.O_PATH | os.O_DIRECTORY), ro) for p, ro in m["keep"]]
    for d, mode in m["tmpfs"]:
        if os.path.isdir(d):
            mount("tmpfs", d, "tmpfs", MS_NOSUID | MS_NODEV, "mode=%o,size=%dk" % (mode, m["tmpfs_kb"]))
    for p, fd, ro in keep:
        os.makedirs(p, exist_ok=True)
        mount("/proc/self/fd/%d" % fd, p, None, MS_BIND | MS_REC)
        if ro:
            f = os.statvfs(p).f_flag
            extra = sum(ms for st_flag, ms in ST if f & st_flag)
            mount(None, p, None, MS_BIND | MS_REMOUNT | MS_RDONLY | extra)
        os.close(fd)
if cfg.get("drop"):
    uid, gid = cfg["drop"]
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
if libc.prctl(38, 1, 0, 0, 0) != 0:
    fail("PR_SET_NO_NEW_PRIVS failed")
try:
    os.chdir(cfg["chdir"])
except OSError as e:
    fail("sandbox setup: %s" % e)
child = os.fork() if cfg.get("reaper") else 0
if child:
    # pid 1 of the namespace: the kernel shields it from the rlimit signals, so the
    # command runs as its child; reap everything, exit with the command's status
    os.close(st)
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            os._exit(1)
        if pid == child:
            os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))
try:
    for name, soft, hard in cfg["rlimits"]:
        resource.setrlimit(getattr(resource, name), (soft, hard))
except OSError as e:
    fail("sandbox setup: %s" % e)
os.set_inheritable(st, False)
try:
    os.execvp(argv[0], argv)
except OSError as e:
    fail("cannot run %s: %s" % (argv[0], e.strerror))
"""


@lru_cache(maxsize=None)
def _tool(name: str) -> str | None:
    return shutil.which(name, path="/usr/bin:/bin:/usr/sbin:/sbin:/usr/local/bin")


def _bwrap_ns_flags(root: bool) -> list[str]:
    if root:
        # No user namespace: a root-created one maps uid 0 to real root, which the
        # kernel exempts from RLIMIT_NPROC. The init program drops to a private uid
        # instead, which needs CAP_SETUID/CAP_SETGID (bwrap drops all others).
        return ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts",
                "--unshare-cgroup-try", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    return ["--unshare-all"]


def _unshare_flags(root: bool) -> list[str]:
    flags = ["--net", "--pid", "--mount", "--ipc", "--uts", "--fork", "--kill-child",
             "--mount-proc", "--propagation", "private"]
    return flags if root else ["--map-root-user"] + flags


@lru_cache(maxsize=None)
def _probe(level: str, root: bool) -> bool:
    if level == "bwrap":
        tool = _tool("bwrap")
        argv = [tool, *_bwrap_ns_flags(root), "--die-with-parent", "--ro-bind", "/", "/",
                "--proc", "/proc", "--dev", "/dev", "true"] if tool else None
    elif level == "unshare":
        tool = _tool("unshare")
        argv = [tool, *_unshare_flags(root), "true"] if tool else None
    else:
        return True
    if argv is None:
        return False
    try:
        r = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return r.returncode == 0


def available_isolation() -> str:
    """The strongest isolation that works on this machine: "bwrap", "unshare" or "none"."""
    root = os.geteuid() == 0
    for level in ("bwrap", "unshare"):
        if _probe(level, root):
            return level
    return "none"


def _python_dirs() -> list[str]:
    """Directories the sandbox needs to run this Python (read-only)."""
    out: list[str] = []
    for p in (sys.prefix, sys.base_prefix, os.path.dirname(os.path.realpath(sys.executable))):
        p = os.path.realpath(p)
        if p.startswith("/usr/") or p == "/usr":
            continue
        if not any(p == q or p.startswith(q + "/") for q in out):
            out = [q for q in out if not q.startswith(p + "/")] + [p]
    return sorted(out)


def _cover_points(paths: list[str], uid: int) -> list[str]:
    """For a sandbox running as ``uid``: the top-most ancestors of ``paths`` that it
    cannot traverse. Mounting a tmpfs over them and binding ``paths`` back makes the
    paths reachable and hides everything else in those directories."""
    out: set[str] = set()
    for p in paths:
        cur = "/"
        for part in p.strip("/").split("/")[:-1]:
            cur = posixpath.join(cur, part)
            try:
                st = os.stat(cur)
            except OSError:
                break
            if st.st_uid != uid and not st.st_mode & stat.S_IXOTH:
                out.add(cur)
                break
    return sorted(out)


_uids_lock = threading.Lock()
_uids_in_use: set[int] = set()


def _take_uid() -> int:
    with _uids_lock:
        while True:
            uid = SANDBOX_UID_BASE + secrets.randbelow(1 << 24)
            if uid not in _uids_in_use:
                _uids_in_use.add(uid)
                return uid


def _release_uid(uid: int) -> None:
    with _uids_lock:
        _uids_in_use.discard(uid)


def _kill_uid(uid: int) -> None:
    """SIGKILL every live process owned by ``uid`` (root only), until none is left."""
    for _ in range(200):
        found = False
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                if os.stat(f"/proc/{name}").st_uid != uid:
                    continue
                with open(f"/proc/{name}/stat", "rb") as f:
                    if f.read().rpartition(b")")[2][1:2] in (b"Z", b"X"):
                        continue            # already dead, waiting for its parent
                found = True
                os.kill(int(name), signal.SIGKILL)
            except (FileNotFoundError, ProcessLookupError):
                pass
        if not found:
            return
        time.sleep(0.005)


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
    except (FileNotFoundError, ProcessLookupError, ValueError):
        pass
    return out


def _exited(pid: int, timeout: float) -> bool:
    """Wait up to ``timeout`` for child ``pid`` to exit, without reaping it (so its
    pid, which is also its process group's id, cannot be reused meanwhile)."""
    end = time.monotonic() + timeout
    while True:
        if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is not None:
            return True
        if time.monotonic() >= end:
            return False
        time.sleep(0.002)


def _stop(proc: subprocess.Popen, uid: int | None) -> None:
    """End a sandbox and everything in it. When it is still running, stop it from
    the inside out, so that every process is reaped by its own parent: kill the
    sandbox's processes (as root: every process of its uid), then the leader's
    children (the pid namespace's init: its death kills the whole namespace), and
    let the leader (bwrap/unshare) exit. Then kill what is left of the process
    group (stragglers in mode "none", or a leader that did not exit) and reap."""
    if not _exited(proc.pid, 0):
        if uid is not None:
            _kill_uid(uid)
        for child in _children(proc.pid):
            try:
                os.kill(child, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        _exited(proc.pid, 2.0)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
    if uid is not None:
        _kill_uid(uid)


def _tail(path: Path) -> str:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - TAIL_BYTES))
        return f.read(TAIL_BYTES).decode("utf-8", errors="replace")


@dataclass
class _Run:
    exit_code: int | None
    signal: int | None
    timed_out: bool
    started: bool
    exec_error: str | None
    stdout: str
    stderr: str


@dataclass
class _Sandbox:
    level: str
    ws: Path                                  # host workspace (0700): task/ (0700), out/
    uid: int | None                           # private uid when running as root
    limits: Limits
    python_dirs: list[str] = field(default_factory=list)

    @property
    def task(self) -> Path:
        return self.ws / "task"

    def inner(self, rel: str) -> str:
        """A path under the task directory as the sandboxed process sees it."""
        base = "/task" if self.level == "bwrap" else str(self.task)
        return posixpath.join(base, rel) if rel else base

    def nproc_enforced(self) -> bool:
        return self.level != "none"

    def limits_applied(self) -> dict:
        lim = self.limits
        return {"cpu_s": lim.cpu_s, "wall_ms": int(lim.wall_s * 1000), "memory_mb": lim.memory_mb,
                "nproc": lim.nproc if self.nproc_enforced() else None,
                "fsize_mb": lim.fsize_mb, "nofile": lim.nofile}

    def env(self) -> dict[str, str]:
        bins = [self.inner("bin")]             # python, python3 -> this interpreter
        for p in (os.path.dirname(sys.executable), os.path.join(sys.base_prefix, "bin")):
            if p not in bins:
                bins.append(p)
        return {"PATH": ":".join(bins + ["/usr/local/bin", "/usr/bin", "/bin"]),
                "HOME": self.inner("tmp"), "TMPDIR": self.inner("tmp"),
                "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "PYTHONHASHSEED": "0",
                "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1"}

    def argv(self, cmd: Sequence[str], status_fd: int) -> list[str]:
        lim = self.limits
        rl = [["RLIMIT_CPU", lim.cpu_s, lim.cpu_s + 1],
              ["RLIMIT_AS", lim.memory_mb << 20, lim.memory_mb << 20],
              ["RLIMIT_FSIZE", lim.fsize_mb << 20, lim.fsize_mb << 20],
              ["RLIMIT_NOFILE", lim.nofile, lim.nofile],
              ["RLIMIT_CORE", 0, 0]]
        if self.nproc_enforced():
            rl.append(["RLIMIT_NPROC", lim.nproc, lim.nproc])
        cfg: dict = {"status_fd": status_fd, "rlimits": rl, "chdir": self.inner("repo"),
                     "drop": [self.uid, self.uid] if self.uid is not None else None}
        root = os.geteuid() == 0
        if self.level == "unshare":
            keep = [[str(self.task), False]] + [[p, True] for p in self.python_dirs]
            tmp = [["/tmp", 0o1777], ["/var/tmp", 0o1777], ["/dev/shm", 0o1777]]
            if self.uid is not None:
                tmp += [[c, 0o755] for c in _cover_points([k for k, _ in keep], self.uid)]
            cfg["mounts"] = {"keep": keep, "tmpfs": tmp, "tmpfs_kb": 64 << 10}
            cfg["reaper"] = True
        init = [sys.executable, "-I", "-S", "-c", _INIT, json.dumps(cfg)]
        if self.level == "none":
            return init + list(cmd)
        if self.level == "unshare":
            return [_tool("unshare"), *_unshare_flags(root), "--", *init, *cmd]
        argv = [_tool("bwrap"), *_bwrap_ns_flags(root), "--die-with-parent", "--new-session",
                "--ro-bind", "/usr", "/usr"]
        for d in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
            if os.path.islink(d):
                argv += ["--symlink", os.readlink(d), d]
            elif os.path.isdir(d):
                argv += ["--ro-bind", d, d]
        made: set[str] = set()
        for p in self.python_dirs:
            # privileged bwrap copies the modes of a bound path's host ancestors
            # (/root is 0700): create them traversable first
            parts = p.strip("/").split("/")
            for k in range(1, len(parts)):
                a = "/" + "/".join(parts[:k])
                if a not in made and a not in ("/usr", "/bin", "/sbin", "/lib", "/lib64"):
                    made.add(a)
                    argv += ["--perms", "0755", "--dir", a]
            argv += ["--ro-bind", p, p]
        argv += ["--proc", "/proc", "--dev", "/dev", "--bind", str(self.task), "/task",
                 "--chdir", self.inner("repo"), "--remount-ro", "/", "--", *init, *cmd]
        return argv

    def run(self, cmd: Sequence[str], wall_s: float, name: str,
            cancel: threading.Event | None) -> _Run:
        out_path = self.ws / "out" / f"{name}.stdout"
        err_path = self.ws / "out" / f"{name}.stderr"
        r_fd, w_fd = os.pipe()
        try:
            with open(out_path, "wb") as out, open(err_path, "wb") as err:
                proc = subprocess.Popen(
                    self.argv(cmd, w_fd), stdin=subprocess.DEVNULL, stdout=out,
                    stderr=err, env=self.env(), cwd="/", pass_fds=(w_fd,),
                    process_group=0)
            os.close(w_fd)
            w_fd = -1
            os.set_blocking(r_fd, False)
            status = bytearray()
            deadline = time.monotonic() + wall_s
            timed_out = False
            try:
                while not _exited(proc.pid, POLL_S):
                    status += _read_available(r_fd)
                    if time.monotonic() >= deadline or (cancel is not None and cancel.is_set()):
                        timed_out = True
                        break
            finally:
                _stop(proc, self.uid)
            status += _read_available(r_fd)
        finally:
            os.close(r_fd)
            if w_fd >= 0:
                os.close(w_fd)
        rc = proc.returncode
        sig = -rc if rc < 0 else (rc - 128 if 128 < rc < 128 + 65 else None)
        if timed_out:                    # what our kill left behind says nothing
            rc = sig = None
        exec_error = None
        if status[1:2] == b"E":
            exec_error = status[2:].decode("utf-8", "replace")
        return _Run(exit_code=rc, signal=sig, timed_out=timed_out,
                    started=status[:1] == b"R", exec_error=exec_error,
                    stdout=_tail(out_path), stderr=_tail(err_path))


def _read_available(fd: int) -> bytes:
    chunks = []
    while True:
        try:
            b = os.read(fd, 4096)
        except BlockingIOError:
            break
        if not b:
            break
        chunks.append(b)
    return b"".join(chunks)


def _rmtree(path: Path) -> None:
    def onerror(func, p, exc):
        try:
            os.chmod(p, 0o700)
            parent = os.path.dirname(p)
            os.chmod(parent, 0o700)
            func(p)
        except OSError:
            pass
    shutil.rmtree(path, onerror=onerror)


def _chown_tree(root: Path, uid: int) -> None:
    os.lchown(root, uid, uid)
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            os.lchown(os.path.join(dirpath, n), uid, uid)


# --- the patch policy -----------------------------------------------------------------

def _through_link(repo: Path, diff: str) -> str:
    """A path the diff names that runs through a symlink of the tree: the
    policy judged the name, and GNU patch would write where the link points."""
    names, _ = diff_names(diff)
    for name in names:
        if name == "/dev/null":
            continue
        for parts in readings(name):
            for k in range(1, len(parts) + 1):
                if repo.joinpath(*parts[:k]).is_symlink():
                    return f"the patch touches {'/'.join(parts)[:48]!r} through a symlink of the repository"
    return ""


def _refused(repo_tar: bytes, diff: object, cmd: tuple[str, ...], limits: Limits, problem: str,
             t0: float) -> VerifierReport:
    try:
        patch_hash = hashlib.sha256(diff.encode("utf-8")).digest() if isinstance(diff, str) else b""
    except UnicodeEncodeError:
        patch_hash = b""
    fields = dict(
        patch_applied=False, outcome="refused", exit_code=None, signal=None, isolation="",
        limits={"cpu_s": limits.cpu_s, "wall_ms": int(limits.wall_s * 1000),
                "memory_mb": limits.memory_mb, "nproc": None, "fsize_mb": limits.fsize_mb,
                "nofile": limits.nofile},
        test_command=cmd, stdout_tail="", stderr_tail=f"[aem] refused: {problem}",
        repo_hash=hashlib.sha256(repo_tar).digest(), patch_hash=patch_hash, output_hash=b"",
        duration_ms=int((time.monotonic() - t0) * 1000))
    fields["output_hash"] = hashlib.sha256(_report_content(fields)).digest()
    return VerifierReport(**fields)


# --- the verifier ---------------------------------------------------------------------

def run_code_patch(
    repo_tar: bytes,
    diff: str,
    test_command: Sequence[str],
    *,
    limits: Limits = Limits(),
    isolation: str = "auto",
    cancel: threading.Event | None = None,
    judge: str = "tests",
    policy=None,
) -> VerifierReport:
    """Apply ``diff`` to the repository in ``repo_tar`` and run ``test_command`` in
    it, isolated. Blocking; takes at most about ``limits.wall_s`` plus the patch
    step (<= 30 s). Setting ``cancel`` stops the run (outcome "timeout").

    ``isolation``: "auto" (the best available, never "none"), or one of "bwrap",
    "unshare", "none". Raises ``AemError``: BAD_VALUE/TOO_LARGE for bad input,
    UNAVAILABLE when the isolation asked for (or any, for "auto") or GNU patch is
    missing.

    ``judge``: "tests" (the default) or "applies" (module-level ``JUDGES``).
    ``policy``: a protocol.mesh.PatchPolicy. With one, a patch it does not
    permit (``protocol.patchpolicy.check_patch``), or one that names a path
    through a symlink of the repository, gets outcome "refused" before
    anything runs, and a diff that is not even a valid diff is refused
    rather than raised."""
    t0 = time.monotonic()
    if not isinstance(repo_tar, (bytes, bytearray, memoryview)):
        raise AemError(BAD_VALUE, "repository must be tar bytes")
    repo_tar = bytes(repo_tar)
    if len(repo_tar) > MAX_REPO_TAR:
        raise AemError(TOO_LARGE, f"repository tar larger than {MAX_REPO_TAR} bytes")
    if policy is None:
        diff_bytes = check_diff(diff)
    elif not isinstance(policy, PatchPolicy):
        raise AemError(BAD_VALUE, "policy must be a protocol.mesh.PatchPolicy")
    if judge not in JUDGES:
        raise AemError(BAD_VALUE, f"judge must be one of {JUDGES}")
    cmd = _check_command(test_command)
    if not isinstance(limits, Limits):
        raise AemError(BAD_VALUE, "limits must be a Limits")
    limits.check()
    if isolation != "auto" and isolation not in ISOLATION_LEVELS:
        raise AemError(BAD_VALUE, f"isolation must be 'auto' or one of {ISOLATION_LEVELS}")
    if policy is not None:
        problem = check_patch(policy, diff)
        if problem:
            return _refused(repo_tar, diff, cmd, limits, problem, t0)
        diff_bytes = check_diff(diff)

    repo_hash = hashlib.sha256(repo_tar).digest()
    patch_hash = hashlib.sha256(diff_bytes).digest()
    root = os.geteuid() == 0
    ws = Path(tempfile.mkdtemp(prefix="aem-codepatch-"))
    uid = None
    try:
        # 0700 all the way: the payer's repository and patch are nobody
        # else's business on this machine. The sandbox's own uid (as root)
        # owns task/ after the chown below; it never needs to traverse ws:
        # bwrap binds task/ at /task, and the unshare mode mounts over the
        # ancestors it cannot traverse (_cover_points) and binds task/ back.
        os.chmod(ws, 0o700)
        (ws / "out").mkdir(mode=0o700)
        task = ws / "task"
        task.mkdir(mode=0o700)
        os.chmod(task, 0o700)                 # mkdir's mode is cut by the umask; be explicit
        (task / "repo").mkdir()
        (task / "tmp").mkdir()
        (task / "bin").mkdir()
        for name in ("python", "python3"):
            os.symlink(sys.executable, task / "bin" / name)
        _extract(repo_tar, task / "repo")     # bad input is BAD_VALUE on any machine
        if policy is not None:
            problem = _through_link(task / "repo", diff)
            if problem:
                return _refused(repo_tar, diff, cmd, limits, problem, t0)
        if isolation == "auto":
            level = available_isolation()
            if level == "none":
                raise AemError(UNAVAILABLE, "no sandbox on this machine: install bubblewrap "
                                            "(Debian package 'bubblewrap')")
        else:
            level = isolation
            if not _probe(level, root):
                raise AemError(UNAVAILABLE, f"isolation {level!r} does not work on this machine")
        if _tool("patch") is None:
            raise AemError(UNAVAILABLE, "GNU patch is not installed (Debian package 'patch')")
        if root and level != "none":
            uid = _take_uid()
        (task / "patch.diff").write_bytes(diff_bytes)
        if uid is not None:
            _chown_tree(task, uid)
        box = _Sandbox(level=level, ws=ws, uid=uid, limits=limits,
                       python_dirs=_python_dirs())

        def report(patch_applied: bool, outcome: str, run: _Run) -> VerifierReport:
            fields = dict(
                patch_applied=patch_applied, outcome=outcome, exit_code=run.exit_code,
                signal=run.signal, isolation=level, limits=box.limits_applied(),
                test_command=cmd, stdout_tail=run.stdout,
                stderr_tail=run.stderr + (f"\n[aem] {run.exec_error}" if run.exec_error else ""),
                repo_hash=repo_hash, patch_hash=patch_hash, output_hash=b"",
                duration_ms=int((time.monotonic() - t0) * 1000))
            fields["output_hash"] = hashlib.sha256(_report_content(fields)).digest()
            return VerifierReport(**fields)

        patch_cmd = ["patch", "-p1", "--batch", "--forward", "--no-backup-if-mismatch",
                     "--reject-file=-", "-i", box.inner("patch.diff")]
        pr = box.run(patch_cmd, min(PATCH_WALL_S, max(limits.wall_s, 5.0)), "patch", cancel)
        if pr.timed_out:
            return report(False, "timeout", pr)
        if not pr.started or pr.exec_error:
            return report(False, "error", pr)
        if pr.exit_code != 0:
            return report(False, "patch_failed", pr)
        if judge == "applies":
            return report(True, "passed", pr)
        tr = box.run(cmd, limits.wall_s, "test", cancel)
        if tr.timed_out:
            outcome = "timeout"
        elif not tr.started or tr.exec_error:
            outcome = "error"
        elif tr.exit_code == 0:
            outcome = "passed"
        elif tr.signal is not None:
            outcome = "killed"
        else:
            outcome = "failed"
        return report(True, outcome, tr)
    finally:
        if uid is not None:
            _kill_uid(uid)
            _release_uid(uid)
        _rmtree(ws)


async def arun_code_patch(
    repo_tar: bytes,
    diff: str,
    test_command: Sequence[str],
    *,
    limits: Limits = Limits(),
    isolation: str = "auto",
    limiter: trio.CapacityLimiter | None = None,
    judge: str = "tests",
    policy=None,
) -> VerifierReport:
    """:func:`run_code_patch` in a worker thread (under ``limiter`` if given). If the
    caller is cancelled, the sandbox is killed within a poll interval and the
    cancellation propagates at once."""
    cancel = threading.Event()
    try:
        return await trio.to_thread.run_sync(
            lambda: run_code_patch(repo_tar, diff, test_command, limits=limits,
                                   isolation=isolation, cancel=cancel, judge=judge,
                                   policy=policy),
            limiter=limiter, abandon_on_cancel=True)
    finally:
        cancel.set()
