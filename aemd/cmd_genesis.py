"""`aemctl genesis new|show`: define a new network, or inspect one."""

from __future__ import annotations

import argparse
import time
from decimal import Decimal, DecimalException
from pathlib import Path

from aemd.cliutil import add_home, add_json, fmt_credits, print_json
from aemd.home import Home, read_passphrase, resolve_home
from aemd.identity import atomic_write, read_genesis_file
from aemd.keyfile import read_keystore, write_keystore
from crypto.keys import SigningKey, is_valid_public
from protocol import errors
from protocol.errors import AemError
from protocol.admission import DEFAULT_ADMISSION, AdmissionParams, DomainEvals, NodeClass
from protocol.genesis import CREDIT_BASES, DEFAULT_LIMITS, Genesis, Grant, MintRate

MICRO = 1_000_000
MAX_CREDITS = Decimal(2**62) / MICRO   # the wire's AMOUNT bound, in credits (exact)


def parse_credits(text: str) -> int:
    """'12.5' credits -> 12_500_000 micro-credits, exactly (no floats)."""
    try:
        d = Decimal(text)
        if not d.is_finite():
            raise AemError(errors.BAD_VALUE, f"amount must be a finite number of credits: {text!r}")
        if abs(d) > MAX_CREDITS:     # before scaling: 1e999999 * MICRO overflows Decimal
            raise AemError(errors.BAD_VALUE, f"amount must be at most {MAX_CREDITS} credits: {text!r}")
        micro = d * MICRO
    except DecimalException:
        raise AemError(errors.BAD_VALUE, f"not an amount of credits: {text!r}") from None
    if micro != micro.to_integral_value() or micro < 0:
        raise AemError(errors.BAD_VALUE, f"amount must be >= 0 with at most 6 decimals: {text!r}")
    return int(micro)


def parse_key(text: str) -> bytes:
    try:
        b = bytes.fromhex(text)
    except ValueError:
        raise AemError(errors.BAD_KEY, f"not a hex public key: {text!r}") from None
    if not is_valid_public(b):
        raise AemError(errors.BAD_KEY, f"not an Ed25519 public key: {text!r}")
    return b


