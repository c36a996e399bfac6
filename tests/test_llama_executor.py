"""LlamaExecutor on real llama.cpp, with GGUF files the suite writes itself.

The acceptance criterion: a generation equals what llama-cpp-python's own
``Llama(...).create_completion(prompt, max_tokens=N, temperature=T, seed=S)`` gives
for the same file (text, completion tokens, finish reason)."""

from __future__ import annotations

import threading
import time

import llama_cpp
import pytest
import trio

from aemd.executors.llama import (GenerationResult, LlamaExecutor, concurrency_from_memory,
                                  no_extra_bufts)
from aemd.executors.tinygguf import write_tiny_llama_gguf
from protocol.errors import BAD_VALUE, NOT_FOUND, TIMEOUT, TOO_LARGE, UNAVAILABLE, AemError

N_CTX = 512
PROMPTS = ["Hello world, the code", "x", "é漢字 <s> the\x00 patch"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    return {dt: write_tiny_llama_gguf(d / f"tiny-{dt}.gguf", dtype=dt, seed=3)
            for dt in ("F32", "F16", "Q8_0")}


@pytest.fixture(scope="module")
def executors(models):
    exs = {dt: LlamaExecutor(p, n_ctx=N_CTX, n_threads=1) for dt, p in models.items()}
    yield exs
    for ex in exs.values():
        ex.close()


def direct(path, dtype, prompt, max_tokens, temperature, seed):
    """llama-cpp-python called directly, freshly loaded, as a user would."""
    def load():
        return llama_cpp.Llama(str(path), n_ctx=N_CTX, n_threads=1, n_threads_batch=1,
                               verbose=False)
    if dtype == "Q8_0":          # quantised types crash on AMX CPUs with extra bufts on
        with no_extra_bufts():
            llm = load()
    else:
        llm = load()
    try:
        return llm.create_completion(prompt, max_tokens=max_tokens, temperature=temperature,
                                     seed=seed)
    finally:
        llm.close()


@pytest.mark.parametrize("dtype", ["F32", "F16", "Q8_0"])
def test_equals_direct_create_completion(models, executors, dtype):
    ex = executors[dtype]
    for prompt, max_tokens, temp_milli, seed in [
        (PROMPTS[0], 64, 0, 0), (PROMPTS[1], 7, 0, 5), (PROMPTS[2], 33, 0, 1),
        (PROMPTS[0], 48, 800, 42), (PROMPTS[2], 20, 1500, 7), (PROMPTS[1], 1, 0, 0),
    ]:
        want = direct(models[dtype], dtype, prompt, max_tokens, temp_milli / 1000, seed)
        got = ex.generate(prompt, max_tokens, seed=seed, temperature_milli=temp_milli)
        assert isinstance(got, GenerationResult)
        assert got.text == want["choices"][0]["text"]
        assert got.tokens_out == want["usage"]["completion_tokens"] == len(got.token_ids)
        assert got.prompt_tokens == want["usage"]["prompt_tokens"]
        assert got.finish_reason == want["choices"][0]["finish_reason"]


def test_extra_bufts_off_and_defaults_restored(executors):
    for ex in executors.values():
        assert ex._llm.model_params.use_extra_bufts is False
    assert llama_cpp.llama_cpp.llama_model_default_params().use_extra_bufts is True


def test_deterministic_across_loads(models):
    outs = []
    for _ in range(2):
        with LlamaExecutor(models["Q8_0"], n_ctx=N_CTX, n_threads=1) as ex:
            outs.append(ex.generate(PROMPTS[0], 100, seed=9))
    assert outs[0].token_ids == outs[1].token_ids and outs[0].tokens_out >= 100
    assert outs[0].output_bytes == outs[1].output_bytes
    assert outs[0].text == outs[1].text


def test_streamed_pieces_and_timings(executors):
    ex = executors["F16"]
    pieces = []
    r = ex.generate(PROMPTS[2], 80, seed=0, on_token=pieces.append)
    assert "".join(pieces) == r.text
    assert r.output_bytes.decode("utf-8", errors="ignore") == r.text
    assert 0 < r.first_token_ns <= r.last_token_ns <= r.total_ns
    again = ex.generate(PROMPTS[2], 80, seed=0)    # a reused model gives the same
    assert again.token_ids == r.token_ids


def test_context_limits(executors):
    ex = executors["F32"]
    r = ex.generate(PROMPTS[0], 10_000, seed=0)          # capped to the context
    assert r.prompt_tokens + r.tokens_out <= N_CTX + 1
    with pytest.raises(AemError) as e:
        ex.generate("the " * 600, 4, seed=0)
    assert e.value.code == TOO_LARGE


def test_bad_arguments(executors, tmp_path):
    ex = executors["F32"]
    for kwargs in (dict(prompt="", max_tokens=4, seed=0),
                   dict(prompt="a", max_tokens=0, seed=0),
                   dict(prompt="a", max_tokens=4, seed=-1),
                   dict(prompt="a", max_tokens=4, seed=0, temperature_milli=-5),
                   dict(prompt="\ud800", max_tokens=4, seed=0)):
        with pytest.raises(AemError) as e:
            ex.generate(**kwargs)
        assert e.value.code == BAD_VALUE
    with pytest.raises(AemError) as e:
        LlamaExecutor(tmp_path / "missing.gguf")
    assert e.value.code == NOT_FOUND
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(range(256)) * 4)
    with pytest.raises(AemError) as e:          # malformed: refused before llama.cpp
        LlamaExecutor(junk)
    assert e.value.code == BAD_VALUE
    junk.write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(16))
    with pytest.raises(AemError) as e:          # well formed, but no model in it
        LlamaExecutor(junk)
    assert e.value.code == UNAVAILABLE


def test_cancel_flag_stops_the_loop(executors):
    ex = executors["F32"]
    cancel = threading.Event()
    cancel.set()
    r = ex.generate(PROMPTS[0], 100, seed=0, cancel=cancel)
    assert r.finish_reason == "cancelled" and r.tokens_out == 0


def test_agenerate_and_timeout_stops_work(executors):
    ex = executors["F32"]
    count = [0]

    def slow(_piece):                        # about 5 ms a token: ~2.5 s for the context
        count[0] += 1
        time.sleep(0.005)

    async def main():
        limiter = trio.CapacityLimiter(1)
        ok = await ex.agenerate(PROMPTS[0], 16, seed=0, limiter=limiter, timeout_s=60)
        assert ok.tokens_out >= 16
        with pytest.raises(AemError) as e:
            await ex.agenerate(PROMPTS[0], 10_000, seed=0, on_token=slow, limiter=limiter,
                               timeout_s=0.3)
        assert e.value.code == TIMEOUT
        # the abandoned worker notices the flag at its next token and stops
        for _ in range(200):
            if not ex._lock.locked():
                break
            await trio.sleep(0.01)
        assert not ex._lock.locked()
        stopped_at = count[0]
        await trio.sleep(0.1)
        assert count[0] == stopped_at
        assert stopped_at < 450
        # the executor still works afterwards
        again = await ex.agenerate(PROMPTS[0], 16, seed=0, limiter=limiter, timeout_s=60)
        assert again.token_ids == ok.token_ids

    trio.run(main)


def test_concurrency_from_memory():
    assert concurrency_from_memory(0, 500) == 1
    assert concurrency_from_memory(1000, 300) == 3
    assert concurrency_from_memory(24_000, 6_000) == 4
    for args in ((100, 0), (-1, 10), (10, 1.5)):
        with pytest.raises(AemError):
            concurrency_from_memory(*args)
