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
