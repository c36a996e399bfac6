"""The expert capsules a node hosts, kept in ``<home>/capsules/``.

Per capsule two files named by the capsule id (hex): ``ID.manifest``, the
signed ExpertCapsuleManifest's canonical bytes, and ``ID.json``, the local
serving settings (artefact path, price, roles, concurrency, and the model
file's size and modification time when it was added) that are nobody else's
business. Both are written atomically; a half-written capsule never appears.

At start the node serves only capsules whose model file is still the one the
manifest describes (:func:`load_capsules`): the file must exist and have the
manifest's size; when its modification time is the one recorded, that is
enough (a start must not read gigabytes), otherwise the file is hashed again
(with progress in the log) and must match the manifest's content hash. A
missing or changed file is a warning and the capsule is withdrawn: advertising
it would fail every task sent to it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from aemd.cliutil import fmt_credits
from aemd.home import Home
from aemd.identity import atomic_write
from protocol import errors
from protocol.errors import AemError
from protocol.mesh import ROLES, ExpertCapsuleManifest

MAX_CAPSULES = 64
HASH_CHUNK = 1 << 20
HASH_PROGRESS_BYTES = 256 << 20   # files above this log their re-hash progress

log = logging.getLogger("aemd.capsules")


@dataclass(frozen=True)
class Serving:
    path: str                 # the GGUF file; empty for a code-patch expert
    price: int                # micro-credits per task
    roles: tuple[str, ...]
    max_concurrency: int
    mtime_ns: int = 0         # the model file's mtime when last verified (0: never)


@dataclass(frozen=True)
class LocalCapsule:
    manifest: ExpertCapsuleManifest
    serving: Serving

    @property
    def id(self) -> bytes:
        return self.manifest.id


def save_capsule(home: Home, cap: LocalCapsule) -> None:
    home.capsules.mkdir(parents=True, exist_ok=True, mode=0o700)
    existing = list_capsules(home)
    if len(existing) >= MAX_CAPSULES and all(c.id != cap.id for c in existing):
        raise AemError(errors.REFUSED, f"a node hosts at most {MAX_CAPSULES} capsules")
    name = cap.id.hex()
    if cap.manifest.kind == "gguf" and not cap.serving.mtime_ns:
        # Remember the file as it is now (it was just hashed for the manifest),
        # so a later start can tell it unchanged without hashing it again.
        try:
            st = os.stat(cap.serving.path)
            if st.st_size == cap.manifest.size_bytes:
                cap = LocalCapsule(cap.manifest, replace(cap.serving, mtime_ns=st.st_mtime_ns))
        except OSError:
            pass
    settings = asdict(cap.serving)
    settings["roles"] = list(settings["roles"])
    atomic_write(home.capsules / f"{name}.json", json.dumps(settings, indent=2).encode())
    atomic_write(home.capsules / f"{name}.manifest", cap.manifest.encode())


def _load_one(manifest_path: Path) -> LocalCapsule:
    m = ExpertCapsuleManifest.decode(manifest_path.read_bytes()[: ExpertCapsuleManifest.MAX_SIZE + 1])
    m.verify()
    raw = json.loads(manifest_path.with_suffix(".json").read_text())
    roles = tuple(raw["roles"])
    if not set(roles) <= set(ROLES) or type(raw["price"]) is not int or raw["price"] < 0:
        raise ValueError("bad serving settings")
    mtime = raw.get("mtime_ns", 0)
    if type(mtime) is not int or mtime < 0:
        raise ValueError("bad mtime_ns")
    return LocalCapsule(m, Serving(path=str(raw["path"]), price=raw["price"], roles=roles,
                                   max_concurrency=max(1, int(raw["max_concurrency"])), mtime_ns=mtime))


def list_capsules(home: Home, on_damaged=None) -> list[LocalCapsule]:
    """Every capsule in the home, sorted by id; a damaged one is an error
    naming its file, not a silent omission, or, with ``on_damaged``, handed
    to it (an AemError) and skipped: the daemon serves the others."""
    if not home.capsules.is_dir():
        return []
    out = []
    for p in sorted(home.capsules.glob("*.manifest")):
        try:
            try:
                out.append(_load_one(p))
            except AemError as exc:
                raise AemError(exc.code, f"capsule {p.name}: {exc.detail}") from None
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise AemError(errors.CONFIG, f"capsule {p.name} is damaged: {exc}") from None
        except AemError as exc:
            if on_damaged is None:
                raise
            on_damaged(exc)
    return out


def _hash_file(path: str, size: int, label: str) -> bytes:
    h = hashlib.sha256()
    done, step = 0, max(HASH_PROGRESS_BYTES, size // 10)
    next_note = step
    with open(path, "rb") as fh:
        while chunk := fh.read(HASH_CHUNK):
            h.update(chunk)
            done += len(chunk)
            if size > HASH_PROGRESS_BYTES and done >= next_note:
                log.info("hashing %s: %d%% of %d MB", label, 100 * done // size, size >> 20)
                next_note += step
    return h.digest()


def check_capsule(home: Home, cap: LocalCapsule) -> tuple[LocalCapsule, str]:
    """The capsule (with its verified mtime recorded) and "" when its model
    file is the manifest's, else the capsule and why it cannot be served."""
    m = cap.manifest
    if m.kind != "gguf":
        return cap, ""
    path = cap.serving.path
    try:
        st = os.stat(path)
    except OSError as exc:
        return cap, f"model file {path} is missing ({exc.strerror})"
    if not os.path.isfile(path):
        return cap, f"model file {path} is not a regular file"
    if st.st_size != m.size_bytes:
        return cap, f"model file {path} changed: {st.st_size} bytes, the manifest says {m.size_bytes}"
    if cap.serving.mtime_ns and st.st_mtime_ns == cap.serving.mtime_ns:
        return cap, ""
    log.info("model file %s was modified since it was added; checking its hash", path)
    try:
        digest = _hash_file(path, st.st_size, os.path.basename(path))
    except OSError as exc:
        return cap, f"model file {path} is unreadable ({exc.strerror})"
    if digest != m.content_hash:
        return cap, f"model file {path} changed: its hash is not the manifest's"
    cap = LocalCapsule(m, replace(cap.serving, mtime_ns=st.st_mtime_ns))
    try:
        save_capsule(home, cap)       # the same content: the next start need not hash it
    except (AemError, OSError) as exc:
        log.info("capsule %s: could not record the checked file: %s", cap.id.hex()[:16], exc)
    return cap, ""


