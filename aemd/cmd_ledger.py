"""`aemctl ledger-replay | ledger-export | ledger-import | ledger-verify`:
the node's credit ledger, from its log store or from an exported log file.

They open ``<home>/store.sqlite`` directly (SQLite in WAL mode lets them read
while a daemon writes) and ``<home>/genesis.aem``; no daemon is needed.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import Counter
from pathlib import Path

from aemd.cliutil import (EXIT_OK, EXIT_PROBLEMS, Progress, add_home, add_json, fmt_credits,
                          print_json)
from aemd.home import Home, resolve_home
from aemd.identity import read_genesis_file
from ledger import reasons
from ledger.facts import Context, examine_many
from ledger.feeds import extend
from ledger.logfile import LogWriter, read_log, read_log_all
from ledger.replay import MAX_AS_OF, ReplayResult, replay
from ledger.store import LogStore, Status
from protocol import errors
from protocol.errors import AemError
from protocol.genesis import Genesis

IMPORT_BATCH = 512


def register_ctl(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ledger-replay", help="replay the credit ledger and print balances",
        description="Replay every log entry the node holds (or an exported log) and print the "
                    "balances, the entries not applied with their reason codes, and the state "
                    "root that peers compare. Amounts are in credits.")
    add_home(p)
    p.add_argument("--as-of", type=int, default=None, metavar="UNIX_SECONDS",
                   help="replay as of this time (default: now)")
    p.add_argument("--log", metavar="FILE", help="replay this exported log instead of the store")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="processes checking signatures of a --log (0: one per core; default 1)")
    p.add_argument("--events", action="store_true", help="also list settlements, voids and mints")
    add_json(p)
    p.set_defaults(func=_replay)

    p = sub.add_parser("ledger-export", help="write the node's log to a file",
                       description="Write every entry of the store to FILE (format: specs/ledger.md, "
                                   "section 9); the file appears complete or not at all.")
    p.add_argument("file", metavar="FILE")
    add_home(p)
    add_json(p)
    p.set_defaults(func=_export)

    p = sub.add_parser("ledger-import", help="add the entries of a log file to the store",
                       description="Verify and insert every entry of an exported log, as if it "
                                   "had arrived from a peer. Exit 4 when some were rejected.")
    p.add_argument("file", metavar="FILE")
    add_home(p)
    add_json(p)
    p.set_defaults(func=_import)

    p = sub.add_parser("ledger-verify", help="check every signature and chain link; report forks",
                       description="Check every stored entry (or a log file) again: size, "
                                   "signatures of the entry and of its body, ids, chain links. "
                                   "Exit 4 when it finds forks or bad entries.")
    add_home(p)
    p.add_argument("--log", metavar="FILE", help="verify this log file instead of the store")
    add_json(p)
    p.set_defaults(func=_verify)


# -- helpers --------------------------------------------------------------------

def _genesis(home: Home) -> Genesis:
    if not home.genesis.exists():
        raise AemError(errors.NOT_FOUND,
                       f"{home.root} has joined no network; run `aemd init --home {home.root} --genesis FILE`")
    return read_genesis_file(home.genesis)


def _store(home: Home, genesis: Genesis, create: bool = False) -> LogStore:
    if not create and not home.store.exists():
        raise AemError(errors.NOT_FOUND, f"no log store at {home.store}")
    return LogStore.open(home.store, genesis)


def _as_of(args: argparse.Namespace) -> int:
    t = args.as_of if args.as_of is not None else int(time.time())
    if not 0 <= t <= MAX_AS_OF:
        raise AemError(errors.BAD_VALUE, "--as-of must be Unix seconds >= 0")
    return t


def _short(b: bytes) -> str:
    return b.hex()


# -- ledger-replay --------------------------------------------------------------

def _replay(args: argparse.Namespace) -> int:
    home = Home(resolve_home(args.home))
    g = _genesis(home)
    as_of = _as_of(args)
    if args.log:
        entries = read_log_all(Path(args.log), g.network_id)
        prog = Progress("checking signatures", len(entries))
        workers = args.workers if args.workers > 0 else (os.cpu_count() or 1)
        res = replay(g, entries, as_of, workers=workers, progress=prog.update)
        prog.done()
    else:
        store = _store(home, g)
        try:
            prog = Progress("reading the log", store.count())
            res = store.replay(as_of, progress=prog.update)
            prog.done()
        finally:
            store.close()
    me = _own_account(home)
    if args.json:
        out = res.to_json()
        if not args.events:
            out.pop("events")
        out["self"] = me            # this home's own account (hex), or None
        print_json(out)
    else:
        _print_replay(res, args.events, me=me)
    return EXIT_OK


def _own_account(home: Home) -> bytes | None:
    """The home's own account: the public key its keystore records in the
    clear (no passphrase needed); None when the home has no readable one."""
    try:
        pub = bytes.fromhex(json.loads(home.keystore.read_text())["public"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return pub if len(pub) == 32 else None


def _print_replay(res: ReplayResult, events: bool, *, me: bytes | None = None) -> None:
    print(f"as of        {res.as_of}")
    print(f"entries      {res.entries} ({res.applied} applied, {len(res.rejected)} not applied)")
    print(f"supply       {fmt_credits(res.granted + res.minted - res.burned)} "
          f"(granted {fmt_credits(res.granted)}, minted {fmt_credits(res.minted)}, burned {fmt_credits(res.burned)})")
    print()
    print(f"{'account':<64}  {'available':>20}  {'pending':>20}")
    for acct, (av, pe) in res.balances.items():
        mark = "  (this node)" if acct == me else ""
        print(f"{_short(acct):<64}  {fmt_credits(av):>20}  {fmt_credits(pe):>20}{mark}")
    if res.rejected:
        print()
        print("not applied:")
        for code, n in sorted(Counter(res.rejected.values()).items()):
            print(f"  {code:<24} {n:>8}  {reasons.DESCRIPTIONS.get(code, '')}")
    if res.frozen:
        print()
        print("frozen (equivocated):")
        for a, s in sorted(res.frozen.items()):
            print(f"  {a.hex()}  from seq {s}")
    if events:
        print()
        print("events:")
        for kind, obj, acct, amount, at in res.events:
            print(f"  {kind:<7} {obj.hex()[:16]}  {acct.hex()[:16]}  {fmt_credits(amount):>20}  "
                  f"{at.hex()[:16] if isinstance(at, bytes) else at}")
    print()
    print(f"state root   {res.state_root.hex()}")


# -- ledger-export / ledger-import ------------------------------------------------

def _export_target(file: str) -> Path:
    """The export file's path, refused before any work when it cannot be
    written: its directory missing, or a directory in its place."""
    path = Path(file).expanduser()
    if path.is_dir():
        raise AemError(errors.BAD_VALUE, f"{path} is a directory; give a file name")
    parent = path.absolute().parent
    if not parent.is_dir():
        raise AemError(errors.NOT_FOUND, f"no directory {parent} to write {path.name} in")
    if not os.access(parent, os.W_OK):
        raise AemError(errors.REFUSED, f"cannot write in {parent}")
    return path


def _export(args: argparse.Namespace) -> int:
    home = Home(resolve_home(args.home))
    g = _genesis(home)
    path = _export_target(args.file)
    store = _store(home, g)
    part = path.with_name(f".{path.name}.part")   # LogWriter's side file
    try:
        prog = Progress("exporting", store.count())
        with LogWriter(path, g.network_id) as w:
            for data in store.iter_entries():
                w.add(data)
                prog.update(w.count)
            n = w.count
        prog.done()
    except OSError as exc:
        raise AemError(errors.UNAVAILABLE, f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        store.close()
        part.unlink(missing_ok=True)   # whatever failed (even at the final rename), no .part stays
    if args.json:
        print_json({"file": args.file, "entries": n})
    else:
        print(f"wrote {n} entries to {args.file}")
    return EXIT_OK


def _import(args: argparse.Namespace) -> int:
    home = Home(resolve_home(args.home))
    g = _genesis(home)
    store = _store(home, g, create=True)
    counts: Counter = Counter()
    codes: Counter = Counter()
    prog = Progress("importing")
    try:
        batch: list[bytes] = []
        seen = 0

        def flush() -> None:
            for r in store.insert_many(batch):
                counts[r.status.value] += 1
                if r.status is Status.REJECTED:
                    codes[r.code] += 1
            batch.clear()

        for data in read_log(Path(args.file), g.network_id):
            batch.append(data)
            seen += 1
            if len(batch) >= IMPORT_BATCH:
                flush()
                prog.update(seen)
        flush()
        prog.done()
    finally:
        store.close()
    out = {"file": args.file, "entries": seen, **{s.value: counts[s.value] for s in Status},
           "rejected_codes": dict(codes)}
    if args.json:
        print_json(out)
    else:
        print(f"read {seen} entries: {counts['added']} added, {counts['duplicate']} already held, "
              f"{counts['held']} held for a predecessor, {counts['equivocation']} equivocations, "
              f"{counts['rejected']} rejected")
        for code, n in sorted(codes.items()):
            print(f"  rejected {code}: {n}")
    return EXIT_PROBLEMS if counts["rejected"] else EXIT_OK


# -- ledger-verify ------------------------------------------------------------------

def _verify(args: argparse.Namespace) -> int:
    home = Home(resolve_home(args.home))
    g = _genesis(home)
    if args.log:
        out = _verify_log(Path(args.log), g)
    else:
        store = _store(home, g)
        try:
            prog = Progress("verifying", store.count())
            rep = store.verify(progress=prog.update)
            prog.done()
        finally:
            store.close()
        out = {
            "entries": rep.entries, "linked": rep.linked, "held": rep.held, "broken": rep.broken,
            "forks": {a: s for a, s in sorted((rep.forks or {}).items())},
            "bad": [{"entry": e, "code": c} for e, c in rep.bad or []],
            "refused": dict(sorted((rep.refused or {}).items())),
        }
    problems = bool(out["forks"] or out["bad"] or out["refused"])
    out["ok"] = not problems
    if args.json:
        print_json(out)
    else:
        print(f"entries   {out['entries']}" + (f" ({out['linked']} linked, {out['held']} held, "
                                                 f"{out['broken']} broken)" if "linked" in out else ""))
        for a, s in out["forks"].items():
            print(f"fork      author {a.hex()} equivocated at seq {s}")
        for b in out["bad"]:
            print(f"bad       {b['entry'].hex()}  {b['code']}")
        for code, n in out["refused"].items():
            print(f"refused   {n} entries with an invalid body: {code}")
        print("ok" if not problems else "problems found")
    return EXIT_PROBLEMS if problems else EXIT_OK


def _verify_log(path: Path, g: Genesis) -> dict:
    """Every entry of a log file checked on its own, then its feeds linked."""
    entries = read_log_all(path, g.network_id)
    ctx = Context.of(g)
    prog = Progress("verifying", len(entries))
    facts = examine_many(entries, ctx, progress=prog.update)
    prog.done()
    feeds: dict = {}
    notes: dict = {}
    extend(feeds, notes, facts, MAX_AS_OF)
    bad = [{"entry": f.id, "code": f.code} for f in facts if f.author is None]
    bad += [{"entry": e, "code": c} for e, c in sorted(notes.items())
            if c in (reasons.BAD_CHAIN, reasons.UNLINKED)]
    refused = Counter(f.code for f in facts if f.author is not None and f.code is not None)
    forks = {a: f.fork for a, f in feeds.items() if f.fork is not None}
    return {"entries": len(entries), "forks": dict(sorted(forks.items())), "bad": bad,
            "refused": dict(sorted(refused.items()))}
