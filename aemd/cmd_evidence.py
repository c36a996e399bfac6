"""`aemctl evidence export | verify`: offline evidence bundles (specs/evidence.md).

``export`` reads ``<home>/store.sqlite`` and ``<home>/checkpoints.sqlite``
directly, like ``ledger-export`` (SQLite in WAL mode lets it read while a
daemon writes), so it runs with the node stopped or running. ``verify`` needs
no home at all: only the file.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from aemd.checkpoints import CheckpointBook, author_log_ids, book_path
from aemd.cliutil import EXIT_OK, EXIT_PROBLEMS, add_home, add_json, print_json
from aemd.cmd_ledger import _export_target, _genesis, _store
from aemd.home import Home, read_passphrase, resolve_home
from aemd.keyfile import read_keystore
from ledger import evidence
from ledger.atomicfile import atomic_write
from ledger.store import LogStore
from protocol import errors
from protocol.checkpoint import LogCheckpoint, build_checkpoint, entry_tree
from protocol.entry import Entry
from protocol.errors import AemError

SUBJECT_OPTIONS = (("receipt", "an inference receipt's id"), ("expert", "an expert capsule's id"),
                   ("contribution", "a contribution receipt's id"))


def register_ctl(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evidence", help="export or verify an offline evidence bundle",
                       description="Evidence bundles prove receipts, expert admissions and contributions "
                                   "from a file alone (format: specs/evidence.md).")
    esub = p.add_subparsers(title="evidence commands", metavar="COMMAND")

    e = esub.add_parser("export", help="write the evidence of one receipt, expert or contribution",
                        description="Write a bundle: the genesis, the entries about the subject (a receipt "
                                    "with its ack, disputes and challenges; an expert's manifest and "
                                    "admission reports; a contribution), an inclusion proof of each entry "
                                    "against a signed checkpoint of its author, and consistency proofs. "
                                    "This node signs a fresh checkpoint of its own log; for other authors "
                                    "it uses the newest checkpoint gossiped to it.")
    which = e.add_mutually_exclusive_group(required=True)
    for name, what in SUBJECT_OPTIONS:
        which.add_argument(f"--{name}", metavar="ID", help=f"{what} (hex; the id of its entry works too)")
    e.add_argument("--out", required=True, metavar="FILE", help="bundle file to write")
    add_home(e)
    e.add_argument("--passphrase-file", metavar="FILE", help="passphrase of an encrypted identity")
    add_json(e)
    e.set_defaults(func=_export)

    v = esub.add_parser("verify", help="check a bundle offline; exit 4 unless all of it verifies",
                        description="Check every signature, inclusion proof and consistency proof of a "
                                    "bundle, with no network and no node. Exit 0 when everything "
                                    "verifies; otherwise exit 4 and one line per failure.")
    v.add_argument("file", metavar="FILE")
    add_json(v)
    v.set_defaults(func=_verify)

    c = esub.add_parser("checkpoints", help="the checkpoints and fork evidence this node holds",
                        description="List the newest signed checkpoint of each author that this node "
                                    "holds (gossiped, or its own), and the fork evidence it recorded: "
                                    "pairs of checkpoints of one author that disagree. Exit 4 when there "
                                    "is fork evidence.")
    add_home(c)
    add_json(c)
    c.set_defaults(func=_checkpoints)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _hex_id(v: str) -> bytes:
    try:
        b = bytes.fromhex(v)
    except ValueError:
        b = b""
    if len(b) != 32:
        raise AemError(errors.BAD_VALUE, "an id is 64 hex digits")
    return b


# -- export ---------------------------------------------------------------------------

def select_entries(store: LogStore, subject: str, sid: bytes) -> tuple[bytes, list[bytes]]:
    """(the subject object's id, bytes of the entries about it: its own first).
    ``sid`` may be the object's id or the id of the entry holding it."""
    own_kind = evidence.SUBJECT_KIND[subject]
    if subject == "expert":
        rows = [(f, d) for f, d in store.admission_entries() if f.author is not None and f.obj]
    else:
        rows = [(f, None) for f in store.facts() if f.author is not None and f.obj]
    for f, _ in rows:
        if f.id == sid and f.kind == own_kind:
            sid = f.obj
            break
    own = sorted((f.key, f.id, d) for f, d in rows if f.kind == own_kind and f.obj == sid)
    if not own:
        raise AemError(errors.NOT_FOUND, f"this node holds no {own_kind} with id {sid.hex()}")
    related = []
    for f, d in rows:
        if f.kind not in evidence.RELATED_KINDS[subject]:
            continue
        if subject == "expert":
            if Entry.decode(d).payload().capsule_id == sid:
                related.append((f.key, f.id, d))
        elif f.args and f.args[0] == sid:
            related.append((f.key, f.id, d))
    out = []
    for _, eid, d in [own[0], *sorted(related)]:
        out.append(d if d is not None else store.get(eid))
    return sid, [d for d in out if d is not None]


def _own_key(home: Home, passphrase_file: str | None):
    try:
        return read_keystore(home.keystore, read_passphrase(passphrase_file))
    except AemError:
        return None


def _export(args: argparse.Namespace) -> int:
    subject = next(name for name, _ in SUBJECT_OPTIONS if getattr(args, name))
    sid = _hex_id(getattr(args, subject))
    home = Home(resolve_home(args.home))
    g = _genesis(home)
    net = g.network_id
    path = _export_target(args.out)
    key = _own_key(home, args.passphrase_file)
    store = _store(home, g)
    book = CheckpointBook.open(book_path(home.root)) if book_path(home.root).exists() else None
    now = int(time.time())
    try:
        sid, datas = select_entries(store, subject, sid)
        entries = [Entry.decode(d) for d in datas]
        logs: dict[bytes, list[bytes]] = {}
        checkpoints: list[LogCheckpoint] = []
        kept, left_out = [], []
        for author in sorted({e.author for e in entries}):
            stored = book.newest(author) if book is not None else None
            if key is not None and author == key.public:
                ids = author_log_ids(store, author)
                fresh = build_checkpoint(key, net, ids, now)
                checkpoints.append(fresh)
                if (stored is not None and 0 < stored.size < fresh.size
                        and entry_tree(ids).root(stored.size) == stored.root):
                    checkpoints.append(stored)     # with a consistency proof to the fresh one
            else:
                if stored is None:
                    raise AemError(errors.NOT_FOUND,
                                   f"no checkpoint of author {author.hex()} is held here: it signs one every "
                                   "[checkpoint] interval_s; wait for its gossip, or export on that author's node")
                ids = author_log_ids(store, author, stored.size)
                if len(ids) < stored.size:
                    raise AemError(errors.NOT_FOUND,
                                   f"the checkpoint of {author.hex()} covers {stored.size} entries and this "
                                   f"node holds {len(ids)} of them: let the node sync, then export again")
                checkpoints.append(stored)
            logs[author] = ids
        for e, d in zip(entries, datas):
            top = max(c.size for c in checkpoints if c.author == e.author)
            ids = logs[e.author]
            if e.seq >= top or e.seq >= len(ids) or ids[e.seq] != e.id:
                if d is datas[0]:
                    why = ("newer than its author's newest checkpoint here: wait for the next one"
                           if e.seq >= top else "not in its author's linked log (a fork or a gap)")
                    raise AemError(errors.NOT_FOUND, f"the {subject}'s entry is {why}")
                left_out.append({"entry": e.id.hex(), "kind": e.kind,
                                 "why": "newer than its author's newest checkpoint" if e.seq >= top
                                 else "not in its author's linked log"})
                continue
            kept.append(d)
        # Only the checkpoints of authors whose entries stay.
        authors = {Entry.decode(d).author for d in kept}
        checkpoints = [c for c in checkpoints if c.author in authors]
        data = evidence.build_bundle(g, subject, sid, kept, logs, checkpoints)
    finally:
        store.close()
        if book is not None:
            book.close()
    try:
        atomic_write(path, data, 0o644)
    except OSError as exc:
        raise AemError(errors.UNAVAILABLE, f"cannot write {path}: {exc.strerror or exc}") from None
    out = {"file": str(args.out), "subject": subject, "subject_id": sid.hex(), "entries": len(kept),
           "checkpoints": len(checkpoints), "bytes": len(data), "left_out": left_out}
    if args.json:
        print_json(out)
    else:
        print(f"wrote evidence of {subject} {sid.hex()} to {args.out}: {len(kept)} entries, "
              f"{len(checkpoints)} checkpoints, {len(data)} bytes")
        for lo in left_out:
            print(f"left out {lo['kind']} {lo['entry']}: {lo['why']}")
    return EXIT_OK


# -- verify ---------------------------------------------------------------------------

def _verify(args: argparse.Namespace) -> int:
    path = Path(args.file).expanduser()
    try:
        size = path.stat().st_size
        if size > evidence.MAX_BUNDLE:
            problems = [f"bundle: TOO_LARGE: {size} bytes > {evidence.MAX_BUNDLE}"]
            data = b""
        else:
            data = path.read_bytes()
            problems = evidence.verify(data)
    except IsADirectoryError:
        raise AemError(errors.BAD_VALUE, f"{path} is a directory") from None
    except FileNotFoundError:
        raise AemError(errors.NOT_FOUND, f"no file {path}") from None
    except OSError as exc:
        raise AemError(errors.UNAVAILABLE, f"cannot read {path}: {exc.strerror or exc}") from None
    summary = None
    if not problems:
        summary = evidence.summary(data)
    if args.json:
        print_json({"file": str(args.file), "ok": not problems, "problems": problems, "summary": summary})
    elif problems:
        for p in problems:
            print(f"FAILED {p}")
    else:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(summary["kinds"].items()))
        print(f"ok: evidence of {summary['subject']} {summary['subject_id']}: {kinds}; "
              f"{summary['inclusions']} inclusion and {summary['consistencies']} consistency proofs, "
              f"{summary['checkpoints']} signed checkpoints")
    return EXIT_PROBLEMS if problems else EXIT_OK


# -- checkpoints ------------------------------------------------------------------------

def _checkpoints(args: argparse.Namespace) -> int:
    home = Home(resolve_home(args.home))
    path = book_path(home.root)
    if not path.exists():
        raise AemError(errors.NOT_FOUND, f"no checkpoints at {path}: the node has not run yet")
    book = CheckpointBook.open(path)
    try:
        cps, evs = book.all(), book.evidence()
    finally:
        book.close()
    out = {"checkpoints": [{"author": c.author, "size": c.size, "root": c.root, "created_at": c.created_at}
                           for c in cps],
           "fork_evidence": [{"author": e.author, "sizes": [e.a.size, e.b.size], "roots": [e.a.root, e.b.root],
                              "evidence": e.encode()} for e in evs]}
    if args.json:
        print_json(out)
    else:
        for c in cps:
            print(f"{c.author.hex()}  size {c.size:>8}  root {c.root.hex()[:16]}  at {c.created_at}")
        for e in evs:
            print(f"FORK {e.author.hex()} signed checkpoints of sizes {e.a.size} and {e.b.size} that disagree")
        if not cps and not evs:
            print("no checkpoints yet")
    return EXIT_PROBLEMS if evs else EXIT_OK
