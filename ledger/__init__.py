"""The ledger: the log store, deterministic replay and the CreditLedger rules.

Public face (see ``specs/ledger.md``):

- :class:`LogStore` (``ledger/store.py``): the node's SQLite log of signed
  entries; :class:`InsertResult` / :class:`Status` for what an insert did;
- :func:`replay` (``ledger/replay.py``): the pure function (genesis, entries,
  as-of) -> :class:`ReplayResult`, with incremental :class:`Checkpoint`s;
- :func:`read_log` / :func:`write_log` (``ledger/logfile.py``): the export
  file format.
"""

from ledger.facts import Context, Fact, examine
from ledger.logfile import read_log, read_log_all, write_log
from ledger.replay import Checkpoint, ReplayResult, replay

# The store (SQLite) loads only when asked for, so the pure core imports on
# a Python without sqlite3 (a second implementation's test harness, say).
_STORE_NAMES = ("InsertResult", "LogStore", "Status", "VerifyReport")


def __getattr__(name: str):
    if name in _STORE_NAMES:
        from ledger import store
        return getattr(store, name)
    raise AttributeError(f"module 'ledger' has no attribute {name!r}")


__all__ = [
    "Checkpoint", "Context", "Fact", "InsertResult", "LogStore", "ReplayResult", "Status",
    "VerifyReport", "examine", "read_log", "read_log_all", "replay", "write_log",
]
