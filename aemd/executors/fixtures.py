"""The code-patch fixture: a tiny repository with a bug, and patches for it.

The files live in ``aemd/executors/codepatch_fixture/`` (package data, so an installed
``aemd demo`` finds them too):

- ``repo/``: ``calc.py`` whose ``add`` subtracts, and ``test_calc.py`` (stdlib
  ``unittest``, so nothing needs installing inside the sandbox), which fails;
- ``good.patch`` fixes the bug (tests pass); ``bad.patch`` changes it wrongly
  (tests fail);
- hostile patches, each also fixing the bug so only the hostile part can fail:
  ``net`` connects to ``127.0.0.1:@PORT@``, ``escape`` writes
  ``/tmp/aem-escape-@TOKEN@`` and ``/var/tmp/aem-escape-@TOKEN@``, ``forkbomb``
  forks forever, ``infinite`` loops forever.

:func:`build_tar` packs any directory as a deterministic tar (sorted names, mtime 0,
uid/gid 0, no user names, modes 0644/0755), the repository snapshot format the
verifier takes.
"""

from __future__ import annotations

import io
import os
import tarfile
from importlib import resources
from pathlib import Path

from protocol.errors import BAD_VALUE, NOT_FOUND, AemError

__all__ = ["FIXTURE_TEST_COMMAND", "PATCH_NAMES", "build_tar", "fixture_dir",
           "fixture_repo_tar", "fixture_patch"]

FIXTURE_TEST_COMMAND = ("python", "-m", "unittest", "-q")
PATCH_NAMES = ("good", "bad", "net", "escape", "forkbomb", "infinite")


def fixture_dir() -> Path:
    """The fixture folder on disk."""
    return Path(str(resources.files("aemd.executors") / "codepatch_fixture"))


def build_tar(root: str | os.PathLike[str]) -> bytes:
    """A deterministic uncompressed tar of the directory ``root`` (files, directories
    and symlinks; ``__pycache__`` and ``*.pyc`` skipped), names relative to it."""
    root = Path(root)
    if not root.is_dir():
        raise AemError(NOT_FOUND, f"no directory {root}")
    entries: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        rel = os.path.relpath(dirpath, root)
        for n in dirnames + filenames:
            if n.endswith(".pyc"):
                continue
            entries.append(n if rel == "." else f"{rel}/{n}".replace(os.sep, "/"))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name in sorted(entries):
            path = root / name
            info = tarfile.TarInfo(name)
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            if path.is_symlink():
                info.type = tarfile.SYMTYPE
                info.linkname = os.readlink(path)
                info.mode = 0o777
                tf.addfile(info)
            elif path.is_dir():
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                tf.addfile(info)
            elif path.is_file():
                data = path.read_bytes()
                info.size = len(data)
                info.mode = 0o755 if os.access(path, os.X_OK) else 0o644
                tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def fixture_repo_tar() -> bytes:
    """The fixture repository as deterministic tar bytes."""
    return build_tar(fixture_dir() / "repo")


def fixture_patch(name: str, **subst: object) -> str:
    """The text of a fixture patch; ``@KEY@`` placeholders are replaced by
    ``subst[key.lower()]`` (``port`` defaults to 9, ``token`` to "demo")."""
    if name not in PATCH_NAMES:
        raise AemError(BAD_VALUE, f"no fixture patch {name!r}")
    text = (fixture_dir() / f"{name}.patch").read_text(encoding="utf-8")
    values = {"port": 9, "token": "demo", **subst}
    for k, v in values.items():
        text = text.replace(f"@{k.upper()}@", str(v))
    return text
