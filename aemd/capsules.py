"""The expert capsules a node hosts, kept in ``<home>/capsules/``.

Per capsule two files named by the capsule id (hex): ``ID.manifest``, the
signed ExpertCapsuleManifest's canonical bytes, and ``ID.json``, the local
serving settings (artefact path, price, roles, concurrency) that are nobody
else's business. Both are written atomically; a half-written capsule never
appears.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from aemd.home import Home
from aemd.identity import atomic_write
from protocol import errors
from protocol.errors import AemError
from protocol.mesh import ROLES, ExpertCapsuleManifest

MAX_CAPSULES = 64


@dataclass(frozen=True)
class Serving:
    path: str                 # the GGUF file; empty for a code-patch expert
    price: int                # micro-credits per task
    roles: tuple[str, ...]
    max_concurrency: int


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
    return LocalCapsule(m, Serving(path=str(raw["path"]), price=raw["price"], roles=roles,
                                   max_concurrency=max(1, int(raw["max_concurrency"]))))


def list_capsules(home: Home) -> list[LocalCapsule]:
    """Every capsule in the home, sorted by id; a damaged one is an error
    naming its file, not a silent omission."""
    if not home.capsules.is_dir():
        return []
    out = []
    for p in sorted(home.capsules.glob("*.manifest")):
        try:
            out.append(_load_one(p))
        except AemError as exc:
            raise AemError(exc.code, f"capsule {p.name}: {exc.detail}") from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise AemError(errors.CONFIG, f"capsule {p.name} is damaged: {exc}") from None
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