def register_ctl(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("genesis", help="create or inspect a network's genesis",
                       description="A genesis file defines one aem network; its hash is the network id.")
    gsub = g.add_subparsers(title="genesis commands", metavar="COMMAND")

    p = gsub.add_parser(
        "new", help="write a signed genesis for a new network",
        description="Write a signed genesis document. Amounts are in credits (up to 6 decimals). "
                    "The founder signs it: the node identity of --home when it exists, otherwise "
                    "a new key saved as OUT.founder.key.")
    p.add_argument("--name", required=True, help="network name (lower-case letters, digits, . _ -)")
    p.add_argument("--out", required=True, metavar="FILE", help="where to write the genesis")
    p.add_argument("--verifier", action="append", default=[], metavar="PUBKEY",
                   help="hex public key of a verifier (repeat for several)")
    p.add_argument("--quorum", type=int, default=0,
                   help="verifier signatures needed to mint (default: a majority)")
    p.add_argument("--grant", action="append", default=[], metavar="PUBKEY=CREDITS",
                   help="initial balance of an account (repeat for several)")
    p.add_argument("--challenge-window", type=int, default=3600, metavar="SECONDS",
                   help="how long a receipt can be challenged before it settles (default 3600)")
    p.add_argument("--mint-rate", action="append", default=[], metavar="BASIS=CREDITS",
                   help=f"credits minted per unit of measured delta, per basis ({', '.join(CREDIT_BASES)}); "
                        "default 0.01 for every basis")
    p.add_argument("--max-mint", default="1000", metavar="CREDITS",
                   help="most credits one contribution can mint (default 1000)")
    p.add_argument("--created-at", type=int, default=None, metavar="UNIX_SECONDS",
                   help="creation time (default: now)")
    a = p.add_argument_group("admission (specs/admission.md; defaults in its section 1)")
    a.add_argument("--gated", action="store_true",
                   help="send ordinary tasks only to admitted experts (default: an open network, where "
                        "admission reports are informative)")
    a.add_argument("--admission-domain", action="append", default=[], metavar="DOMAIN=TARGET[,GENERAL[,BASELINE_BP]]",
                   help="the eval sets (shipped name or 64-hex content hash) that judge a domain, and the target "
                        "score to beat while no expert is admitted (default 0); e.g. "
                        "general=general-target,general-facts (repeatable)")
    a.add_argument("--probe-set", default="probes", metavar="NAME",
                   help="eval set of fingerprint and trigger probes (default: the shipped 'probes')")
    a.add_argument("--node-class", action="append", default=[], metavar="NAME=MB",
                   help="a node class and its memory budget in MB (repeatable; replaces the defaults "
                        "cpu=8192, gpu12=12288, gpu16=16384, gpu24=24576)")
    a.add_argument("--min-gain-bp", type=int, metavar="BP", help="gate 1 threshold (default 100)")
    a.add_argument("--max-regression-bp", type=int, metavar="BP", help="gate 2 threshold (default 1000)")
    a.add_argument("--probation-share-bp", type=int, metavar="BP",
                   help="share of tasks (basis points) that may go to candidates on probation (default 0)")
    a.add_argument("--reeval-interval", type=int, metavar="SECONDS",
                   help="scheduled re-evaluation of admitted experts (default 7 days; 0 off)")
    add_home(p)
    p.add_argument("--passphrase-file", metavar="FILE", help="passphrase of the founder's keystore")
    add_json(p)
    p.set_defaults(func=_new)

    s = gsub.add_parser("show", help="print a genesis file", description="Verify and print a genesis file.")
    s.add_argument("file", metavar="FILE")
    add_json(s)
    s.set_defaults(func=_show)


def _founder(args: argparse.Namespace, out: Path) -> SigningKey:
    home = Home(resolve_home(args.home))
    if home.keystore.exists():
        return read_keystore(home.keystore, read_passphrase(args.passphrase_file))
    key = SigningKey.generate()
    write_keystore(out.with_name(out.name + ".founder.key"), key, None)
    return key


def _new(args: argparse.Namespace) -> int:
    out = Path(args.out)
    verifiers = sorted({parse_key(v) for v in args.verifier})
    quorum = args.quorum or (len(verifiers) // 2 + 1 if verifiers else 0)
    if verifiers and not 1 <= quorum <= len(verifiers):
        raise AemError(errors.BAD_VALUE, f"--quorum must be between 1 and {len(verifiers)}")
    if not verifiers:
        raise AemError(errors.BAD_VALUE, "a network needs at least one --verifier")
    grants: dict[bytes, int] = {}
    for text in args.grant:
        key, _, amount = text.partition("=")
        account = parse_key(key)
        grants[account] = grants.get(account, 0) + parse_credits(amount)
    rates = {b: parse_credits("0.01") for b in CREDIT_BASES}
    for text in args.mint_rate:
        basis, _, amount = text.partition("=")
        if basis not in CREDIT_BASES:
            raise AemError(errors.BAD_VALUE, f"unknown credit basis {basis!r}")
        rates[basis] = parse_credits(amount)
    if out.exists():
        raise AemError(errors.REFUSED, f"{out} exists; choose another --out")
    founder = _founder(args, out)
    g = Genesis(
        network_name=args.name,
        created_at=args.created_at if args.created_at is not None else int(time.time()),
        founder=founder.public,
        verifiers=tuple(verifiers),
        quorum=quorum,
        grants=tuple(Grant(account=a, amount=grants[a]) for a in sorted(grants)),
        challenge_window=args.challenge_window,
        mint_rates=tuple(MintRate(basis=b, micro_per_unit=rates[b]) for b in sorted(rates)),
        max_mint_per_receipt=parse_credits(args.max_mint),
        limits=DEFAULT_LIMITS,
        sig=b"",
        admission=admission_params(args),
    ).signed(founder)
    atomic_write(out, g.encode())
    if args.json:
        print_json({"file": str(out), "network_id": g.network_id, "genesis": g.to_map()})
    else:
        print(f"wrote {out}")
        print(f"network id {g.network_id.hex()}")
    return 0


def _eval_hash(ref: str, what: str) -> bytes:
    """A shipped eval set's (or code-patch fixture set's) hash, by name or hash."""
    ref = ref.strip()
    if len(ref) == 64:
        try:
            return bytes.fromhex(ref)
        except ValueError:
            pass
    from aemd.evaluate import load_evalset
    try:
        return load_evalset(ref).hash
    except AemError as first:
        try:
            from aemd.codepatch_capsule import load_fixtures
            return load_fixtures(ref).hash
        except (AemError, ImportError):
            raise AemError(errors.BAD_VALUE, f"{what}: no eval set {ref!r} ({first.detail})") from None


def _bp(v: int | None, default: int, what: str) -> int:
    if v is None:
        return default
    if not 0 <= v <= 10_000:
        raise AemError(errors.BAD_VALUE, f"{what} must be 0..10000 basis points")
    return v


def admission_params(args: argparse.Namespace) -> AdmissionParams:
    d = DEFAULT_ADMISSION
    domains = {}
    for text in args.admission_domain:
        name, eq, rest = text.partition("=")
        parts = rest.split(",")
        if not eq or not name or not 1 <= len(parts) <= 3 or not parts[0]:
            raise AemError(errors.BAD_VALUE, f"--admission-domain {text!r}: want DOMAIN=TARGET[,GENERAL[,BASELINE_BP]]")
        general = _eval_hash(parts[1], f"domain {name}") if len(parts) > 1 and parts[1] else b""
        try:
            baseline = int(parts[2]) if len(parts) > 2 else 0
        except ValueError:
            raise AemError(errors.BAD_VALUE, f"--admission-domain {text!r}: BASELINE_BP is an integer") from None
        domains[name] = DomainEvals(domain=name, target_eval=_eval_hash(parts[0], f"domain {name}"),
                                    general_eval=general, baseline_bp=_bp(baseline, 0, "BASELINE_BP"),
                                    general_baseline_bp=0)
    classes = d.classes
    if args.node_class:
        found = {}
        for text in args.node_class:
            name, _, mb = text.partition("=")
            try:
                found[name] = NodeClass(name=name, memory_mb=int(mb))
            except (ValueError, AemError):
                raise AemError(errors.BAD_VALUE, f"--node-class {text!r}: want NAME=MB") from None
        classes = tuple(found[n] for n in sorted(found))
    interval = d.reeval_interval_s if args.reeval_interval is None else args.reeval_interval
    return AdmissionParams(
        admitted_only=bool(args.gated), min_gain_bp=_bp(args.min_gain_bp, d.min_gain_bp, "--min-gain-bp"),
        max_regression_bp=_bp(args.max_regression_bp, d.max_regression_bp, "--max-regression-bp"),
        near_duplicate_bp=d.near_duplicate_bp, max_trigger_divergence_bp=d.max_trigger_divergence_bp,
        probation_share_bp=_bp(args.probation_share_bp, d.probation_share_bp, "--probation-share-bp"),
        demote_margin_bp=d.demote_margin_bp, reeval_interval_s=interval, challenge_limit=d.challenge_limit,
        probe_set=_eval_hash(args.probe_set, "--probe-set") if args.probe_set else b"",
        classes=classes, domains=tuple(domains[n] for n in sorted(domains)))


def _show(args: argparse.Namespace) -> int:
    g = read_genesis_file(Path(args.file))
    if args.json:
        print_json({"network_id": g.network_id, "genesis": g.to_map()})
        return 0
    print(f"network      {g.network_name}")
    print(f"network id   {g.network_id.hex()}")
    print(f"founder      {g.founder.hex()}")
    print(f"created at   {g.created_at}")
    print(f"verifiers    {len(g.verifiers)} (quorum {g.quorum})")
    for v in g.verifiers:
        print(f"  {v.hex()}")
    print(f"challenge    {g.challenge_window} s")
    a = g.admission
    print(f"admission    {'gated: only admitted experts get traffic' if a.admitted_only else 'open'}; "
          f"gain >= {a.min_gain_bp} bp, regression <= {a.max_regression_bp} bp")
    print(f"classes      {', '.join(f'{c.name} {c.memory_mb} MB' for c in a.classes) or 'none'}")
    for d in a.domains:
        print(f"  domain {d.domain}: target {d.target_eval.hex()[:16]}, general "
              f"{d.general_eval.hex()[:16] or '-'}, baseline {d.baseline_bp} bp")
    print(f"grants       {len(g.grants)}")
    for gr in g.grants:
        print(f"  {gr.account.hex()}  {fmt_credits(gr.amount)}")
    return 0
