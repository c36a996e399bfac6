"""The ledger's invariants are ordinary checks that raise a typed error,
never ``assert``: they hold under ``python -O`` too (specs/ledger.md
section 6)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ledger.state import InvariantError, LedgerState
from protocol import errors

ROOT = Path(__file__).resolve().parent.parent
A = b"\x01" * 32

PROBE = """
import sys
from ledger.state import InvariantError, LedgerState
assert False, "this line vanishes under -O"
s = LedgerState()
checks = {
    "debit": lambda: s.debit(b"\\x01" * 32, 1),
    "pend_take": lambda: s.pend_take(b"\\x01" * 32, 1),
    "conservation": lambda: (setattr(s, "minted", 5), s.check_conservation()),
}
for name, fn in checks.items():
    try:
        fn()
    except InvariantError as e:
        print(name, e.code)
    else:
        print(name, "PASSED SILENTLY")
"""


def test_invariants_raise_under_python_O():
    out = subprocess.run([sys.executable, "-O", "-c", PROBE], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:3] == ["debit INVARIANT", "pend_take INVARIANT", "conservation INVARIANT"]


def test_a_debit_below_zero_raises():
    s = LedgerState()
    s.credit(A, 5)
    with pytest.raises(InvariantError) as e:
        s.debit(A, 6)
    assert e.value.code == errors.INVARIANT
    assert s.avail[A] == 5                 # nothing changed


def test_no_assert_statements_in_the_ledger_core():
    import ast
    for name in ("state.py", "replay.py", "rules.py", "feeds.py", "facts.py", "store.py"):
        tree = ast.parse((ROOT / "ledger" / name).read_text())
        assert not [n for n in ast.walk(tree) if isinstance(n, ast.Assert)], name


def test_one_order_key_and_one_link_rule():
    """The replay order and the link rule are each spelled once
    (ledger.facts.order_key, ledger.feeds.links); everything else calls them."""
    import re
    order = re.compile(r"\(\s*\w+\.lamport\s*,\s*\w+\.author\s*,\s*\w+\.seq\s*\)")
    link = re.compile(r"seq\s*-\s*1\b.*lamport|lamport.*seq\s*-\s*1\b|seq\s*\+\s*1\b.*lam")
    hits_order, hits_link = [], []
    for path in sorted((ROOT / "ledger").glob("*.py")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if order.search(code):
                hits_order.append((path.name, n))
            if link.search(code) and not code.strip().startswith(("\"", "'")):
                hits_link.append((path.name, n))
    assert [h[0] for h in hits_order] == ["facts.py"], hits_order
    assert all(h[0] == "feeds.py" for h in hits_link), hits_link
