"""`aemctl traces export`: the distillation memory of a domain as a training
set (specs/task-protocol.md §8).

It opens ``<home>/traces.sqlite`` (the memory rows this node wrote as a
payer), ``<home>/store.sqlite`` and ``<home>/genesis.aem`` directly (SQLite in
WAL mode lets it read while a daemon writes); no daemon is needed. Each row is
judged by :func:`aemd.traces.judge` from the signed task and receipt and this
node's replay of the log; what it leaves out is counted by reason.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter

from aemd.cliutil import EXIT_OK, Progress, add_home, add_json, print_json
from aemd.cmd_ledger import _export_target, _genesis, _own_account, _store
from aemd.home import Home, resolve_home
from aemd.traces import REASONS, LogView, TraceStore, judge
from ledger.atomicfile import AtomicFile
from protocol import errors
from protocol.errors import AemError
from protocol.schema import NAME
from protocol.task import InferenceWorkReceipt


def register_ctl(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("traces", help="this node's task memory: export it as a training set",
                       description="The tasks this node paid for, kept as distillation memory.")
    tsub = p.add_subparsers(title="traces commands", metavar="COMMAND")
    e = tsub.add_parser(
        "export", help="write a domain's successful tasks as JSON lines",
        description="Write every task of DOMAIN this node paid for and got a valid, acknowledged, "
                    "unchallenged receipt for (a code-patch task: also a passing report) as one JSON "
                    "object per line: prompt or messages, output, host, capsule, receipt, price, both "
                    "training-use policies, the verifier outcome. Tasks whose payer or host said "
                    "training use is forbidden are left out and counted, as are the others left out, "
                    "by reason. Fields: specs/task-protocol.md section 8. The file appears complete "
                    "or not at all.")
    e.add_argument("--domain", required=True, help="the task domain to export")
    e.add_argument("--out", required=True, metavar="FILE.jsonl", help="the file to write")
    add_home(e)
    add_json(e)
    e.set_defaults(func=_export)


def _export(args: argparse.Namespace) -> int:
    NAME.check(args.domain, "--domain")
    home = Home(resolve_home(args.home))
    g = _genesis(home)
    path = _export_target(args.out)
    payer = _own_account(home)
    if payer is None:
        raise AemError(errors.NOT_FOUND, f"{home.root} has no readable keystore: whose tasks would these be?")
    traces_path = home.root / "traces.sqlite"
    if not traces_path.exists():
        raise AemError(errors.NOT_FOUND, f"no task memory at {traces_path}: this node has paid for no task")
    store = _store(home, g)
    try:
        prog = Progress("reading the log", store.count())
        res = store.replay(int(time.time()), progress=prog.update)
        prog.done()
    finally:
        store.close()
    traces = TraceStore(traces_path)
    written, left_out = 0, Counter()
    try:
        total = traces.memory_count(args.domain)
        prog = Progress("exporting", total)
        with AtomicFile(path) as out:
            for i, m in enumerate(traces.memories(args.domain), 1):
                receipt_id = _receipt_id(m.receipt)
                view = LogView(acknowledged=res.acknowledged(receipt_id, payer), challenged=res.challenged(receipt_id))
                reason, record = judge(m, g.network_id, payer, view)
                if record is None:
                    left_out[reason] += 1
                else:
                    out.write(json.dumps(record, sort_keys=True, ensure_ascii=False).encode() + b"\n")
                    written += 1
                prog.update(i)
        prog.done()
    finally:
        traces.close()
    summary = {"file": str(path), "domain": args.domain, "written": written,
               "left_out": {r: left_out.get(r, 0) for r in REASONS}, "left_out_total": sum(left_out.values())}
    if args.json:
        print_json(summary)
    else:
        why = ", ".join(f"{n} {r}" for r, n in summary["left_out"].items() if n)
        print(f"wrote {written} task{'s' if written != 1 else ''} of {args.domain} to {path}", file=sys.stderr)
        print(f"left out {summary['left_out_total']}" + (f" ({why})" if why else ""), file=sys.stderr)
    return EXIT_OK


def _receipt_id(data: bytes) -> bytes:
    try:
        return InferenceWorkReceipt.decode(data).id
    except AemError:
        return b""      # judge() will call the row a bad record
