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
    ).signed(founder)
    atomic_write(out, g.encode())
    if args.json:
        print_json({"file": str(out), "network_id": g.network_id, "genesis": g.to_map()})
    else:
        print(f"wrote {out}")
        print(f"network id {g.network_id.hex()}")
    return 0


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
    print(f"grants       {len(g.grants)}")
    for gr in g.grants:
        print(f"  {gr.account.hex()}  {fmt_credits(gr.amount)}")
    return 0