def load_capsules(home: Home) -> list[LocalCapsule]:
    """The capsules this node can serve now: :func:`list_capsules` less those
    whose model file is missing or changed (each a warning), one log line per
    capsule loaded. Blocking (it may hash a file): run it in a thread."""
    out = []

    def damaged(exc: AemError) -> None:
        log.warning("%s: not served; fix or remove the file", exc.detail)
    for cap in list_capsules(home, on_damaged=damaged):
        cap, problem = check_capsule(home, cap)
        m = cap.manifest
        if problem:
            log.warning("capsule %s (%s) withdrawn, not advertised: %s; fix the file or "
                        "`aemctl expert remove %s`", cap.id.hex()[:16], m.name, problem, cap.id.hex()[:16])
            continue
        log.info("capsule %s loaded: %s %s  domain %s  price %s", cap.id.hex()[:16], m.kind, m.name,
                 m.domain, fmt_credits(cap.serving.price))
        out.append(cap)
    return out


def find_capsule(home: Home, prefix: str) -> LocalCapsule:
    prefix = prefix.lower()
    found = [c for c in list_capsules(home) if c.id.hex().startswith(prefix)]
    if not found:
        raise AemError(errors.NOT_FOUND, f"no capsule {prefix!r} in {home.capsules}")
    if len(found) > 1:
        raise AemError(errors.BAD_VALUE, f"{prefix!r} names {len(found)} capsules; give more of the id")
    return found[0]


def remove_capsule(home: Home, prefix: str) -> LocalCapsule:
    cap = find_capsule(home, prefix)
    name = cap.id.hex()
    (home.capsules / f"{name}.manifest").unlink(missing_ok=True)
    (home.capsules / f"{name}.json").unlink(missing_ok=True)
    return cap
