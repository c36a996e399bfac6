"""Benchmark: what an idle node costs, against an idle Python process with the
same libraries loaded.

    python bench/idle.py            # sample 60 s (one NodeCard interval, two sync intervals)
    python bench/idle.py --quick    # sample 10 s

Two real ``aemd start`` processes on 127.0.0.1 (default config except the
listen address: no capsule, so no model loaded, card interval 60 s, sync
interval 30 s), the second bootstrapping to the first. Once both are connected
and know each other's card, plus a settling pause, the first one (the
measured node) is sampled for the sampling period: resident memory (RSS, from
/proc via psutil, every 0.5 s; the figure is the largest sample) and CPU% =
(user + system CPU seconds over the period) / period x 100, of one core.

Baseline, sampled the same way in the same run:
``python -c "import trio, libp2p; trio.run(trio.sleep, N)"``: the interpreter
with trio and py-libp2p imported, asleep. The ratio rss / baseline rss says
what the node adds to the libraries it stands on. The baseline's CPU is ~0,
so its CPU ratio is not meaningful; CPU is reported as percentages and as the
difference in percentage points. Targets from the issue: under 150 MB
resident, near 0% CPU.

Figures are printed last, one ``name: value`` per line.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _mesh import Proc, TempRoot, config_text, log, make_homes, stop_all, wait_for  # noqa: E402

SETTLE_S = 5.0


def sample(pid: int, seconds: float, every: float = 0.5) -> dict:
    import psutil
    p = psutil.Process(pid)
    c0 = p.cpu_times()
    t0 = time.monotonic()
    rss = []
    deadline = t0 + seconds
    while time.monotonic() < deadline:
        rss.append(p.memory_info().rss)
        time.sleep(min(every, max(0.0, deadline - time.monotonic())))
    c1 = p.cpu_times()
    wall = time.monotonic() - t0
    cpu = (c1.user - c0.user) + (c1.system - c0.system)
    return {"rss_mb": max(rss) / 2**20, "rss_mb_first": rss[0] / 2**20, "cpu_pct": 100 * cpu / wall,
            "cpu_s": cpu, "wall": wall, "threads": p.num_threads()}


def baseline(seconds: float) -> dict:
    sleep_s = seconds + SETTLE_S + 30
    proc = subprocess.Popen([sys.executable, "-c", f"import trio, libp2p; trio.run(trio.sleep, {sleep_s})"],
                            stdin=subprocess.DEVNULL)
    try:
        import psutil
        p = psutil.Process(proc.pid)
        # wait until the imports are done (CPU time stops growing), then settle
        last = -1.0
        for _ in range(120):
            time.sleep(0.5)
            cur = sum(p.cpu_times()[:2])
            if cur == last:
                break
            last = cur
        time.sleep(SETTLE_S)
        return sample(proc.pid, seconds)
    finally:
        proc.kill()
        proc.wait(timeout=10)


def node(root: Path, seconds: float) -> dict:
    homes, keys, _ = make_homes(root / "mesh", 2, config=config_text())
    a, b = Proc(homes[0], keys[0], runner=False), Proc(homes[1], keys[1], runner=False)
    try:
        a.spawn().wait_ready()
        b.spawn([a.addr]).wait_ready()
        wait_for("both nodes connected, each with the other's card",
                 lambda: all(p.call("status")["peers_connected"] == 1 and p.call("status")["cards_known"] == 2
                             for p in (a, b)), 60, 0.5)
        time.sleep(SETTLE_S)
        return sample(a.pid, seconds)
    finally:
        stop_all([b, a])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="sample 10 s")
    ap.add_argument("--seconds", type=float, default=None, help="sampling period (default 60)")
    args = ap.parse_args()
    seconds = args.seconds or (10.0 if args.quick else 60.0)
    with TempRoot("aem-bench-idle-") as root:
        log(f"baseline: idle python with trio and libp2p imported, {seconds:.0f} s")
        base = baseline(seconds)
        log(f"node: aemd start with one peer, {seconds:.0f} s")
        n = node(root, seconds)
    figures = [
        ("sample_s", f"{seconds:.0f}"),
        ("node_rss_mb", f"{n['rss_mb']:.1f}"),
        ("baseline_rss_mb", f"{base['rss_mb']:.1f}"),
        ("node_over_baseline_rss", f"{n['rss_mb'] / base['rss_mb']:.2f}"),
        ("node_cpu_pct", f"{n['cpu_pct']:.2f}"),
        ("baseline_cpu_pct", f"{base['cpu_pct']:.2f}"),
        ("node_minus_baseline_cpu_pct_points", f"{n['cpu_pct'] - base['cpu_pct']:.2f}"),
        ("node_threads", str(n["threads"])),
    ]
    for name, value in figures:
        print(f"{name}: {value}")


if __name__ == "__main__":
    main()
