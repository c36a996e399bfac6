"""Benchmark: the per-task ledger check against the size of the log.

    python bench/ledger_check.py            # logs of 2,000, 20,000 and 100,000 entries
    python bench/ledger_check.py --quick    # 2,000 and 20,000, under a minute

Before a host accepts a task, and before a payer routes one, the node asks
its log store for the payer's available balance and whether the spend key is
spent (``LogStore.replay(now)`` from the store's checkpoint, then
``ReplayResult.available`` / ``spend_key_used``). That check must cost the
same on a year-old log as on a new one. For each size the script builds a
realistic log (tests/ledgerkit.bulk: 2,000 accounts, 200 hosts, every kind
of entry), stores it in a real SQLite LogStore, replays once (the checkpoint
a running node keeps), then times:

- ``check``: the check with nothing new since the last one (the median of
  ``--repeat`` runs);
- ``check_after_1``: the check right after one new entry was stored (a
  transfer authored locally), the case between two tasks of a busy host.

Figures, printed last as ``name: value`` lines: each time in milliseconds,
and the ratios of the largest log to the smallest measured in the same run
(goal: ``check`` at 100,000 entries within 1.5x of 2,000). The baseline is
the 2,000-entry log measured in the same run; the Ed25519 verification of
one signature is printed beside it for scale.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

from ledger.store import LogStore  # noqa: E402
from tests.ledgerkit import MICRO, bulk  # noqa: E402


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def median_ms(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter_ns()
        fn()
        times.append(time.perf_counter_ns() - t)
    return statistics.median(times) / 1e6


def verify_ms(repeat: int) -> float:
    k = Ed25519PrivateKey.generate()
    pub, msg = k.public_key(), b"x" * 200
    sig = k.sign(msg)
    return median_ms(lambda: pub.verify(sig, msg), repeat)


def measure(n: int, repeat: int, tmp: Path) -> dict[str, float]:
    log(f"building a {n}-entry log ...")
    net, entries = bulk(n, seed=1)
    end = max(e.ts for e in _entries(entries))
    store = LogStore.open(tmp / f"store-{n}.sqlite", net.genesis)
    try:
        for i in range(0, len(entries), 2000):
            store.insert_many(entries[i:i + 2000])
        now = end + 60
        store.replay(now)                      # the checkpoint a running node keeps
        payer = net.users[7]
        key = bytes(32)

        def check() -> None:
            res = store.replay(now)
            res.available(payer.public)
            res.spend_key_used(payer.public, key)

        quiet = median_ms(check, repeat)
        after = []
        sender, recipient = net.users[11], net.users[12]
        for i in range(max(3, repeat // 4)):
            store.append_local(sender, net.transfer(sender, recipient, MICRO // 100 + i, at=now), now)
            t = time.perf_counter_ns()
            check()
            after.append(time.perf_counter_ns() - t)
            now += 1
        return {"check": quiet, "check_after_1": statistics.median(after) / 1e6,
                "stored": store.count()}
    finally:
        store.close()


def _entries(datas):
    from protocol.entry import Entry
    for d in datas:
        yield Entry.decode(d)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2,000 and 20,000 entries only")
    ap.add_argument("--repeat", type=int, default=40, help="checks timed per size (median)")
    args = ap.parse_args()
    sizes = (2_000, 20_000) if args.quick else (2_000, 20_000, 100_000)
    figures: dict[int, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as d:
        for n in sizes:
            figures[n] = measure(n, args.repeat, Path(d))
            log(f"  {n}: {figures[n]}")
    lo, hi = sizes[0], sizes[-1]
    print(f"ed25519_verify_ms: {verify_ms(2000):.4f}")
    for n in sizes:
        print(f"check_ms_{n}: {figures[n]['check']:.3f}")
        print(f"check_after_1_ms_{n}: {figures[n]['check_after_1']:.3f}")
    print(f"check_ratio_{hi}_to_{lo}: {figures[hi]['check'] / figures[lo]['check']:.2f}")
    print(f"check_after_1_ratio_{hi}_to_{lo}: "
          f"{figures[hi]['check_after_1'] / figures[lo]['check_after_1']:.2f}")


if __name__ == "__main__":
    main()
