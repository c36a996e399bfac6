"""`aemctl contribute`: offer a file that people own or license; it earns
credits only for the delta the genesis verifiers measure (specs/growth.md)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from aemd import control
from aemd.cliutil import EXIT_FAILED, EXIT_OK, EXIT_TIMEOUT, add_home, add_json, print_json
from aemd.home import Home, resolve_home
from protocol import errors
from protocol.errors import AemError
from protocol.growth import MAX_CONTRIBUTION_BYTES, USE_TYPES, ContributionDocument
from protocol.mesh import TeacherPolicyCard
from protocol.receipts import CONTRIBUTION_TYPES

DONE = ("appended", "zero", "failed")


def register_ctl(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "contribute", help="offer a licensed contribution to be measured and attested",
        description="Commit to a file and the terms it is offered under (the commitment is the hash of a "
                    "document binding the file's hash to its licence and policies), keep it in "
                    "<home>/contributions/ for the verifiers to fetch, and ask the genesis verifiers to "
                    "measure its delta. With a quorum of agreeing attestations the node appends a "
                    "ContributionReceipt, and every node's replay mints the measured delta at the genesis "
                    "rate, once. Measurable today: knowledge (basis eval_improvement: the lift of the "
                    "domain's eval with the file as context) and eval (basis accepted_delta: a qa eval set "
                    "in the aem-evalset/1 format, credited for how far it separates the domain's admitted "
                    "experts; a copy of an existing eval measures 0), skill (basis verified_skill_use) and "
                    "operator (basis operator_adoption): counted from the log, the receipts of paid tasks that "
                    "named the contribution (`aemctl submit-task --use COMMITMENT`), acknowledged by a payer "
                    "other than the contributor, per period; `--recount COMMITMENT` asks for the next "
                    "period's count; other types are refused. Refused at once: no --license (an SPDX id), no --source-policy or "
                    "--training-use, a third-party-model origin without a teacher policy that allows "
                    "distillation.")
    p.add_argument("--type", choices=CONTRIBUTION_TYPES, help="what the file is (required unless --recount)")
    p.add_argument("--file", metavar="PATH",
                   help=f"the content (at most {MAX_CONTRIBUTION_BYTES} bytes): UTF-8 text for knowledge, "
                        "an eval-set JSON file of kind qa for eval, the skill's text or the operator's "
                        "description (UTF-8) for skill and operator (required unless --recount)")
    p.add_argument("--recount", metavar="COMMITMENT",
                   help="a skill or operator contribution registered on this node (64 hex): ask the verifiers "
                        "to count its uses since its last counted period and, with a quorum, append the receipt")
    p.add_argument("--as-of", dest="as_of", type=int, metavar="T",
                   help="skill/operator: the end of the period counted (seconds; at most now - 60, the "
                        "default)")
    p.add_argument("--license", dest="licence", metavar="SPDX_ID", help="its licence, an SPDX id (required)")
    p.add_argument("--source-policy", metavar="TEXT", help="where it came from, under which terms (required)")
    p.add_argument("--training-use", metavar="TEXT", help="what others may train on it (required)")
    p.add_argument("--teacher-policy", metavar="CARD.json",
                   help="the TeacherPolicyCard of the model it was made with (JSON: teacher, licence, "
                        "distillation, terms); distillation must be 'allowed'")
    p.add_argument("--distilled-from", metavar="NAME", help="the third-party model it was made with")
    p.add_argument("--domain",
                   help="the genesis domain whose eval it should lift (knowledge), whose experts it tells apart "
                        "(eval), or that the skill or operator serves (required unless --recount)")
    p.add_argument("--wait", type=float, default=0, metavar="SECONDS",
                   help="follow the measurement and attestations this long (exit 1 when it measured 0 or "
                        "failed, 5 when still running)")
    add_home(p)
    add_json(p)
    p.set_defaults(func=_contribute)


def _card(path: str | None) -> TeacherPolicyCard | None:
    if path is None:
        return None
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise AemError(errors.BAD_VALUE, f"--teacher-policy {path}: not a readable JSON file ({exc})") from None
    return TeacherPolicyCard.from_map(raw, "teacher policy")


def _recount_doc(home: Home, args: argparse.Namespace) -> ContributionDocument:
    from aemd.growth import load_document
    for name in ("type", "file", "domain", "licence", "source_policy", "training_use", "teacher_policy",
                 "distilled_from"):
        if getattr(args, name) is not None:
            raise AemError(errors.BAD_VALUE, f"--recount takes the registered document: no --{name.replace('_', '-')}")
    c = args.recount.strip().lower()
    if len(c) != 64 or any(ch not in "0123456789abcdef" for ch in c):
        raise AemError(errors.BAD_VALUE, "--recount COMMITMENT is 64 hex digits")
    doc = load_document(home, bytes.fromhex(c))
    if doc.type not in USE_TYPES:
        raise AemError(errors.REFUSED, f"--recount: contribution {c[:16]} is a {doc.type}, measured once, not "
                                       "counted (skill and operator are)")
    return doc


def _contribute(args: argparse.Namespace) -> int:
    from aemd.growth import save_contribution
    home = Home(resolve_home(args.home))
    if args.recount is not None:
        doc = _recount_doc(home, args)
    else:
        missing = [f"--{n}" for n in ("type", "file", "domain") if getattr(args, n) is None]
        if missing:
            raise AemError(errors.BAD_VALUE, f"{', '.join(missing)} required (or --recount COMMITMENT)")
        card = _card(args.teacher_policy)
        try:
            with open(args.file, "rb") as fh:
                data = fh.read(MAX_CONTRIBUTION_BYTES + 1)
        except OSError as exc:
            raise AemError(errors.NOT_FOUND, f"--file {args.file}: {exc.strerror}") from None
        doc = ContributionDocument.make(type=args.type, domain=args.domain, licence=args.licence,
                                        source_policy=args.source_policy, training_use=args.training_use,
                                        teacher_policy=card, distilled_from=args.distilled_from, data=data)
        save_contribution(home, doc, data)
    if args.as_of is not None and doc.type not in USE_TYPES:
        raise AemError(errors.BAD_VALUE, "--as-of is for skill and operator contributions (counted per period)")
    c = doc.commitment.hex()
    cargs: dict = {"commitment": c}
    if args.as_of is not None:
        cargs["as_of"] = args.as_of
    job = control.call(home.socket, "contribute", cargs, timeout=60)
    if not args.json:
        print(f"contribution {c[:16]}: {doc.type}, {doc.licence}, {doc.file_size} bytes; asking the verifiers"
              + (f" to count its uses up to {job.get('as_of')}" if doc.type in USE_TYPES else ""))
    deadline = time.monotonic() + max(0.0, args.wait)
    last = None
    while args.wait > 0 and job["state"] not in DONE and time.monotonic() < deadline:
        time.sleep(min(1.0, max(0.05, deadline - time.monotonic())))
        job = control.call(home.socket, "contribution_status", {"commitment": c}, timeout=60)
        if not args.json and (job["state"], job["attestations"]) != last:
            last = (job["state"], job["attestations"])
            print(f"  {job['state']}: delta {job['delta']}, {job['attestations']} attestation(s)")
    out = {**job, "document": {k: (v.hex() if isinstance(v, bytes) else v) for k, v in doc.to_map().items()}}
    if args.json:
        print_json(out)
    else:
        print({"appended": f"appended receipt {str(job['receipt_id'])[:16]}: {job['delta']} {'use(s)' if doc.type in USE_TYPES else 'bp'} attested",
               "zero": f"{'counted' if doc.type in USE_TYPES else 'measured'} 0 ({job['detail']}): nothing to mint",
               "failed": f"failed: {job['detail']}"}.get(job["state"], f"{job['state']} (see `--wait`)"))
    if args.wait <= 0:
        return EXIT_OK
    if job["state"] not in DONE:
        return EXIT_TIMEOUT
    return EXIT_OK if job["state"] == "appended" else EXIT_FAILED
