"""`aemctl expert add|list|remove`, `aemctl submit-task`, `aemctl trace`."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shlex
import signal
import sys
import threading
import time
from pathlib import Path

from aemd import control
from aemd.capsules import LocalCapsule, Serving, list_capsules, remove_capsule, save_capsule
from aemd.cliutil import add_home, add_json, fmt_credits, print_json
from aemd.cmd_genesis import parse_credits
from aemd.home import Home, read_passphrase, resolve_home
from aemd.identity import load_node
from crypto.hashing import H
from protocol import errors
from protocol.errors import AemError
from protocol.admission import DEFAULT_ADMISSION
from protocol.mesh import ExpertCapsuleManifest
from protocol.task import MAX_PATCH, MAX_PROMPT, MAX_REPO_TAR, MAX_TOKENS, TRAINING_USES, TaskPacket

# The TaskPacket schema's own bounds, so the command refuses what the node would.
_TASK_FIELDS = dict(TaskPacket._schema())
MAX_SEED = _TASK_FIELDS["seed"].hi
MAX_TEMPERATURE_MILLI = _TASK_FIELDS["temperature_milli"].hi
MAX_LATENCY_BUDGET_MS = _TASK_FIELDS["latency_budget_ms"].hi

def _home(args: argparse.Namespace) -> Home:
    return Home(resolve_home(args.home))


def register_ctl(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("expert", help="manage the expert capsules this node hosts",
                       description="Add, list and remove the expert capsules this node serves. "
                                   "A running node starts (or stops) advertising them at once.")
    esub = e.add_subparsers(title="expert commands", metavar="COMMAND")

    p = esub.add_parser(
        "add", help="host a GGUF model (or the code-patch verifier) as an expert capsule",
        description="Read a GGUF file's metadata (architecture, parameters, quantisation, context, "
                    "tensor sizes), hash it, estimate the memory it needs, and write a signed "
                    "capsule manifest into the node's home. Refused when the estimate exceeds the "
                    "node's memory envelope (config [capacity], or the machine's RAM).")
    p.add_argument("file", nargs="?", metavar="FILE.gguf", help="the model file (omit with --code-patch)")
    p.add_argument("--code-patch", action="store_true",
                   help="host the code-patch verifier: runs a task's tests on its patch in a sandbox")
    p.add_argument("--judge", choices=("tests", "applies"), default="tests",
                   help="code-patch: how a patch is judged: run the tests (default), or pass any patch that "
                        "applies without running them (cheaper; admission measures how well it agrees "
                        "with labelled fixtures)")
    p.add_argument("--domain", required=True, help="the task domain it serves, e.g. general, python")
    p.add_argument("--tags", nargs="*", default=[], help="capability tags")
    p.add_argument("--price", required=True, metavar="CREDITS", help="price per task in credits")
    p.add_argument("--name", help="a display name (default: the file name)")
    p.add_argument("--max-concurrency", type=int, default=1, help="tasks served at once, 1..1024 (default 1)")
    p.add_argument("--class", dest="node_class", metavar="NAME",
                   help="the genesis node class the capsule claims to fit (its memory budget; admission "
                        "gate 5 checks it); default: the smallest class whose budget covers the estimate")
    p.add_argument("--submit", action="store_true",
                   help="then submit it for admission (as `aemctl expert submit`; needs a running node)")
    p.add_argument("--passphrase-file", metavar="FILE", help="passphrase of an encrypted identity")
    add_home(p)
    add_json(p)
    p.set_defaults(func=_expert_add)

    from aemd.cmd_admission import register_expert
    register_expert(esub)

    p = esub.add_parser("list", help="the capsules this node hosts")
    add_home(p)
    add_json(p)
    p.set_defaults(func=_expert_list)

    p = esub.add_parser("remove", help="stop hosting a capsule")
    p.add_argument("capsule", metavar="CAPSULE_ID", help="the capsule id or a unique prefix of it")
    add_home(p)
    add_json(p)
    p.set_defaults(func=_expert_remove)

    p = sub.add_parser(
        "submit-task", help="have the mesh do a task, and pay for it",
        description="Send a task to the best host in the mesh for its domain, print the output as it "
                    "streams, then the host, the price and the receipt id. The running node signs the "
                    "task and one spend authorisation; a retry on another host reuses it, so a task "
                    "is never paid twice.")
    p.add_argument("--domain", required=True, help="task domain")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--message", metavar="TEXT",
                      help="chat task: your message; the host applies its model's own chat template "
                           "(use this with instruct models)")
    what.add_argument("--prompt", help="text task: a raw completion of this prompt (no chat template)")
    what.add_argument("--patch", metavar="FILE", help="code-patch task: a unified diff")
    p.add_argument("--system", metavar="TEXT", help="chat task: a system message before --message")
    p.add_argument("--repo", metavar="DIR", help="code-patch task: the repository to patch")
    p.add_argument("--test-cmd", metavar="CMD", help="code-patch task: the test command, e.g. 'python3 -m unittest'")
    p.add_argument("--tags", nargs="*", default=[], help="capability tags the host must have")
    p.add_argument("--max-price", default="1", metavar="CREDITS", help="most you will pay (default 1)")
    p.add_argument("--max-tokens", type=int, default=128, help="text task: tokens to generate (default 128)")
    p.add_argument("--seed", type=int, default=0, help="text task: sampling seed (default 0)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="text task: sampling temperature; 0 (default) is deterministic")
    p.add_argument("--timeout", type=float, default=600, metavar="SECONDS",
                   help="give up after this many seconds in all, exit 5 (default 600)")
    p.add_argument("--training-use", choices=TRAINING_USES, default=None,
                   help="may this task's prompt and output become training data (`aemctl traces export`)? "
                        "Signed into the task; default: the node's [training] use (forbidden unless set)")
    p.add_argument("--use", dest="uses", action="append", default=[], metavar="COMMITMENT",
                   help="a skill or operator contribution (its commitment, 64 hex) the task applies; "
                        "repeatable, at most 4. Signed into the task and repeated in the host's receipt, "
                        "it counts for that contribution's verified use (specs/growth.md)")
    add_home(p)
    add_json(p)
    p.set_defaults(func=_submit)

    p = sub.add_parser("trace", help="why a task went where it went",
                       description="Show the RouteTrace of a task this node routed: candidates and "
                                   "scores, each attempt and its outcome, the choice.")
    p.add_argument("task_id", metavar="TASK_ID", help="the task id or a unique prefix (at least 4 hex digits)")
    add_home(p)
    add_json(p)
    p.set_defaults(func=_trace)


def _notify(home: Home) -> bool:
    try:
        control.call(home.socket, "reload_capsules", timeout=10)
        return True
    except AemError as exc:
        if exc.code == errors.NO_NODE:
            return False
        raise


def make_manifest(key, net: bytes, args: argparse.Namespace, cfg: dict,
                  admission=DEFAULT_ADMISSION) -> tuple[ExpertCapsuleManifest, str]:
    domain, tags = args.domain, tuple(args.tags)
    if args.code_patch:
        if args.file:
            raise AemError(errors.BAD_VALUE, "--code-patch takes no model file")
        return code_patch_manifest(key, net, domain, tags, getattr(args, "judge", "tests"),
                                   args.name or f"code-patch verifier ({domain})"), ""
    if getattr(args, "judge", "tests") != "tests":
        raise AemError(errors.BAD_VALUE, "--judge goes with --code-patch")
    if not args.file:
        raise AemError(errors.BAD_VALUE, "give a GGUF file, or --code-patch")
    from aemd.executors import estimate_memory_mb, inspect_gguf
    path = Path(args.file).expanduser().resolve()
    if not path.is_file():
        raise AemError(errors.NOT_FOUND, f"no file at {path}")
    print(f"reading {path.name} ...", file=sys.stderr) if sys.stderr.isatty() else None
    info = inspect_gguf(path)
    n_ctx = min(cfg["llama"]["n_ctx"], info.context_length or cfg["llama"]["n_ctx"])
    need = estimate_memory_mb(info, n_ctx)
    cap = cfg["capacity"]
    on_gpu = cfg["llama"]["n_gpu_layers"] != 0 and cap["vram_mb"] > 0
    envelope = cap["vram_mb"] if on_gpu else (cap["ram_mb"] or
                                              os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1 << 20))
    if need > envelope:
        where = "VRAM" if on_gpu else "RAM"
        raise AemError(errors.REFUSED, f"{path.name} needs about {need} MB with n_ctx {n_ctx}, "
                                       f"more than this node's {envelope} MB of {where}")
    m = ExpertCapsuleManifest(
        net=net, author=key.public, name=(args.name or path.name)[:200], kind="gguf",
        content_hash=info.content_hash, size_bytes=info.size_bytes, architecture=info.architecture[:64],
        n_params=info.n_params, quantization=info.quantization[:32], context_length=info.context_length or 0,
        vram_need_mb=need, domain=domain, tags=tags, eval_claims=(), created_at=int(time.time()), sig=b"",
        node_class=_node_class(args, admission, need))
    return m.signed(key), str(path)


def _node_class(args: argparse.Namespace, admission, need_mb: int) -> str:
    """The class named by --class (one of the genesis's), else the smallest
    that covers the estimate; "" when none does (the capsule can still be
    served, but not admitted)."""
    names = [c.name for c in admission.classes]
    if getattr(args, "node_class", None):
        if admission.node_class(args.node_class) is None:
            raise AemError(errors.BAD_VALUE, f"--class {args.node_class!r} is not a node class of this network "
                                             f"({', '.join(names) or 'it defines none'})")
        return args.node_class
    c = admission.smallest_class_for(need_mb)
    return c.name if c is not None else ""


def code_patch_manifest(key, net: bytes, domain: str, tags: tuple, judge: str, name: str) -> ExpertCapsuleManifest:
    """A code-patch verifier capsule: its artefact is the runner spec (which
    judge it applies), its manifest carries the default patch policy
    (specs/admission-codepatch.md)."""
    from aemd.codepatch_capsule import default_patch_policy, runner_spec_bytes
    spec = runner_spec_bytes(judge)
    return ExpertCapsuleManifest(
        net=net, author=key.public, name=name[:200], kind="code_patch", content_hash=H(spec),
        size_bytes=len(spec), architecture="", n_params=0, quantization="", context_length=0, vram_need_mb=0,
        domain=domain, tags=tags, eval_claims=(), created_at=int(time.time()), sig=b"", node_class="cpu",
        patch_policy=(default_patch_policy(),)).signed(key)


def write_runner_spec(home: Home, judge: str) -> str:
    """The runner spec file a code-patch capsule serves (its artefact)."""
    from aemd.codepatch_capsule import runner_spec_bytes
    from aemd.identity import atomic_write
    home.capsules.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = home.capsules / f"runner-{judge}.json"
    atomic_write(path, runner_spec_bytes(judge))
    return str(path)


MAX_CONCURRENCY = 1024     # HostAdvertisement.max_concurrency's wire bound


def _same_capsule(a: ExpertCapsuleManifest, b: ExpertCapsuleManifest) -> bool:
    """The same expert offered the same way: adding it again is not a new capsule."""
    return ((a.kind, a.content_hash, a.domain, a.tags, a.author, a.node_class)
            == (b.kind, b.content_hash, b.domain, b.tags, b.author, b.node_class))


def _expert_add(args: argparse.Namespace) -> int:
    home = _home(args)
    key, genesis, cfg = load_node(home, read_passphrase(args.passphrase_file))
    if not 1 <= args.max_concurrency <= MAX_CONCURRENCY:
        raise AemError(errors.BAD_VALUE, f"--max-concurrency must be 1..{MAX_CONCURRENCY}")
    price = parse_credits(args.price)
    manifest, path = make_manifest(key, genesis.network_id, args, cfg, genesis.admission)
    roles = ("code_patch",) if manifest.kind == "code_patch" else ("inference",)
    if manifest.kind == "code_patch":
        path = write_runner_spec(home, args.judge)
    serving = Serving(path=path, price=price, roles=roles, max_concurrency=args.max_concurrency)
    # Idempotent: the same expert (kind, content, domain, tags) keeps its
    # capsule id; only its serving settings (price, concurrency, path) change.
    existing = next((c for c in list_capsules(home) if _same_capsule(c.manifest, manifest)), None)
    state = "added"
    if existing is not None:
        manifest = existing.manifest
        state = "unchanged" if existing.serving == serving else "updated"
    cap = LocalCapsule(manifest, serving)
    if state != "unchanged":
        save_capsule(home, cap)
    try:
        live = _notify(home)
    except AemError:
        # The node refused it: leave the home as it was, so a failed command
        # leaves no capsule behind to be served at the next start.
        if existing is None:
            remove_capsule(home, cap.id.hex())
        elif state == "updated":
            save_capsule(home, existing)
        raise
    submitted = None
    if getattr(args, "submit", False):
        if not live:
            raise AemError(errors.NO_NODE, f"capsule {cap.id.hex()} saved, but --submit needs a running node: "
                                           "start it, then `aemctl expert submit`")
        from aemd.cmd_admission import submit_capsule
        submitted, _ = submit_capsule(home, cap.id.hex(), quiet=True)
    if args.json:
        print_json({"capsule_id": cap.id, "manifest": manifest.to_map(), "advertised": live, "state": state,
                    "submitted": submitted})
    else:
        note = {"added": "", "updated": " (already hosted: settings updated)",
                "unchanged": " (already hosted: nothing changed)"}[state]
        print(f"capsule {cap.id.hex()}{note}")
        print(f"  {manifest.kind} {manifest.name}  domain {manifest.domain}  price {fmt_credits(cap.serving.price)}")
        if manifest.kind == "gguf":
            print(f"  {manifest.architecture}, {manifest.n_params:,} parameters, {manifest.quantization}, "
                  f"needs ~{manifest.vram_need_mb} MB")
        print("  advertised now" if live else
              "  saved; no node is running: it will be advertised when the node starts")
        if submitted is not None:
            print(f"  submitted for admission ({submitted['status']}); `aemctl experts --status` follows it")
    return 0


def _capsule_row(c: LocalCapsule) -> dict:
    m = c.manifest
    return {"capsule_id": c.id.hex(), "kind": m.kind, "name": m.name, "domain": m.domain, "tags": list(m.tags),
            "price": c.serving.price, "path": c.serving.path, "quantization": m.quantization,
            "n_params": m.n_params, "memory_mb": m.vram_need_mb, "max_concurrency": c.serving.max_concurrency}


def _expert_list(args: argparse.Namespace) -> int:
    caps = list_capsules(_home(args))
    if args.json:
        print_json([_capsule_row(c) for c in caps])
        return 0
    if not caps:
        print("no capsules; add one with `aemctl expert add`")
    for c in caps:
        r = _capsule_row(c)
        print(f"{r['capsule_id'][:16]}  {r['kind']:10}  {r['domain']:14}  {fmt_credits(r['price'])} cr  {r['name']}")
    return 0


MIN_CAPSULE_PREFIX = 4


def _expert_remove(args: argparse.Namespace) -> int:
    home = _home(args)
    prefix = args.capsule.strip().lower()
    # An empty or short prefix would match whatever capsule happens to be alone.
    if len(prefix) < MIN_CAPSULE_PREFIX or any(c not in "0123456789abcdef" for c in prefix):
        raise AemError(errors.BAD_VALUE, f"give at least {MIN_CAPSULE_PREFIX} hex digits of the capsule id "
                                         "(`aemctl expert list` shows them)")
    cap = remove_capsule(home, prefix)
    live = _notify(home)
    if args.json:
        print_json({"removed": cap.id, "withdrawn": live})
    else:
        print(f"removed {cap.id.hex()}")
    return 0


MAX_TIMEOUT_S = 24 * 3600


def _text_args(args: argparse.Namespace) -> dict:
    """The text-task arguments, each checked here so a bad value is a one-line
    error before anything reaches the node."""
    if args.repo or args.test_cmd:
        raise AemError(errors.BAD_VALUE, "--repo and --test-cmd go with --patch")
    if not math.isfinite(args.temperature) or not 0 <= args.temperature <= MAX_TEMPERATURE_MILLI / 1000:
        raise AemError(errors.BAD_VALUE, f"--temperature must be a number from 0 to {MAX_TEMPERATURE_MILLI / 1000:g}")
    if not 0 <= args.seed <= MAX_SEED:
        raise AemError(errors.BAD_VALUE, f"--seed must be an integer from 0 to {MAX_SEED}")
    if not 1 <= args.max_tokens <= MAX_TOKENS:
        raise AemError(errors.BAD_VALUE, f"--max-tokens must be from 1 to {MAX_TOKENS}")
    out: dict = dict(kind="text", max_tokens=args.max_tokens, seed=args.seed,
                     temperature_milli=int(round(args.temperature * 1000)))
    if args.message is not None:
        if not args.message:
            raise AemError(errors.BAD_VALUE, "--message is empty")
        msgs = [{"role": "system", "content": args.system}] if args.system else []
        out["messages"] = msgs + [{"role": "user", "content": args.message}]
        size = sum(len(m["content"].encode("utf-8", "replace")) for m in out["messages"])
    else:
        if args.system is not None:
            raise AemError(errors.BAD_VALUE, "--system goes with --message (a chat), not --prompt")
        if not args.prompt:
            raise AemError(errors.BAD_VALUE, "--prompt is empty")
        out["prompt"] = args.prompt
        size = len(args.prompt.encode("utf-8", "replace"))
    if size > MAX_PROMPT:
        raise AemError(errors.TOO_LARGE, f"the text is longer than {MAX_PROMPT} bytes")
    return out


def _code_args(args: argparse.Namespace) -> dict:
    if args.system is not None:
        raise AemError(errors.BAD_VALUE, "--system goes with --message")
    if not args.repo or not args.test_cmd:
        raise AemError(errors.BAD_VALUE, "a code-patch task needs --patch, --repo and --test-cmd")
    try:
        test_cmd = shlex.split(args.test_cmd)
    except ValueError as exc:
        raise AemError(errors.BAD_VALUE, f"--test-cmd: {exc}") from None
    if not test_cmd:
        raise AemError(errors.BAD_VALUE, "--test-cmd is empty")
    from aemd.executors import build_tar
    path = Path(args.patch)
    if not path.is_file():
        raise AemError(errors.NOT_FOUND, f"--patch: no file at {path}"
                       + (" (it is a directory)" if path.is_dir() else ""))
    try:
        with path.open("rb") as fh:
            patch = fh.read(MAX_PATCH + 1)
    except OSError as exc:
        raise AemError(errors.NOT_FOUND, f"--patch: cannot read {path}: {exc.strerror}") from None
    if len(patch) > MAX_PATCH:
        raise AemError(errors.TOO_LARGE, f"the patch is larger than {MAX_PATCH} bytes")
    repo = build_tar(args.repo)
    if len(repo) > MAX_REPO_TAR:
        raise AemError(errors.TOO_LARGE, f"the repository is larger than {MAX_REPO_TAR} bytes as a tar")
    return dict(kind="code_patch", patch=patch.decode("utf-8", "replace"), repo_tar=repo, test_cmd=test_cmd)


@contextlib.contextmanager
def _deadline(seconds: float):
    """Raise AemError(TIMEOUT) when ``seconds`` have passed in all: the socket's
    own timeout only bounds each read, and a streaming task reads often."""
    def expire(signum, frame):
        raise AemError(errors.TIMEOUT, f"no result within --timeout {seconds:g} s")
    if threading.current_thread() is not threading.main_thread():
        yield                         # signals reach the main thread only; the socket timeout still holds
        return
    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _submit(args: argparse.Namespace) -> int:
    home = _home(args)
    if not math.isfinite(args.timeout) or not 0 < args.timeout <= MAX_TIMEOUT_S:
        raise AemError(errors.BAD_VALUE, f"--timeout must be a number of seconds above 0 and at most {MAX_TIMEOUT_S}")
    cargs: dict = {"domain": args.domain, "tags": list(args.tags), "max_price": parse_credits(args.max_price)}
    cargs.update(_text_args(args) if args.patch is None else _code_args(args))
    # The node gives up on a host when this budget has passed, too.
    cargs["latency_budget_ms"] = min(int(args.timeout * 1000), MAX_LATENCY_BUDGET_MS)
    if args.training_use is not None:
        cargs["training_use"] = args.training_use
    if args.uses:
        cargs["uses"] = [u.lower() for u in args.uses]

    def on_event(ev: dict) -> None:
        if args.json:
            return
        if ev["event"] == "chunk" and cargs["kind"] == "text":
            sys.stdout.write(ev["data"].decode("utf-8", "replace"))
            sys.stdout.flush()
        elif ev["event"] == "attempt":
            print(f"\n[host {ev['host'][:12]} failed: {ev['outcome']} {ev['detail']}; trying the next]",
                  file=sys.stderr)

    with _deadline(args.timeout):
        res = control.call(home.socket, "submit_task", cargs, on_event=on_event, timeout=args.timeout)
    if args.json:
        out = dict(res)
        out["output"] = res["output"].decode("utf-8", "replace")
        out["output_hex"] = res["output"].hex()       # the exact bytes the receipt hashes
        print_json(out)
        return 0
    if cargs["kind"] == "code_patch":
        print(res["output"].decode("utf-8", "replace"))
    print()
    print(f"host     {res['peer_id']}")
    print(f"price    {fmt_credits(res['price'])} credits")
    print(f"receipt  {res['receipt_id']}")
    print(f"task     {res['task_id']}")
    return 0


def _trace(args: argparse.Namespace) -> int:
    t = control.call(_home(args).socket, "trace", {"task_id": args.task_id})
    if args.json:
        print_json(t)
        return 0
    print(f"task     {t['task_id'].hex()}")
    print(f"outcome  {t['outcome']}")
    print("candidates:")
    for c in t["candidates"]:
        print(f"  {c['host'].hex()[:16]}  score {c['score']:6}  price {fmt_credits(c['price'])}")
    print("attempts:")
    for a in t["attempts"]:
        print(f"  {a['host'].hex()[:16]}  {a['outcome']:12} {a['elapsed_ms']:6} ms  {a['detail']}")
    return 0
