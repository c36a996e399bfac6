"""`aemctl expert submit|reeval`, `aemctl experts`: admission from the
command line (specs/admission.md)."""

from __future__ import annotations

import argparse
import time

from aemd import control
from aemd.capsules import find_capsule
from aemd.cliutil import EXIT_FAILED, EXIT_OK, EXIT_TIMEOUT, add_home, add_json, print_json
from aemd.home import Home, resolve_home
from protocol import errors
from protocol.errors import AemError

FINAL = ("admitted", "refused", "pruned")
STATUS_ORDER = ("admitted", "probation", "candidate", "demoted", "refused", "pruned")


def _home(args: argparse.Namespace) -> Home:
    return Home(resolve_home(args.home))


def register_expert(esub: argparse._SubParsersAction) -> None:
    """The admission subcommands of `aemctl expert`."""
    p = esub.add_parser(
        "submit", help="ask the genesis verifiers to admit a capsule this node hosts",
        description="Append the capsule's signed manifest to this node's log. Every genesis verifier "
                    "that runs the verifier role fetches the capsule's artefact from this node, measures "
                    "it against the eight admission gates (specs/admission.md) and appends its report; a "
                    "quorum of identical reports admits or refuses it on every node's replay. With "
                    "--wait, follow the reports until a quorum decides.")
    p.add_argument("capsule", metavar="CAPSULE_ID", help="the capsule id or a unique prefix (`aemctl expert list`)")
    p.add_argument("--wait", type=float, default=0, metavar="SECONDS",
                   help="wait up to this long for the decision, showing each report (exit 1 when refused, "
                        "5 when still undecided)")
    add_home(p)
    add_json(p)
    p.set_defaults(func=_submit)

    p = esub.add_parser(
        "reeval", help="(verifier) open a re-evaluation round for an admitted capsule",
        description="On a verifier node: measure an admitted (or demoted) capsule again, fetching its "
                    "artefact anew from its host. Other verifiers join the round; a quorum of failing "
                    "reports demotes it (a second demotion prunes it for good).")
    p.add_argument("capsule", metavar="CAPSULE_ID", help="the full capsule id (64 hex digits)")
    add_home(p)
    add_json(p)
    p.set_defaults(func=_reeval)


def register_ctl(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "experts", help="the admission status of every submitted capsule",
        description="Replay the log's admission reports (every node computes the same result) and list "
                    "each submitted capsule: candidate, probation, admitted, refused, demoted or pruned. "
                    "--status adds each gate's measured figure, threshold and outcome.")
    p.add_argument("--status", action="store_true", help="show every gate's figure and threshold")
    p.add_argument("--domain", help="only capsules of this domain")
    add_home(p)
    add_json(p)
    p.set_defaults(func=_experts)


def _full_id(home: Home, prefix: str) -> str:
    prefix = prefix.strip().lower()
    if len(prefix) == 64:
        return prefix
    if len(prefix) < 4 or any(c not in "0123456789abcdef" for c in prefix):
        raise AemError(errors.BAD_VALUE, "give at least 4 hex digits of the capsule id (`aemctl expert list`)")
    return find_capsule(home, prefix).id.hex()


def submit_capsule(home: Home, capsule_hex: str, *, wait: float = 0, quiet: bool = False) -> tuple[dict, int]:
    """Submit and optionally follow; (result, exit code). Used by `expert add --submit` too."""
    res = control.call(home.socket, "submit_capsule", {"capsule_id": capsule_hex}, timeout=60)
    if not quiet:
        if res["submitted"]:
            print(f"submitted {capsule_hex[:16]}: {res['verifiers']} genesis verifier(s), quorum {res['quorum']}")
        else:
            print(f"{capsule_hex[:16]} was submitted before: {res['status']}")
    if wait <= 0:
        return res, EXIT_OK
    deadline = time.monotonic() + wait
    seen_votes = -1
    while True:
        row = next((r for r in control.call(home.socket, "experts", timeout=60)["experts"]
                    if r["capsule_id"] == capsule_hex), None)
        if row is not None:
            if row["votes"] != seen_votes and not quiet:
                print(f"  {row['status']}: {row['votes']} agreeing report(s)")
                seen_votes = row["votes"]
            if row["status"] in FINAL:
                res["status"], res["failed"] = row["status"], row["failed"]
                if not quiet:
                    print(f"{row['status']}" + (f": failed {', '.join(row['failed'])}" if row["failed"] else ""))
                return res, EXIT_OK if row["status"] == "admitted" else EXIT_FAILED
        if time.monotonic() >= deadline:
            res["status"] = row["status"] if row else "candidate"
            return res, EXIT_TIMEOUT
        time.sleep(min(2.0, max(0.1, deadline - time.monotonic())))


def _submit(args: argparse.Namespace) -> int:
    home = _home(args)
    res, code = submit_capsule(home, _full_id(home, args.capsule), wait=args.wait, quiet=args.json)
    if args.json:
        print_json(res)
    return code


def _reeval(args: argparse.Namespace) -> int:
    home = _home(args)
    res = control.call(home.socket, "reeval", {"capsule_id": _full_id(home, args.capsule)}, timeout=60)
    if args.json:
        print_json(res)
    else:
        print(f"re-evaluation round {res['round'][:16]} opened for {res['capsule_id'][:16]}")
    return EXIT_OK


def _experts(args: argparse.Namespace) -> int:
    res = control.call(_home(args).socket, "experts", timeout=120)
    rows = [r for r in res["experts"] if not args.domain or r["domain"] == args.domain]
    rows.sort(key=lambda r: (STATUS_ORDER.index(r["status"]) if r["status"] in STATUS_ORDER else 99,
                             r["domain"], r["capsule_id"]))
    if args.json:
        print_json({**res, "experts": rows})
        return EXIT_OK
    mode = "only admitted experts get traffic" if res["admitted_only"] else "open network: admission informative"
    print(f"{len(rows)} submitted capsule(s); {mode}; admission root {res['root'][:16]}")
    v = res.get("verifier")
    if v:
        doing = v["current"] or "idle"
        if v["current"] and v["artefact_bytes"]:
            doing += f", artefact {100 * v['fetched_bytes'] // v['artefact_bytes']}% fetched"
        print(f"this node verifies: {doing}; {v['reports']} report(s) made, {v['retrying']} job(s) to retry")
    for r in rows:
        failed = f"  failed: {', '.join(r['failed'])}" if r["failed"] else ""
        print(f"{r['capsule_id'][:16]}  {r['status']:9}  {r['domain']:12}  {r['kind']:10}  "
              f"{r['node_class'] or '-':6}  {r['name']}{failed}")
        if args.status:
            for g in r["gates"]:
                mark = {True: "pass", False: "FAIL", None: "  - "}[g["passed"]]
                print(f"    {mark}  {g['gate']:12} {str(g['figure']):>18}  {g['threshold']}")
    return EXIT_OK
