"""specs/ledger.md must agree with the code: its test vector, its worked
example and its table of reason codes."""

from __future__ import annotations

import re
from pathlib import Path

from ledger import reasons
from tests import ledger_vectors

SPEC = (Path(__file__).resolve().parent.parent / "specs" / "ledger.md").read_text()


def test_vector_block_matches_code():
    block = re.search(r"```ledger-vectors\n(.*?)```", SPEC, re.S).group(1).strip()
    assert block == ledger_vectors.block()


def test_worked_example_balances():
    res = ledger_vectors.results()
    early, late = (res[t] for t in ledger_vectors.AS_OF)
    C = ledger_vectors.C
    alice, bob, carol = (k.public for k in (ledger_vectors.ALICE, ledger_vectors.BOB, ledger_vectors.CAROL))
    assert early.balances == {alice: (88 * C, 0), carol: (12_500_000, 0), bob: (5 * C, 2 * C)}
    assert late.balances == {alice: (88 * C, 0), carol: (12_500_000, 0), bob: (7 * C, 0)}
    for r in (early, late):
        assert r.granted == 105 * C and r.minted == 2_500_000 and r.burned == 0
        assert r.frozen == {alice: 1}


def test_every_reason_code_is_in_the_spec_table():
    table = SPEC[SPEC.index("## 13. Reason codes"):]
    codes = {v for k, v in vars(reasons).items() if k.isupper() and isinstance(v, str)}
    for code in codes:
        assert f"`{code}`" in table, code
    assert set(reasons.DESCRIPTIONS) == codes


def test_vector_text_names_every_genesis_field_and_limit():
    """Section 12 gives every value the vector's genesis holds, so the
    vector can be rebuilt from the spec alone."""
    from protocol.genesis import Genesis, Limits
    text = " ".join(SPEC[SPEC.index("## 12. Test vector"):SPEC.index("```ledger-vectors")].split())
    g = ledger_vectors.genesis()
    for name, _ in Genesis._schema():
        if name in ("founder", "sig"):
            continue          # the founder's key is given by its seed; the signature follows
        assert f"`{name}`" in text, name
    for name, _ in Limits._schema():
        assert f"`{name}` {getattr(g.limits, name)}" in text, name
    assert "`created_at` T0" in text and "`max_mint_per_receipt` 1000 credits" in text
    for label in ("E10 alice to bob 1", "E11 alice to bob 2"):
        assert label in text, label
