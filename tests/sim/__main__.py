"""Replay one seeded scenario and print its trace.

    .venv/bin/python -m tests.sim replay --scenario partition --seed 123 [--quiet]
    .venv/bin/python -m tests.sim list
"""

from __future__ import annotations

import argparse
import sys

from tests.sim.scenarios import SCENARIOS, SEEDS, replay_command, run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.sim")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("replay", help="run one scenario from its seed and print its trace")
    r.add_argument("--scenario", required=True, choices=sorted(SCENARIOS))
    r.add_argument("--seed", type=int, required=True)
    r.add_argument("--quiet", action="store_true", help="no trace, only the outcome")
    sub.add_parser("list", help="scenarios and the seeds pytest runs")
    args = ap.parse_args(argv)
    if args.cmd == "list":
        for name in sorted(SCENARIOS):
            print(f"{name}: seeds 0..{SEEDS[name] - 1}  ({SCENARIOS[name].__doc__.splitlines()[0]})")
        return 0
    mesh, out = run(args.scenario, args.seed, keep_trace=not args.quiet)
    if not args.quiet:
        for line in mesh.sim.trace_lines:
            print(line)
    print(f"# {replay_command(args.scenario, args.seed)}")
    print(f"# nodes {len(mesh.nodes)}, events {out.events}, simulated {out.sim_time_s:.1f} s, "
          f"trace {out.trace_hash}")
    print(f"# groups {out.groups}, roots {sorted({r.hex()[:16] for r in out.roots.values()})}")
    for f in out.failures:
        print(f"FAIL {f}")
    return 1 if out.failures else 0


if __name__ == "__main__":
    sys.exit(main())
