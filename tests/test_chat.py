"""Chat tasks and the text-task fixes around them.

- the executor's chat equals llama-cpp-python's ``create_chat_completion`` (a tiny
  model with a ChatML template, and the real SmolLM2-135M-Instruct);
- TaskPacket's prompt/messages rule and build_task's typed errors;
- `aemctl submit-task` input errors as one line each;
- on real nodes: "What is the capital of France?" names Paris; a raw prompt that
  yields 0 tokens is not charged; a model without a template, a missing model
  file and a changed one give the host's own reason or are withdrawn at start;
  --timeout ends at the deadline with exit 5; errors speak credits.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from types import SimpleNamespace

import llama_cpp
import pytest

from aemd import ctl
from aemd.executors.llama import LlamaExecutor, no_extra_bufts
from aemd.executors.models import smollm2_path
from aemd.executors.tinygguf import N_BYTE, N_SPECIAL, TINY_MODEL, vocab_pieces, write_tiny_llama_gguf
from aemd.tasks import build_task
from crypto.keys import SigningKey
from protocol import errors
from protocol.errors import AemError
from protocol.task import ChatMessage, TaskPacket
from tests.nodekit import BIN, Mesh, wait_for

# ChatML with the tiny model's own EOS (</s>) as end-of-turn, and a BOS the template writes.
TINY_CHATML = ("{{ bos_token }}{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
               "message['content'] + eos_token + '\n'}}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
FRANCE = [{"role": "system", "content": "You are a helpful assistant."},
          {"role": "user", "content": "What is the capital of France?"}]
N_CTX = 512


@pytest.fixture(scope="module")
def tiny_chat(tmp_path_factory):
    return write_tiny_llama_gguf(tmp_path_factory.mktemp("chat") / "tiny-chat.gguf", seed=3,
                                 chat_template=TINY_CHATML, **TINY_MODEL)


def _direct_chat(path, messages, max_tokens, temperature_milli, seed):
    with no_extra_bufts():
        llm = llama_cpp.Llama(str(path), n_ctx=N_CTX, n_threads=1, n_threads_batch=1, verbose=False)
    try:
        return llm.create_chat_completion(messages, max_tokens=max_tokens, temperature=temperature_milli / 1000,
                                          seed=seed)
    finally:
        llm.close()


def _same(got, want, pieces):
    c = want["choices"][0]
    assert got.text == c["message"]["content"]
    assert got.tokens_out == want["usage"]["completion_tokens"]
    assert got.prompt_tokens == want["usage"]["prompt_tokens"]
    assert got.finish_reason == c["finish_reason"]
    assert "".join(pieces) == got.text                  # streamed pieces add up to the answer


def test_chat_equals_create_chat_completion_on_a_tiny_model(tiny_chat):
    cases = [(FRANCE, 24, 0, 0), ([{"role": "user", "content": "Hi"}], 40, 0, 1),
             ([{"role": "user", "content": "a story"}, {"role": "assistant", "content": "Once"},
               {"role": "user", "content": "more é漢字"}], 30, 700, 9)]
    with LlamaExecutor(tiny_chat, n_ctx=N_CTX, n_threads=1) as ex:
        for messages, max_tokens, temp, seed in cases:
            pieces: list[str] = []
            got = ex.chat(messages, max_tokens, seed, temp, pieces.append)
            _same(got, _direct_chat(tiny_chat, messages, max_tokens, temp, seed), pieces)
        # the template's BOS is the only one: none is added in front of it
        toks = ex.chat_tokens(FRANCE)
        assert toks[0] == 1 and toks[1] != 1


def test_chat_stops_at_the_eos_text_inside_a_token_as_create_chat_completion(tmp_path):
    """With a common letter as EOS, its text turns up inside longer pieces: the
    answer is cut before it, and no streamed piece holds any of it."""
    eos = N_SPECIAL + N_BYTE + vocab_pieces(TINY_MODEL["n_vocab_pieces"]).index("e")
    cut = 0
    messages = [{"role": "user", "content": "Hi there"}]
    for seed in (1, 2, 3):
        path = write_tiny_llama_gguf(tmp_path / f"e{seed}.gguf", seed=seed, chat_template=TINY_CHATML,
                                     eos_token_id=eos, **TINY_MODEL)
        with LlamaExecutor(path, n_ctx=N_CTX, n_threads=1) as ex:
            pieces: list[str] = []
            got = ex.chat(messages, 60, 0, 0, pieces.append)
            full = ex._llm.detokenize(list(got.token_ids))
        _same(got, _direct_chat(path, messages, 60, 0, 0), pieces)
        assert "e" not in got.text
        cut += len(full) > len(got.output_bytes)
    assert cut >= 1                                      # the stop string, not the EOS token, ended one


def test_smollm2_chat_equals_create_chat_completion_and_names_paris():
    path = smollm2_path()
    with LlamaExecutor(path, n_ctx=N_CTX, n_threads=1) as ex:
        assert "<|im_start|>" in ex.chat_template
        pieces: list[str] = []
        got = ex.chat(FRANCE, 24, 0, 0, pieces.append)
    _same(got, _direct_chat(path, FRANCE, 24, 0, 0), pieces)
    assert "Paris" in got.text and got.finish_reason == "stop"     # stopped at <|im_end|>


def test_chat_refused_without_a_template_and_bad_messages(tmp_path):
    plain = write_tiny_llama_gguf(tmp_path / "plain.gguf", seed=1, **TINY_MODEL)
    with LlamaExecutor(plain, n_ctx=N_CTX, n_threads=1) as ex:
        assert ex.chat_template is None
        with pytest.raises(AemError) as e:
            ex.chat(FRANCE, 8, 0)
        assert e.value.code == errors.REFUSED and "chat template" in e.value.detail
    strict = write_tiny_llama_gguf(tmp_path / "strict.gguf", seed=1, **TINY_MODEL,
                                   chat_template="{% if messages[0]['role'] != 'user' %}"
                                                 "{{ raise_exception('first must be user') }}{% endif %}x")
    with LlamaExecutor(strict, n_ctx=N_CTX, n_threads=1) as ex:
        with pytest.raises(AemError) as e:
            ex.chat(FRANCE, 8, 0)
        assert e.value.code == errors.BAD_VALUE and "first must be user" in e.value.detail
        for bad in ([], [{"role": "robot", "content": "x"}], [{"role": "user", "content": 5}],
                    [{"role": "user", "content": "x", "extra": 1}], "hi"):
            with pytest.raises(AemError):
                ex.chat(bad, 8, 0)


# -- the wire and the control-socket arguments ------------------------------------------

PAYER = SigningKey.from_seed(bytes([9]) * 32)
NODE = SimpleNamespace(net=bytes(32), key=PAYER, now=lambda: 1_800_000_000)


def test_task_packet_carries_exactly_one_of_prompt_or_messages():
    chat = build_task(NODE, {"domain": "general", "max_price": 1, "messages": FRANCE})
    assert chat.kind == "text" and chat.prompt == "" and chat.messages[1] == ChatMessage(role="user",
                                                                                        content=FRANCE[1]["content"])
    assert TaskPacket.decode(chat.encode()) == chat
    chat.verify(NODE.net)
    base = dict(chat.__dict__)
    for k in ("_canonical", "_wire_map"):
        base.pop(k, None)
    with pytest.raises(AemError) as e:
        TaskPacket(**{**base, "prompt": "also"})
    assert e.value.code == errors.BAD_VALUE
    with pytest.raises(AemError):
        TaskPacket(**{**base, "messages": ()})                     # neither
    with pytest.raises(AemError) as e:
        TaskPacket(**{**base, "messages": tuple(ChatMessage(role="user", content="x" * 40_000) for _ in range(2))})
    assert e.value.code == errors.TOO_LARGE                           # 64 KiB in all
    with pytest.raises(AemError):
        ChatMessage(role="tool", content="x")


@pytest.mark.parametrize("args,code", [
    ({"kind": "text", "prompt": "hi", "tags": 5}, errors.BAD_TYPE),
    ({"kind": "code_patch", "patch": "", "test_cmd": 5}, errors.BAD_TYPE),
    ({"kind": "code_patch", "patch": "", "test_cmd": ["ok", 5]}, errors.BAD_TYPE),
    ({"kind": "code_patch", "patch": 5, "test_cmd": ["true"]}, errors.BAD_TYPE),
    ({"kind": "code_patch", "repo_tar": "x", "test_cmd": ["true"]}, errors.BAD_TYPE),
    ({"kind": "text", "prompt": 5}, errors.BAD_TYPE),
    ({"kind": "text", "prompt": "hi", "max_tokens": "8"}, errors.BAD_TYPE),
    ({"kind": "text", "prompt": "hi", "seed": True}, errors.BAD_TYPE),
    ({"kind": "text", "prompt": "hi", "seed": 2**70}, errors.BAD_VALUE),
    ({"kind": "text", "prompt": "hi", "max_price": 1.5}, errors.BAD_TYPE),
    ({"kind": "text", "prompt": "hi", "domain": ["x"]}, errors.BAD_TYPE),
    ({"kind": "text", "prompt": "hi", "messages": FRANCE}, errors.BAD_VALUE),
    ({"kind": "text"}, errors.BAD_VALUE),
    ({"messages": "hi"}, errors.BAD_VALUE),
    ({"messages": ["hi"]}, errors.BAD_TYPE),
    ({"messages": [{"role": "user"}]}, errors.MISSING_FIELD),
    ({"messages": [{"role": "user", "content": "x", "name": "y"}]}, errors.UNKNOWN_FIELD),
    ({"messages": [{"role": "user", "content": "x"}] * 65}, errors.TOO_LARGE),
    ({"kind": "code_patch", "messages": FRANCE, "test_cmd": ["true"]}, errors.BAD_VALUE),
    ({"kind": "video"}, errors.BAD_VALUE),
])
def test_build_task_answers_bad_arguments_with_typed_errors(args, code):
    with pytest.raises(AemError) as e:
        build_task(NODE, {"domain": "general", "max_price": 1, **args})
    assert e.value.code == code


@pytest.mark.parametrize("extra,needle", [
    (["--message", "hi", "--temperature", "nan"], "--temperature"),
    (["--message", "hi", "--temperature", "inf"], "--temperature"),
    (["--message", "hi", "--seed", str(2**70)], "--seed"),
    (["--message", "hi", "--max-price", "1e30"], "at most"),
    (["--message", "hi", "--timeout", "0"], "--timeout"),
    (["--message", "hi", "--timeout", "-1"], "--timeout"),
    (["--message", "hi", "--timeout", "nan"], "--timeout"),
    (["--message", "hi", "--max-tokens", "0"], "--max-tokens"),
    (["--prompt", "hi", "--system", "be brief"], "--system"),
    (["--patch", "/nonexistent/fix.diff", "--repo", ".", "--test-cmd", "true"], "no file"),
    (["--patch", "/", "--repo", ".", "--test-cmd", "true"], "directory"),
    (["--patch", "/etc/hostname", "--repo", ".", "--test-cmd", "python -c 'x"], "--test-cmd"),
])
def test_submit_task_bad_inputs_are_one_line_errors(tmp_path, capsys, extra, needle):
    rc = ctl.main(["submit-task", "--domain", "general", *extra, "--home", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 1, err
    assert err.startswith("error: ") and err.count("\n") == 1 and needle in err and "Traceback" not in err


def test_submit_task_good_input_reaches_for_the_node(tmp_path, capsys):
    # The same checks pass a good chat, which then finds no node: exit 3, not a bad-input error.
    rc = ctl.main(["submit-task", "--domain", "general", "--message", "hi", "--system", "be brief",
                   "--home", str(tmp_path)])
    assert rc == 3 and "NO_NODE" in capsys.readouterr().err


# -- on real nodes ----------------------------------------------------------------------

def aemctl(home, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "aemctl"), *args, "--home", str(home.root)], capture_output=True,
                          text=True, timeout=timeout)


def add_expert(node, *args: str) -> str:
    out = aemctl(node.home, "expert", "add", *args, "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)["capsule_id"]


@pytest.fixture(scope="module")
def chat_mesh(tmp_path_factory):
    """n0 pays; n1 hosts SmolLM2 (domain general); n2 hosts tiny models: "plain"
    (no chat template), "gone" (deleted once the node runs), "missing" (deleted
    before it starts) and "changed" (rewritten, same size, before it starts)."""
    root = tmp_path_factory.mktemp("chatmesh")
    mesh = Mesh(root, 3)
    p, h, t = mesh.nodes
    add_expert(h, str(smollm2_path()), "--domain", "general", "--price", "0.5")
    files = {d: write_tiny_llama_gguf(root / f"{d}.gguf", seed=1, **TINY_MODEL)
             for d in ("plain", "gone", "missing", "changed")}
    ids = {d: add_expert(t, str(f), "--domain", d, "--price", "0.1") for d, f in files.items()}
    files["missing"].unlink()
    before = files["changed"].stat()
    write_tiny_llama_gguf(files["changed"], seed=2, **TINY_MODEL)          # other weights, same size
    assert files["changed"].stat().st_size == before.st_size
    os.utime(files["changed"], ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    mesh.start_line()
    try:
        wait_for("ads at the payer", lambda: len(p.call("ads")) >= 3, timeout=90)
        yield mesh, files, ids
    except BaseException:
        print(mesh.logs())
        raise
    finally:
        mesh.close()


def test_chat_task_names_paris_through_the_mesh(chat_mesh):
    mesh, _, _ = chat_mesh
    p, h, _ = mesh.nodes
    out = aemctl(p.home, "submit-task", "--domain", "general", "--message", "What is the capital of France?",
                 "--system", "You are a helpful assistant.", "--max-tokens", "16", "--json")
    assert out.returncode == 0, out.stderr + mesh.logs()
    res = json.loads(out.stdout)
    assert "Paris" in res["output"] and res["host"] == h.account.hex() and res["price"] == 500_000
    # one line per task at the nodes' log level: served on the host, routed on the payer
    wait_for("the log lines", lambda: "served task " + res["task_id"][:16] in h.log_path.read_text()
             and "routed task " + res["task_id"][:16] in p.log_path.read_text(), timeout=30)
    line = next(x for x in h.log_path.read_text().splitlines() if "served task " + res["task_id"][:16] in x)
    assert "domain general" in line and "tokens/s" in line and "0.500000" in line


def test_empty_answer_is_not_charged(chat_mesh):
    mesh, _, _ = chat_mesh
    p, h, _ = mesh.nodes
    # Earlier tasks' receipts and acks cross by sync: start from one settled log on both,
    # the same root at one instant (equal counts alone can be the host's receipt against
    # the payer's ack, each not yet at the other).
    def settled():
        as_of = {"as_of": int(time.time())}
        return h.call("ledger_replay", as_of)["state_root"] == p.call("ledger_replay", as_of)["state_root"]
    wait_for("the host and the payer to hold one log", settled, timeout=60)
    before = h.call("ledger_replay")       # the host's own log holds any receipt at once
    # SmolLM2 ends its turn at once on the bare question as a raw completion.
    out = aemctl(p.home, "submit-task", "--domain", "general", "--prompt", "What is the capital of France?",
                 "--max-tokens", "16")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "no output" in out.stderr and "nothing is charged" in out.stderr
    after = h.call("ledger_replay")
    assert after["entries"] == before["entries"]
    assert after["balances"][p.account.hex()] == before["balances"][p.account.hex()]


def test_host_failures_reach_the_payer_with_their_reason(chat_mesh):
    mesh, files, _ = chat_mesh
    p = mesh.nodes[0]
    out = aemctl(p.home, "submit-task", "--domain", "plain", "--message", "hi", "--max-tokens", "4")
    assert out.returncode == 1 and "no chat template" in out.stderr, out.stderr
    files["gone"].unlink()
    out = aemctl(p.home, "submit-task", "--domain", "gone", "--prompt", "hi", "--max-tokens", "4")
    assert out.returncode == 1 and "no model file" in out.stderr, out.stderr
    assert "stream closed" not in out.stderr


def test_missing_or_changed_model_files_are_withdrawn_at_start(chat_mesh):
    mesh, files, ids = chat_mesh
    p, _, t = mesh.nodes
    domains = {a["domain"] for a in p.call("ads")}
    assert {"plain", "gone"} <= domains and not {"missing", "changed"} & domains
    log = t.log_path.read_text()
    assert f"capsule {ids['missing'][:16]}" in log and "missing" in log and "withdrawn" in log
    assert f"capsule {ids['changed'][:16]}" in log and "its hash is not the manifest's" in log
    assert f"capsule {ids['plain'][:16]} loaded" in log
    assert f"{files['plain']} was modified" not in log        # size and mtime as recorded: not re-hashed


def test_max_price_below_the_cheapest_ask_names_it_in_credits(chat_mesh):
    mesh, _, _ = chat_mesh
    out = aemctl(mesh.nodes[0].home, "submit-task", "--domain", "general", "--message", "hi",
                 "--max-price", "0.2")
    assert out.returncode == 1
    assert "0.200000" in out.stderr and "cheapest asks 0.500000" in out.stderr and "micro" not in out.stderr


def test_timeout_ends_at_the_deadline_with_exit_5(chat_mesh):
    mesh, _, _ = chat_mesh
    p = mesh.nodes[0]
    # A long streamed answer (the context's ~450 tokens, several seconds): each
    # chunk used to reset the socket's timeout, so it ran to the end and exited 0.
    out = aemctl(p.home, "submit-task", "--domain", "general", "--message", "Write a long story about a cat.",
                 "--max-tokens", "2000", "--timeout", "1.5", timeout=120)
    assert out.returncode == 5, out.stdout + out.stderr
    assert "TIMEOUT" in out.stderr and out.stderr.count("error:") == 1
