"""Why replay did not apply an entry: the reason codes of the ledger.

Every entry that replay does not apply gets exactly one code (see
``specs/ledger.md`` for the precedence). Codes that also describe a decoding
or verification failure are the :mod:`protocol.errors` codes themselves
(``BAD_SIGNATURE``, ``WRONG_NETWORK``, ``EXPIRED`` ...); the ones below are
specific to the ledger. They are stable strings: the CLI prints them, the
tests assert on them, and the rule-level ones enter the state root.

Two groups matter for convergence:

- *feed* codes (``UNLINKED``, ``BAD_CHAIN``, ``EQUIVOCATION``, ``FUTURE``) say
  an entry is not (yet) part of its author's applied feed; they depend on
  which other entries a peer holds and are not hashed into the state root;
- *rule* codes say an entry of the applied feed was refused by a ledger
  rule; they are part of the state root.
"""

from __future__ import annotations

from protocol import errors

# Envelope code specific to the ledger (the others are protocol.errors codes):
# the entry is in no feed.
LAMPORT_AHEAD = "LAMPORT_AHEAD"          # lamport >> 16 > ts: the clock runs ahead of the author's time

# Feed codes: the entry is not in its author's applied prefix.
UNLINKED = "UNLINKED"                    # predecessor (or an earlier one) not held yet
BAD_CHAIN = errors.BAD_CHAIN             # predecessor held but is not this author's seq-1, or lamport does not grow
EQUIVOCATION = errors.EQUIVOCATION       # author forked at or before this seq: frozen from the fork on
FUTURE = "FUTURE"                        # ts (or an earlier entry's ts) is after as_of

# Rule codes: the entry is in the applied prefix and a rule refused it.
WRONG_AUTHOR = "WRONG_AUTHOR"            # entry author is not the object's signer
DUPLICATE_OBJECT = "DUPLICATE_OBJECT"    # the same signed object was already applied
SELF_TRANSFER = "SELF_TRANSFER"          # transfer to the sender itself
INSUFFICIENT_FUNDS = "INSUFFICIENT_FUNDS"  # would take an available balance below zero
AUTH_EXPIRED = errors.EXPIRED            # spend authorisation expired before the work started
SPEND_KEY_USED = "SPEND_KEY_USED"        # the payer's spend key already charged (double spend)
NO_QUORUM = "NO_QUORUM"                  # fewer valid distinct genesis-verifier attestations than quorum
DUPLICATE_CONTRIBUTION = "DUPLICATE_CONTRIBUTION"  # same content, eval and basis already minted
SUPPLY_CAP = "SUPPLY_CAP"                # minting would take the supply past 2^62
NOT_VERIFIER = "NOT_VERIFIER"            # challenge signer is not a genesis verifier
CHALLENGE_NO_RECEIPT = "CHALLENGE_NO_RECEIPT"  # no applied-feed receipt with that id
CHALLENGE_LATE = "CHALLENGE_LATE"        # created at or after the receipt's settlement time
ALREADY_CHALLENGED = "ALREADY_CHALLENGED"  # an earlier challenge or dispute already voids that receipt
ACKED_ELSEWHERE = "ACKED_ELSEWHERE"      # the payer acknowledged another receipt for this spend key
DISPUTE_NO_RECEIPT = "DISPUTE_NO_RECEIPT"  # no applied-feed receipt with the disputed id
NOT_PAYER = "NOT_PAYER"                  # the disputer is not the receipt's payer
DISPUTE_LATE = "DISPUTE_LATE"            # dispute created at or after the receipt's settlement time
DISPUTE_ACKED = "DISPUTE_ACKED"          # the payer acknowledged the receipt it disputes

FEED_CODES = frozenset({UNLINKED, BAD_CHAIN, EQUIVOCATION, FUTURE})

DESCRIPTIONS = {
    LAMPORT_AHEAD: "Lamport clock ahead of the entry's time",
    UNLINKED: "predecessor not held yet",
    BAD_CHAIN: "does not link to its author's previous entry",
    EQUIVOCATION: "author equivocated at or before this seq; feed frozen",
    FUTURE: "authored after the as-of time",
    WRONG_AUTHOR: "entry author is not the object's signer",
    DUPLICATE_OBJECT: "object already applied",
    SELF_TRANSFER: "transfer to oneself",
    INSUFFICIENT_FUNDS: "insufficient available balance",
    AUTH_EXPIRED: "spend authorisation expired before the work started",
    SPEND_KEY_USED: "spend key already charged",
    NO_QUORUM: "not enough verifier attestations",
    DUPLICATE_CONTRIBUTION: "contribution already minted",
    SUPPLY_CAP: "supply cap reached",
    NOT_VERIFIER: "challenger is not a genesis verifier",
    CHALLENGE_NO_RECEIPT: "no such receipt",
    CHALLENGE_LATE: "challenge after the window",
    ALREADY_CHALLENGED: "receipt already challenged",
    ACKED_ELSEWHERE: "the payer acknowledged another receipt for this spend key",
    DISPUTE_NO_RECEIPT: "no such receipt to dispute",
    NOT_PAYER: "only the receipt's payer can dispute it",
    DISPUTE_LATE: "dispute after the window",
    DISPUTE_ACKED: "the payer acknowledged this receipt",
}
